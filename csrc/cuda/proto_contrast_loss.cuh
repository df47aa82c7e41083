// Device code of proto_contrast_loss: the deterministic loss reduction (fixed grid, per-block
// partials in double, summed in block order by one thread) and the per-row gradient
// coefficients of the backward, which read the upstream gradients and the valid count from
// device memory (no host synchronisation).
//   ppc = mean_valid (lse_n - s_t / temperature),   ppd = mean_valid (1 - s_t)^2
#pragma once

#include "cuda/common.cuh"

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
