// The kernels every op with an index vector launches (the range check) and the two that group
// pixels by segment (sinkhorn, scatter_mean), each instantiated once, here, together with the
// host functions that launch them: the other translation units see only their declarations
// (cuda_exec.cuh).
#include "cuda/common.cuh"

template __global__ void protoseg::cuda::range_check_kernel<protoseg::cuda::kRangeCheckThreads>(
    protoseg::cuda::RangeCheckParams);
template __global__ void protoseg::cuda::segment_keys_kernel<protoseg::cuda::kSegmentThreads>(
    protoseg::cuda::SegmentKeysParams);
template __global__ void protoseg::cuda::segment_offsets_kernel<protoseg::cuda::kSegmentThreads>(
    protoseg::cuda::SegmentOffsetsParams);

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace cuda {
PROTOSEG_COMMON_HOST_FUNCTIONS(template, CudaExec)
}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
