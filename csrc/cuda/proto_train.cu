// proto_train on CUDA: the fused training pass. Per chunk: S = x_hat p_hat^T (cuBLAS), one
// epilogue for max/argmax, own-class scores and the row logsumexp (exp written in place), then
// the second GEMM softmax(S) p_hat for `weighted`. The backward is one GEMM per chunk
// (the gradient coefficients scattered into a [rows, K*M] tile, times p_hat). The optional
// LayerNorm runs as an ATen composite around them (cuda/launchers.h).
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_PASS_KERNELS()

// Host side: hidden from the per-architecture device passes (see kernels.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace {

cuda::TrainOutputs proto_train_cuda(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& labels,
                                    double temperature, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, double eps) {
  cuda::CudaExec ex(x.device());
  return cuda::proto_train(ex, x, prototypes, labels, temperature, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_train_backward_cuda(
    const std::optional<at::Tensor>& grad_scores, const std::optional<at::Tensor>& grad_own,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& index, const at::Tensor& weighted, double temperature,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& stats) {
  cuda::CudaExec ex(x.device());
  return cuda::proto_train_backward(ex, grad_scores, grad_own, grad_lse, x, prototypes, labels, index, weighted,
                                    temperature, weight, bias, stats);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("proto_train", &protoseg::proto_train_cuda);
  m.impl("proto_train_backward", &protoseg::proto_train_backward_cuda);
}
#endif  // __CUDA_ARCH__
