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
#include <utility>
#include <vector>

#include "grid_executor.h"
#include "cuda/common.cuh"

namespace ps_emu {

struct Record {
  std::string name;  // the kernel's parameter struct, or "gemm <dtype>"
  double read, written, flops;
  double l2;  // of read + written, the bytes to buffers declared L2-resident: they never reach HBM
};
inline bool record_only = false;
inline int64_t tile_budget = int64_t{1} << 25;  // entries of the [rows, K*M] tile (small values force chunking)
inline int64_t l2_bytes = 0;                    // the modelled L2 cache; 0: no chunk is sized to fit it
inline std::mutex records_mutex;
inline std::vector<Record> records;

inline void record(std::string name, const protoseg::cuda::LaunchCost& c, double l2) {
  std::lock_guard<std::mutex> lock(records_mutex);
  records.push_back({std::move(name), c.read, c.written, c.flops, l2});
}

}  // namespace ps_emu

namespace protoseg {
namespace cuda {

struct EmuExec {
  int64_t tile_budget = ps_emu::tile_budget;

  explicit EmuExec(at::Device) {}

  int64_t l2_bytes() const { return ps_emu::l2_bytes; }

  // For the rest of this op call, traffic to `t`'s storage is recorded as L2 traffic.
  void l2_resident(const at::Tensor& t) {
    const auto* begin = static_cast<const char*>(t.storage().data());
    resident_.emplace_back(begin, begin + t.storage().nbytes());
  }

  template <class P>
  void launch(void (*kernel)(P), ps::Dim3 grid, ps::Dim3 block, std::size_t dynamic_smem, const P& params) const {
    if (ps_emu::record_only) {
      if (int64_t(grid.x) * grid.y * grid.z > 0) {
        const LaunchCost c = launch_cost(params);
        ps_emu::record(ps_emu::demangle(typeid(P).name()), c, resident(c.workspace) ? c.workspace_bytes : 0.0);
      }
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
    const double a_bytes = m * k * a.element_size(), b_bytes = k * n * b.element_size(),
                 out_bytes = m * n * out.element_size();
    const double l2 = (resident(a.data_ptr()) ? a_bytes : 0.0) + (resident(b.data_ptr()) ? b_bytes : 0.0) +
                      (resident(out.data_ptr()) ? out_bytes : 0.0);
    ps_emu::record("gemm " + std::string(c10::toString(a.scalar_type())), {a_bytes + b_bytes, out_bytes, 2 * m * k * n},
                   l2);
  }

 private:
  bool resident(const void* p) const {
    const auto* c = static_cast<const char*>(p);
    for (const auto& [begin, end] : resident_)
      if (c != nullptr && c >= begin && c < end) return true;
    return false;
  }
  std::vector<std::pair<const char*, const char*>> resident_;
};

}  // namespace cuda
}  // namespace protoseg
