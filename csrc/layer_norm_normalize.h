// layer_norm_normalize: argument checks shared by the CPU kernel and the CUDA entry points, and
// the op written in ATen calls (`composite`), which is what CUDA runs, for layer_norm_normalize
// and for proto_train's optional LayerNorm: torch's LayerNorm forward and backward kernels around
// the row norm and a few elementwise passes, not yet one fused kernel. The composite is
// device-agnostic, so the tests also run it on the CPU (tests/emulated) against the reference.
//
// Per row of x [N, D]: mean, rstd = 1 / sqrt(var + eps) (biased variance, as LayerNorm),
// z = (x - mean) * rstd, y = z * weight + bias, out = y / max(||y||, 1e-12).
// Backward, with s = 1 / max(||y||, 1e-12) and g = grad_out[n]:
//   grad_y = (g - out * <g, out>) * s          (g * s where ||y|| <= 1e-12, as F.normalize)
//   grad_weight += grad_y * z, grad_bias += grad_y, gz = grad_y * weight,
//   grad_x = rstd * (gz - mean(gz) - z * mean(gz * z)).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "norm_eps.h"

namespace protoseg {

inline void check_layer_norm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_embeddings(x);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"}, {bias, "bias"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " must be [D] with D == x.size(1) == ", x.size(1),
                " (got ", shape_str(t), ")");
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (got ", t.scalar_type(),
                " and x ", x.scalar_type(), ")");
    check_same_device(t, x, name, "x");
  }
  TORCH_CHECK(eps >= 0.0 && eps < std::numeric_limits<double>::infinity(),
              "eps must be a non-negative finite number (got ", eps, ")");
}

// The LayerNorm that proto_train may apply first: weight and bias both given, or neither.
// Returns whether they are.
inline bool check_optional_layer_norm(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& x, double eps) {
  const bool has_weight = weight.has_value() && weight->defined(), has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(has_weight == has_bias, "weight and bias must be given together (got weight ",
              has_weight ? "a tensor" : "None", " and bias ", has_bias ? "a tensor" : "None", ")");
  if (has_weight) check_layer_norm_args(x, *weight, *bias, eps);
  return has_weight;
}

// stats [N, 3] in the accumulation type of x, as the forward wrote it.
inline void check_stats(const at::Tensor& stats, const at::Tensor& x) {
  check_shape(stats, "stats", {x.size(0), 3});
  TORCH_CHECK(stats.scalar_type() == at::toOpMathType(x.scalar_type()), "stats must be ",
              at::toOpMathType(x.scalar_type()), " (got ", stats.scalar_type(), ")");
  check_same_device(stats, x, "stats", "x");
}

inline void check_layer_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& bias, const at::Tensor& stats) {
  check_layer_norm_args(x, weight, bias, 0.0);
  check_shape(grad_out, "grad_out", x.sizes());
  check_floating(grad_out, "grad_out");
  check_same_device(grad_out, x, "grad_out", "x");
  check_stats(stats, x);
}

namespace composite {

// The unit rows in the accumulation type, and stats [N, 3] = (mean, rstd, ||y||).
inline std::tuple<at::Tensor, at::Tensor> layer_norm_normalize_rows(const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& bias, double eps) {
  check_layer_norm_args(x, weight, bias, eps);
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto [y, mean, rstd] = at::native_layer_norm(x.to(acc), {d}, weight.to(acc), bias.to(acc), eps);
  const auto norm = y.norm(2, {1});
  const auto out = (y / norm.clamp_min(kNormEps).unsqueeze(1)).contiguous();
  return {out, at::stack({mean.reshape({n}), rstd.reshape({n}), norm}, 1)};
}

inline std::tuple<at::Tensor, at::Tensor> layer_norm_normalize(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  auto [rows, stats] = layer_norm_normalize_rows(x, weight, bias, eps);
  return {rows.to(x.scalar_type()).contiguous(), stats};
}

// The same unit rows again from x and the forward's stats (for a backward).
inline at::Tensor unit_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& stats) {
  const auto acc = stats.scalar_type();
  const auto mean = stats.select(1, 0).unsqueeze(1), rstd = stats.select(1, 1).unsqueeze(1);
  const auto s = stats.select(1, 2).unsqueeze(1).clamp_min(kNormEps).reciprocal();
  return ((((x.to(acc) - mean) * rstd) * weight.to(acc) + bias.to(acc)) * s).contiguous();
}

// x / max(||x||, 1e-12) in the dtype of x, and stats [N, 3] = (0, 1, ||x||): proto_train
// without its LayerNorm.
inline std::tuple<at::Tensor, at::Tensor> l2_normalize(const at::Tensor& x) {
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto xa = x.to(acc);
  const auto norm = xa.norm(2, {1});
  const auto out = (xa / norm.clamp_min(kNormEps).unsqueeze(1)).to(x.scalar_type()).contiguous();
  return {out, at::stack({at::zeros_like(norm), at::ones_like(norm), norm}, 1)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_normalize_backward(const at::Tensor& grad_out,
                                                                                    const at::Tensor& x,
                                                                                    const at::Tensor& weight,
                                                                                    const at::Tensor& bias,
                                                                                    const at::Tensor& stats) {
  check_layer_norm_backward_args(grad_out, x, weight, bias, stats);
  const auto acc = stats.scalar_type();
  const auto xa = x.to(acc), w = weight.to(acc), b = bias.to(acc), g = grad_out.to(acc);
  const auto mean = stats.select(1, 0).unsqueeze(1).contiguous();
  const auto rstd = stats.select(1, 1).unsqueeze(1).contiguous();
  const auto norm = stats.select(1, 2).unsqueeze(1);
  // Through the L2 normalisation here, then torch's own LayerNorm backward.
  const auto s = norm.clamp_min(kNormEps).reciprocal();
  const auto out = (((xa - mean) * rstd) * w + b) * s;
  const auto dot = at::where(norm > kNormEps, (g * out).sum(1, /*keepdim=*/true), at::zeros_like(norm));
  const auto grad_y = (g - out * dot) * s;
  auto [grad_x, grad_weight, grad_bias] =
      at::native_layer_norm_backward(grad_y, xa, {x.size(1)}, mean, rstd, w, b, {true, true, true});
  return {grad_x.to(x.scalar_type()), grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
}

}  // namespace composite

}  // namespace protoseg
