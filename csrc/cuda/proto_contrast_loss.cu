// proto_contrast_loss on CUDA: the chunked pass keeping each row's logsumexp and target product,
// then a deterministic two-stage reduction to the two scalars. The backward recomputes the pass
// with the softmax-weighted second GEMM; the upstream gradients are read on the device.
#include "cuda/proto_contrast_loss.cuh"

#define PROTOSEG_CONTRAST_ACC_KERNELS(T)                                                                        \
  template __global__ void protoseg::cuda::contrast_partials_kernel<T>(protoseg::cuda::ContrastPartialsParams<T>); \
  template __global__ void protoseg::cuda::contrast_coef_kernel<T>(protoseg::cuda::ContrastCoefParams<T>);
#define PROTOSEG_CONTRAST_FINALIZE_KERNEL(T) \
  template __global__ void protoseg::cuda::contrast_finalize_kernel<T>(protoseg::cuda::ContrastFinalizeParams<T>);
PROTOSEG_CONTRAST_ACC_KERNELS(float)
PROTOSEG_CONTRAST_ACC_KERNELS(double)
PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_CONTRAST_FINALIZE_KERNEL)

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("proto_contrast_loss", &protoseg::cuda::proto_contrast_loss<protoseg::cuda::CudaExec>);
  m.impl("proto_contrast_loss_backward", &protoseg::cuda::proto_contrast_loss_backward<protoseg::cuda::CudaExec>);
}
#endif  // __CUDA_ARCH__
