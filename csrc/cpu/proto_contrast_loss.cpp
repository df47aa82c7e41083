// proto_contrast_loss on the CPU. Forward: one chunked GEMM pass keeping only each row's
// logsumexp and target product. Backward: the pass again with the softmax-weighted second
// GEMM, then the gradient assembly. (Training uses proto_train, which gets both GEMMs' worth
// of results from a single pass; this op serves callers who only want the losses.)
// Kernels: cpu/kernels_impl.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace protoseg {
namespace {

void check_contrast_args(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                         double temperature, int64_t ignore_index) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  check_index_vector(target, "target", x.size(0), x);
  check_positive(temperature, "temperature");
  const auto t = target.contiguous();
  const int64_t km = prototypes.size(0) * prototypes.size(1);
  check_range_host(t.data_ptr<int64_t>(), t.numel(), km, "target", "K*M", false, ignore_index, true);
}

// Per-row products the forward and backward both need: lse [N], target logit [N] (acc_t), and
// the number of valid rows. `weighted` [N, D] acc_t is filled when defined.
int64_t contrast_pass(const at::Tensor& x, const at::Tensor& p_hat, int64_t k, int64_t m, const at::Tensor& target,
                      double temperature, int64_t ignore_index, const at::Tensor& lse, const at::Tensor& logit,
                      const at::Tensor& weighted) {
  const auto t = target.contiguous();
  // Ignored rows are mapped to -1 so the epilogue skips them, whatever ignore_index is.
  const auto masked = at::where(t == ignore_index, at::full_like(t, -1), t);
  cpu::PassArgs a;
  a.x = x;
  a.p_hat = p_hat;
  a.num_classes = k;
  a.num_prototypes = m;
  a.target = masked.data_ptr<int64_t>();
  a.target_logit = logit.data_ptr();
  a.lse = lse.data_ptr();
  a.weighted = weighted.defined() ? weighted.data_ptr() : nullptr;
  a.temperature = temperature;
  cpu::kernels().pass(a);
  return (t != ignore_index).sum().item<int64_t>();
}

std::tuple<at::Tensor, at::Tensor> proto_contrast_loss_cpu(const at::Tensor& x, const at::Tensor& prototypes,
                                                           const at::Tensor& target, double temperature,
                                                           int64_t ignore_index) {
  check_contrast_args(x, prototypes, target, temperature, ignore_index);
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  auto ppc = at::zeros({}, x.options());
  auto ppd = at::zeros({}, x.options());
  if (n == 0) return {ppc, ppd};
  const auto acc = at::toOpMathType(x.scalar_type());
  auto lse = at::empty({n}, x.options().dtype(acc));
  auto logit = at::empty({n}, x.options().dtype(acc));
  const auto p_hat = cpu::normalized_prototypes(prototypes, acc);
  const int64_t valid = contrast_pass(x, p_hat, k, m, target, temperature, ignore_index, lse, logit, at::Tensor());
  if (valid == 0) return {ppc, ppd};
  AT_DISPATCH_FLOATING_TYPES(acc, "proto_contrast_loss_cpu", [&] {
    using acc_t = scalar_t;
    // Sum in a fixed order, in double: the result does not depend on the thread count.
    const auto t = target.contiguous();
    const int64_t* tp = t.data_ptr<int64_t>();
    const acc_t* l = lse.data_ptr<acc_t>();
    const acc_t* s = logit.data_ptr<acc_t>();
    double sum_ppc = 0, sum_ppd = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (tp[i] == ignore_index) continue;
      sum_ppc += static_cast<double>(l[i]) - static_cast<double>(s[i]) / temperature;
      const double dist = 1.0 - static_cast<double>(s[i]);
      sum_ppd += dist * dist;
    }
    ppc.fill_(sum_ppc / static_cast<double>(valid));
    ppd.fill_(sum_ppd / static_cast<double>(valid));
  });
  return {ppc, ppd};
}

at::Tensor proto_contrast_loss_backward_cpu(const at::Tensor& grad_ppc, const at::Tensor& grad_ppd,
                                            const at::Tensor& x, const at::Tensor& prototypes,
                                            const at::Tensor& target, double temperature, int64_t ignore_index) {
  check_contrast_args(x, prototypes, target, temperature, ignore_index);
  TORCH_CHECK(grad_ppc.numel() == 1, "grad_ppc must be a scalar (got ", shape_str(grad_ppc), ")");
  TORCH_CHECK(grad_ppd.numel() == 1, "grad_ppd must be a scalar (got ", shape_str(grad_ppd), ")");
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  auto grad_x = cpu::empty_output({n, d}, x.options());
  if (n == 0) return grad_x;
  const auto acc = at::toOpMathType(x.scalar_type());
  auto lse = at::empty({n}, x.options().dtype(acc));
  auto logit = at::empty({n}, x.options().dtype(acc));
  auto weighted = cpu::empty_output({n, d}, x.options().dtype(acc));
  const double g_ppc = grad_ppc.item<double>(), g_ppd = grad_ppd.item<double>();
  const auto p_hat = cpu::normalized_prototypes(prototypes, acc);
  const int64_t valid = contrast_pass(x, p_hat, k, m, target, temperature, ignore_index, lse, logit, weighted);
  if (valid == 0) return grad_x.zero_();
  AT_DISPATCH_FLOATING_TYPES(acc, "proto_contrast_loss_backward_cpu", [&] {
    using acc_t = scalar_t;
    // d ppc / d x_hat = (weighted - p_t) / (temperature * valid); d ppd / d x_hat = -2 (1 - s_t) p_t / valid.
    const auto t = target.contiguous();
    const int64_t* tp = t.data_ptr<int64_t>();
    const acc_t* s = logit.data_ptr<acc_t>();
    std::vector<acc_t> g_lse(n), coef(n);
    std::vector<int64_t> tgt(n);
    for (int64_t i = 0; i < n; ++i) {
      const bool ok = tp[i] != ignore_index;
      tgt[i] = ok ? tp[i] : -1;
      g_lse[i] = ok ? static_cast<acc_t>(g_ppc / valid) : acc_t(0);
      coef[i] = ok ? static_cast<acc_t>(-g_ppc / (temperature * valid) - 2.0 * g_ppd * (1.0 - s[i]) / valid)
                   : acc_t(0);
    }
    cpu::GradArgs a;
    a.x = x;
    a.p_hat = p_hat;
    a.num_classes = k;
    a.num_prototypes = m;
    a.grad_lse = g_lse.data();
    a.weighted = weighted.data_ptr();
    a.coef_target = coef.data();
    a.target = tgt.data();
    a.temperature = temperature;
    a.grad_x = grad_x.data_ptr();
    cpu::kernels().grad(a);
  });
  return grad_x;
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("proto_contrast_loss", &protoseg::proto_contrast_loss_cpu);
  m.impl("proto_contrast_loss_backward", &protoseg::proto_contrast_loss_backward_cpu);
}
