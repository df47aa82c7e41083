// proto_train on the CPU: the fused training pass. One chunked pass normalises each row of x
// (LayerNorm then L2, or L2 alone), computes the GEMM tile S = x_hat p_hat^T once and reduces it
// to per-class max/argmax, own-class scores and the row logsumexp, then multiplies the softmax
// tile by p_hat (the second GEMM) to keep `weighted`, which is all the contrast-loss gradient
// needs. The backward does no GEMM: it gathers the winning prototypes and goes back through the
// normalisation in one pass over x. Kernels: cpu/kernels_impl.h.
#include <torch/library.h>

#include "checks.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"
#include "layer_norm_normalize.h"

namespace protoseg {
namespace {

void check_labels(const at::Tensor& labels, const at::Tensor& x, int64_t k) {
  check_index_vector(labels, "labels", x.size(0), x);
  const auto l = labels.contiguous();
  check_range_host(l.data_ptr<int64_t>(), l.numel(), k, "labels", "K", /*allow_negative=*/true, 0, false);
}

using TrainOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TrainOutputs proto_train_cpu(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& labels,
                             double temperature, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  check_labels(labels, x, k);
  check_positive(temperature, "temperature");
  const bool layer_norm = check_optional_layer_norm(weight, bias, x, eps);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto scores = at::empty({n, k}, x.options());
  auto index = at::empty({n, k}, x.options().dtype(at::kLong));
  auto own = at::empty({n, m}, x.options().dtype(acc));
  auto lse = at::empty({n}, x.options().dtype(acc));
  auto weighted = cpu::empty_output({n, d}, x.options().dtype(acc));
  auto x_hat = cpu::empty_output({n, d}, x.options());
  auto stats = at::empty({n, 3}, x.options().dtype(acc));
  if (n == 0) return {scores, index, own, lse, weighted, x_hat, stats};
  const auto lab = labels.contiguous();
  at::Tensor w, b;
  cpu::PassArgs a;
  if (layer_norm) {
    w = weight->to(acc).contiguous();
    b = bias->to(acc).contiguous();
    a.norm = {w.data_ptr(), b.data_ptr(), eps};
  }
  a.x = x;
  a.p_hat = cpu::normalized_prototypes(prototypes, acc);
  a.num_classes = k;
  a.num_prototypes = m;
  a.x_hat = x_hat.data_ptr();
  a.stats = stats.data_ptr();
  a.scores = scores.data_ptr();
  a.index = index.data_ptr<int64_t>();
  a.labels = lab.data_ptr<int64_t>();
  a.own = own.data_ptr();
  a.lse = lse.data_ptr();
  a.weighted = weighted.data_ptr();
  a.temperature = temperature;
  cpu::kernels().pass(a);
  return {scores, index, own, lse, weighted, x_hat, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_train_backward_cpu(
    const std::optional<at::Tensor>& grad_scores, const std::optional<at::Tensor>& grad_own,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& index, const at::Tensor& weighted, double temperature,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& stats) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  check_labels(labels, x, k);
  check_positive(temperature, "temperature");
  check_shape(index, "index", {n, k});
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64 (got ", index.scalar_type(), ")");
  const bool layer_norm = check_optional_layer_norm(weight, bias, x, 0.0);
  if (layer_norm) check_stats(stats, x);
  const auto acc = at::toOpMathType(x.scalar_type());
  auto grad_x = cpu::empty_output({n, d}, x.options());
  const int64_t affine = layer_norm ? d : 0;
  auto partial = at::empty({layer_norm ? cpu::grad_blocks(n) : 0, 2, affine}, x.options().dtype(acc));
  if (n > 0) {
    const auto lab = labels.contiguous();
    const auto idx = index.contiguous();
    check_range_host(idx.data_ptr<int64_t>(), idx.numel(), m, "index", "M", false, 0, false);
    at::Tensor gs, go, gl, wt, w, b, st;
    cpu::GradArgs a;
    if (grad_scores.has_value() && grad_scores->defined()) {
      check_shape(*grad_scores, "grad_scores", {n, k});
      gs = grad_scores->to(x.scalar_type()).contiguous();
      a.grad_scores = gs.data_ptr();
      a.index = idx.data_ptr<int64_t>();
    }
    if (grad_own.has_value() && grad_own->defined()) {
      check_shape(*grad_own, "grad_own", {n, m});
      go = grad_own->to(acc).contiguous();
      a.grad_own = go.data_ptr();
      a.labels = lab.data_ptr<int64_t>();
    }
    if (grad_lse.has_value() && grad_lse->defined()) {
      check_shape(*grad_lse, "grad_lse", {n});
      check_shape(weighted, "weighted", {n, d});
      gl = grad_lse->to(acc).contiguous();
      wt = weighted.to(acc).contiguous();
      a.grad_lse = gl.data_ptr();
      a.weighted = wt.data_ptr();
    }
    if (layer_norm) {
      w = weight->to(acc).contiguous();
      b = bias->to(acc).contiguous();
      st = stats.contiguous();
      a.norm = {w.data_ptr(), b.data_ptr(), 0.0};
      a.stats = st.data_ptr();
      a.norm_partial = partial.data_ptr();
    }
    a.x = x;
    a.p_hat = cpu::normalized_prototypes(prototypes, acc);
    a.num_classes = k;
    a.num_prototypes = m;
    a.temperature = temperature;
    a.grad_x = grad_x.data_ptr();
    cpu::kernels().grad(a);
  }
  if (!layer_norm) return {grad_x, at::empty({0}, x.options()), at::empty({0}, x.options())};
  auto [grad_weight, grad_bias] = cpu::sum_norm_partials(partial, weight->scalar_type());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("proto_train", &protoseg::proto_train_cpu);
  m.impl("proto_train_backward", &protoseg::proto_train_backward_cpu);
}
