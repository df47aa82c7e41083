// scatter_mean on CUDA: a sorted-segment reduction (stable sort by segment, then each thread
// adds one channel of one segment in pixel order); no floating-point atomics, bitwise
// deterministic. The backward is an elementwise gather.
#include "cuda/scatter_mean.cuh"

#define PROTOSEG_SCATTER_KERNELS(T)                                                                     \
  template __global__ void protoseg::cuda::scatter_mean_kernel<T>(protoseg::cuda::ScatterMeanParams<T>); \
  template __global__ void protoseg::cuda::scatter_mean_backward_kernel<T>(                              \
      protoseg::cuda::ScatterMeanBackwardParams<T>);
PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_SCATTER_KERNELS)

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("scatter_mean", &protoseg::cuda::scatter_mean<protoseg::cuda::CudaExec>);
  m.impl("scatter_mean_backward", &protoseg::cuda::scatter_mean_backward<protoseg::cuda::CudaExec>);
}
#endif  // __CUDA_ARCH__
