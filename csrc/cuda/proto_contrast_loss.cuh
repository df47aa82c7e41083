// Device code of proto_contrast_loss: the deterministic loss reduction (fixed grid, per-block
// partials in double, summed in block order by one thread) and the per-row gradient
// coefficients of the backward, which read the upstream gradients and the valid count from
// device memory (no host synchronisation).
//   ppc = mean_valid (lse_n - s_t / temperature),   ppd = mean_valid (1 - s_t)^2
#pragma once

#include "cuda/common.cuh"
#include "cuda/prototype_pass.cuh"

namespace protoseg {
namespace cuda {

template <class acc>
struct ContrastPartialsParams {
  const acc* lse;           // [N]
  const acc* target_logit;  // [N] s_t
  const int64_t* target;    // [N] masked: -1 where ignored
  int64_t n;
  double inv_temperature;
  double* partials;  // [gridDim.x, 3]: sum ppc, sum ppd, valid count
};

constexpr int kContrastThreads = 256;
constexpr int64_t kContrastMaxBlocks = 256;

template <class acc>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kContrastThreads) contrast_partials_kernel(ContrastPartialsParams<acc> p) {
  double s_ppc = 0, s_ppd = 0, cnt = 0;
  for (int64_t i = int64_t(blockIdx.x) * kContrastThreads + threadIdx.x; i < p.n;
       i += int64_t(gridDim.x) * kContrastThreads) {
    if (p.target[i] < 0) continue;
    const double st = static_cast<double>(p.target_logit[i]);
    s_ppc += static_cast<double>(p.lse[i]) - st * p.inv_temperature;
    s_ppd += (1.0 - st) * (1.0 - st);
    cnt += 1.0;
  }
  s_ppc = block_sum<kContrastThreads>(s_ppc);
  s_ppd = block_sum<kContrastThreads>(s_ppd);
  cnt = block_sum<kContrastThreads>(cnt);
  if (threadIdx.x == 0) {
    p.partials[blockIdx.x * 3 + 0] = s_ppc;
    p.partials[blockIdx.x * 3 + 1] = s_ppd;
    p.partials[blockIdx.x * 3 + 2] = cnt;
  }
}

template <class scalar_t>
struct ContrastFinalizeParams {
  const double* partials;  // [blocks, 3]
  int64_t blocks;
  scalar_t* ppc;      // [] (may be null)
  scalar_t* ppd;      // []
  double* valid;      // [1] (may be null): the valid count, for the backward
};

// One thread: blocks <= kContrastMaxBlocks partials added in order.
template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kWarpSize) contrast_finalize_kernel(ContrastFinalizeParams<scalar_t> p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double s_ppc = 0, s_ppd = 0, cnt = 0;
  for (int64_t b = 0; b < p.blocks; ++b) {
    s_ppc += p.partials[b * 3 + 0];
    s_ppd += p.partials[b * 3 + 1];
    cnt += p.partials[b * 3 + 2];
  }
  if (p.ppc != nullptr) p.ppc[0] = static_cast<scalar_t>(cnt > 0 ? s_ppc / cnt : 0.0);
  if (p.ppd != nullptr) p.ppd[0] = static_cast<scalar_t>(cnt > 0 ? s_ppd / cnt : 0.0);
  if (p.valid != nullptr) p.valid[0] = cnt;
}

// d ppc / d x_hat = (weighted - p_t) / (temperature * valid); d ppd / d x_hat = -2 (1 - s_t) p_t / valid.
// grad_lse[n] = g_ppc / valid (the assembly multiplies by 1 / temperature) and
// coef_target[n] = -g_ppc / (temperature * valid) - 2 g_ppd (1 - s_t) / valid; 0 when ignored
// or when no pixel is valid.
template <class acc>
struct ContrastCoefParams {
  const acc* target_logit;  // [N]
  const int64_t* target;    // [N] masked
  int64_t n;
  const double* grad_ppc;  // [1]
  const double* grad_ppd;  // [1]
  const double* valid;     // [1]
  double temperature;
  acc* grad_lse;     // [N]
  acc* coef_target;  // [N]
};

