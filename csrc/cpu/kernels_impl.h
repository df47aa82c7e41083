// The vectorised CPU kernels (the interface and the layouts: cpu/kernels.h), compiled once per
// instruction set: cpu/kernels_<isa>.cpp defines PROTOSEG_ISA (the namespace), PROTOSEG_ISA_NAME,
// PROTOSEG_VEC_BYTES and, for the x86 extensions, PROTOSEG_ISA_TARGET, then includes this file.
//
// Every library header is included before the target pragma, so what they define keeps the
// baseline target (GCC gives a function the target in force where it is defined, template
// instantiations included): the only code compiled for AVX2/AVX-512 is below, in its own
// namespace, and the library holds no AVX-512 copy of an inline function that baseline code could
// end up calling.
//
// The pass: pixels `rows` at a time, each row normalised into an acc_t buffer, one library GEMM
// into the tile S [rows, K*M], then a fused epilogue over the tile while it is in cache, and for
// `weighted` a second GEMM (the softmax tile times p_hat). The [N, K*M] products are never held.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "norm_eps.h"

#define PROTOSEG_DO_PRAGMA(x) _Pragma(#x)
#define PROTOSEG_TARGET(t) PROTOSEG_DO_PRAGMA(GCC target(t))

#ifdef PROTOSEG_ISA_TARGET
#pragma GCC push_options
PROTOSEG_TARGET(PROTOSEG_ISA_TARGET)
#endif

#include "cpu/simd.h"

