// layer_norm_normalize on CUDA: the ATen composite of csrc/layer_norm_normalize.h (LayerNorm, a
// row norm, elementwise passes). Correct and deterministic (no atomics in these reductions), not
// yet the single fused pass the CPU kernel is. Host code only, so a .cpp: nvcc has nothing to do.
// No device guard: every ATen op guards its own device, and the composite checks the arguments'
// devices first.
#include <torch/library.h>

#include "layer_norm_normalize.h"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> layer_norm_normalize_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                             const at::Tensor& bias, double eps) {
  return composite::layer_norm_normalize(x, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_normalize_backward_cuda(const at::Tensor& grad_out,
                                                                                  const at::Tensor& x,
                                                                                  const at::Tensor& weight,
                                                                                  const at::Tensor& bias,
                                                                                  const at::Tensor& stats) {
  return composite::layer_norm_normalize_backward(grad_out, x, weight, bias, stats);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("layer_norm_normalize", &protoseg::layer_norm_normalize_cuda);
  m.impl("layer_norm_normalize_backward", &protoseg::layer_norm_normalize_backward_cuda);
}
