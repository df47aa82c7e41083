// All device code, and the explicit instantiations each CUDA source needs.
//
// Why explicit instantiations: nvcc parses a .cu file once for the host and once per target
// architecture. The host side (launchers.h, torch registration) includes ATen, which costs
// ~45 s of front-end time per parse; the .cu files hide it from the device passes with
// `#ifndef __CUDA_ARCH__`, which cuts the 4-architecture build of each file by more than half.
// The device passes then no longer see the launches that implicitly instantiate the kernel
// templates, so every kernel the host side can launch is instantiated here, identically in
// all passes (the condition nvcc documents for __CUDA_ARCH__-dependent code). The build test
// tests/test_cuda_build.py checks that every kernel stub the host side registers is present in
// every cubin of the built library.
#pragma once

#include "cuda/common.cuh"
#include "cuda/proto_contrast_loss.cuh"
#include "cuda/prototype_pass.cuh"
#include "cuda/scatter_mean.cuh"
#include "cuda/sinkhorn.cuh"

#define PROTOSEG_FOR_FLOATING_TYPES(X) X(float) X(double) X(c10::Half) X(c10::BFloat16)
#define PROTOSEG_FOR_ACC_TYPES(X) X(float) X(double)

// The chunked pass and the gradient assembly (prototype_pass.cuh) and the range check.
#define PROTOSEG_INSTANTIATE_PASS_(T)                                                                             \
  template __global__ void protoseg::cuda::normalize_rows_kernel<T>(protoseg::cuda::NormalizeParams<T>);          \
  template __global__ void protoseg::cuda::pass_epilogue_kernel<T>(protoseg::cuda::EpilogueParams<T>);            \
  template __global__ void protoseg::cuda::grad_tile_kernel<T>(protoseg::cuda::GradTileParams<T>);             \
  template __global__ void protoseg::cuda::assemble_grad_kernel<T>(protoseg::cuda::GradParams<T>);
#define PROTOSEG_INSTANTIATE_RANGE_CHECK()                                                         \
  template __global__ void protoseg::cuda::range_check_kernel<protoseg::cuda::kRangeCheckThreads>( \
      protoseg::cuda::RangeCheckParams);
#define PROTOSEG_INSTANTIATE_PASS_ONLY() PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_INSTANTIATE_PASS_)
#define PROTOSEG_INSTANTIATE_PASS_KERNELS() \
  PROTOSEG_INSTANTIATE_PASS_ONLY()          \
  PROTOSEG_INSTANTIATE_RANGE_CHECK()

#define PROTOSEG_INSTANTIATE_CONTRAST_ACC_(T)                                                                    \
  template __global__ void protoseg::cuda::contrast_partials_kernel<T>(protoseg::cuda::ContrastPartialsParams<T>); \
  template __global__ void protoseg::cuda::contrast_coef_kernel<T>(protoseg::cuda::ContrastCoefParams<T>);
#define PROTOSEG_INSTANTIATE_CONTRAST_SCALAR_(T) \
  template __global__ void protoseg::cuda::contrast_finalize_kernel<T>(protoseg::cuda::ContrastFinalizeParams<T>);
#define PROTOSEG_INSTANTIATE_CONTRAST_KERNELS()                \
  PROTOSEG_FOR_ACC_TYPES(PROTOSEG_INSTANTIATE_CONTRAST_ACC_)   \
  PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_INSTANTIATE_CONTRAST_SCALAR_)

// Range check and the stable grouping by segment (sinkhorn, scatter_mean).
#define PROTOSEG_INSTANTIATE_SEGMENT_KERNELS()                                                         \
  PROTOSEG_INSTANTIATE_RANGE_CHECK()                                                                   \
  PROTOSEG_INSTANTIATE_SEGMENT_SORT()
#define PROTOSEG_INSTANTIATE_SEGMENT_SORT()                                                            \
  template __global__ void protoseg::cuda::segment_keys_kernel<protoseg::cuda::kSegmentThreads>(       \
      protoseg::cuda::SegmentKeysParams);                                                              \
  template __global__ void protoseg::cuda::segment_offsets_kernel<protoseg::cuda::kSegmentThreads>(    \
      protoseg::cuda::SegmentOffsetsParams);

#define PROTOSEG_INSTANTIATE_SINKHORN_(T)                                                                 \
  template __global__ void protoseg::cuda::segment_reduce_kernel<T>(protoseg::cuda::SegmentReduceParams<T>); \
  template __global__ void protoseg::cuda::sinkhorn_init_kernel<T>(protoseg::cuda::SinkhornInitParams<T>);
#define PROTOSEG_INSTANTIATE_SINKHORN_KERNELS() \
  PROTOSEG_INSTANTIATE_SEGMENT_KERNELS()        \
  PROTOSEG_INSTANTIATE_SINKHORN_ONLY()
#define PROTOSEG_INSTANTIATE_SINKHORN_ONLY()                                                               \
  PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_INSTANTIATE_SINKHORN_)                                              \
  template __global__ void protoseg::cuda::sinkhorn_scale_kernel<protoseg::cuda::kSinkhornThreads>(       \
      protoseg::cuda::SinkhornScaleParams);                                                                \
  template __global__ void protoseg::cuda::sinkhorn_step_kernel<protoseg::cuda::kSinkhornThreads>(        \
      protoseg::cuda::SinkhornStepParams);                                                                 \
  template __global__ void protoseg::cuda::sinkhorn_finish_kernel<protoseg::cuda::kSinkhornThreads>(      \
      protoseg::cuda::SinkhornFinishParams);

#define PROTOSEG_INSTANTIATE_SCATTER_(T)                                                                        \
  template __global__ void protoseg::cuda::scatter_mean_kernel<T>(protoseg::cuda::ScatterMeanParams<T>);        \
  template __global__ void protoseg::cuda::scatter_mean_backward_kernel<T>(                                     \
      protoseg::cuda::ScatterMeanBackwardParams<T>);
#define PROTOSEG_INSTANTIATE_SCATTER_KERNELS() \
  PROTOSEG_INSTANTIATE_SEGMENT_KERNELS()      \
  PROTOSEG_INSTANTIATE_SCATTER_ONLY()
#define PROTOSEG_INSTANTIATE_SCATTER_ONLY() PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_INSTANTIATE_SCATTER_)
