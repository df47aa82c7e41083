// Device code of the chunked pixel x prototype pass (proto_similarity, proto_contrast_loss,
// proto_train) and of the gradient assembly their backward ops share.
//
// Layouts: x [N, D] scalar_t with strides (sx0, sx1); p_hat [K*M, D] acc_t row-major, unit
// rows; the tile S [rows, K*M] acc_t row-major, produced by cuBLAS (at::mm_out) from the
// normalised rows. All pixel and element indices are int64: N * D and N * K * M pass 2^31 at
// the sizes we target (N = 1M, D = 720, K*M = 8470).
#pragma once

#include "cuda/common.cuh"

namespace protoseg {
namespace cuda {

// ---- row normalisation: out[r, :] = x[r, :] / max(||x[r, :]||, eps) in acc_t ---------------
// One warp per row (D is a few hundred: 32 lanes stride over it); the squared norm is a
// butterfly sum so every lane holds it.
template <class scalar_t>
struct NormalizeParams {
  const scalar_t* x;  // row 0 of the chunk
  int64_t rows, d, stride_row, stride_col;
  acc_t<scalar_t>* out;  // [rows, d] contiguous
};

constexpr int kNormalizeThreads = 256;

template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kNormalizeThreads) normalize_rows_kernel(NormalizeParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  constexpr int kRowsPerBlock = kNormalizeThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const scalar_t* xr = p.x + row * p.stride_row;
    acc ss = 0;
    for (int64_t c = lane; c < p.d; c += kWarpSize) {
      const acc v = static_cast<acc>(xr[c * p.stride_col]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    // 1 / max(||x||, eps) as one rsqrt per row, then products: the IEEE sqrt and division
    // slow-path calls made ptxas spill registers here (checked by tests/test_cuda_build.py).
    const acc eps = static_cast<acc>(kNormEps);
    const acc inv = ss > eps * eps ? ps::rsqrt(ss) : acc(1) / eps;
    acc* out = p.out + row * p.d;
    for (int64_t c = lane; c < p.d; c += kWarpSize) out[c] = static_cast<acc>(xr[c * p.stride_col]) * inv;
  }
}

// ---- the fused epilogue over one tile -------------------------------------------------------
// One warp per tile row, while the tile is hot in L2. Null pointers skip outputs; outputs are
// indexed by the global pixel n = row0 + row.
template <class scalar_t>
struct EpilogueParams {
  using acc = acc_t<scalar_t>;
  acc* tile;  // [rows, K*M]; becomes exp((S - rowmax) / temperature) when row_sum is set
  int64_t rows, row0, num_classes, num_prototypes;
  scalar_t* scores;        // [N, K] max over the class's M prototypes
  int64_t* index;          // [N, K] argmax, ties to the smallest m
  const int64_t* labels;   // [N] for `own`; entries outside [0, K) give a 0 row
  acc* own;                // [N, M]
  const int64_t* target;   // [N] for `target_logit`; entries outside [0, K*M) give 0
  acc* target_logit;       // [N]
  acc* lse;                // [N] logsumexp_j S[n, j] / temperature
  acc* row_sum;            // [rows] sum_j exp((S - max) / temperature), for the second GEMM
  acc inv_temperature;
};

constexpr int kEpilogueThreads = 256;

template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kEpilogueThreads) pass_epilogue_kernel(EpilogueParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  constexpr int kRowsPerBlock = kEpilogueThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t k_classes = p.num_classes, m_protos = p.num_prototypes, km = k_classes * m_protos;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t n = p.row0 + row;
    acc* s = p.tile + row * km;
    if (p.scores != nullptr || p.index != nullptr) {
      for (int64_t k = lane; k < k_classes; k += kWarpSize) {
        const acc* sk = s + k * m_protos;
        acc best = sk[0];
        int64_t arg = 0;
#pragma unroll 1
        for (int64_t m = 1; m < m_protos; ++m) {
          const acc v = sk[m];
          if (v > best) {
            best = v;
            arg = m;
          }
        }
        if (p.scores != nullptr) p.scores[n * k_classes + k] = static_cast<scalar_t>(best);
        if (p.index != nullptr) p.index[n * k_classes + k] = arg;
      }
    }
    if (p.own != nullptr) {
      const int64_t y = p.labels[n];
      const bool valid = y >= 0 && y < k_classes;
      for (int64_t m = lane; m < m_protos; m += kWarpSize) p.own[n * m_protos + m] = valid ? s[y * m_protos + m] : acc(0);
    }
    if (p.target_logit != nullptr && lane == 0) {
      const int64_t t = p.target[n];
      p.target_logit[n] = (t >= 0 && t < km) ? s[t] : acc(0);
    }
    if (p.lse != nullptr) {
      acc mx = -ps::infinity<acc>();
      for (int64_t j = lane; j < km; j += kWarpSize) mx = ps::max(mx, s[j]);
      mx = warp_max(mx);
      acc sum = 0;
      if (p.row_sum != nullptr) {
        // exp in place (each lane rewrites only the entries it read): the tile becomes the
        // unnormalised softmax that the second GEMM multiplies by p_hat.
#pragma unroll 1
        for (int64_t j = lane; j < km; j += kWarpSize) {
          const acc e = ps::exp((s[j] - mx) * p.inv_temperature);
          s[j] = e;
          sum += e;
        }
      } else {
#pragma unroll 1
        for (int64_t j = lane; j < km; j += kWarpSize) sum += ps::exp((s[j] - mx) * p.inv_temperature);
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        p.lse[n] = mx * p.inv_temperature + ps::log(sum);
        if (p.row_sum != nullptr) p.row_sum[row] = sum;
      }
    }
  }
}

