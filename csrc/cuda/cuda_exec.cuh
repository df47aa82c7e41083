// The executor the shipped CUDA ops instantiate csrc/cuda/launchers.h with: launches on the
// current stream of the op's device, checked right after. (The test-only CPU grid executor
// provides the same interface: tests/emulated/grid_executor.h.)
//
// The device guard is taken at the first launch, not when the executor is made: the launch
// sequence checks its arguments first (devices included), so a call with x on the CPU and the
// prototypes on a GPU reports the argument instead of failing in CUDAGuard's constructor.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "cuda/launchers.h"

namespace protoseg {
namespace cuda {

class CudaExec {
 public:
  int64_t tile_budget = kDefaultTileBudget;

  explicit CudaExec(at::Device device) : device_(device) {}

  template <class P>
  void launch(void (*kernel)(P), ps::Dim3 grid, ps::Dim3 block, size_t dynamic_smem, const P& params) {
    if (grid.x == 0 || block.x == 0) return;
    if (!guard_) {
      guard_.emplace(device_);
      stream_ = c10::cuda::getCurrentCUDAStream();
    }
    kernel<<<grid, block, dynamic_smem, stream_>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // cuBLAS through ATen, which guards its own device and follows torch's matmul precision
  // settings (TF32 where torch.backends.cuda.matmul.allow_tf32 allows it).
  void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

 private:
  at::Device device_;
  std::optional<c10::cuda::CUDAGuard> guard_;
  cudaStream_t stream_ = nullptr;
};

}  // namespace cuda
}  // namespace protoseg
