// proto_similarity on CUDA: chunks of pixels through cuBLAS into a bounded tile, reduced by the
// fused max/argmax epilogue (prototype_pass.cuh); the backward scatters grad_scores into a tile at
// the winning prototypes and multiplies it by p_hat (one more cuBLAS GEMM per chunk).
// The launch sequence is launchers.h, shared with the CPU grid executor used in tests.
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_PASS_KERNELS()

// Host side: hidden from the per-architecture device passes (see kernels.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> proto_similarity_cuda(const at::Tensor& x, const at::Tensor& prototypes) {
  cuda::CudaExec ex(x.device());
  return cuda::proto_similarity(ex, x, prototypes);
}

at::Tensor proto_similarity_backward_cuda(const at::Tensor& grad_scores, const at::Tensor& x,
                                          const at::Tensor& prototypes, const at::Tensor& index) {
  cuda::CudaExec ex(x.device());
  return cuda::proto_similarity_backward(ex, grad_scores, x, prototypes, index);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("proto_similarity", &protoseg::proto_similarity_cuda);
  m.impl("proto_similarity_backward", &protoseg::proto_similarity_backward_cuda);
}
#endif  // __CUDA_ARCH__
