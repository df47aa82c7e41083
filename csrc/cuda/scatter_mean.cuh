// Device code of scatter_mean: a sorted-segment reduction (no floating-point atomics). Pixels
// are stably sorted by segment (common.cuh); each thread owns one (segment, channel) pair and
// adds the segment's rows in pixel order, exactly as the CPU kernel does, so the result is
// bitwise the same on every run (and equal to the CPU's for float32/float64).
#pragma once

#include "cuda/common.cuh"

namespace protoseg {
namespace cuda {

template <class scalar_t>
struct ScatterMeanParams {
  const scalar_t* x;  // [N, D] with strides
  int64_t d, sx0, sx1;
  const int64_t* perm;     // [n] sorted position -> pixel
  int64_t n;               // entries of perm (what the launch's cost is counted from)
  const int64_t* offsets;  // [S + 1]
  int64_t num_segments;
  int64_t channel_blocks;  // ceil(D / kThreads)
  scalar_t* mean;          // [S, D] contiguous, zero-initialised
  int64_t* count;          // [S]
};

constexpr int kScatterThreads = 128;

// Block b handles segment b / channel_blocks, channels (b % channel_blocks) * kThreads + t:
// consecutive threads read consecutive channels of the same row (coalesced for contiguous x).
template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kScatterThreads) scatter_mean_kernel(ScatterMeanParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const int64_t work = p.num_segments * p.channel_blocks;
  for (int64_t b = blockIdx.x; b < work; b += gridDim.x) {
    const int64_t s = b / p.channel_blocks;
    const int64_t c = (b % p.channel_blocks) * kScatterThreads + threadIdx.x;
    const int64_t begin = p.offsets[s], end = p.offsets[s + 1];
    if (c == 0) p.count[s] = end - begin;
    if (c >= p.d || begin == end) continue;
    acc sum = 0;
    for (int64_t i = begin; i < end; ++i) sum += static_cast<acc>(p.x[p.perm[i] * p.sx0 + c * p.sx1]);
    p.mean[s * p.d + c] = static_cast<scalar_t>(sum / static_cast<acc>(end - begin));
  }
}

// grad_x[n, c] = grad_mean[index[n], c] / count[index[n]]; 0 for skipped pixels (negative or
// out-of-range index) and empty segments.
template <class scalar_t>
struct ScatterMeanBackwardParams {
  const scalar_t* grad_mean;  // [S, D] contiguous
  const int64_t* index;       // [N]
  const int64_t* count;       // [S]
  int64_t n, d, num_segments;
  scalar_t* grad_x;  // [N, D] contiguous
};

constexpr int kScatterBackwardThreads = 256;

template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kScatterBackwardThreads) scatter_mean_backward_kernel(
    ScatterMeanBackwardParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const int64_t total = p.n * p.d;
  for (int64_t e = int64_t(blockIdx.x) * kScatterBackwardThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kScatterBackwardThreads) {
    const int64_t i = e / p.d, c = e % p.d;
    const int64_t s = p.index[i];
    const int64_t cnt = (s >= 0 && s < p.num_segments) ? p.count[s] : 0;
    if (cnt <= 0) {
      p.grad_x[e] = scalar_t(0);
    } else {
      const acc inv = acc(1) / static_cast<acc>(cnt);
      p.grad_x[e] = static_cast<scalar_t>(static_cast<acc>(p.grad_mean[s * p.d + c]) * inv);
    }
  }
}

}  // namespace cuda
}  // namespace protoseg
