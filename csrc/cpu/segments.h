// Stable counting sort of pixels by segment id, shared by sinkhorn and scatter_mean: the
// pixels of segment s are order[offsets[s] .. offsets[s + 1]), in increasing pixel order.
// Negative ids are dropped. Sequential and O(N + S): the order never depends on threads.
#pragma once

#include <cstdint>
#include <vector>

namespace protoseg {
namespace cpu {

struct Segments {
  std::vector<int64_t> offsets;  // [S + 1]
  std::vector<int64_t> order;    // pixels with id >= 0, grouped by id
};

inline Segments sort_by_segment(const int64_t* ids, int64_t n, int64_t num_segments) {
  Segments seg;
  seg.offsets.assign(num_segments + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] >= 0) ++seg.offsets[ids[i] + 1];
  for (int64_t s = 0; s < num_segments; ++s) seg.offsets[s + 1] += seg.offsets[s];
  seg.order.resize(seg.offsets[num_segments]);
  std::vector<int64_t> cursor(seg.offsets.begin(), seg.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] >= 0) seg.order[cursor[ids[i]]++] = i;
  return seg;
}

}  // namespace cpu
}  // namespace protoseg