template <class acc>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kContrastThreads) contrast_coef_kernel(ContrastCoefParams<acc> p) {
  const double valid = p.valid[0];
  // The divisions once per thread, outside the loop (see normalize_rows_kernel on spills).
  const double inv_valid = valid > 0 ? 1.0 / valid : 0.0;
  const double g_lse = p.grad_ppc[0] * inv_valid;
  const double c_ppc = -g_lse / p.temperature, c_ppd = 2.0 * p.grad_ppd[0] * inv_valid;
  for (int64_t i = int64_t(blockIdx.x) * kContrastThreads + threadIdx.x; i < p.n;
       i += int64_t(gridDim.x) * kContrastThreads) {
    const bool ok = p.target[i] >= 0 && valid > 0;
    const double st = static_cast<double>(p.target_logit[i]);
    p.grad_lse[i] = ok ? static_cast<acc>(g_lse) : acc(0);
    p.coef_target[i] = ok ? static_cast<acc>(c_ppc - c_ppd * (1.0 - st)) : acc(0);
  }
}

}  // namespace cuda
}  // namespace protoseg

// ---- host side: launch costs (the roofline model) and the launch sequence ----------------
// Hidden from nvcc's per-architecture device passes (parsing ATen there would triple the build)
#ifndef __CUDA_ARCH__
#include "checks.h"

