// The executor the shipped CUDA ops instantiate csrc/cuda/launchers.h with: launches on the
// current stream, checked right after. (The test-only CPU grid executor provides the same
// interface: tests/emulated/grid_executor.h.)
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"

namespace protoseg {
namespace cuda {

struct CudaExec {
  cudaStream_t stream;
  int64_t tile_budget = kDefaultTileBudget;

  explicit CudaExec(cudaStream_t s) : stream(s) {}

  template <class P>
  void launch(void (*kernel)(P), ps::Dim3 grid, ps::Dim3 block, size_t dynamic_smem, const P& params) const {
    if (grid.x == 0 || block.x == 0) return;
    kernel<<<grid, block, dynamic_smem, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace cuda
}  // namespace protoseg