namespace protoseg {
namespace cpu {
namespace PROTOSEG_ISA {
namespace {

template <typename acc_t>
struct Norm {
  const acc_t* weight;
  const acc_t* bias;
  acc_t eps;
  explicit Norm(const RowNorm& n)
      : weight(static_cast<const acc_t*>(n.weight)),
        bias(static_cast<const acc_t*>(n.bias)),
        eps(static_cast<acc_t>(n.eps)) {}
};

// y = the unit row of x (see RowNorm), written to out; stats = (mean, rstd, ||y||).
template <typename scalar_t, typename acc_t>
inline void normalize_row(const scalar_t* x, int64_t stride, int64_t d, const Norm<acc_t>& norm, acc_t* __restrict y,
                          acc_t* stats) {
  load_row(x, stride, d, y);
  acc_t mean = 0, rstd = 1;
  if (norm.weight != nullptr) {
    mean = sum(y, d) / static_cast<acc_t>(d);
    for (int64_t c = 0; c < d; ++c) y[c] -= mean;
    rstd = acc_t(1) / std::sqrt(dot(y, y, d) / static_cast<acc_t>(d) + norm.eps);
    for (int64_t c = 0; c < d; ++c) y[c] = y[c] * rstd * norm.weight[c] + norm.bias[c];
  }
  const acc_t length = std::sqrt(dot(y, y, d));
  const acc_t inv = acc_t(1) / std::max(length, static_cast<acc_t>(kNormEps));
  for (int64_t c = 0; c < d; ++c) y[c] *= inv;
  if (stats != nullptr) {
    stats[0] = mean;
    stats[1] = rstd;
    stats[2] = length;
  }
}

// Rows per chunk: the tile [rows, K*M] is at most 2^22 entries (16 MB in fp32), and at most
// 1024 rows so that the normalised rows [rows, D] and the `weighted` rows the second GEMM writes
// stay in cache between the GEMMs and the epilogue (bigger chunks add two memory passes over
// [N, D] without making the GEMMs faster).
inline int64_t chunk_rows(int64_t n, int64_t km) {
  const int64_t budget = int64_t{1} << 22;
  const int64_t rows = std::min<int64_t>(1024, std::max<int64_t>(64, budget / std::max<int64_t>(km, 1)));
  return std::max<int64_t>(1, std::min<int64_t>(n, rows));
}

// Only the rows: x_hat and stats (layer_norm_normalize's forward).
template <typename scalar_t, typename acc_t>
void normalize_rows(const PassArgs& a) {
  const int64_t n = a.x.size(0), d = a.x.size(1), sx0 = a.x.stride(0), sx1 = a.x.stride(1);
  const scalar_t* xp = a.x.data_ptr<scalar_t>();
  const Norm<acc_t> norm(a.norm);
  auto* out = static_cast<scalar_t*>(a.x_hat);
  auto* stats = static_cast<acc_t*>(a.stats);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    for (int64_t i = begin; i < end; ++i) {
      acc_t* y = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + i * d) : row.data();
      normalize_row(xp + i * sx0, sx1, d, norm, y, stats ? stats + 3 * i : nullptr);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t c = 0; c < d; ++c) out[i * d + c] = static_cast<scalar_t>(y[c]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void pass_impl(const PassArgs& a) {
  const int64_t n_total = a.x.size(0), d = a.x.size(1);
  if (n_total == 0) return;
  if (!a.p_hat.defined()) return normalize_rows<scalar_t, acc_t>(a);
  const int64_t k_classes = a.num_classes, m_protos = a.num_prototypes, km = k_classes * m_protos;
  const int64_t rows = chunk_rows(n_total, km);
  const at::Tensor& p_hat = a.p_hat;
  // fp32/fp64 rows are normalised straight into x_hat when it is wanted, and the GEMM reads them there.
  constexpr bool rows_in_place = std::is_same_v<scalar_t, acc_t>;
  const bool own_buffer = !(rows_in_place && a.x_hat != nullptr);
  auto xbuf = own_buffer ? at::empty({rows, d}, p_hat.options()) : at::Tensor();
  auto tile = at::empty({rows, km}, p_hat.options());
  const at::Tensor p_hat_t = p_hat.t();
  const scalar_t* x_ptr = a.x.data_ptr<scalar_t>();
  const int64_t sx0 = a.x.stride(0), sx1 = a.x.stride(1);
  const Norm<acc_t> norm(a.norm);
  auto* x_hat = static_cast<scalar_t*>(a.x_hat);
  auto* stats = static_cast<acc_t*>(a.stats);
  auto* scores = static_cast<scalar_t*>(a.scores);
  auto* own = static_cast<acc_t*>(a.own);
  auto* lse = static_cast<acc_t*>(a.lse);
  auto* weighted = static_cast<acc_t*>(a.weighted);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / a.temperature);
  std::vector<acc_t> row_sum(weighted ? rows : 0);  // exp sums, to scale the second GEMM's rows

  for (int64_t start = 0; start < n_total; start += rows) {
    const int64_t r = std::min(rows, n_total - start);
    acc_t* xb = own_buffer ? xbuf.data_ptr<acc_t>() : reinterpret_cast<acc_t*>(x_hat + start * d);
    at::parallel_for(0, r, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = start + i;
        normalize_row(x_ptr + n * sx0, sx1, d, norm, xb + i * d, stats ? stats + 3 * n : nullptr);
        if (own_buffer && x_hat != nullptr) {
          for (int64_t c = 0; c < d; ++c) x_hat[n * d + c] = static_cast<scalar_t>(xb[i * d + c]);
        }
      }
    });
    auto s_view = tile.narrow(0, 0, r);
    at::mm_out(s_view, at::from_blob(xb, {r, d}, p_hat.options()), p_hat_t);
    acc_t* s_ptr = tile.data_ptr<acc_t>();

