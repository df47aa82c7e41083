// sinkhorn on CUDA: all classes at once over pixels stably sorted by class, in double; each
// iteration is one segmented reduction to [K, M] plus one per-pixel step, with no host
// synchronisation inside the loop (sinkhorn.cuh). Bitwise deterministic.
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_SINKHORN_KERNELS()

// Host side: hidden from the per-architecture device passes (see kernels.cuh).
#ifndef __CUDA_ARCH__
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& labels,
                                                 int64_t num_classes, int64_t iterations, double epsilon) {
  const c10::cuda::CUDAGuard guard(scores.device());
  cuda::CudaExec ex(c10::cuda::getCurrentCUDAStream());
  return cuda::sinkhorn(ex, scores, labels, num_classes, iterations, epsilon);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) { m.impl("sinkhorn", &protoseg::sinkhorn_cuda); }
#endif  // __CUDA_ARCH__
