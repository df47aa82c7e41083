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

// ---- host side: launch costs (the roofline model) and the launch sequence ----------------
// Hidden from nvcc's per-architecture device passes (parsing ATen there would triple the build)
#ifndef __CUDA_ARCH__
#include "checks.h"

namespace protoseg {
namespace cuda {

template <class T>
LaunchCost launch_cost(const ScatterMeanParams<T>& p) {
  const double e = double(p.n) * p.d;
  return {e * sizeof(T) + p.n * costs::kIndex, double(p.num_segments) * p.d * sizeof(T) + p.num_segments * costs::kIndex,
          e};
}

template <class T>
LaunchCost launch_cost(const ScatterMeanBackwardParams<T>& p) {
  const double e = double(p.n) * p.d;
  return {double(p.num_segments) * p.d * sizeof(T) + p.n * costs::kIndex + p.num_segments * costs::kIndex,
          e * sizeof(T), e};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> scatter_mean(const at::Tensor& x, const at::Tensor& index,
                                                int64_t num_segments) {
  Exec ex(x.device());
  check_embeddings(x);
  check_index_vector(index, "index", x.size(0), x);
  TORCH_CHECK(num_segments >= 0, "num_segments must be >= 0 (got ", num_segments, ")");
  const int64_t n = x.size(0), d = x.size(1);
  auto mean = at::zeros({num_segments, d}, x.options());
  auto count = at::zeros({num_segments}, index.options());
  if (n == 0 || num_segments == 0) return {mean, count};
  const auto idx = index.contiguous();
  check_range_device(ex, idx, num_segments, "index", "num_segments", /*allow_negative=*/true, 0, false);
  at::Tensor keys, perm, offsets;
  std::tie(keys, perm, offsets) = sort_by_segment(ex, idx, num_segments);
  const int64_t channel_blocks = std::max<int64_t>(1, (d + kScatterThreads - 1) / kScatterThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_mean_cuda", [&] {
    ex.launch(scatter_mean_kernel<scalar_t>, grid_for(num_segments * channel_blocks, 1), kScatterThreads, 0,
              ScatterMeanParams<scalar_t>{.x = x.data_ptr<scalar_t>(),
                                          .d = d,
                                          .sx0 = x.stride(0),
                                          .sx1 = x.stride(1),
                                          .perm = perm.data_ptr<int64_t>(),
                                          .n = perm.numel(),
                                          .offsets = offsets.data_ptr<int64_t>(),
                                          .num_segments = num_segments,
                                          .channel_blocks = channel_blocks,
                                          .mean = mean.data_ptr<scalar_t>(),
                                          .count = count.data_ptr<int64_t>()});
  });
  return {mean, count};
}

template <class Exec>
at::Tensor scatter_mean_backward(const at::Tensor& grad_mean, const at::Tensor& index,
                                 const at::Tensor& count) {
  Exec ex(grad_mean.device());
  TORCH_CHECK(grad_mean.dim() == 2, "grad_mean must be [S, D] (got ", shape_str(grad_mean), ")");
  check_floating(grad_mean, "grad_mean");
  const int64_t s = grad_mean.size(0), d = grad_mean.size(1);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "index must be a [N] int64 tensor (got ",
              shape_str(index), " ", index.scalar_type(), ")");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == s && count.scalar_type() == at::kLong,
              "count must be [S] int64 with S == grad_mean.size(0) == ", s, " (got ", shape_str(count), " ",
              count.scalar_type(), ")");
  check_same_device(index, grad_mean, "index", "grad_mean");
  check_same_device(count, grad_mean, "count", "grad_mean");
  const int64_t n = index.size(0);
  auto grad_x = at::empty({n, d}, grad_mean.options());
  if (n == 0 || d == 0) return grad_x;
  const auto idx = index.contiguous();
  check_range_device(ex, idx, s, "index", "num_segments", /*allow_negative=*/true, 0, false);
  const auto g = grad_mean.contiguous();
  const auto cnt = count.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scatter_mean_backward_cuda", [&] {
    ex.launch(scatter_mean_backward_kernel<scalar_t>, grid_for(n * d, kScatterBackwardThreads),
              kScatterBackwardThreads, 0,
              ScatterMeanBackwardParams<scalar_t>{.grad_mean = g.data_ptr<scalar_t>(),
                                                  .index = idx.data_ptr<int64_t>(),
                                                  .count = cnt.data_ptr<int64_t>(),
                                                  .n = n,
                                                  .d = d,
                                                  .num_segments = s,
                                                  .grad_x = grad_x.data_ptr<scalar_t>()});
  });
  return grad_x;
}

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
