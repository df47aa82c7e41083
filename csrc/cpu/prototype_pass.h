// The chunked pixel x prototype pass shared by proto_similarity, proto_contrast_loss and
// proto_train on the CPU, and the gradient assembly shared by their backward ops.
//
// Layouts: x [N, D] (any strides, any float dtype); p_hat [K*M, D] acc_t row-major, already
// L2-normalised; the tile S [rows, K*M] acc_t row-major. Pixels are processed `rows` at a
// time: normalise the rows into an acc_t buffer, one library GEMM into the tile, then a fused
// epilogue over the tile while it is still in cache. The [N, K*M] products are never held.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/huge_pages.h"
#include "cpu/simd.h"

namespace protoseg {
namespace cpu {

constexpr double kNormEps = 1e-12;  // as F.normalize

// Rows per chunk: the tile [rows, K*M] is at most 2^22 entries (16 MB in fp32), and at most
// 1024 rows so that the normalised rows [rows, D] and the `weighted` rows the second GEMM
// writes stay in cache between the GEMMs and the epilogue (bigger chunks add two memory
// passes over [N, D] without making the GEMMs faster).
inline int64_t chunk_rows(int64_t n, int64_t km) {
  const int64_t budget = int64_t{1} << 22;
  const int64_t rows = std::min<int64_t>(1024, std::max<int64_t>(64, budget / std::max<int64_t>(km, 1)));
  return std::max<int64_t>(1, std::min<int64_t>(n, rows));
}

// p_hat = prototypes / max(||p||, eps) as a contiguous [K*M, D] tensor of the accumulation type.
inline at::Tensor normalized_prototypes(const at::Tensor& prototypes, at::ScalarType acc) {
  const auto d = prototypes.size(2);
  auto p = prototypes.reshape({-1, d}).to(acc);
  return (p / p.norm(2, {1}, /*keepdim=*/true).clamp_min(kNormEps)).contiguous();
}

template <typename acc_t>
inline void axpy(acc_t* __restrict y, acc_t a, const acc_t* __restrict x, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

// Reads row n of x into `out` as acc_t, divided by max(||x_n||, eps); returns the norm.
template <typename scalar_t, typename acc_t>
inline acc_t load_normalized_row(const scalar_t* x, int64_t stride_d, int64_t d, acc_t* __restrict out) {
  load_row(x, stride_d, d, out);
  const acc_t norm = std::sqrt(dot(out, out, d));
  const acc_t inv = acc_t(1) / std::max(norm, static_cast<acc_t>(kNormEps));
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
  return norm;
}

// What the epilogue produces; a null pointer skips that output. Row pointers are indexed by
// the global pixel n.
template <typename scalar_t, typename acc_t>
struct PassOutputs {
  scalar_t* scores = nullptr;  // [N, K] max over the class's M prototypes
  int64_t* index = nullptr;    // [N, K] argmax, ties to the smallest m
  const int64_t* labels = nullptr;  // [N] for `own`
  acc_t* own = nullptr;             // [N, M] the row's own-class products (0 if labels[n] < 0)
  const int64_t* target = nullptr;  // [N] for `target_logit`; entries outside [0, K*M) skipped
  acc_t* target_logit = nullptr;    // [N] S[n, target[n]]
  acc_t* lse = nullptr;             // [N] logsumexp_j S[n, j] / temperature
  acc_t* weighted = nullptr;        // [N, D] sum_j softmax_j(S[n] / temperature) p_hat_j (needs lse)
  double temperature = 1.0;
};

// One pass over all pixels. x: [N, D] with strides; p_hat: [K*M, D] acc_t contiguous.
template <typename scalar_t, typename acc_t>
void prototype_pass(const at::Tensor& x, const at::Tensor& p_hat, int64_t num_classes, int64_t num_prototypes,
                    const PassOutputs<scalar_t, acc_t>& out) {
  const int64_t n_total = x.size(0), d = x.size(1), k_classes = num_classes, m_protos = num_prototypes;
  const int64_t km = k_classes * m_protos;
  if (n_total == 0) return;
  const int64_t rows = chunk_rows(n_total, km);
  const auto acc_type = p_hat.scalar_type();
  auto xbuf = at::empty({rows, d}, p_hat.options());
  auto tile = at::empty({rows, km}, p_hat.options());
  const at::Tensor p_hat_t = p_hat.t();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / out.temperature);
  (void)acc_type;

  for (int64_t start = 0; start < n_total; start += rows) {
    const int64_t r = std::min(rows, n_total - start);
    acc_t* xb = xbuf.data_ptr<acc_t>();
    at::parallel_for(0, r, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) load_normalized_row(x_ptr + (start + i) * sx0, sx1, d, xb + i * d);
    });
    auto s_view = tile.narrow(0, 0, r);
    at::mm_out(s_view, xbuf.narrow(0, 0, r), p_hat_t);
    acc_t* s_ptr = tile.data_ptr<acc_t>();

