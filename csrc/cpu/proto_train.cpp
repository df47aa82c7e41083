// proto_train on the CPU: the fused training pass. One chunked pass computes the GEMM tile
// S = x_hat p_hat^T once and reduces it to per-class max/argmax, own-class scores and the row
// logsumexp, then multiplies the softmax tile by p_hat (the second GEMM) to keep `weighted`,
// which is all the contrast-loss gradient needs: the backward does no GEMM.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/prototype_pass.h"

namespace protoseg {
namespace {

void check_labels(const at::Tensor& labels, const at::Tensor& x, int64_t k) {
  check_index_vector(labels, "labels", x.size(0), x);
  const auto l = labels.contiguous();
  check_range_host(l.data_ptr<int64_t>(), l.numel(), k, "labels", "K", /*allow_negative=*/true, 0, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> proto_train_cpu(const at::Tensor& x,
                                                                                       const at::Tensor& prototypes,
                                                                                       const at::Tensor& labels,
                                                                                       double temperature) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  check_labels(labels, x, k);
  check_positive(temperature, "temperature");
  const auto acc = at::toOpMathType(x.scalar_type());
  auto scores = at::empty({n, k}, x.options());
  auto index = at::empty({n, k}, x.options().dtype(at::kLong));
  auto own = at::empty({n, m}, x.options().dtype(acc));
  auto lse = at::empty({n}, x.options().dtype(acc));
  auto weighted = cpu::empty_output({n, d}, x.options().dtype(acc));
  if (n == 0) return {scores, index, own, lse, weighted};
  const auto lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p_hat = cpu::normalized_prototypes(prototypes, acc);
    cpu::PassOutputs<scalar_t, acc_t> out;
    out.scores = scores.data_ptr<scalar_t>();
    out.index = index.data_ptr<int64_t>();
    out.labels = lab.data_ptr<int64_t>();
    out.own = own.data_ptr<acc_t>();
    out.lse = lse.data_ptr<acc_t>();
    out.weighted = weighted.data_ptr<acc_t>();
    out.temperature = temperature;
    cpu::prototype_pass<scalar_t, acc_t>(x, p_hat, k, m, out);
  });
  return {scores, index, own, lse, weighted};
}

at::Tensor proto_train_backward_cpu(const std::optional<at::Tensor>& grad_scores,
                                    const std::optional<at::Tensor>& grad_own,
                                    const std::optional<at::Tensor>& grad_lse, const at::Tensor& x,
                                    const at::Tensor& prototypes, const at::Tensor& labels, const at::Tensor& index,
                                    const at::Tensor& weighted, double temperature) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  check_labels(labels, x, k);
  check_positive(temperature, "temperature");
  check_shape(index, "index", {n, k});
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64 (got ", index.scalar_type(), ")");
  const auto acc = at::toOpMathType(x.scalar_type());
  auto grad_x = cpu::empty_output({n, d}, x.options());
  if (n == 0) return grad_x;
  const auto lab = labels.contiguous();
  const auto idx = index.contiguous();
  check_range_host(idx.data_ptr<int64_t>(), idx.numel(), m, "index", "M", false, 0, false);
  at::Tensor gs, go, gl, w;
  if (grad_scores.has_value() && grad_scores->defined()) {
    check_shape(*grad_scores, "grad_scores", {n, k});
    gs = grad_scores->to(x.scalar_type()).contiguous();
  }
  if (grad_own.has_value() && grad_own->defined()) {
    check_shape(*grad_own, "grad_own", {n, m});
    go = grad_own->to(acc).contiguous();
  }
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_shape(*grad_lse, "grad_lse", {n});
    check_shape(weighted, "weighted", {n, d});
    gl = grad_lse->to(acc).contiguous();
    w = weighted.to(acc).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_train_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p_hat = cpu::normalized_prototypes(prototypes, acc);
    cpu::GradTerms<scalar_t, acc_t> terms;
    if (gs.defined()) {
      terms.grad_scores = gs.data_ptr<scalar_t>();
      terms.index = idx.data_ptr<int64_t>();
    }
    if (go.defined()) {
      terms.grad_own = go.data_ptr<acc_t>();
      terms.labels = lab.data_ptr<int64_t>();
    }
    if (gl.defined()) {
      terms.grad_lse = gl.data_ptr<acc_t>();
      terms.weighted = w.data_ptr<acc_t>();
    }
    terms.temperature = temperature;
    cpu::assemble_grad_x<scalar_t, acc_t>(x, p_hat, k, m, terms, grad_x);
  });
  return grad_x;
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("proto_train", &protoseg::proto_train_cpu);
  m.impl("proto_train_backward", &protoseg::proto_train_backward_cpu);
}
