// proto_contrast_loss on CUDA: the chunked pass keeping each row's logsumexp and target product,
// then a deterministic two-stage reduction to the two scalars. The backward recomputes the pass
// with the softmax-weighted second GEMM; the upstream gradients are read on the device.
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_PASS_KERNELS()
PROTOSEG_INSTANTIATE_CONTRAST_KERNELS()

// Host side: hidden from the per-architecture device passes (see kernels.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> proto_contrast_loss_cuda(const at::Tensor& x, const at::Tensor& prototypes,
                                                            const at::Tensor& target, double temperature,
                                                            int64_t ignore_index) {
  cuda::CudaExec ex(x.device());
  return cuda::proto_contrast_loss(ex, x, prototypes, target, temperature, ignore_index);
}

at::Tensor proto_contrast_loss_backward_cuda(const at::Tensor& grad_ppc, const at::Tensor& grad_ppd,
                                             const at::Tensor& x, const at::Tensor& prototypes,
                                             const at::Tensor& target, double temperature, int64_t ignore_index) {
  cuda::CudaExec ex(x.device());
  return cuda::proto_contrast_loss_backward(ex, grad_ppc, grad_ppd, x, prototypes, target, temperature,
                                            ignore_index);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("proto_contrast_loss", &protoseg::proto_contrast_loss_cuda);
  m.impl("proto_contrast_loss_backward", &protoseg::proto_contrast_loss_backward_cuda);
}
#endif  // __CUDA_ARCH__
