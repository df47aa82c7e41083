// EmuExec: the `Exec` of the launch sequences in csrc/cuda/<op>.cuh on the CPU grid executor (grid_executor.h), for
// CPU tensors: the emulated tests run the shipped launch sequence, with torch's CPU GEMM and
// sort standing in for cuBLAS and cub.
//
// In record-only mode (benchmarks/cuda_roofline.py) nothing executes: every launch and GEMM
// appends its name and its global-memory bytes and FLOPs (the kernel's launch_cost, next to it
// in csrc/cuda/<op>.cuh) to ps_emu::records,
// so the shipped launch sequence can be costed at sizes the executor could never run.
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <string>
#include <typeinfo>
#include <vector>

#include "grid_executor.h"
#include "cuda/common.cuh"

namespace ps_emu {

struct Record {
  std::string name;  // the kernel's parameter struct, or "gemm <dtype>"
  double read, written, flops;
};
inline bool record_only = false;
inline int64_t tile_budget = int64_t{1} << 25;  // entries of the [rows, K*M] tile (small values force chunking)
inline std::mutex records_mutex;
inline std::vector<Record> records;

inline void record(std::string name, const protoseg::cuda::LaunchCost& c) {
  std::lock_guard<std::mutex> lock(records_mutex);
  records.push_back({std::move(name), c.read, c.written, c.flops});
}

}  // namespace ps_emu

namespace protoseg {
namespace cuda {

struct EmuExec {
  int64_t tile_budget = ps_emu::tile_budget;

  explicit EmuExec(at::Device) {}

  template <class P>
  void launch(void (*kernel)(P), ps::Dim3 grid, ps::Dim3 block, std::size_t dynamic_smem, const P& params) const {
    if (ps_emu::record_only) {
      if (int64_t(grid.x) * grid.y * grid.z > 0) ps_emu::record(ps_emu::demangle(typeid(P).name()), launch_cost(params));
      return;
    }
    ps_emu::launch(kernel, grid, block, dynamic_smem, params);
  }

  void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    if (!ps_emu::record_only) {
      // Half-precision inputs with a float32 out: exact products, fp32 accumulation, as cuBLAS.
      at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
      return;
    }
    const double m = a.size(0), k = a.size(1), n = b.size(1);
    ps_emu::record("gemm " + std::string(c10::toString(a.scalar_type())),
                   {(m * k + k * n) * a.element_size(), m * n * out.element_size(), 2 * m * k * n});
  }
};

}  // namespace cuda
}  // namespace protoseg
