// The chunked pixel x prototype pass (proto_similarity, proto_train) and
// the gradient assembly their backward ops share: kernels, then (host side) their launch costs
// and the host functions the ops' launch sequences call.
//
// Layouts: x [N, D] scalar_t with strides (sx0, sx1); p_hat [K*M, D] acc_t row-major, unit
// rows; the tile [rows, K*M] acc_t row-major, produced by cuBLAS from x (float32/float64, the
// epilogue then applies 1 / ||x||) or from the normalised rows (half precision). All pixel and element indices are int64: N * D and N * K * M pass 2^31 at
// the sizes we target (N = 1M, D = 720, K*M = 8470).
#pragma once

#include "cuda/common.cuh"

namespace protoseg {
namespace cuda {

// ---- row normalisation: out[r, :] = x[r, :] / max(||x[r, :]||, eps) in acc_t ---------------
// One warp per row (D is a few hundred: 32 lanes stride over it); the squared norm is a
// butterfly sum so every lane holds it. Either output may be null: with `out` null only the
// reciprocal norms are written (the pass then multiplies x itself and scales in the epilogue).
template <class scalar_t>
struct NormalizeParams {
  const scalar_t* x;  // row 0 of the chunk
  int64_t rows, d, stride_row, stride_col;
  acc_t<scalar_t>* out;       // [rows, d] contiguous, or null
  acc_t<scalar_t>* inv_norm;  // [rows] 1 / max(||x||, eps), or null
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
    if (p.inv_norm != nullptr && lane == 0) p.inv_norm[row] = inv;
    if (p.out == nullptr) continue;
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
  acc* tile;  // [rows, K*M] products; becomes softmax_j(S / temperature) when softmax_tile is set
  const acc* inv_norm;     // [rows] 1 / ||x|| when the tile holds products with raw x, or null
  int64_t rows, row0, num_classes, num_prototypes;
  scalar_t* scores;        // [N, K] max over the class's M prototypes
  int64_t* index;          // [N, K] argmax, ties to the smallest m
  const int64_t* labels;   // [N] for `own`; entries outside [0, K) give a 0 row
  acc* own;                // [N, M]
  acc* lse;                // [N] logsumexp_j S[n, j] / temperature
  bool softmax_tile;       // rewrite the tile as the row softmax, for the second GEMM (needs lse)
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
    // S = (x p_hat^T) / ||x||: the scale is positive, so the max and argmax of the raw products
    // are those of S; every value read out is scaled.
    const acc scale = p.inv_norm != nullptr ? p.inv_norm[row] : acc(1);
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
        if (p.scores != nullptr) p.scores[n * k_classes + k] = static_cast<scalar_t>(best * scale);
        if (p.index != nullptr) p.index[n * k_classes + k] = arg;
      }
    }
    if (p.own != nullptr) {
      const int64_t y = p.labels[n];
      const bool valid = y >= 0 && y < k_classes;
      for (int64_t m = lane; m < m_protos; m += kWarpSize) p.own[n * m_protos + m] = valid ? s[y * m_protos + m] * scale : acc(0);
    }
    if (p.lse != nullptr) {
      acc mx = -ps::infinity<acc>();
      for (int64_t j = lane; j < km; j += kWarpSize) mx = ps::max(mx, s[j]);
      mx = warp_max(mx);
      const acc factor = scale * p.inv_temperature;
      acc sum = 0;
      if (p.softmax_tile) {
        // exp in place, then divided by the row sum (each lane rewrites only the entries it
        // read): the tile becomes the softmax that the second GEMM multiplies by p_hat, so
        // `weighted` needs no pass of its own over [rows, D] afterwards.
#pragma unroll 1
        for (int64_t j = lane; j < km; j += kWarpSize) {
          const acc e = ps::exp((s[j] - mx) * factor);
          s[j] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        const acc inv = acc(1) / sum;
#pragma unroll 1
        for (int64_t j = lane; j < km; j += kWarpSize) s[j] *= inv;
      } else {
#pragma unroll 1
        for (int64_t j = lane; j < km; j += kWarpSize) sum += ps::exp((s[j] - mx) * factor);
        sum = warp_sum(sum);
      }
      if (lane == 0) p.lse[n] = mx * factor + ps::log(sum);
    }
  }
}

