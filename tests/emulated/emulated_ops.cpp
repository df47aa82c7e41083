// Test-only Python module: every protoseg op's CUDA launch sequence (csrc/cuda/launchers.h) and
// kernels (csrc/cuda/*.cuh), run on CPU tensors by the CPU grid executor. Built by
// tests/emulated/emulated_module.py with torch.utils.cpp_extension.load. Not registered with the
// dispatcher (the real CUDA kernels are), just plain functions.
#include <torch/extension.h>

#include "cuda/launchers.h"
#include "emu_exec.h"
#include "layer_norm_normalize.h"

namespace {

using protoseg::cuda::EmuExec;
int64_t tile_budget = int64_t{1} << 25;

EmuExec exec() {
  EmuExec ex;
  ex.tile_budget = tile_budget;
  return ex;
}

py::dict launch_stats() {
  std::lock_guard<std::mutex> lock(ps_emu::stats_mutex);
  py::dict out;
  for (const auto& [name, s] : ps_emu::stats) out[py::str(name)] = py::make_tuple(s.launches, s.max_blocks);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace pc = protoseg::cuda;
  m.def("set_tile_budget", [](int64_t b) { tile_budget = b; }, "entries of the [rows, K*M] tile (forces chunking)");
  m.def("launch_stats", &launch_stats, "{kernel params type: (launches, largest grid)}");
  m.def(
      "set_record_only", [](bool on) { ps_emu::record_only = on; },
      "launches and GEMMs record their cost (emu_exec.h) instead of running");
  m.def(
      "take_records",
      [] {
        std::lock_guard<std::mutex> lock(ps_emu::records_mutex);
        py::list out;
        for (const auto& r : ps_emu::records) out.append(py::make_tuple(r.name, r.read, r.written, r.flops));
        ps_emu::records.clear();
        return out;
      },
      "[(name, bytes read, bytes written, flops)] since the last call");
  m.def("proto_similarity", [](const at::Tensor& x, const at::Tensor& p) {
    auto ex = exec();
    return pc::proto_similarity(ex, x, p);
  });
  m.def("proto_similarity_backward",
        [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& p, const at::Tensor& index) {
          auto ex = exec();
          return pc::proto_similarity_backward(ex, g, x, p, index);
        });
  m.def("proto_contrast_loss", [](const at::Tensor& x, const at::Tensor& p, const at::Tensor& t, double tau,
                                  int64_t ignore) {
    auto ex = exec();
    return pc::proto_contrast_loss(ex, x, p, t, tau, ignore);
  });
  m.def("proto_contrast_loss_backward", [](const at::Tensor& gc, const at::Tensor& gd, const at::Tensor& x,
                                           const at::Tensor& p, const at::Tensor& t, double tau, int64_t ignore) {
    auto ex = exec();
    return pc::proto_contrast_loss_backward(ex, gc, gd, x, p, t, tau, ignore);
  });
  m.def(
      "proto_train",
      [](const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, double tau,
         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
        auto ex = exec();
        return pc::proto_train(ex, x, p, labels, tau, weight, bias, eps);
      },
      py::arg("x"), py::arg("prototypes"), py::arg("labels"), py::arg("temperature"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5);
  m.def("proto_train_backward",
        [](const std::optional<at::Tensor>& gs, const std::optional<at::Tensor>& go, const std::optional<at::Tensor>& gl,
           const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, const at::Tensor& index,
           const at::Tensor& weighted, double tau, const std::optional<at::Tensor>& weight,
           const std::optional<at::Tensor>& bias, const at::Tensor& stats) {
          auto ex = exec();
          return pc::proto_train_backward(ex, gs, go, gl, x, p, labels, index, weighted, tau, weight, bias, stats);
        });
  // CUDA runs layer_norm_normalize as an ATen composite (no kernel of its own): the same code here.
  m.def("layer_norm_normalize", &protoseg::composite::layer_norm_normalize);
  m.def("layer_norm_normalize_backward", &protoseg::composite::layer_norm_normalize_backward);
  m.def("sinkhorn", [](const at::Tensor& s, const at::Tensor& labels, int64_t k, int64_t iters, double eps) {
    auto ex = exec();
    return pc::sinkhorn(ex, s, labels, k, iters, eps);
  });
  m.def("sinkhorn_segments", [](const at::Tensor& labels, int64_t k) {
    auto ex = exec();
    return pc::sinkhorn_segments(ex, labels, k);
  });
  m.def("segment_reduce", [](const at::Tensor& v, const at::Tensor& perm, const at::Tensor& offsets, bool is_max,
                             bool all_columns) {
    auto ex = exec();
    return pc::segment_reduce(ex, v, perm, offsets, is_max, all_columns);
  });
  m.def("sinkhorn_exp", [](const at::Tensor& s, const at::Tensor& labels, const at::Tensor& class_max, double eps) {
    auto ex = exec();
    return pc::sinkhorn_exp(ex, s, labels, class_max, eps);
  });
  m.def("sinkhorn_scale", [](const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& total) {
    auto ex = exec();
    return pc::sinkhorn_scale(ex, plan, labels, total);
  });
  m.def("sinkhorn_step", [](const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& rows,
                            const at::Tensor& count) {
    auto ex = exec();
    return pc::sinkhorn_step(ex, plan, labels, rows, count);
  });
  m.def("sinkhorn_finish", [](const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& count) {
    auto ex = exec();
    return pc::sinkhorn_finish(ex, plan, labels, count);
  });
  m.def("scatter_mean", [](const at::Tensor& x, const at::Tensor& index, int64_t segments) {
    auto ex = exec();
    return pc::scatter_mean(ex, x, index, segments);
  });
  m.def("scatter_mean_backward", [](const at::Tensor& g, const at::Tensor& index, const at::Tensor& count) {
    auto ex = exec();
    return pc::scatter_mean_backward(ex, g, index, count);
  });
}
