// Test-only Python module: every protoseg op's CUDA launch sequence and kernels
// (csrc/cuda/<op>.cuh), run on CPU tensors by the CPU grid executor. Built by
// tests/emulated/emulated_module.py with torch.utils.cpp_extension.load, which also generates the
// bindings of every op csrc/cuda/*.cu registers. Not registered with the dispatcher (the real
// CUDA kernels are), just plain functions taking every argument positionally.
#include <torch/extension.h>

#include "emu_exec.h"
#include "emulated_bindings.h"  // generated: every op csrc/cuda/*.cu registers (emulated_module.py)
#include "layer_norm_normalize.h"

namespace {

using protoseg::cuda::EmuExec;

py::dict launch_stats() {
  std::lock_guard<std::mutex> lock(ps_emu::stats_mutex);
  py::dict out;
  for (const auto& [name, s] : ps_emu::stats) out[py::str(name)] = py::make_tuple(s.launches, s.max_blocks);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace pc = protoseg::cuda;
  m.def("set_tile_budget", [](int64_t b) { ps_emu::tile_budget = b; }, "entries of the [rows, K*M] tile (forces chunking)");
  m.def("set_l2_bytes", [](int64_t b) { ps_emu::l2_bytes = b; }, "the modelled L2 cache (plan_chunks); 0: none");
  m.def("launch_stats", &launch_stats, "{kernel params type: (launches, largest grid)}");
  m.def(
      "set_record_only", [](bool on) { ps_emu::record_only = on; },
      "launches and GEMMs record their cost (emu_exec.h) instead of running");
  m.def(
      "take_records",
      [] {
        std::lock_guard<std::mutex> lock(ps_emu::records_mutex);
        py::list out;
        for (const auto& r : ps_emu::records) out.append(py::make_tuple(r.name, r.read, r.written, r.flops, r.l2));
        ps_emu::records.clear();
        return out;
      },
      "[(name, bytes read, bytes written, flops, of those bytes the ones that stay in L2)] since the last call");
  PROTOSEG_EMULATED_BINDINGS(m);
  // CUDA runs layer_norm_normalize as an ATen composite (no kernel of its own): the same code here.
  m.def("layer_norm_normalize", &protoseg::composite::layer_norm_normalize);
  m.def("layer_norm_normalize_backward", &protoseg::composite::layer_norm_normalize_backward);
}
