// scatter_mean on CUDA: a sorted-segment reduction (stable sort by segment, then each thread
// adds one channel of one segment in pixel order); no floating-point atomics, bitwise
// deterministic. The backward is an elementwise gather.
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_SCATTER_KERNELS()

// Host side: hidden from the per-architecture device passes (see kernels.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> scatter_mean_cuda(const at::Tensor& x, const at::Tensor& index,
                                                     int64_t num_segments) {
  cuda::CudaExec ex(x.device());
  return cuda::scatter_mean(ex, x, index, num_segments);
}

at::Tensor scatter_mean_backward_cuda(const at::Tensor& grad_mean, const at::Tensor& index, const at::Tensor& count) {
  cuda::CudaExec ex(grad_mean.device());
  return cuda::scatter_mean_backward(ex, grad_mean, index, count);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("scatter_mean", &protoseg::scatter_mean_cuda);
  m.impl("scatter_mean_backward", &protoseg::scatter_mean_backward_cuda);
}
#endif  // __CUDA_ARCH__