// ---- gradient assembly ----------------------------------------------------------------------
//   grad_x_hat[n] = sum_k grad_scores[n,k] p_hat[k*M + index[n,k]]
//                 + sum_m grad_own[n,m] p_hat[labels[n]*M + m]           (labels in [0, K))
//                 + grad_lse[n] / temperature * weighted[n]
//   grad_x[n] = (grad_x_hat - x_hat <grad_x_hat, x_hat>) / ||x||   (or grad_x_hat / eps when
//   ||x|| <= eps, the clamped branch of F.normalize). Null pointers contribute nothing.
// The prototype terms are one GEMM per chunk: grad_tile_kernel scatters the coefficients into
// a [rows, K*M] tile G, cuBLAS forms G p_hat, and assemble_grad_kernel adds the `weighted` term
// and applies the normalisation backward. (Gathering the K + M prototype rows per pixel instead
// reads (K + M) * D values per pixel from L2: 88 GB at N = 1M, K*M = 190, D = 720.)
template <class scalar_t>
struct GradTileParams {
  using acc = acc_t<scalar_t>;
  acc* tile;  // [rows, K*M]
  int64_t rows, row0, num_classes, num_prototypes;
  const scalar_t* grad_scores;  // [N, K] contiguous
  const int64_t* index;         // [N, K]
  const acc* grad_own;          // [N, M]
  const int64_t* labels;        // [N]
};

constexpr int kGradTileThreads = 256;

// One warp per tile row: zero it, then add the two kinds of coefficients in turn (they can
// land on the same cell, so the phases are separated by warp barriers; within a phase every
// lane writes distinct cells).
template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kGradTileThreads) grad_tile_kernel(GradTileParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  constexpr int kRowsPerBlock = kGradTileThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t k_classes = p.num_classes, m_protos = p.num_prototypes, km = k_classes * m_protos;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t n = p.row0 + row;
    acc* t = p.tile + row * km;
    for (int64_t j = lane; j < km; j += kWarpSize) t[j] = acc(0);
    ps::sync_warp();
    if (p.grad_scores != nullptr) {
      for (int64_t k = lane; k < k_classes; k += kWarpSize) {
        const int64_t m = p.index[n * k_classes + k];
        if (m >= 0 && m < m_protos) t[k * m_protos + m] = static_cast<acc>(p.grad_scores[n * k_classes + k]);
      }
    }
    ps::sync_warp();
    if (p.grad_own != nullptr) {
      const int64_t y = p.labels[n];
      if (y >= 0 && y < k_classes) {
        for (int64_t m = lane; m < m_protos; m += kWarpSize) t[y * m_protos + m] += p.grad_own[n * m_protos + m];
      }
    }
    ps::sync_warp();  // the row is complete before this warp moves on
  }
}

template <class scalar_t>
struct GradParams {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;
  int64_t d, sx0, sx1;
  int64_t rows, row0;      // this chunk: pixels row0 .. row0 + rows
  const acc* tile_grad;    // [rows, D] = G p_hat for the chunk, or null
  const acc* grad_lse;     // [N]
  const acc* weighted;     // [N, D]
  acc inv_temperature;
  scalar_t* grad_x;  // [N, D] contiguous
};

constexpr int kGradThreads = 128;