// ---- weighted[r, :] *= 1 / row_sum[r] after the second GEMM ---------------------------------
template <class acc>
struct ScaleRowsParams {
  acc* w;  // [rows, d] contiguous
  int64_t rows, d;
  const acc* row_sum;  // [rows]
};

constexpr int kScaleThreads = 256;

template <class acc>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kScaleThreads) scale_rows_kernel(ScaleRowsParams<acc> p) {
  const int64_t total = p.rows * p.d;
  for (int64_t i = int64_t(blockIdx.x) * kScaleThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kScaleThreads) {
    const acc inv = acc(1) / p.row_sum[i / p.d];
    p.w[i] *= inv;
  }
}

// ---- gradient assembly ----------------------------------------------------------------------
//   grad_x_hat[n] = sum_k grad_scores[n,k] p_hat[k*M + index[n,k]]
//                 + sum_m grad_own[n,m] p_hat[labels[n]*M + m]           (labels in [0, K))
//                 + grad_lse[n] / temperature * weighted[n]
//                 + coef_target[n] p_hat[target[n]]                      (target in [0, K*M))
//   grad_x[n] = (grad_x_hat - x_hat <grad_x_hat, x_hat>) / ||x||   (or grad_x_hat / eps when
//   ||x|| <= eps, the clamped branch of F.normalize). Null pointers contribute nothing.
// One block per pixel row, threads over channels; grad_x_hat is kept in dynamic shared memory
// ([D] acc_t; each entry is only touched by the thread that owns its channel).
template <class scalar_t>
struct GradParams {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;
  int64_t n, d, sx0, sx1;
  const acc* p_hat;  // [K*M, D]
  int64_t num_classes, num_prototypes;
  const scalar_t* grad_scores;  // [N, K] contiguous
  const int64_t* index;         // [N, K]
  const acc* grad_own;          // [N, M]
  const int64_t* labels;        // [N]
  const acc* grad_lse;          // [N]
  const acc* weighted;          // [N, D]
  const acc* coef_target;       // [N]
  const int64_t* target;        // [N]
  acc inv_temperature;
  scalar_t* grad_x;  // [N, D] contiguous
};

constexpr int kGradThreads = 128;

template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kGradThreads) assemble_grad_kernel(GradParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  PS_DYNAMIC_SHARED(acc, gxh);  // [d]
  const int64_t k_classes = p.num_classes, m_protos = p.num_prototypes, km = k_classes * m_protos, d = p.d;
  for (int64_t n = blockIdx.x; n < p.n; n += gridDim.x) {
    const int64_t y = p.grad_own != nullptr ? p.labels[n] : -1;
    const bool own_valid = y >= 0 && y < k_classes;
    const acc gl = p.grad_lse != nullptr ? p.grad_lse[n] * p.inv_temperature : acc(0);
    const int64_t t = p.coef_target != nullptr ? p.target[n] : -1;
    const acc ct = (t >= 0 && t < km) ? p.coef_target[n] : acc(0);
    const scalar_t* xr = p.x + n * p.sx0;
    acc ss = 0, dot = 0;
    for (int64_t c = threadIdx.x; c < d; c += kGradThreads) {
      acc a = 0;
      if (p.grad_scores != nullptr) {
#pragma unroll 1
        for (int64_t k = 0; k < k_classes; ++k) {
          const acc g = static_cast<acc>(p.grad_scores[n * k_classes + k]);
          const int64_t m = p.index[n * k_classes + k];
          if (g != acc(0) && m >= 0 && m < m_protos) a += g * p.p_hat[(k * m_protos + m) * d + c];
        }
      }
      if (own_valid) {
#pragma unroll 1
        for (int64_t m = 0; m < m_protos; ++m) {
          const acc g = p.grad_own[n * m_protos + m];
          if (g != acc(0)) a += g * p.p_hat[(y * m_protos + m) * d + c];
        }
      }
      if (gl != acc(0)) a += gl * p.weighted[n * d + c];
      if (ct != acc(0)) a += ct * p.p_hat[t * d + c];
      gxh[c] = a;
      const acc xv = static_cast<acc>(xr[c * p.sx1]);
      ss += xv * xv;
      dot += a * xv;
    }
    ss = block_sum<kGradThreads>(ss);
    dot = block_sum<kGradThreads>(dot);
    const acc eps = static_cast<acc>(kNormEps);
    const bool clamped = !(ss > eps * eps);  // ||x|| <= eps
    // One rsqrt per row (see normalize_rows_kernel). Unclamped: (a - x_hat <a, x_hat>) / ||x||
    // with x_hat = x / ||x|| and <a, x_hat> = <a, x> / ||x||; clamped: a / eps.
    const acc inv_norm = clamped ? acc(1) / eps : ps::rsqrt(ss);
    const acc x_coef = clamped ? acc(0) : dot * inv_norm;  // <a, x_hat>
    scalar_t* out = p.grad_x + n * d;
    for (int64_t c = threadIdx.x; c < d; c += kGradThreads) {
      const acc xh = static_cast<acc>(xr[c * p.sx1]) * inv_norm;
      out[c] = static_cast<scalar_t>((gxh[c] - xh * x_coef) * inv_norm);
    }
  }
}

}  // namespace cuda
}  // namespace protoseg
