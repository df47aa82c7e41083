// Device helpers shared by every CUDA kernel file: accumulation types, deterministic warp and
// block reductions, the device-side range check and the sorted-segment offsets.
// Device code only (raw pointers and sizes, no ATen): it compiles with nvcc and, through
// cuda/portability.h, with the host compiler for the CPU grid executor.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/portability.h"

namespace protoseg {
namespace cuda {

constexpr double kNormEps = 1e-12;  // as F.normalize
constexpr int kWarpSize = 32;

// fp32 accumulation for half, bfloat16 and float; fp64 for double.
template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <class T>
using acc_t = typename Acc<T>::type;

// Butterfly reductions: every lane ends with the same value, combined in a fixed order, so the
// result does not depend on timing (deterministic).
template <class T>
PS_DEVICE T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += ps::shfl_xor(v, offset);
  return v;
}
template <class T>
PS_DEVICE T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = ps::max(v, ps::shfl_xor(v, offset));
  return v;
}

// Sum over the block (blockDim.x == kThreads, a multiple of 32); every thread gets the result.
// Warp partials are added in warp order. Ends with a barrier so the scratch can be reused.
template <int kThreads, class T>
PS_DEVICE T block_sum(T v) {
  static_assert(kThreads % kWarpSize == 0, "block_sum needs whole warps");
  PS_SHARED_ARRAY(T, partial, kThreads / kWarpSize);
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) partial[warp] = v;
  ps::sync_threads();
  T total = partial[0];
  for (int w = 1; w < kThreads / kWarpSize; ++w) total += partial[w];
  ps::sync_threads();
  return total;
}

// ---- device-side range check ----------------------------------------------------------------
// Labels, targets and indices live on the GPU; checking them on the host would copy them. This
// kernel records the position of the first offending entry with an integer atomicMin into
// `first_bad` (initialised to n); the host reads that one value once, before any kernel uses
// the vector, and raises naming the entry (see range_check_host.h). The kernels themselves also
// treat out-of-range entries as ignored, so nothing reads or writes out of bounds even if the
// check were skipped: bad input can raise, never corrupt memory.
struct RangeCheckParams {
  const int64_t* values;  // [n]
  int64_t n;
  int64_t upper;           // valid: [0, upper)
  bool allow_negative;     // negative entries are "ignored", not errors
  bool has_ignore;         // entries equal to `ignore` are fine
  int64_t ignore;
  unsigned long long* first_bad;  // [1], n when all entries are valid
};

constexpr int kRangeCheckThreads = 256;

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) range_check_kernel(RangeCheckParams p) {
  unsigned long long first = static_cast<unsigned long long>(p.n);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t v = p.values[i];
    const bool ok = (v >= 0 && v < p.upper) || (p.allow_negative && v < 0) || (p.has_ignore && v == p.ignore);
    if (!ok) {
      first = static_cast<unsigned long long>(i);
      break;  // later entries of this thread have larger positions
    }
  }
  if (first < static_cast<unsigned long long>(p.n)) ps::atomic_min_u64(p.first_bad, first);
}

// ---- sorted segments ------------------------------------------------------------------------
// Pixels are grouped by segment id (class for Sinkhorn, bucket for scatter_mean) with a stable
// sort of `keys` (cub radix sort through at::sort, deterministic): key = id for ids in
// [0, S), S for negative (ignored) ids, so ignored pixels sort last. offsets[s] is the first
// sorted position with key >= s, for s in [0, S]; segment s is [offsets[s], offsets[s + 1]).

struct SegmentKeysParams {
  const int64_t* ids;  // [n]
  int64_t n;
  int64_t num_segments;
  int64_t* keys;  // [n]
};

constexpr int kSegmentThreads = 256;

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) segment_keys_kernel(SegmentKeysParams p) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t v = p.ids[i];
    p.keys[i] = (v >= 0 && v < p.num_segments) ? v : p.num_segments;
  }
}

struct SegmentOffsetsParams {
  const int64_t* sorted_keys;  // [n], non-decreasing, values in [0, S]
  int64_t n;
  int64_t num_segments;  // S
  int64_t* offsets;      // [S + 1]
};

// Position i in [0, n] writes offsets[s] = i for every s in (key[i - 1], key[i]] (key[-1] = -1,
// key[n] = S): each s in [0, S] is written exactly once, no atomics.
template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) segment_offsets_kernel(SegmentOffsetsParams p) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i <= p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t prev = i == 0 ? -1 : p.sorted_keys[i - 1];
    const int64_t cur = i == p.n ? p.num_segments : p.sorted_keys[i];
    for (int64_t s = prev + 1; s <= cur; ++s) p.offsets[s] = i;
  }
}

// Grid size for a grid-stride loop over `work` items with `threads` per block.
PS_HD unsigned grid_for(int64_t work, int threads, int64_t max_blocks = int64_t{1} << 20) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

}  // namespace cuda
}  // namespace protoseg
