// The executor the shipped CUDA ops instantiate their launch sequences (csrc/cuda/<op>.cuh) with:
// launches on the current stream of the op's device, checked right after. (The test-only CPU
// grid executor provides the same interface: tests/emulated/emu_exec.h.)
//
// The device guard is taken at the first launch, not when the executor is made: the launch
// sequence checks its arguments first (devices included), so a call with x on the CPU and the
// prototypes on a GPU reports the argument instead of failing in CUDAGuard's constructor.
//
// Each kernel is instantiated in exactly one translation unit, the one whose host code launches
// it: nvcc gives a kernel template's host stub internal linkage, so a launch from another unit
// would find no device code. The host functions that launch the shared kernels are therefore
// compiled once (common.cu, prototype_pass.cu) and declared `extern template` here for the ops.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <torch/version.h>

#include <optional>

#include "cuda/common.cuh"
#include "cuda/prototype_pass.cuh"

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

  // out = a b through cuBLAS (ATen), which guards its own device and follows torch's matmul
  // precision settings (TF32 where torch.backends.cuda.matmul.allow_tf32 allows it). Half-precision
  // a and b with a float32 `out` multiply in their own dtype with fp32 accumulation (torch >= 2.8;
  // older ones multiply float32 copies).
  void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    if (out.scalar_type() == a.scalar_type()) {
      at::mm_out(out, a, b);
      return;
    }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    at::mm_out(out, a, b, out.scalar_type());
#else
    at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
#endif
  }

  // The device's L2 cache in bytes (plan_chunks in prototype_pass.cuh sizes chunks by it).
  int64_t l2_bytes() {
    if (l2_bytes_ < 0) {
      int bytes = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device_.index()));
      l2_bytes_ = bytes;
    }
    return l2_bytes_;
  }

  // The launch sequence sized `t` to stay in L2 with the rest of its chunk's working set. Here that
  // size is all there is to it; the roofline's executor (tests/emulated/emu_exec.h) counts the
  // traffic to such buffers as L2 traffic instead of HBM traffic.
  void l2_resident(const at::Tensor&) {}

 private:
  at::Device device_;
  std::optional<c10::cuda::CUDAGuard> guard_;
  cudaStream_t stream_ = nullptr;
  int64_t l2_bytes_ = -1;
};

PROTOSEG_COMMON_HOST_FUNCTIONS(extern template, CudaExec)
#define PROTOSEG_PASS_EXTERN(T) PROTOSEG_PASS_HOST_FUNCTIONS(extern template, CudaExec, T)
PROTOSEG_FOR_FLOATING_TYPES(PROTOSEG_PASS_EXTERN)
#undef PROTOSEG_PASS_EXTERN

}  // namespace cuda
}  // namespace protoseg
