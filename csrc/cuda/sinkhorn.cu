// sinkhorn on CUDA: all classes at once over pixels stably sorted by class, in double; each
// iteration is one segmented reduction to [K, M] plus one per-pixel step, with no host
// synchronisation inside the loop. Bitwise deterministic. Also its steps as separate ops, for
// the distributed caller (the same kernels, on the plan in pixel order).
#include "cuda/sinkhorn.cuh"

#define PROTOSEG_SINKHORN_TYPED_KERNELS(T)                                                                        \
  template __global__ void protoseg::cuda::segment_reduce_kernel<T>(protoseg::cuda::SegmentReduceParams<T>); \
  template __global__ void protoseg::cuda::sinkhorn_init_kernel<T>(protoseg::cuda::SinkhornInitParams<T>);
PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_SINKHORN_TYPED_KERNELS)
template __global__ void protoseg::cuda::sinkhorn_scale_kernel<protoseg::cuda::kSinkhornThreads>(
    protoseg::cuda::SinkhornScaleParams);
template __global__ void protoseg::cuda::sinkhorn_step_kernel<protoseg::cuda::kSinkhornThreads>(
    protoseg::cuda::SinkhornStepParams);
template __global__ void protoseg::cuda::sinkhorn_finish_kernel<protoseg::cuda::kSinkhornThreads>(
    protoseg::cuda::SinkhornFinishParams);

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("sinkhorn", &protoseg::cuda::sinkhorn<protoseg::cuda::CudaExec>);
  m.impl("sinkhorn_segments", &protoseg::cuda::sinkhorn_segments<protoseg::cuda::CudaExec>);
  m.impl("segment_reduce", &protoseg::cuda::segment_reduce<protoseg::cuda::CudaExec>);
  m.impl("sinkhorn_exp", &protoseg::cuda::sinkhorn_exp<protoseg::cuda::CudaExec>);
  m.impl("sinkhorn_scale", &protoseg::cuda::sinkhorn_scale<protoseg::cuda::CudaExec>);
  m.impl("sinkhorn_step", &protoseg::cuda::sinkhorn_step<protoseg::cuda::CudaExec>);
  m.impl("sinkhorn_finish", &protoseg::cuda::sinkhorn_finish<protoseg::cuda::CudaExec>);
}
#endif  // __CUDA_ARCH__
