// scatter_mean on the CPU: a sorted-segment reduction. Pixels are counting-sorted by index
// once; each segment then sums its rows in pixel order (segments in parallel), so the result is
// bitwise the same for any thread count. No atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/huge_pages.h"
#include "cpu/segments.h"

namespace protoseg {
namespace {

void check_segment_index(const at::Tensor& index, const at::Tensor& x, int64_t num_segments) {
  check_index_vector(index, "index", x.size(0), x);
  TORCH_CHECK(num_segments >= 0, "num_segments must be >= 0 (got ", num_segments, ")");
  const auto idx = index.contiguous();
  check_range_host(idx.data_ptr<int64_t>(), idx.numel(), num_segments, "index", "num_segments",
                   /*allow_negative=*/true, 0, false);
}

std::tuple<at::Tensor, at::Tensor> scatter_mean_cpu(const at::Tensor& x, const at::Tensor& index,
                                                    int64_t num_segments) {
  check_embeddings(x);
  check_segment_index(index, x, num_segments);
  const int64_t n = x.size(0), d = x.size(1);
  auto mean = at::zeros({num_segments, d}, x.options());
  auto count = at::zeros({num_segments}, index.options());
  if (n == 0 || num_segments == 0) return {mean, count};
  const auto idx = index.contiguous();
  const auto seg = cpu::sort_by_segment(idx.data_ptr<int64_t>(), n, num_segments);
  int64_t* cp = count.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_segments; ++s) cp[s] = seg.offsets[s + 1] - seg.offsets[s];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    scalar_t* mp = mean.data_ptr<scalar_t>();
    at::parallel_for(0, num_segments, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(d);
      for (int64_t s = b; s < e; ++s) {
        const int64_t begin = seg.offsets[s], end = seg.offsets[s + 1];
        if (begin == end) continue;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = begin; j < end; ++j) {
          const scalar_t* row = xp + seg.order[j] * sx0;
          for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<acc_t>(row[c * sx1]);
        }
        const acc_t cnt = static_cast<acc_t>(end - begin);
        for (int64_t c = 0; c < d; ++c) mp[s * d + c] = static_cast<scalar_t>(acc[c] / cnt);
      }
    });
  });
  return {mean, count};
}

at::Tensor scatter_mean_backward_cpu(const at::Tensor& grad_mean, const at::Tensor& index, const at::Tensor& count) {
  TORCH_CHECK(grad_mean.dim() == 2, "grad_mean must be [S, D] (got ", shape_str(grad_mean), ")");
  check_floating(grad_mean, "grad_mean");
  const int64_t s = grad_mean.size(0), d = grad_mean.size(1);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "index must be a [N] int64 tensor (got ", shape_str(index), " ", index.scalar_type(), ")");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == s && count.scalar_type() == at::kLong,
              "count must be [S] int64 with S == grad_mean.size(0) == ", s, " (got ", shape_str(count), " ",
              count.scalar_type(), ")");
  const int64_t n = index.size(0);
  const auto idx = index.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  check_range_host(ip, n, s, "index", "num_segments", /*allow_negative=*/true, 0, false);
  auto grad_x = cpu::empty_output({n, d}, grad_mean.options());
  if (n == 0) return grad_x;
  const auto g = grad_mean.contiguous();
  const auto cnt = count.contiguous();
  const int64_t* cp = cnt.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scatter_mean_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        scalar_t* row = out + i * d;
        const int64_t seg = ip[i];
        if (seg < 0 || cp[seg] == 0) {
          std::fill(row, row + d, scalar_t(0));
          continue;
        }
        const acc_t inv = acc_t(1) / static_cast<acc_t>(cp[seg]);
        for (int64_t c = 0; c < d; ++c) row[c] = static_cast<scalar_t>(static_cast<acc_t>(gp[seg * d + c]) * inv);
      }
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("scatter_mean", &protoseg::scatter_mean_cpu);
  m.impl("scatter_mean_backward", &protoseg::scatter_mean_backward_cpu);
}
