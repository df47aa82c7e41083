// proto_train's launch sequence: the shared chunked pass (prototype_pass.cuh) with the training
// epilogue and the second GEMM for `weighted`, the backward through the shared gradient assembly;
// the optional LayerNorm as the ATen composite of layer_norm_normalize.h around them. No kernels
// of its own.
#pragma once

#include "cuda/prototype_pass.cuh"

// ---- host side: launch costs (the roofline model) and the launch sequence ----------------
// Hidden from nvcc's per-architecture device passes (parsing ATen there would triple the build)
#ifndef __CUDA_ARCH__
#include "checks.h"
#include "layer_norm_normalize.h"
#include <optional>

namespace protoseg {
namespace cuda {

template <class Exec>
at::Tensor checked_labels(Exec& ex, const at::Tensor& labels, const at::Tensor& x, int64_t k) {
  check_index_vector(labels, "labels", x.size(0), x);
  auto lab = labels.contiguous();
  check_range_device(ex, lab, k, "labels", "K", /*allow_negative=*/true, 0, false);
  return lab;
}

// The pass and the gradient over x, with its own L2 normalisation; proto_train adds the optional
// LayerNorm around them.
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> train_pass(Exec& ex, const at::Tensor& x,
                                                                                  const at::Tensor& prototypes,
                                                                                  const at::Tensor& labels,
                                                                                  double temperature) {
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  auto scores = at::empty({n, k}, x.options());
  auto index = at::empty({n, k}, x.options().dtype(at::kLong));
  auto own = at::empty({n, m}, x.options().dtype(acc_type));
  auto lse = at::empty({n}, x.options().dtype(acc_type));
  auto weighted = at::empty({n, d}, x.options().dtype(acc_type));
  if (n == 0) return {scores, index, own, lse, weighted};
  const at::Tensor lab = checked_labels(ex, labels, x, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_train_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor p_hat = normalized_prototypes<Exec, scalar_t>(ex, prototypes);
    PassOutputs<scalar_t> out;
    out.scores = scores.data_ptr<scalar_t>();
    out.index = index.data_ptr<int64_t>();
    out.labels = lab.data_ptr<int64_t>();
    out.own = own.data_ptr<acc>();
    out.lse = lse.data_ptr<acc>();
    out.weighted = weighted;
    out.temperature = temperature;
    prototype_pass<Exec, scalar_t>(ex, x, p_hat, k, m, out);
  });
  return {scores, index, own, lse, weighted};
}

template <class Exec>
at::Tensor train_backward(Exec& ex, const std::optional<at::Tensor>& grad_scores,
                          const std::optional<at::Tensor>& grad_own, const std::optional<at::Tensor>& grad_lse,
                          const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& labels,
                          const at::Tensor& index, const at::Tensor& weighted, double temperature) {
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  auto grad_x = at::empty({n, d}, x.options());
  if (n == 0) return grad_x;
  at::Tensor gs, go, gl, w;
  if (grad_scores.has_value() && grad_scores->defined()) {
    check_shape(*grad_scores, "grad_scores", {n, k});
    check_same_device(*grad_scores, x, "grad_scores", "x");
    gs = grad_scores->to(x.scalar_type()).contiguous();
  }
  if (grad_own.has_value() && grad_own->defined()) {
    check_shape(*grad_own, "grad_own", {n, m});
    check_same_device(*grad_own, x, "grad_own", "x");
    go = grad_own->to(acc_type).contiguous();
  }
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_shape(*grad_lse, "grad_lse", {n});
    check_same_device(*grad_lse, x, "grad_lse", "x");
    check_shape(weighted, "weighted", {n, d});
    check_same_device(weighted, x, "weighted", "x");
    gl = grad_lse->to(acc_type).contiguous();
    w = weighted.to(acc_type).contiguous();
  }
  const at::Tensor lab = checked_labels(ex, labels, x, k);
  const auto idx = index.contiguous();
  if (gs.defined()) check_range_device(ex, idx, m, "index", "M", false, 0, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_train_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor p_hat = normalized_prototypes<Exec, scalar_t>(ex, prototypes);
    GradTerms<scalar_t> terms;
    if (gs.defined()) {
      terms.grad_scores = gs.data_ptr<scalar_t>();
      terms.index = idx.data_ptr<int64_t>();
    }
    if (go.defined()) {
      terms.grad_own = go.data_ptr<acc>();
      terms.labels = lab.data_ptr<int64_t>();
    }
    if (gl.defined()) {
      terms.grad_lse = gl.data_ptr<acc>();
      terms.weighted = w.data_ptr<acc>();
    }
    terms.temperature = temperature;
    assemble_grad_x<Exec, scalar_t>(ex, x, p_hat, k, m, terms, grad_x);
  });
  return grad_x;
}

using TrainOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// With weight and bias, the LayerNorm and L2 normalisation run first as the ATen composite of
// layer_norm_normalize.h, in the accumulation type, and the pass runs on those unit rows rounded
// to x's dtype, the x_hat it returns (so half-precision x keeps its half-precision GEMM; the pass's
// own normalisation changes the rows by rounding only). The backward recomputes the rows in the
// accumulation type. The CPU fuses them into the pass.
template <class Exec>
TrainOutputs proto_train(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& labels,
                         double temperature, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps) {
  Exec ex(x.device());
  check_embeddings(x);
  check_prototypes(prototypes, x);
  check_index_vector(labels, "labels", x.size(0), x);
  check_positive(temperature, "temperature");
  if (!check_optional_layer_norm(weight, bias, x, eps)) {
    auto [scores, index, own, lse, weighted] = train_pass(ex, x, prototypes, labels, temperature);
    auto [x_hat, stats] = composite::l2_normalize(x);
    return {scores, index, own, lse, weighted, x_hat, stats};
  }
  auto [rows, stats] = composite::layer_norm_normalize_rows(x, *weight, *bias, eps);
  auto x_hat = rows.to(x.scalar_type());
  auto [scores, index, own, lse, weighted] = train_pass(ex, x_hat, prototypes, labels, temperature);
  return {scores, index, own, lse, weighted, x_hat, stats};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_train_backward(const std::optional<at::Tensor>& grad_scores, const std::optional<at::Tensor>& grad_own,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& index, const at::Tensor& weighted, double temperature,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& stats) {
  Exec ex(x.device());
  check_embeddings(x);
  check_prototypes(prototypes, x);
  check_index_vector(labels, "labels", x.size(0), x);
  check_positive(temperature, "temperature");
  check_shape(index, "index", {x.size(0), prototypes.size(0)});
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64 (got ", index.scalar_type(), ")");
  check_same_device(index, x, "index", "x");
  if (!check_optional_layer_norm(weight, bias, x, 0.0)) {
    auto grad_x = train_backward(ex, grad_scores, grad_own, grad_lse, x, prototypes, labels, index, weighted,
                                 temperature);
    return {grad_x, at::empty({0}, x.options()), at::empty({0}, x.options())};
  }
  check_stats(stats, x);
  const auto rows = composite::unit_rows(x, *weight, *bias, stats);
  const auto grad_rows = train_backward(ex, grad_scores, grad_own, grad_lse, rows, prototypes.to(rows.scalar_type()),
                                        labels, index, weighted, temperature);
  return composite::layer_norm_normalize_backward(grad_rows, x, *weight, *bias, stats);
}

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