    // Row sums of exp for `weighted`, kept to scale the second GEMM's rows.
    std::vector<acc_t> row_sum(out.weighted ? r : 0);
    at::parallel_for(0, r, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = start + i;
        acc_t* s = s_ptr + i * km;
        if (out.scores || out.index) {
          for (int64_t k = 0; k < k_classes; ++k) {
            const acc_t* sk = s + k * m_protos;
            acc_t best = sk[0];
            int64_t arg = 0;
            for (int64_t m = 1; m < m_protos; ++m) {
              if (sk[m] > best) {
                best = sk[m];
                arg = m;
              }
            }
            if (out.scores) out.scores[n * k_classes + k] = static_cast<scalar_t>(best);
            if (out.index) out.index[n * k_classes + k] = arg;
          }
        }
        if (out.own) {
          const int64_t y = out.labels[n];
          acc_t* o = out.own + n * m_protos;
          if (y >= 0) {
            std::copy(s + y * m_protos, s + (y + 1) * m_protos, o);
          } else {
            std::fill(o, o + m_protos, acc_t(0));
          }
        }
        if (out.target_logit) {
          const int64_t t = out.target[n];
          out.target_logit[n] = (t >= 0 && t < km) ? s[t] : acc_t(0);
        }
        if (out.lse) {
          const acc_t mx = row_max(s, km);
          // exp in place when `weighted` is wanted: the tile becomes the unnormalised softmax fed
          // to the second GEMM.
          const double sum = exp_shifted_sum(s, km, mx, inv_tau, /*store=*/out.weighted != nullptr);
          if (out.weighted) row_sum[i] = static_cast<acc_t>(sum);
          out.lse[n] = static_cast<acc_t>(static_cast<double>(mx * inv_tau) + std::log(sum));
        }
      }
    });

    if (out.weighted) {
      auto w_view = at::from_blob(out.weighted + start * d, {r, d}, p_hat.options());
      at::mm_out(w_view, s_view, p_hat);
      at::parallel_for(0, r, 64, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          acc_t* w = out.weighted + (start + i) * d;
          const acc_t inv = acc_t(1) / row_sum[i];
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) w[c] *= inv;
        }
      });
    }
  }
}

// The per-row gradient terms of the backward ops; null pointers contribute nothing.
//   grad_x_hat[n] = sum_k grad_scores[n,k] p_hat[k*M + index[n,k]]
//                 + sum_m grad_own[n,m] p_hat[labels[n]*M + m]          (labels[n] >= 0)
//                 + grad_lse[n] / temperature * weighted[n]
//                 + coef_target[n] p_hat[target[n]]                     (target in range)
// then through x_hat = x / max(||x||, eps).
template <typename scalar_t, typename acc_t>
struct GradTerms {
  const scalar_t* grad_scores = nullptr;  // [N, K] contiguous
  const int64_t* index = nullptr;         // [N, K]
  const acc_t* grad_own = nullptr;        // [N, M] contiguous
  const int64_t* labels = nullptr;        // [N]
  const acc_t* grad_lse = nullptr;        // [N]
  const acc_t* weighted = nullptr;        // [N, D]
  const acc_t* coef_target = nullptr;     // [N]
  const int64_t* target = nullptr;        // [N]
  double temperature = 1.0;
};

// acc[b] = sum_k grad_scores[n0+b, k] p_hat[k*M + index[n0+b, k]] for the `rows` pixels of
// a block: a GEMM's worth of FMAs (K*D per pixel) over rows scattered through p_hat. Written
// as K axpys into a row of D accumulators it is bound by storing those accumulators back after
// every prototype, and it streams p_hat from L3 once p_hat outgrows L2 (K = 847: 24 MB). So the
// columns are tiled into kGatherRegs vector registers that stay live across a slab of classes,
// and a slab's slice of p_hat stays in L2 while every pixel of the block reads it.
constexpr int64_t kGatherRows = 256;
constexpr int64_t kClassSlab = 16;
constexpr int kGatherRegs = 8;

