// sinkhorn on CUDA: all classes at once over pixels stably sorted by class, in double; each
// iteration is one segmented reduction to [K, M] plus one per-pixel step, with no host
// synchronisation inside the loop (sinkhorn.cuh). Bitwise deterministic. Also its steps as
// separate ops, for the distributed caller (the same kernels, on the plan in pixel order).
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_SINKHORN_KERNELS()

// Host side: hidden from the per-architecture device passes (see kernels.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> sinkhorn_cuda(const at::Tensor& scores, const at::Tensor& labels,
                                                 int64_t num_classes, int64_t iterations, double epsilon) {
  cuda::CudaExec ex(scores.device());
  return cuda::sinkhorn(ex, scores, labels, num_classes, iterations, epsilon);
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_segments_cuda(const at::Tensor& labels, int64_t num_classes) {
  cuda::CudaExec ex(labels.device());
  return cuda::sinkhorn_segments(ex, labels, num_classes);
}

at::Tensor segment_reduce_cuda(const at::Tensor& values, const at::Tensor& perm, const at::Tensor& offsets,
                               bool is_max, bool all_columns) {
  cuda::CudaExec ex(values.device());
  return cuda::segment_reduce(ex, values, perm, offsets, is_max, all_columns);
}

at::Tensor sinkhorn_exp_cuda(const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& class_max,
                             double epsilon) {
  cuda::CudaExec ex(scores.device());
  return cuda::sinkhorn_exp(ex, scores, labels, class_max, epsilon);
}

at::Tensor sinkhorn_scale_cuda(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& class_total) {
  cuda::CudaExec ex(plan.device());
  return cuda::sinkhorn_scale(ex, plan, labels, class_total);
}

at::Tensor sinkhorn_step_cuda(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& rows,
                              const at::Tensor& count) {
  cuda::CudaExec ex(plan.device());
  return cuda::sinkhorn_step(ex, plan, labels, rows, count);
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_finish_cuda(const at::Tensor& plan, const at::Tensor& labels,
                                                        const at::Tensor& count) {
  cuda::CudaExec ex(plan.device());
  return cuda::sinkhorn_finish(ex, plan, labels, count);
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("sinkhorn", &protoseg::sinkhorn_cuda);
  m.impl("sinkhorn_segments", &protoseg::sinkhorn_segments_cuda);
  m.impl("segment_reduce", &protoseg::segment_reduce_cuda);
  m.impl("sinkhorn_exp", &protoseg::sinkhorn_exp_cuda);
  m.impl("sinkhorn_scale", &protoseg::sinkhorn_scale_cuda);
  m.impl("sinkhorn_step", &protoseg::sinkhorn_step_cuda);
  m.impl("sinkhorn_finish", &protoseg::sinkhorn_finish_cuda);
}
#endif  // __CUDA_ARCH__