// One block per pixel row, threads over channels.
template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kGradThreads) assemble_grad_kernel(GradParams<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const int64_t d = p.d;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t n = p.row0 + row;
    const acc gl = p.grad_lse != nullptr ? p.grad_lse[n] * p.inv_temperature : acc(0);
    const acc* tg = p.tile_grad != nullptr ? p.tile_grad + row * d : nullptr;
    const acc* w = p.weighted != nullptr ? p.weighted + n * d : nullptr;
    const scalar_t* xr = p.x + n * p.sx0;
    acc ss = 0, dot = 0;
    for (int64_t c = threadIdx.x; c < d; c += kGradThreads) {
      const acc a = (tg != nullptr ? tg[c] : acc(0)) + (gl != acc(0) ? gl * w[c] : acc(0));
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
      const acc a = (tg != nullptr ? tg[c] : acc(0)) + (gl != acc(0) ? gl * w[c] : acc(0));
      const acc xh = static_cast<acc>(xr[c * p.sx1]) * inv_norm;
      out[c] = static_cast<scalar_t>((a - xh * x_coef) * inv_norm);
    }
  }
}

}  // namespace cuda
}  // namespace protoseg

// ---- host side: launch costs (the roofline model) and the launch sequence ----------------
// Hidden from nvcc's per-architecture device passes (parsing ATen there would triple the build)
#ifndef __CUDA_ARCH__
#include <algorithm>
#include <type_traits>