// out[0, kGatherRegs * lanes) += sum_{k in [k0, k1)} g[k] p[(k*M + idx[k]) * d + ...], the
// accumulators held in registers.
template <typename scalar_t, typename acc_t>
inline void gather_tile(const scalar_t* g, const int64_t* idx, const acc_t* p, int64_t k0, int64_t k1,
                        int64_t m_protos, int64_t d, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t lanes = sizeof(V) / sizeof(acc_t);
  V a[kGatherRegs];
#pragma GCC unroll 8
  for (int r = 0; r < kGatherRegs; ++r) a[r] = load_vec(out + r * lanes);
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t c = static_cast<acc_t>(g[k]);
    const acc_t* row = p + (k * m_protos + idx[k]) * d;
#pragma GCC unroll 8
    for (int r = 0; r < kGatherRegs; ++r) a[r] += c * load_vec(row + r * lanes);
  }
#pragma GCC unroll 8
  for (int r = 0; r < kGatherRegs; ++r) store_vec(out + r * lanes, a[r]);
}

template <typename scalar_t, typename acc_t>
void gather_scores_block(const scalar_t* grad_scores, const int64_t* index, const acc_t* p_hat, int64_t n0,
                         int64_t rows, int64_t num_classes, int64_t m_protos, int64_t d, acc_t* acc) {
  constexpr int64_t tile = kGatherRegs * sizeof(typename Vec<acc_t>::type) / sizeof(acc_t);
  const int64_t full = d / tile * tile;
  for (int64_t k0 = 0; k0 < num_classes; k0 += kClassSlab) {
    const int64_t k1 = std::min(num_classes, k0 + kClassSlab);
    for (int64_t c0 = 0; c0 < full; c0 += tile) {
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t n = n0 + b;
        gather_tile(grad_scores + n * num_classes, index + n * num_classes, p_hat + c0, k0, k1, m_protos, d,
                    acc + b * d + c0);
      }
    }
    if (full == d) continue;
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t n = n0 + b;
      for (int64_t k = k0; k < k1; ++k) {
        const acc_t c = static_cast<acc_t>(grad_scores[n * num_classes + k]);
        const acc_t* row = p_hat + (k * m_protos + index[n * num_classes + k]) * d;
#pragma omp simd
        for (int64_t t = full; t < d; ++t) acc[b * d + t] += c * row[t];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void assemble_grad_x(const at::Tensor& x, const at::Tensor& p_hat, int64_t num_classes, int64_t num_prototypes,
                     const GradTerms<scalar_t, acc_t>& g, const at::Tensor& grad_x) {
  const int64_t n_total = x.size(0), d = x.size(1), m_protos = num_prototypes, km = num_classes * num_prototypes;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const acc_t* p = p_hat.data_ptr<acc_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();  // contiguous [N, D]
  const acc_t inv_tau = static_cast<acc_t>(1.0 / g.temperature);
  const int64_t blocks = (n_total + kGatherRows - 1) / kGatherRows;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> acc_block(kGatherRows * d), xh(d);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t n0 = blk * kGatherRows, rows = std::min(kGatherRows, n_total - n0);
      std::fill(acc_block.begin(), acc_block.end(), acc_t(0));
      if (g.grad_scores) {
        gather_scores_block(g.grad_scores, g.index, p, n0, rows, num_classes, m_protos, d, acc_block.data());
      }
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t n = n0 + b;
        acc_t* acc = acc_block.data() + b * d;
        if (g.grad_own && g.labels[n] >= 0) {
          const acc_t* base = p + g.labels[n] * m_protos * d;
          for (int64_t m = 0; m < m_protos; ++m) {
            const acc_t c = g.grad_own[n * m_protos + m];
            if (c != acc_t(0)) axpy(acc, c, base + m * d, d);
          }
        }
        if (g.grad_lse && g.grad_lse[n] != acc_t(0)) axpy(acc, g.grad_lse[n] * inv_tau, g.weighted + n * d, d);
        if (g.coef_target) {
          const int64_t t = g.target[n];
          if (t >= 0 && t < km && g.coef_target[n] != acc_t(0)) axpy(acc, g.coef_target[n], p + t * d, d);
        }
        const acc_t norm = load_normalized_row(x_ptr + n * sx0, sx1, d, xh.data());
        scalar_t* out = gx + n * d;
        const acc_t dot = norm > static_cast<acc_t>(kNormEps) ? cpu::dot(acc, xh.data(), d) : acc_t(0);
        const acc_t inv = acc_t(1) / std::max(norm, static_cast<acc_t>(kNormEps));
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<scalar_t>((acc[c] - xh[c] * dot) * inv);
      }
    }
  });
}

}  // namespace cpu
}  // namespace protoseg
