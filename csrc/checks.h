// Argument checks shared by the CPU and CUDA entry points. Every message names the argument
// and says what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace protoseg {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kFloat8_e4m3fn &&
                  t.scalar_type() != at::kFloat8_e5m2,
              name, " must be float16, bfloat16, float32 or float64 (got ", t.scalar_type(), ")");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (got ", t.device(),
              " and ", ref.device(), ")");
}

// x [N, D] floating.
inline void check_embeddings(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.dim() == 2, name, " must be [N, D] (got ", shape_str(x), ")");
  check_floating(x, name);
}

// prototypes [K, M, D], same dtype and device as x, D == x.size(1).
inline void check_prototypes(const at::Tensor& prototypes, const at::Tensor& x) {
  TORCH_CHECK(prototypes.dim() == 3 && prototypes.size(2) == x.size(1),
              "prototypes must be [K, M, D] with D == x.size(1) (got ", shape_str(prototypes), " and x ",
              shape_str(x), ")");
  TORCH_CHECK(prototypes.size(0) > 0 && prototypes.size(1) > 0,
              "prototypes must have at least one class and one prototype per class (got ", shape_str(prototypes), ")");
  TORCH_CHECK(prototypes.scalar_type() == x.scalar_type(), "prototypes must have the dtype of x (got ",
              prototypes.scalar_type(), " and x ", x.scalar_type(), ")");
  check_same_device(prototypes, x, "prototypes", "x");
}

// An int64 vector with one entry per pixel.
inline void check_index_vector(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& x,
                               const char* x_name = "x") {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64 (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be [N] with N == ", x_name, ".size(0) == ", n, " (got ",
              shape_str(t), ")");
  check_same_device(t, x, name, x_name);
}

// A [rows, cols] tensor with the given shape (grad outputs, saved tensors).
inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must be ", expected, " (got ", shape_str(t), ")");
}

inline void check_positive(double v, const char* name) {
  TORCH_CHECK(v > 0.0 && v < std::numeric_limits<double>::infinity(), name, " must be a positive finite number (got ",
              v, ")");
}

// sinkhorn's arguments, all but the range of the labels (which the CPU checks on the host and
// CUDA on the device).
inline void check_sinkhorn_args(const at::Tensor& scores, const at::Tensor& labels, int64_t num_classes,
                                int64_t iterations, double epsilon) {
  TORCH_CHECK(scores.dim() == 2, "scores must be [N, M] (got ", shape_str(scores), ")");
  check_floating(scores, "scores");
  check_index_vector(labels, "labels", scores.size(0), scores, "scores");
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1 (got ", num_classes, ")");
  TORCH_CHECK(iterations >= 0, "iterations must be >= 0 (got ", iterations, ")");
  check_positive(epsilon, "epsilon");
  TORCH_CHECK(scores.size(1) >= 1 || scores.size(0) == 0,
              "scores must have at least one prototype column (got ", shape_str(scores), ")");
}

// ---- the steps of sinkhorn (the ops a distributed caller composes) ----

inline void check_segments_args(const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong, "labels must be an [N] int64 vector (got ",
              labels.scalar_type(), " ", shape_str(labels), ")");
  TORCH_CHECK(num_classes >= 1, "num_classes must be >= 1 (got ", num_classes, ")");
}

// values [n, M] floating, perm [n_valid] and offsets [S + 1] int64 on the device of values.
inline void check_segment_reduce_args(const at::Tensor& values, const at::Tensor& perm, const at::Tensor& offsets) {
  TORCH_CHECK(values.dim() == 2, "values must be [N, M] (got ", shape_str(values), ")");
  check_floating(values, "values");
  TORCH_CHECK(perm.dim() == 1 && perm.scalar_type() == at::kLong, "perm must be an int64 vector (got ",
              perm.scalar_type(), " ", shape_str(perm), ")");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.scalar_type() == at::kLong,
              "offsets must be an [S + 1] int64 vector (got ", offsets.scalar_type(), " ", shape_str(offsets), ")");
  TORCH_CHECK(perm.numel() <= values.size(0), "perm must not be longer than values has rows (got ",
              perm.numel(), " > ", values.size(0), ")");
  check_same_device(perm, values, "perm", "values");
  check_same_device(offsets, values, "offsets", "values");
}

// A float64 [K] (dim 1) or [K, M] (dim 2) marginal on the device of `ref`.
inline void check_marginal(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& ref,
                           const char* ref_name) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == at::kDouble && t.size(0) >= 1, name, " must be a float64 ",
              dim == 1 ? "[K]" : "[K, M]", " tensor (got ", t.scalar_type(), " ", shape_str(t), ")");
  if (dim == 2)
    TORCH_CHECK(t.size(1) == ref.size(1), name, " must have ", ref_name, ".size(1) = ", ref.size(1),
                " columns (got ", shape_str(t), ")");
  check_same_device(t, ref, name, ref_name);
}

inline void check_sinkhorn_exp_args(const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& class_max,
                                    double epsilon) {
  TORCH_CHECK(scores.dim() == 2, "scores must be [N, M] (got ", shape_str(scores), ")");
  check_floating(scores, "scores");
  check_index_vector(labels, "labels", scores.size(0), scores, "scores");
  check_marginal(class_max, "class_max", 1, scores, "scores");
  check_positive(epsilon, "epsilon");
}

// plan [N, M] float64 (the transport plan in pixel order), labels [N], one marginal.
inline void check_plan_args(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& marginal,
                            const char* name, int64_t dim) {
  TORCH_CHECK(plan.dim() == 2 && plan.scalar_type() == at::kDouble, "plan must be a float64 [N, M] tensor (got ",
              plan.scalar_type(), " ", shape_str(plan), ")");
  check_index_vector(labels, "labels", plan.size(0), plan, "plan");
  check_marginal(marginal, name, dim, plan, "plan");
}

// sinkhorn_step: the row sums [K, M] and the counts [K] of the same K.
inline void check_sinkhorn_step_args(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& rows,
                                     const at::Tensor& count) {
  check_plan_args(plan, labels, rows, "rows", 2);
  check_plan_args(plan, labels, count, "count", 1);
  TORCH_CHECK(count.size(0) == rows.size(0), "count must be [K] with K == rows.size(0) = ", rows.size(0), " (got ",
              shape_str(count), ")");
}

// Host-side range check of an int64 vector: every entry is in [0, upper), or (when
// allow_negative) negative, or equal to `ignore`. Raises naming the first offending entry.
inline void check_range_host(const int64_t* v, int64_t n, int64_t upper, const char* name, const char* upper_name,
                             bool allow_negative, int64_t ignore, bool has_ignore) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = v[i];
    if (t >= 0 && t < upper) continue;
    if (allow_negative && t < 0) continue;
    if (has_ignore && t == ignore) continue;
    TORCH_CHECK(false, name, "[", i, "] = ", t, " is out of range: expected a value in [0, ", upper_name, " = ", upper,
                ")", (allow_negative ? " or negative (ignored)" : ""),
                (has_ignore ? " or ignore_index = " + std::to_string(ignore) : std::string()));
  }
}

}  // namespace protoseg