    at::parallel_for(0, r, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = start + i;
        acc_t* s = s_ptr + i * km;
        if (scores || a.index) {
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
            if (scores) scores[n * k_classes + k] = static_cast<scalar_t>(best);
            if (a.index) a.index[n * k_classes + k] = arg;
          }
        }
        if (own) {
          const int64_t y = a.labels[n];
          acc_t* o = own + n * m_protos;
          if (y >= 0) {
            std::copy(s + y * m_protos, s + (y + 1) * m_protos, o);
          } else {
            std::fill(o, o + m_protos, acc_t(0));
          }
        }
        if (lse) {
          const acc_t mx = row_max(s, km);
          // exp in place when `weighted` is wanted: the tile becomes the unnormalised softmax fed
          // to the second GEMM.
          const double total = exp_shifted_sum(s, km, mx, inv_tau, /*store=*/weighted != nullptr);
          if (weighted) row_sum[i] = static_cast<acc_t>(total);
          lse[n] = static_cast<acc_t>(static_cast<double>(mx * inv_tau) + std::log(total));
        }
      }
    });

    if (weighted) {
      auto w_view = at::from_blob(weighted + start * d, {r, d}, p_hat.options());
      at::mm_out(w_view, s_view, p_hat);
      at::parallel_for(0, r, 64, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          acc_t* w = weighted + (start + i) * d;
          const acc_t inv = acc_t(1) / row_sum[i];
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) w[c] *= inv;
        }
      });
    }
  }
}

template <typename acc_t>
inline void axpy(acc_t* __restrict y, acc_t a, const acc_t* __restrict x, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

// The sum over classes of grad_scores[n, k] p_hat[k*M + index[n, k]] for a block of pixels: a
// GEMM's worth of FMAs (K*D per pixel) over rows scattered through p_hat. Written as K axpys into
// a row of D accumulators it is bound by storing those accumulators back after every prototype,
// and it streams p_hat from L3 once p_hat outgrows L2 (K = 847: 24 MB). So a tile of columns is
// held in kGatherRegs vector registers across a slab of kClassSlab classes, and a slab's slice
// of p_hat stays in L2 while every pixel of the block reads it.
//
// The sum is blocked for precision: each slab is summed from zero in registers, slabs are
// added into a group of kSlabGroup slabs, groups into the result. A float sum over K = 6000
// classes in one chain had 5x the error of torch's GEMM (tests/test_ops.py, case min_rows).
constexpr int64_t kClassSlab = 16;
constexpr int64_t kClassGroup = 16 * kClassSlab;
constexpr int kGatherRegs = 8;

// out[0, R * lanes) += sum_{k in [k0, k1)} g[k] p[(k*M + idx[k]) * d + ...].
template <int R, typename scalar_t, typename acc_t>
inline void gather_tile(const scalar_t* g, const int64_t* idx, const acc_t* p, int64_t k0, int64_t k1,
                        int64_t m_protos, int64_t d, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t lanes = Vec<acc_t>::lanes;
  V a[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a[r] = V{};
  for (int64_t k = k0; k < k1; ++k) {
    const acc_t c = static_cast<acc_t>(g[k]);
    const acc_t* row = p + (k * m_protos + idx[k]) * d;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r] += c * load_vec(row + r * lanes);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store_vec(out + r * lanes, load_vec(out + r * lanes) + a[r]);
}

template <typename scalar_t, typename acc_t>
using GatherTileFn = void (*)(const scalar_t*, const int64_t*, const acc_t*, int64_t, int64_t, int64_t, int64_t,
                              acc_t*);

template <typename scalar_t, typename acc_t, int... R>
constexpr GatherTileFn<scalar_t, acc_t> gather_tile_for(int regs, std::integer_sequence<int, R...>) {
  GatherTileFn<scalar_t, acc_t> fns[] = {nullptr, &gather_tile<R + 1, scalar_t, acc_t>...};
  return fns[regs];
}

// out[b, :] += the slab's sum for the rows of the block: full register tiles, then one tile of
// the remaining whole vectors, then the columns left over one at a time.
template <typename scalar_t, typename acc_t>
void gather_slab(const scalar_t* grad_scores, const int64_t* index, const acc_t* p_hat, int64_t n0, int64_t rows,
                 int64_t k0, int64_t k1, int64_t num_classes, int64_t m_protos, int64_t d, acc_t* out) {
  constexpr int64_t lanes = Vec<acc_t>::lanes, tile = kGatherRegs * lanes;
  const int64_t full = d / tile * tile, vec_end = d / lanes * lanes;
  for (int64_t c0 = 0; c0 < full; c0 += tile) {
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t n = n0 + b;
      gather_tile<kGatherRegs>(grad_scores + n * num_classes, index + n * num_classes, p_hat + c0, k0, k1, m_protos,
                               d, out + b * d + c0);
    }
  }
  if (vec_end > full) {
    const auto fn = gather_tile_for<scalar_t, acc_t>(static_cast<int>((vec_end - full) / lanes),
                                                     std::make_integer_sequence<int, kGatherRegs>{});
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t n = n0 + b;
      fn(grad_scores + n * num_classes, index + n * num_classes, p_hat + full, k0, k1, m_protos, d, out + b * d + full);
    }
  }
  for (int64_t b = 0; b < rows && vec_end < d; ++b) {
    const int64_t n = n0 + b;
    for (int64_t t = vec_end; t < d; ++t) {
      acc_t s = 0;
      for (int64_t k = k0; k < k1; ++k) {
        s += static_cast<acc_t>(grad_scores[n * num_classes + k]) *
             p_hat[(k * m_protos + index[n * num_classes + k]) * d + t];
      }
      out[b * d + t] += s;
    }
  }
}

