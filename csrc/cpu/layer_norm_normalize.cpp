// layer_norm_normalize on the CPU: one pass over x for LayerNorm and the L2 normalisation
// together (row in cache), one pass back. Rows go in parallel; the weight and bias gradients
// are summed per fixed block of rows and then over blocks in order, so they are bitwise the
// same for any thread count. The [N, D] outputs use huge pages (cpu/huge_pages.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/simd.h"
#include "layer_norm_normalize.h"

namespace protoseg {
namespace {

constexpr int64_t kRowsPerBlock = 256;  // the weight/bias gradient's summation blocks

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_rows(const at::Tensor& x, const acc_t* w, const acc_t* b, acc_t eps, scalar_t* out, acc_t* stats) {
  const int64_t n = x.size(0), d = x.size(1), sx0 = x.stride(0), sx1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    acc_t* __restrict y = row.data();
    for (int64_t i = begin; i < end; ++i) {
      cpu::load_row(xp + i * sx0, sx1, d, y);
      const acc_t mean = cpu::sum(y, d) / static_cast<acc_t>(d);
      for (int64_t c = 0; c < d; ++c) y[c] -= mean;
      const acc_t rstd = acc_t(1) / std::sqrt(cpu::dot(y, y, d) / static_cast<acc_t>(d) + eps);
      for (int64_t c = 0; c < d; ++c) y[c] = y[c] * rstd * w[c] + b[c];
      const acc_t norm = std::sqrt(cpu::dot(y, y, d));
      const acc_t inv = acc_t(1) / std::max(norm, static_cast<acc_t>(kRowNormEps));
      scalar_t* o = out + i * d;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(y[c] * inv);
      stats[3 * i] = mean;
      stats[3 * i + 1] = rstd;
      stats[3 * i + 2] = norm;
    }
  });
}

// grad_x rows, and per block of kRowsPerBlock rows the partial weight and bias gradients
// partial[block] = (sum grad_y * z, sum grad_y).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_rows(const at::Tensor& x, const scalar_t* grad_out, const acc_t* w, const acc_t* b, const acc_t* stats,
                   scalar_t* grad_x, acc_t* partial) {
  const int64_t n = x.size(0), d = x.size(1), sx0 = x.stride(0), sx1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> zbuf(d), gbuf(d), tbuf(d);
    acc_t* __restrict z = zbuf.data();
    acc_t* __restrict gy = gbuf.data();
    acc_t* __restrict t = tbuf.data();
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* __restrict gw = partial + blk * 2 * d;
      acc_t* __restrict gb = gw + d;
      const int64_t row_end = std::min(n, (blk + 1) * kRowsPerBlock);
      for (int64_t i = blk * kRowsPerBlock; i < row_end; ++i) {
        const acc_t mean = stats[3 * i], rstd = stats[3 * i + 1], norm = stats[3 * i + 2];
        const acc_t s = acc_t(1) / std::max(norm, static_cast<acc_t>(kRowNormEps));
        cpu::load_row(xp + i * sx0, sx1, d, z);
        cpu::load_row(grad_out + i * d, 1, d, gy);
        for (int64_t c = 0; c < d; ++c) {
          z[c] = (z[c] - mean) * rstd;
          t[c] = (z[c] * w[c] + b[c]) * s;  // out
        }
        const acc_t dot = norm > static_cast<acc_t>(kRowNormEps) ? cpu::dot(gy, t, d) : acc_t(0);
        for (int64_t c = 0; c < d; ++c) gy[c] = (gy[c] - t[c] * dot) * s;
        for (int64_t c = 0; c < d; ++c) gw[c] += gy[c] * z[c];
        for (int64_t c = 0; c < d; ++c) gb[c] += gy[c];
        for (int64_t c = 0; c < d; ++c) t[c] = gy[c] * w[c];  // gradient of z
        const acc_t m1 = cpu::sum(t, d) * inv_d, m2 = cpu::dot(t, z, d) * inv_d;
        scalar_t* gx = grad_x + i * d;
        for (int64_t c = 0; c < d; ++c) gx[c] = static_cast<scalar_t>(rstd * (t[c] - m1 - z[c] * m2));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> layer_norm_normalize_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps) {
  check_layer_norm_args(x, weight, bias, eps);
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto out = cpu::empty_output({n, d}, x.options());
  auto stats = at::empty({n, 3}, x.options().dtype(acc));
  if (n == 0) return {out, stats};
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_normalize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t>(x, w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), static_cast<acc_t>(eps),
                           out.data_ptr<scalar_t>(), stats.data_ptr<acc_t>());
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_normalize_backward_cpu(const at::Tensor& grad_out,
                                                                                 const at::Tensor& x,
                                                                                 const at::Tensor& weight,
                                                                                 const at::Tensor& bias,
                                                                                 const at::Tensor& stats) {
  check_layer_norm_backward_args(grad_out, x, weight, bias, stats);
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto grad_x = cpu::empty_output({n, d}, x.options());
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  auto partial = at::zeros({blocks, 2, d}, x.options().dtype(acc));
  auto grad_weight = at::zeros({d}, x.options().dtype(acc));
  auto grad_bias = at::zeros({d}, x.options().dtype(acc));
  if (n > 0) {
    const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
    const auto g = grad_out.to(x.scalar_type()).contiguous();
    const auto st = stats.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_normalize_backward_cpu",
                                    [&] {
                                      using acc_t = at::opmath_type<scalar_t>;
                                      backward_rows<scalar_t>(x, g.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
                                                              b.data_ptr<acc_t>(), st.data_ptr<acc_t>(),
                                                              grad_x.data_ptr<scalar_t>(), partial.data_ptr<acc_t>());
                                    });
    // Blocks summed one after another: the same bits for any thread count.
    AT_DISPATCH_FLOATING_TYPES(acc, "layer_norm_normalize_backward_sum", [&] {
      const scalar_t* pp = partial.data_ptr<scalar_t>();
      scalar_t* gw = grad_weight.data_ptr<scalar_t>();
      scalar_t* gb = grad_bias.data_ptr<scalar_t>();
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t c = 0; c < d; ++c) {
          gw[c] += pp[blk * 2 * d + c];
          gb[c] += pp[blk * 2 * d + d + c];
        }
      }
    });
  }
  return {grad_x, grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("layer_norm_normalize", &protoseg::layer_norm_normalize_cpu);
  m.impl("layer_norm_normalize_backward", &protoseg::layer_norm_normalize_backward_cpu);
}