namespace protoseg {
namespace cuda {

template <class acc>
LaunchCost launch_cost(const ContrastPartialsParams<acc>& p) {
  return {p.n * (2 * sizeof(acc) + costs::kIndex), 0, 6.0 * p.n};
}

template <class T>
LaunchCost launch_cost(const ContrastFinalizeParams<T>& p) {
  return {p.blocks * 3 * sizeof(double), 3 * sizeof(double), 3.0 * p.blocks};
}

template <class acc>
LaunchCost launch_cost(const ContrastCoefParams<acc>& p) {
  return {p.n * (sizeof(acc) + costs::kIndex), 2.0 * p.n * sizeof(acc), 4.0 * p.n};
}

// Checks, then the target with ignored entries mapped to -1 (whatever ignore_index is).
template <class Exec>
at::Tensor checked_masked_target(Exec& ex, const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                                 double temperature, int64_t ignore_index) {
  const auto t = target.contiguous();
  const int64_t km = prototypes.size(0) * prototypes.size(1);
  check_range_device(ex, t, km, "target", "K*M", false, ignore_index, true);
  return at::where(t == ignore_index, at::full_like(t, -1), t);
}

inline void check_contrast_args(const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                                double temperature) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  check_index_vector(target, "target", x.size(0), x);
  check_positive(temperature, "temperature");
}

// lse, target logit (and weighted) for every row, then the deterministic loss reduction into
// ppc / ppd / valid (any of them may be null).
template <class Exec, class scalar_t>
void contrast_pass(Exec& ex, const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& masked,
                   double temperature, at::Tensor& p_hat, at::Tensor& lse, at::Tensor& logit,
                   const at::Tensor& weighted, scalar_t* ppc, scalar_t* ppd, double* valid) {
  using acc = acc_t<scalar_t>;
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  p_hat = normalized_prototypes<Exec, scalar_t>(ex, prototypes);
  PassOutputs<scalar_t> out;
  out.target = masked.data_ptr<int64_t>();
  out.target_logit = logit.data_ptr<acc>();
  out.lse = lse.data_ptr<acc>();
  out.weighted = weighted;
  out.temperature = temperature;
  prototype_pass<Exec, scalar_t>(ex, x, p_hat, k, m, out);
  const unsigned blocks = grid_for(n, kContrastThreads, kContrastMaxBlocks);
  auto partials = at::empty({static_cast<int64_t>(blocks), 3}, x.options().dtype(at::kDouble));
  ex.launch(contrast_partials_kernel<acc>, blocks, kContrastThreads, 0,
            ContrastPartialsParams<acc>{lse.data_ptr<acc>(), logit.data_ptr<acc>(), masked.data_ptr<int64_t>(), n,
                                        1.0 / temperature, partials.data_ptr<double>()});
  ex.launch(contrast_finalize_kernel<scalar_t>, 1, kWarpSize, 0,
            ContrastFinalizeParams<scalar_t>{partials.data_ptr<double>(), blocks, ppc, ppd, valid});
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> proto_contrast_loss(const at::Tensor& x, const at::Tensor& prototypes,
                                                       const at::Tensor& target, double temperature,
                                                       int64_t ignore_index) {
  Exec ex(x.device());
  check_contrast_args(x, prototypes, target, temperature);
  const int64_t n = x.size(0);
  auto ppc = at::zeros({}, x.options());
  auto ppd = at::zeros({}, x.options());
  if (n == 0) return {ppc, ppd};
  const at::Tensor masked = checked_masked_target(ex, x, prototypes, target, temperature, ignore_index);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  auto lse = at::empty({n}, x.options().dtype(acc_type));
  auto logit = at::empty({n}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_contrast_loss_cuda", [&] {
    at::Tensor p_hat;
    contrast_pass<Exec, scalar_t>(ex, x, prototypes, masked, temperature, p_hat, lse, logit, at::Tensor(),
                                  ppc.data_ptr<scalar_t>(), ppd.data_ptr<scalar_t>(), nullptr);
  });
  return {ppc, ppd};
}

template <class Exec>
at::Tensor proto_contrast_loss_backward(const at::Tensor& grad_ppc, const at::Tensor& grad_ppd,
                                        const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                                        double temperature, int64_t ignore_index) {
  Exec ex(x.device());
  check_contrast_args(x, prototypes, target, temperature);
  TORCH_CHECK(grad_ppc.numel() == 1, "grad_ppc must be a scalar (got ", shape_str(grad_ppc), ")");
  TORCH_CHECK(grad_ppd.numel() == 1, "grad_ppd must be a scalar (got ", shape_str(grad_ppd), ")");
  const int64_t n = x.size(0), d = x.size(1), k = prototypes.size(0), m = prototypes.size(1);
  auto grad_x = at::empty({n, d}, x.options());
  if (n == 0) return grad_x;
  const at::Tensor masked = checked_masked_target(ex, x, prototypes, target, temperature, ignore_index);
  // The upstream gradients stay on the device (a 0-dim CPU scalar is copied over): no .item().
  const auto g_ppc = grad_ppc.reshape({1}).to(x.device(), at::kDouble).contiguous();
  const auto g_ppd = grad_ppd.reshape({1}).to(x.device(), at::kDouble).contiguous();
  const auto acc_type = at::toOpMathType(x.scalar_type());
  auto lse = at::empty({n}, x.options().dtype(acc_type));
  auto logit = at::empty({n}, x.options().dtype(acc_type));
  auto weighted = at::empty({n, d}, x.options().dtype(acc_type));
  auto valid = at::empty({1}, x.options().dtype(at::kDouble));
  auto g_lse = at::empty({n}, x.options().dtype(acc_type));
  auto coef = at::empty({n}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_contrast_loss_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor p_hat;
    contrast_pass<Exec, scalar_t>(ex, x, prototypes, masked, temperature, p_hat, lse, logit, weighted, nullptr,
                                  nullptr, valid.data_ptr<double>());
    ex.launch(contrast_coef_kernel<acc>, grid_for(n, kContrastThreads), kContrastThreads, 0,
              ContrastCoefParams<acc>{logit.data_ptr<acc>(), masked.data_ptr<int64_t>(), n,
                                      g_ppc.data_ptr<double>(), g_ppd.data_ptr<double>(), valid.data_ptr<double>(),
                                      temperature, g_lse.data_ptr<acc>(), coef.data_ptr<acc>()});
    GradTerms<scalar_t> terms;
    terms.grad_lse = g_lse.data_ptr<acc>();
    terms.weighted = weighted.data_ptr<acc>();
    terms.coef_target = coef.data_ptr<acc>();
    terms.target = masked.data_ptr<int64_t>();
    terms.temperature = temperature;
    assemble_grad_x<Exec, scalar_t>(ex, x, p_hat, k, m, terms, grad_x);
  });
  return grad_x;
}

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