template <typename scalar_t, typename acc_t>
void gather_scores_block(const scalar_t* grad_scores, const int64_t* index, const acc_t* p_hat, int64_t n0,
                         int64_t rows, int64_t num_classes, int64_t m_protos, int64_t d, acc_t* acc, acc_t* group) {
  for (int64_t g0 = 0; g0 < num_classes; g0 += kClassGroup) {
    const int64_t g1 = std::min(num_classes, g0 + kClassGroup);
    acc_t* out = g0 == 0 ? acc : group;
    if (g0 > 0) std::fill(group, group + rows * d, acc_t(0));
    for (int64_t k0 = g0; k0 < g1; k0 += kClassSlab) {
      gather_slab(grad_scores, index, p_hat, n0, rows, k0, std::min(g1, k0 + kClassSlab), num_classes, m_protos, d,
                  out);
    }
    if (g0 > 0) {
      for (int64_t i = 0; i < rows * d; ++i) acc[i] += group[i];
    }
  }
}

template <typename scalar_t, typename acc_t>
void grad_impl(const GradArgs& a) {
  const int64_t n_total = a.x.size(0), d = a.x.size(1);
  if (n_total == 0) return;
  const int64_t k_classes = a.num_classes, m_protos = a.num_prototypes;
  const scalar_t* x_ptr = a.x.data_ptr<scalar_t>();
  const int64_t sx0 = a.x.stride(0), sx1 = a.x.stride(1);
  const acc_t* p = a.p_hat.defined() ? a.p_hat.data_ptr<acc_t>() : nullptr;
  const Norm<acc_t> norm(a.norm);
  const auto* stats = static_cast<const acc_t*>(a.stats);
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_out);
  const auto* grad_scores = static_cast<const scalar_t*>(a.grad_scores);
  const auto* grad_own = static_cast<const acc_t*>(a.grad_own);
  const auto* grad_lse = static_cast<const acc_t*>(a.grad_lse);
  const auto* weighted = static_cast<const acc_t*>(a.weighted);
  auto* gx = static_cast<scalar_t*>(a.grad_x);
  auto* partial = static_cast<acc_t*>(a.norm_partial);
  const acc_t inv_tau = static_cast<acc_t>(1.0 / a.temperature);
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(d);
  const int64_t blocks = grad_blocks(n_total);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc_t> acc_block(kGradBlockRows * d), z(d), t(d);
    std::vector<acc_t> group(grad_scores && k_classes > kClassGroup ? kGradBlockRows * d : 0);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t n0 = blk * kGradBlockRows, rows = std::min(kGradBlockRows, n_total - n0);
      std::fill(acc_block.begin(), acc_block.end(), acc_t(0));
      if (grad_out) {
        for (int64_t i = 0; i < rows * d; ++i) acc_block[i] = static_cast<acc_t>(grad_out[n0 * d + i]);
      }
      if (grad_scores) {
        gather_scores_block(grad_scores, a.index, p, n0, rows, k_classes, m_protos, d, acc_block.data(), group.data());
      }
      acc_t* gw = partial ? partial + blk * 2 * d : nullptr;
      acc_t* gb = partial ? gw + d : nullptr;
      if (gw) std::fill(gw, gw + 2 * d, acc_t(0));
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t n = n0 + b;
        acc_t* g = acc_block.data() + b * d;  // d loss / d x_hat, then d loss / d y
        if (grad_own && a.labels[n] >= 0) {
          const acc_t* base = p + a.labels[n] * m_protos * d;
          for (int64_t m = 0; m < m_protos; ++m) {
            const acc_t c = grad_own[n * m_protos + m];
            if (c != acc_t(0)) axpy(g, c, base + m * d, d);
          }
        }
        if (grad_lse && grad_lse[n] != acc_t(0)) axpy(g, grad_lse[n] * inv_tau, weighted + n * d, d);
        scalar_t* out = gx + n * d;
        // Through x_hat = y / max(||y||, eps) (t holds x_hat), then for LayerNorm through
        // y = z * weight + bias, z = (x - mean) * rstd.
        acc_t length, mean = 0, rstd = 1;
        load_row(x_ptr + n * sx0, sx1, d, z.data());
        if (norm.weight != nullptr) {
          mean = stats[3 * n];
          rstd = stats[3 * n + 1];
          length = stats[3 * n + 2];
        } else {
          length = std::sqrt(dot(z.data(), z.data(), d));
        }
        const acc_t s = acc_t(1) / std::max(length, static_cast<acc_t>(kNormEps));
        if (norm.weight != nullptr) {
          for (int64_t c = 0; c < d; ++c) {
            z[c] = (z[c] - mean) * rstd;
            t[c] = (z[c] * norm.weight[c] + norm.bias[c]) * s;
          }
        } else {
          for (int64_t c = 0; c < d; ++c) t[c] = z[c] * s;
        }
        const acc_t proj = length > static_cast<acc_t>(kNormEps) ? dot(g, t.data(), d) : acc_t(0);
        if (norm.weight == nullptr) {
          for (int64_t c = 0; c < d; ++c) out[c] = static_cast<scalar_t>((g[c] - t[c] * proj) * s);
          continue;
        }
        for (int64_t c = 0; c < d; ++c) g[c] = (g[c] - t[c] * proj) * s;
        for (int64_t c = 0; c < d; ++c) gw[c] += g[c] * z[c];
        for (int64_t c = 0; c < d; ++c) gb[c] += g[c];
        for (int64_t c = 0; c < d; ++c) t[c] = g[c] * norm.weight[c];  // d loss / d z
        const acc_t m1 = sum(t.data(), d) * inv_d, m2 = dot(t.data(), z.data(), d) * inv_d;
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<scalar_t>(rstd * (t[c] - m1 - z[c] * m2));
      }
    }
  });
}

void pass(const PassArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "protoseg_cpu_pass", [&] {
    pass_impl<scalar_t, at::opmath_type<scalar_t>>(a);
  });
}

void grad(const GradArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "protoseg_cpu_grad", [&] {
    grad_impl<scalar_t, at::opmath_type<scalar_t>>(a);
  });
}

}  // namespace

const Kernels& table() {
  static const Kernels k{PROTOSEG_ISA_NAME, &pass, &grad};
  return k;
}

}  // namespace PROTOSEG_ISA
}  // namespace cpu
}  // namespace protoseg

#ifdef PROTOSEG_ISA_TARGET
#pragma GCC pop_options
#endif
