// The chunked pixel x prototype pass and the gradient assembly, shared by proto_similarity
// and proto_train: their kernels are instantiated once, here, together with
// the host functions that launch them; the ops' translation units see only their declarations
// (cuda_exec.cuh).
#include "cuda/prototype_pass.cuh"

#define PROTOSEG_PASS_KERNELS(T)                                                                         \
  template __global__ void protoseg::cuda::normalize_rows_kernel<T>(protoseg::cuda::NormalizeParams<T>); \
  template __global__ void protoseg::cuda::pass_epilogue_kernel<T>(protoseg::cuda::EpilogueParams<T>);   \
  template __global__ void protoseg::cuda::grad_tile_kernel<T>(protoseg::cuda::GradTileParams<T>);       \
  template __global__ void protoseg::cuda::assemble_grad_kernel<T>(protoseg::cuda::GradParams<T>);
PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_PASS_KERNELS)

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace cuda {
#define PROTOSEG_PASS_INSTANTIATE(T) PROTOSEG_PASS_HOST_FUNCTIONS(template, CudaExec, T)
PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_PASS_INSTANTIATE)
}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
