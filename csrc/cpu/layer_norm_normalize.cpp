// layer_norm_normalize on the CPU: one pass over x for LayerNorm and the L2 normalisation
// together (row in cache), one pass back. Rows go in parallel; the weight and bias gradients
// are summed per fixed block of rows and then over blocks in order, so they are bitwise the
// same for any thread count. The same row kernels serve proto_train (cpu/kernels_impl.h); the
// [N, D] outputs use huge pages (cpu/huge_pages.h).
#include <torch/library.h>

#include "cpu/huge_pages.h"
#include "cpu/kernels.h"
#include "layer_norm_normalize.h"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> layer_norm_normalize_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps) {
  check_layer_norm_args(x, weight, bias, eps);
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto out = cpu::empty_output({n, d}, x.options());
  auto stats = at::empty({n, 3}, x.options().dtype(acc));
  if (n == 0) return {out, stats};
  const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  cpu::PassArgs a;
  a.x = x;
  a.norm = {w.data_ptr(), b.data_ptr(), eps};
  a.x_hat = out.data_ptr();
  a.stats = stats.data_ptr();
  cpu::kernels().pass(a);
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
  auto partial = at::empty({cpu::grad_blocks(n), 2, d}, x.options().dtype(acc));
  if (n > 0) {
    const auto w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
    const auto g = grad_out.to(x.scalar_type()).contiguous();
    const auto st = stats.contiguous();
    cpu::GradArgs a;
    a.x = x;
    a.norm = {w.data_ptr(), b.data_ptr(), 0.0};
    a.stats = st.data_ptr();
    a.grad_out = g.data_ptr();
    a.grad_x = grad_x.data_ptr();
    a.norm_partial = partial.data_ptr();
    cpu::kernels().grad(a);
  }
  auto [grad_weight, grad_bias] = cpu::sum_norm_partials(partial, weight.scalar_type());
  return {grad_x, grad_weight, grad_bias.to(bias.scalar_type())};
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("layer_norm_normalize", &protoseg::layer_norm_normalize_cpu);
  m.impl("layer_norm_normalize_backward", &protoseg::layer_norm_normalize_backward_cpu);
}
