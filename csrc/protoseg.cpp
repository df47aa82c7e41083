// Every protoseg operator schema, in one place. Kernels live in cpu/<op>.cpp and
// cuda/<op>.cu and register themselves; fake kernels, autograd and autocast rules are
// registered in Python (protoseg.ops); set_python_module names, per op, the module that registers its fake.
//
// Shapes (N pixels, D channels, K classes, M prototypes per class, S segments):
//   x [N, D], prototypes [K, M, D] (both L2-normalised inside the ops),
//   labels [N] int64 in [0, K) or negative (ignored).

#include <torch/library.h>

TORCH_LIBRARY(protoseg, m) {
  // Each group names the Python module that registers its fake kernels (beside the wrappers).
  m.set_python_module("protoseg.ops.similarity");

  // scores[n, k] = max_m <x_n, p_km>, index[n, k] = argmax (ties to the smallest m).
  m.def("proto_similarity(Tensor x, Tensor prototypes) -> (Tensor scores, Tensor index)");
  m.def(
      "proto_similarity_backward(Tensor grad_scores, Tensor x, Tensor prototypes, Tensor index) "
      "-> Tensor grad_x");

  // The fused training pass: from one pass over the [N, K*M] products (never held whole),
  //   scores [N, K], index [N, K]       per-class max and argmax, as proto_similarity
  //   own [N, M]                        <x_hat_n, p_{labels[n], m}> (0 where labels[n] < 0)
  //   lse [N] fp32/fp64                 logsumexp_j <x_hat_n, p_j> / temperature
  //   weighted [N, D] fp32/fp64         sum_j softmax_j(<x_hat_n, p_j> / temperature) p_j,
  //                                     d lse / d x_hat * temperature, kept for the backward
  //   x_hat [N, D]                      the unit rows (no gradient: what the prototype update reads)
  //   stats [N, 3] fp32/fp64            (mean, rstd, ||y||) per row, kept for the backward,
  // where x_hat = y / max(||y||, 1e-12) and y = LayerNorm_D(x; weight, bias, eps) when weight and
  // bias are given (the classifier's feature norm, fused into the row load), else y = x. The
  // backward returns grad_weight and grad_bias [D] with the LayerNorm ([0] without).
  // The contrast losses are no op of their own: PPC and PPD of a pixel are lse - own[a] / temperature
  // and (1 - own[a])^2 for its assigned prototype a (protoseg.ops.contrast_losses, in Python).
  m.def(
      "proto_train(Tensor x, Tensor prototypes, Tensor labels, float temperature, Tensor? weight=None, "
      "Tensor? bias=None, float eps=1e-05) "
      "-> (Tensor scores, Tensor index, Tensor own, Tensor lse, Tensor weighted, Tensor x_hat, Tensor stats)");
  m.def(
      "proto_train_backward(Tensor? grad_scores, Tensor? grad_own, Tensor? grad_lse, Tensor x, "
      "Tensor prototypes, Tensor labels, Tensor index, Tensor weighted, float temperature, Tensor? weight, "
      "Tensor? bias, Tensor stats) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  m.set_python_module("protoseg.ops.segments");

  // Sinkhorn-Knopp equipartition of each class's pixels over its M prototypes, all classes at once.
  m.def(
      "sinkhorn(Tensor scores, Tensor labels, int num_classes, int iterations, float epsilon) "
      "-> (Tensor q, Tensor assignment)");

  // The steps of `sinkhorn`, split at its reductions, for a caller that all-reduces the [K] and
  // [K, M] marginals between them (protoseg/models/prototype.py global_sinkhorn). In one process
  //   perm, offsets = sinkhorn_segments(labels, K)          pixels grouped by class, in pixel order
  //   class_max = segment_reduce(scores, perm, offsets, is_max=True, all_columns=True)     [K]
  //   plan = sinkhorn_exp(scores, labels, class_max, epsilon)   [N, M] float64, 0 where ignored
  //   plan = sinkhorn_scale(plan, labels, segment_reduce(plan, ..., False, True))        / [K]
  //   iterations x: plan = sinkhorn_step(plan, labels, segment_reduce(plan, ..., False, False), count)
  //   q, assignment = sinkhorn_finish(plan, labels, count)     count = float64 pixels per class
  // gives bitwise sinkhorn's result on the CPU. sinkhorn_segments checks the labels' range; the
  // later steps skip labels outside [0, K) and (on CUDA, with no host synchronisation) keep reads
  // through perm and offsets in bounds, which the CPU also checks.
  m.def("sinkhorn_segments(Tensor labels, int num_classes) -> (Tensor perm, Tensor offsets)");
  m.def("segment_reduce(Tensor values, Tensor perm, Tensor offsets, bool is_max, bool all_columns) -> Tensor");
  m.def("sinkhorn_exp(Tensor scores, Tensor labels, Tensor class_max, float epsilon) -> Tensor plan");
  m.def("sinkhorn_scale(Tensor plan, Tensor labels, Tensor class_total) -> Tensor");
  m.def("sinkhorn_step(Tensor plan, Tensor labels, Tensor rows, Tensor count) -> Tensor");
  m.def("sinkhorn_finish(Tensor plan, Tensor labels, Tensor count) -> (Tensor q, Tensor assignment)");

  m.set_python_module("protoseg.ops.embedding");

  // The embedding normalisation of docs/design.md section 1, inference step 2, fused:
  //   out = y / max(||y||, 1e-12) with y = LayerNorm_D(x; weight, bias, eps),
  //   stats [N, 3] fp32/fp64 = (mean, rstd, ||y||) per row, kept for the backward.
  m.def("layer_norm_normalize(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor stats)");
  m.def(
      "layer_norm_normalize_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor stats) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  m.set_python_module("protoseg.ops.segments");

  // Deterministic segment mean: mean[s] = mean of x[n] over index[n] == s.
  m.def("scatter_mean(Tensor x, Tensor index, int num_segments) -> (Tensor mean, Tensor count)");
  m.def("scatter_mean_backward(Tensor grad_mean, Tensor index, Tensor count) -> Tensor grad_x");
}

#ifdef PROTOSEG_PYTHON_MODULE
// `import protoseg._C` loads this library (and so runs the registrations above). Built as a
// plain library (CMakeLists.txt) it is loaded with torch.ops.load_library instead.
#include <Python.h>

#include "cpu/kernels.h"

namespace {

// protoseg._C.cpu_isa(): which build of the CPU kernels runs here ("avx512", "avx2", "default").
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(protoseg::cpu::kernels().isa); }

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use: avx512, avx2 or default."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
#endif