namespace protoseg {
namespace cuda {

template <class T>
LaunchCost launch_cost(const NormalizeParams<T>& p) {
  using acc = acc_t<T>;
  const double e = double(p.rows) * p.d;
  return {e * costs::bytes<T>(), costs::if_set(p.out, e * costs::bytes<acc>()) + costs::if_set(p.inv_norm, p.rows * costs::bytes<acc>()),
          costs::if_set(p.out, e) + 3 * e};
}

template <class T>
LaunchCost launch_cost(const EpilogueParams<T>& p) {
  using acc = acc_t<T>;
  using namespace costs;
  const double r = p.rows, km = double(p.num_classes) * p.num_prototypes;
  const bool training = p.softmax_tile;
  LaunchCost c;
  c.read = r * km * bytes<acc>() + if_set(p.inv_norm, r * bytes<acc>()) + if_set(p.labels, r * kIndex);
  c.written = if_set(p.scores, r * p.num_classes * bytes<T>()) + if_set(p.index, r * p.num_classes * kIndex) +
              if_set(p.own, r * p.num_prototypes * bytes<acc>()) + if_set(p.lse, r * bytes<acc>()) +
              (training ? r * km * bytes<acc>() : 0.0);
  c.flops = r * km * (training ? 6 : p.lse != nullptr ? 5 : 1);
  c.workspace = p.tile;
  c.workspace_bytes = r * km * bytes<acc>() * (training ? 2 : 1);
  return c;
}

template <class T>
LaunchCost launch_cost(const GradTileParams<T>& p) {
  using acc = acc_t<T>;
  using namespace costs;
  const double r = p.rows, k = p.num_classes, m = p.num_prototypes;
  LaunchCost c;
  c.read = if_set(p.grad_scores, r * k * (bytes<T>() + kIndex)) + if_set(p.grad_own, r * m * bytes<acc>() + r * kIndex);
  c.written = r * k * m * bytes<acc>();
  c.flops = r * (k + m);
  c.workspace = p.tile;
  c.workspace_bytes = c.written;
  return c;
}

template <class T>
LaunchCost launch_cost(const GradParams<T>& p) {
  using acc = acc_t<T>;
  using namespace costs;
  const double e = double(p.rows) * p.d;
  LaunchCost c;
  c.read = e * bytes<T>() + if_set(p.tile_grad, e * bytes<acc>()) + if_set(p.weighted, e * bytes<acc>()) +
           if_set(p.grad_lse, p.rows * bytes<acc>());
  c.written = e * bytes<T>();
  c.flops = 8 * e;
  c.workspace = p.tile_grad;
  c.workspace_bytes = if_set(p.tile_grad, e * bytes<acc>());
  return c;
}

// Default tile bound: 2^25 acc_t entries (128 MB in fp32). Large enough that cuBLAS runs near
// peak (>= 3961 rows at K*M = 8470), small next to an 80 GB device; O(chunk), never O(N*K*M).
constexpr int64_t kDefaultTileBudget = int64_t{1} << 25;

// How many pixel rows a chunk of the pass (or of the gradient assembly) takes, and whether its
// workspaces stay in L2. Each chunk's [rows, K*M] tile is written by a GEMM (the backward: by
// grad_tile_kernel) and read back by the next kernel. Where a row's tile is larger than its row of
// x (K*M accumulator values against D values of x: 8470 against 720 on ADE20K-Full), those round
// trips are most of the traffic, and the chunk is cut so that everything it touches (the tile,
// its rows of x, of grad_x and of the [rows, D] product, and the normalised prototypes that every
// GEMM reads: `resident_bytes`) fits in kL2Share of the cache; the round trips then stay on chip.
// At small K*M the tile is a small part of the traffic and L2-sized chunks would be thousands of
// small GEMMs, so the chunk is the tile budget's, as it is where the prototypes alone crowd the
// cache (a chunk of fewer than kMinL2Rows rows would leave cuBLAS too little to tile).
struct ChunkPlan {
  int64_t rows;
  bool in_l2;
};

constexpr double kL2Share = 0.75;    // the rest: other lines, and replacement that is not LRU
constexpr int64_t kMinL2Rows = 128;  // one row of 128 x 128 GEMM output tiles
constexpr int64_t kL2RowStep = 32;   // chunk starts stay aligned

inline ChunkPlan plan_chunks(int64_t n, int64_t km, int64_t d, int64_t x_bytes, int64_t acc_bytes,
                             int64_t resident_bytes, int64_t l2_bytes, int64_t tile_budget) {
  const int64_t budget_rows = std::max<int64_t>(1, std::min<int64_t>(n, tile_budget / std::max<int64_t>(km, 1)));
  if (km * acc_bytes <= d * x_bytes) return {budget_rows, false};
  const double free_bytes = kL2Share * double(l2_bytes) - double(resident_bytes);
  const int64_t row_bytes = km * acc_bytes + d * (acc_bytes + 2 * x_bytes);
  const int64_t fit = free_bytes > 0 ? int64_t(free_bytes / double(row_bytes)) / kL2RowStep * kL2RowStep : 0;
  if (fit < kMinL2Rows) return {budget_rows, false};
  return {std::min(budget_rows, fit), true};
}

// p_hat = prototypes / max(||p||, eps) as a contiguous [K*M, D] acc_t tensor.
template <class Exec, class scalar_t>
at::Tensor normalized_prototypes(Exec& ex, const at::Tensor& prototypes) {
  using acc = acc_t<scalar_t>;
  const int64_t d = prototypes.size(2);
  const auto p = prototypes.reshape({-1, d});
  at::Tensor out = at::empty({p.size(0), d}, p.options().dtype(c10::CppTypeToScalarType<acc>::value));
  NormalizeParams<scalar_t> np{.x = p.data_ptr<scalar_t>(),
                               .rows = p.size(0),
                               .d = d,
                               .stride_row = p.stride(0),
                               .stride_col = p.stride(1),
                               .out = out.data_ptr<acc>(),
                               .inv_norm = nullptr};
  constexpr int kRows = kNormalizeThreads / kWarpSize;
  ex.launch(normalize_rows_kernel<scalar_t>, grid_for(p.size(0), kRows), kNormalizeThreads, 0, np);
  return out;
}

// What the chunked pass produces; null pointers / undefined tensors skip an output.
template <class scalar_t>
struct PassOutputs {
  using acc = acc_t<scalar_t>;
  scalar_t* scores = nullptr;
  int64_t* index = nullptr;
  const int64_t* labels = nullptr;
  acc* own = nullptr;
  acc* lse = nullptr;
  at::Tensor weighted;  // [N, D] acc_t contiguous (needs lse)
  double temperature = 1.0;
};

// x [N, D] (any strides) against p_hat [K*M, D], per chunk of rows (plan_chunks): the tile of
// products (cuBLAS), the fused epilogue (which, for `weighted`, leaves the row softmax in the
// tile), and the second GEMM softmax(S) p_hat. The first GEMM reads x itself, in its own dtype:
// half-precision x against p_hat rounded to that dtype, products accumulated and written in fp32;
// the epilogue scales each row by 1 / ||x|| (the reciprocal norms of all rows are written first,
// in one launch). Workspaces are allocated once per call and reused by every chunk (same stream,
// so no chunk overwrites a buffer still being read).
template <class Exec, class scalar_t>
void prototype_pass(Exec& ex, const at::Tensor& x, const at::Tensor& p_hat, int64_t k_classes, int64_t m_protos,
                    const PassOutputs<scalar_t>& out) {
  using acc = acc_t<scalar_t>;
  const int64_t n = x.size(0), d = x.size(1), km = k_classes * m_protos;
  if (n == 0) return;
  const at::Tensor p_gemm = std::is_same_v<scalar_t, acc> ? p_hat : p_hat.to(x.scalar_type());
  const int64_t p_bytes = p_hat.nbytes() + (p_gemm.is_same(p_hat) ? 0 : p_gemm.nbytes());
  const ChunkPlan plan = plan_chunks(n, km, d, sizeof(scalar_t), sizeof(acc), p_bytes, ex.l2_bytes(), ex.tile_budget);
  auto inv_norm = at::empty({n}, p_hat.options());
  auto tile = at::empty({plan.rows, km}, p_hat.options());
  if (plan.in_l2) {
    ex.l2_resident(tile);
    ex.l2_resident(p_hat);
    ex.l2_resident(p_gemm);
  }
  NormalizeParams<scalar_t> np{.x = x.data_ptr<scalar_t>(),
                               .rows = n,
                               .d = d,
                               .stride_row = x.stride(0),
                               .stride_col = x.stride(1),
                               .out = nullptr,
                               .inv_norm = inv_norm.data_ptr<acc>()};
  ex.launch(normalize_rows_kernel<scalar_t>, grid_for(n, kNormalizeThreads / kWarpSize), kNormalizeThreads, 0, np);
  const at::Tensor p_gemm_t = p_gemm.t();
  constexpr int kRows = kEpilogueThreads / kWarpSize;
  for (int64_t start = 0; start < n; start += plan.rows) {
    const int64_t r = std::min(plan.rows, n - start);
    auto s_view = tile.narrow(0, 0, r);
    ex.gemm(s_view, x.narrow(0, start, r), p_gemm_t);
    EpilogueParams<scalar_t> ep{.tile = tile.data_ptr<acc>(),
                                .inv_norm = inv_norm.data_ptr<acc>() + start,
                                .rows = r,
                                .row0 = start,
                                .num_classes = k_classes,
                                .num_prototypes = m_protos,
                                .scores = out.scores,
                                .index = out.index,
                                .labels = out.labels,
                                .own = out.own,
                                .lse = out.lse,
                                .softmax_tile = out.weighted.defined(),
                                .inv_temperature = static_cast<acc>(1.0 / out.temperature)};
    ex.launch(pass_epilogue_kernel<scalar_t>, grid_for(r, kRows), kEpilogueThreads, 0, ep);
    if (out.weighted.defined()) {
      at::Tensor w_view = out.weighted.narrow(0, start, r);
      ex.gemm(w_view, s_view, p_hat);
    }
  }
}

// The terms of the gradient (GradTileParams / GradParams in prototype_pass.cuh); null
// pointers contribute nothing.
template <class scalar_t>
struct GradTerms {
  using acc = acc_t<scalar_t>;
  const scalar_t* grad_scores = nullptr;
  const int64_t* index = nullptr;
  const acc* grad_own = nullptr;
  const int64_t* labels = nullptr;
  const acc* grad_lse = nullptr;
  const acc* weighted = nullptr;
  double temperature = 1.0;
};

// grad_x [N, D] contiguous, per chunk of rows: coefficients into the [rows, K*M] tile, one
// cuBLAS GEMM with p_hat, then the `weighted` term and the normalisation backward.
template <class Exec, class scalar_t>
void assemble_grad_x(Exec& ex, const at::Tensor& x, const at::Tensor& p_hat, int64_t k_classes, int64_t m_protos,
                     const GradTerms<scalar_t>& g, const at::Tensor& grad_x) {
  using acc = acc_t<scalar_t>;
  const int64_t n = x.size(0), d = x.size(1), km = k_classes * m_protos;
  if (n == 0) return;
  const bool tile_terms = g.grad_scores != nullptr || g.grad_own != nullptr;
  const ChunkPlan plan =
      plan_chunks(n, km, d, sizeof(scalar_t), sizeof(acc), p_hat.nbytes(), ex.l2_bytes(), ex.tile_budget);
  at::Tensor tile, tile_grad;
  if (tile_terms) {
    tile = at::empty({plan.rows, km}, p_hat.options());
    tile_grad = at::empty({plan.rows, d}, p_hat.options());
    if (plan.in_l2) {
      ex.l2_resident(tile);
      ex.l2_resident(tile_grad);
      ex.l2_resident(p_hat);
    }
  }
  const int64_t rows = tile_terms ? plan.rows : n;  // without a tile, one launch does every row
  constexpr int kRows = kGradTileThreads / kWarpSize;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t r = std::min(rows, n - start);
    if (tile_terms) {
      GradTileParams<scalar_t> tp{.tile = tile.data_ptr<acc>(),
                                  .rows = r,
                                  .row0 = start,
                                  .num_classes = k_classes,
                                  .num_prototypes = m_protos,
                                  .grad_scores = g.grad_scores,
                                  .index = g.index,
                                  .grad_own = g.grad_own,
                                  .labels = g.labels};
      ex.launch(grad_tile_kernel<scalar_t>, grid_for(r, kRows), kGradTileThreads, 0, tp);
      at::Tensor out_view = tile_grad.narrow(0, 0, r);
      ex.gemm(out_view, tile.narrow(0, 0, r), p_hat);
    }
    GradParams<scalar_t> gp{.x = x.data_ptr<scalar_t>(),
                            .d = d,
                            .sx0 = x.stride(0),
                            .sx1 = x.stride(1),
                            .rows = r,
                            .row0 = start,
                            .tile_grad = tile_terms ? tile_grad.data_ptr<acc>() : nullptr,
                            .grad_lse = g.grad_lse,
                            .weighted = g.weighted,
                            .inv_temperature = static_cast<acc>(1.0 / g.temperature),
                            .grad_x = grad_x.data_ptr<scalar_t>()};
    ex.launch(assemble_grad_kernel<scalar_t>, grid_for(r, 1), kGradThreads, 0, gp);
  }
}


// Compiled once for the GPU, in prototype_pass.cu (the one translation unit holding the pass
// kernels); `prefix` is `template` there and `extern template` in cuda_exec.cuh.
#define PROTOSEG_PASS_HOST_FUNCTIONS(prefix, Exec, T)                                                            \
  prefix at::Tensor normalized_prototypes<Exec, T>(Exec&, const at::Tensor&);                                    \
  prefix void prototype_pass<Exec, T>(Exec&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,             \
                                      const PassOutputs<T>&);                                                    \
  prefix void assemble_grad_x<Exec, T>(Exec&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,            \
                                       const GradTerms<T>&, const at::Tensor&);

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
