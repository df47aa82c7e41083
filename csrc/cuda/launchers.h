// The host side of every CUDA op: argument checks, output allocation, the chunk loop with its
// cuBLAS GEMMs, and the kernel launches, in the order of STYLE.md rule 6.
//
// Written once, templated on an executor `Exec` that provides
//   void launch(void (*kernel)(P), ps::Dim3 grid, ps::Dim3 block, size_t dynamic_smem, const P&)
//   void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b)   (out = a b)
//   int64_t tile_budget   (entries of the [rows, K*M] tile)
// csrc/cuda/<op>.cu instantiates it with CudaExec (kernel<<<...>>> on the current stream, then
// C10_CUDA_KERNEL_LAUNCH_CHECK) and registers the ops for the CUDA key; the test-only CPU grid
// executor (tests/emulated/) instantiates the very same code with CPU tensors, so the tests run
// the shipped launch sequence and kernels, with torch's CPU GEMM standing in for cuBLAS.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "layer_norm_normalize.h"
#include "cuda/common.cuh"
#include "cuda/proto_contrast_loss.cuh"
#include "cuda/prototype_pass.cuh"
#include "cuda/scatter_mean.cuh"
#include "cuda/sinkhorn.cuh"

namespace protoseg {
namespace cuda {

// Default tile bound: 2^25 acc_t entries (128 MB in fp32). Large enough that cuBLAS runs near
// peak (>= 3961 rows at K*M = 8470), small next to an 80 GB device; O(chunk), never O(N*K*M).
constexpr int64_t kDefaultTileBudget = int64_t{1} << 25;

inline int64_t chunk_rows(int64_t n, int64_t km, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(n, budget / std::max<int64_t>(km, 1)));
}

template <class T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Device-side range check of a contiguous int64 vector (see RangeCheckParams in common.cuh).
// The one host synchronisation of the ops that take labels, targets or indices: it reads back
// a single int64 before any kernel uses the vector. Same message as check_range_host.
template <class Exec>
void check_range_device(Exec& ex, const at::Tensor& v, int64_t upper, const char* name, const char* upper_name,
                        bool allow_negative, int64_t ignore, bool has_ignore) {
  const int64_t n = v.numel();
  if (n == 0) return;
  auto first_bad = at::full({1}, n, v.options());
  RangeCheckParams p{v.data_ptr<int64_t>(), n, upper, allow_negative, has_ignore, ignore,
                     reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>())};
  ex.launch(range_check_kernel<kRangeCheckThreads>, grid_for(n, kRangeCheckThreads, 4096), kRangeCheckThreads, 0, p);
  const int64_t i = first_bad.item<int64_t>();
  if (i >= n) return;
  const int64_t t = v.reshape({-1})[i].item<int64_t>();  // flat position, as check_range_host
  TORCH_CHECK(false, name, "[", i, "] = ", t, " is out of range: expected a value in [0, ", upper_name, " = ", upper, ")",
              (allow_negative ? " or negative (ignored)" : ""),
              (has_ignore ? " or ignore_index = " + std::to_string(ignore) : std::string()));
}

// Stable grouping of pixels by id (common.cuh): returns (sorted keys, perm, offsets [S + 1]).
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_segment(Exec& ex, const at::Tensor& ids, int64_t num_segments) {
  const int64_t n = ids.numel();
  auto keys = at::empty({n}, ids.options());
  ex.launch(segment_keys_kernel<kSegmentThreads>, grid_for(n, kSegmentThreads), kSegmentThreads, 0,
            SegmentKeysParams{ids.data_ptr<int64_t>(), n, num_segments, keys.data_ptr<int64_t>()});
  auto [sorted, perm] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto offsets = at::empty({num_segments + 1}, ids.options());
  ex.launch(segment_offsets_kernel<kSegmentThreads>, grid_for(n + 1, kSegmentThreads), kSegmentThreads, 0,
            SegmentOffsetsParams{sorted.data_ptr<int64_t>(), n, num_segments, offsets.data_ptr<int64_t>()});
  return {sorted, perm, offsets};
}

// p_hat = prototypes / max(||p||, eps) as a contiguous [K*M, D] acc_t tensor.
template <class Exec, class scalar_t>
at::Tensor normalized_prototypes(Exec& ex, const at::Tensor& prototypes) {
  using acc = acc_t<scalar_t>;
  const int64_t d = prototypes.size(2);
  const auto p = prototypes.reshape({-1, d});
  at::Tensor out = at::empty({p.size(0), d}, p.options().dtype(c10::CppTypeToScalarType<acc>::value));
  NormalizeParams<scalar_t> np{p.data_ptr<scalar_t>(), p.size(0), d, p.stride(0), p.stride(1), out.data_ptr<acc>(),
                               nullptr};
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
  const int64_t* target = nullptr;
  acc* target_logit = nullptr;
  acc* lse = nullptr;
  at::Tensor weighted;  // [N, D] acc_t contiguous (needs lse)
  double temperature = 1.0;
};

// x [N, D] (any strides) against p_hat [K*M, D], per chunk of rows: the tile of products
// (cuBLAS), the fused epilogue (which, for `weighted`, leaves the row softmax in the tile), and
// the second GEMM softmax(S) p_hat. In float32/float64 the GEMM reads x itself and the epilogue
// scales each row by 1 / ||x|| (only the reciprocal norms are written first); half-precision x
// is normalised into an acc_t buffer, the GEMMs' input type. Workspaces are allocated once per
// call and reused by every chunk (same stream, so no chunk overwrites a buffer still being read).
template <class Exec, class scalar_t>
void prototype_pass(Exec& ex, const at::Tensor& x, const at::Tensor& p_hat, int64_t k_classes, int64_t m_protos,
                    const PassOutputs<scalar_t>& out) {
  using acc = acc_t<scalar_t>;
  constexpr bool kRawRows = std::is_same_v<scalar_t, acc>;
  const int64_t n = x.size(0), d = x.size(1), km = k_classes * m_protos;
  if (n == 0) return;
  const int64_t rows = chunk_rows(n, km, ex.tile_budget);
  auto xbuf = kRawRows ? at::Tensor() : at::empty({rows, d}, p_hat.options());
  auto inv_norm = kRawRows ? at::empty({rows}, p_hat.options()) : at::Tensor();
  auto tile = at::empty({rows, km}, p_hat.options());
  const at::Tensor p_hat_t = p_hat.t();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  constexpr int kRows = kEpilogueThreads / kWarpSize;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t r = std::min(rows, n - start);
    NormalizeParams<scalar_t> np{x_ptr + start * x.stride(0), r, d, x.stride(0), x.stride(1), ptr_or_null<acc>(xbuf),
                                 ptr_or_null<acc>(inv_norm)};
    ex.launch(normalize_rows_kernel<scalar_t>, grid_for(r, kNormalizeThreads / kWarpSize), kNormalizeThreads, 0, np);
    auto s_view = tile.narrow(0, 0, r);
    ex.gemm(s_view, kRawRows ? x.narrow(0, start, r) : xbuf.narrow(0, 0, r), p_hat_t);
    EpilogueParams<scalar_t> ep{tile.data_ptr<acc>(), ptr_or_null<acc>(inv_norm), r, start, k_classes, m_protos,
                                out.scores, out.index, out.labels, out.own, out.target, out.target_logit, out.lse,
                                out.weighted.defined(), static_cast<acc>(1.0 / out.temperature)};
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
  const acc* coef_target = nullptr;
  const int64_t* target = nullptr;
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
  const bool tile_terms = g.grad_scores != nullptr || g.grad_own != nullptr || g.coef_target != nullptr;
  const int64_t rows = chunk_rows(n, km, ex.tile_budget);
  at::Tensor tile, tile_grad;
  if (tile_terms) {
    tile = at::empty({rows, km}, p_hat.options());
    tile_grad = at::empty({rows, d}, p_hat.options());
  }
  constexpr int kRows = kGradTileThreads / kWarpSize;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t r = std::min(rows, n - start);
    if (tile_terms) {
      GradTileParams<scalar_t> tp{tile.data_ptr<acc>(), r, start, k_classes, m_protos, g.grad_scores, g.index,
                                  g.grad_own, g.labels, g.coef_target, g.target};
      ex.launch(grad_tile_kernel<scalar_t>, grid_for(r, kRows), kGradTileThreads, 0, tp);
      at::Tensor out_view = tile_grad.narrow(0, 0, r);
      ex.gemm(out_view, tile.narrow(0, 0, r), p_hat);
    }
    GradParams<scalar_t> gp{x.data_ptr<scalar_t>(), d, x.stride(0), x.stride(1), r, start,
                            tile_terms ? tile_grad.data_ptr<acc>() : nullptr, g.grad_lse, g.weighted,
                            static_cast<acc>(1.0 / g.temperature), grad_x.data_ptr<scalar_t>()};
    ex.launch(assemble_grad_kernel<scalar_t>, grid_for(r, 1), kGradThreads, 0, gp);
  }
}

// ==== proto_similarity ===========================================================================

template <class Exec>
std::tuple<at::Tensor, at::Tensor> proto_similarity(Exec& ex, const at::Tensor& x, const at::Tensor& prototypes) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  auto scores = at::empty({n, k}, x.options());
  auto index = at::empty({n, k}, x.options().dtype(at::kLong));
  if (n == 0) return {scores, index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_similarity_cuda", [&] {
    const at::Tensor p_hat = normalized_prototypes<Exec, scalar_t>(ex, prototypes);
    PassOutputs<scalar_t> out;
    out.scores = scores.data_ptr<scalar_t>();
    out.index = index.data_ptr<int64_t>();
    prototype_pass<Exec, scalar_t>(ex, x, p_hat, k, m, out);
  });
  return {scores, index};
}

template <class Exec>
at::Tensor proto_similarity_backward(Exec& ex, const at::Tensor& grad_scores, const at::Tensor& x,
                                     const at::Tensor& prototypes, const at::Tensor& index) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  check_shape(grad_scores, "grad_scores", {n, k});
  check_same_device(grad_scores, x, "grad_scores", "x");
  check_shape(index, "index", {n, k});
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64 (got ", index.scalar_type(), ")");
  check_same_device(index, x, "index", "x");
  auto grad_x = at::empty({n, x.size(1)}, x.options());
  if (n == 0) return grad_x;
  const auto g = grad_scores.to(x.scalar_type()).contiguous();
  const auto idx = index.contiguous();
  check_range_device(ex, idx, m, "index", "M", false, 0, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_similarity_backward_cuda", [&] {
    const at::Tensor p_hat = normalized_prototypes<Exec, scalar_t>(ex, prototypes);
    GradTerms<scalar_t> terms;
    terms.grad_scores = g.data_ptr<scalar_t>();
    terms.index = idx.data_ptr<int64_t>();
    assemble_grad_x<Exec, scalar_t>(ex, x, p_hat, k, m, terms, grad_x);
  });
  return grad_x;
}

// ==== proto_train ================================================================================

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
// layer_norm_normalize.h, in the accumulation type, and the pass runs on those unit rows (its own
// normalisation changes them by rounding only). The CPU fuses them into the pass.
template <class Exec>
TrainOutputs proto_train(Exec& ex, const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& labels,
                         double temperature, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps) {
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
  auto [scores, index, own, lse, weighted] =
      train_pass(ex, rows, prototypes.to(rows.scalar_type()), labels, temperature);
  return {scores.to(x.scalar_type()), index, own, lse, weighted, rows.to(x.scalar_type()), stats};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> proto_train_backward(
    Exec& ex, const std::optional<at::Tensor>& grad_scores, const std::optional<at::Tensor>& grad_own,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& x, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& index, const at::Tensor& weighted, double temperature,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& stats) {
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

// ==== proto_contrast_loss ========================================================================

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
std::tuple<at::Tensor, at::Tensor> proto_contrast_loss(Exec& ex, const at::Tensor& x, const at::Tensor& prototypes,
                                                       const at::Tensor& target, double temperature,
                                                       int64_t ignore_index) {
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
at::Tensor proto_contrast_loss_backward(Exec& ex, const at::Tensor& grad_ppc, const at::Tensor& grad_ppd,
                                        const at::Tensor& x, const at::Tensor& prototypes, const at::Tensor& target,
                                        double temperature, int64_t ignore_index) {
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

// ==== sinkhorn ===================================================================================

// Launches of segment_reduce_kernel over `in` [rows, M] (through perm, or directly when perm is
// undefined) into out [S] or [S, M].
template <class Exec, class in_t>
void launch_segment_reduce(Exec& ex, const in_t* in, const at::Tensor& perm, const at::Tensor& offsets,
                           int64_t rows, int64_t m, bool is_max, bool all_columns, at::Tensor& out) {
  const int64_t s = offsets.numel() - 1;
  const int64_t n = perm.defined() ? perm.numel() : rows;
  ex.launch(segment_reduce_kernel<in_t>, grid_for(s, 1), kSegmentReduceThreads, 0,
            SegmentReduceParams<in_t>{in, ptr_or_null<int64_t>(perm), offsets.data_ptr<int64_t>(), n, rows, s, m,
                                      is_max, all_columns, out.data_ptr<double>()});
}

// Pixels per class as float64 (the n_k of the iterations), from the segment offsets.
inline at::Tensor segment_counts(const at::Tensor& offsets) {
  return (offsets.slice(0, 1) - offsets.slice(0, 0, -1)).to(at::kDouble);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> sinkhorn(Exec& ex, const at::Tensor& scores, const at::Tensor& labels,
                                            int64_t num_classes, int64_t iterations, double epsilon) {
  check_sinkhorn_args(scores, labels, num_classes, iterations, epsilon);
  const int64_t n = scores.size(0), m = scores.size(1), k = num_classes;
  auto q = at::zeros({n, m}, scores.options().dtype(at::kFloat));
  auto assignment = at::full({n}, -1, labels.options());
  if (n == 0) return {q, assignment};
  const auto lab = labels.contiguous();
  check_range_device(ex, lab, k, "labels", "num_classes", /*allow_negative=*/true, 0, false);
  const auto s = scores.contiguous();
  at::Tensor keys, perm, offsets;
  std::tie(keys, perm, offsets) = sort_by_segment(ex, lab, k);
  const auto count = segment_counts(offsets);
  const auto f64 = scores.options().dtype(at::kDouble);
  auto L = at::empty({n, m}, f64);
  auto class_stat = at::empty({k}, f64);
  auto rows = at::empty({k, m}, f64);
  const int64_t* kp = keys.data_ptr<int64_t>();
  const int64_t* pp = perm.data_ptr<int64_t>();
  const double* cp = count.data_ptr<double>();
  double* lp = L.data_ptr<double>();
  constexpr int kT = kSinkhornThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_cuda", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    launch_segment_reduce(ex, sp, perm, offsets, n, m, /*is_max=*/true, /*all_columns=*/true, class_stat);
    ex.launch(sinkhorn_init_kernel<scalar_t>, grid_for(n * m, kT), kT, 0,
              SinkhornInitParams<scalar_t>{sp, pp, kp, n, m, k, class_stat.data_ptr<double>(), epsilon, lp});
  });
  const at::Tensor no_perm;  // L is already in sorted order
  launch_segment_reduce(ex, static_cast<const double*>(lp), no_perm, offsets, n, m, false, true, class_stat);
  ex.launch(sinkhorn_scale_kernel<kT>, grid_for(n * m, kT), kT, 0,
            SinkhornScaleParams{kp, n, m, k, class_stat.data_ptr<double>(), lp});
  for (int64_t it = 0; it < iterations; ++it) {
    launch_segment_reduce(ex, static_cast<const double*>(lp), no_perm, offsets, n, m, false, false, rows);
    ex.launch(sinkhorn_step_kernel<kT>, grid_for(n, kT), kT, 0,
              SinkhornStepParams{kp, cp, n, m, k, rows.data_ptr<double>(), lp});
  }
  ex.launch(sinkhorn_finish_kernel<kT>, grid_for(n, kT), kT, 0,
            SinkhornFinishParams{kp, pp, cp, n, m, k, lp, q.data_ptr<float>(), assignment.data_ptr<int64_t>()});
  return {q, assignment};
}

// ---- the steps of sinkhorn, for a distributed caller (csrc/protoseg.cpp) ----
// The per-pixel kernels run on the plan in pixel order (keys = labels, perm null). Only
// sinkhorn_segments synchronises with the host (its range check of the labels, and reading
// back how many pixels are labelled).

template <class Exec>
std::tuple<at::Tensor, at::Tensor> sinkhorn_segments(Exec& ex, const at::Tensor& labels, int64_t num_classes) {
  check_segments_args(labels, num_classes);
  const auto lab = labels.contiguous();
  check_range_device(ex, lab, num_classes, "labels", "num_classes", /*allow_negative=*/true, 0, false);
  auto [keys, perm, offsets] = sort_by_segment(ex, lab, num_classes);
  // Ignored pixels sort last (key K): perm keeps the labelled ones, as the CPU's counting sort.
  const int64_t valid = offsets[num_classes].template item<int64_t>();
  return {perm.slice(0, 0, valid).clone(), offsets};
}

template <class Exec>
at::Tensor segment_reduce(Exec& ex, const at::Tensor& values, const at::Tensor& perm, const at::Tensor& offsets,
                          bool is_max, bool all_columns) {
  check_segment_reduce_args(values, perm, offsets);
  const int64_t rows = values.size(0), m = values.size(1), s = offsets.numel() - 1;
  const auto v = values.contiguous();
  const auto pm = perm.contiguous();
  const auto off = offsets.contiguous();
  auto out = at::empty(all_columns ? at::IntArrayRef{s} : at::IntArrayRef{s, m}, values.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "segment_reduce_cuda", [&] {
    launch_segment_reduce(ex, v.data_ptr<scalar_t>(), pm, off, rows, m, is_max, all_columns, out);
  });
  return out;
}

template <class Exec>
at::Tensor sinkhorn_exp(Exec& ex, const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& class_max,
                        double epsilon) {
  check_sinkhorn_exp_args(scores, labels, class_max, epsilon);
  const int64_t n = scores.size(0), m = scores.size(1);
  const auto s = scores.contiguous();
  const auto lab = labels.contiguous();
  const auto mx = class_max.contiguous();
  auto plan = at::zeros({n, m}, scores.options().dtype(at::kDouble));
  constexpr int kT = kSinkhornThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_exp_cuda", [&] {
    ex.launch(sinkhorn_init_kernel<scalar_t>, grid_for(n * m, kT), kT, 0,
              SinkhornInitParams<scalar_t>{s.data_ptr<scalar_t>(), nullptr, lab.data_ptr<int64_t>(), n, m,
                                           mx.numel(), mx.data_ptr<double>(), epsilon, plan.data_ptr<double>()});
  });
  return plan;
}

template <class Exec>
at::Tensor sinkhorn_scale(Exec& ex, const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& class_total) {
  check_plan_args(plan, labels, class_total, "class_total", 1);
  const int64_t n = plan.size(0), m = plan.size(1);
  auto out = plan.contiguous().clone();
  const auto lab = labels.contiguous();
  const auto total = class_total.contiguous();
  constexpr int kT = kSinkhornThreads;
  ex.launch(sinkhorn_scale_kernel<kT>, grid_for(n * m, kT), kT, 0,
            SinkhornScaleParams{lab.data_ptr<int64_t>(), n, m, total.numel(), total.data_ptr<double>(),
                                out.data_ptr<double>()});
  return out;
}

template <class Exec>
at::Tensor sinkhorn_step(Exec& ex, const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& rows,
                         const at::Tensor& count) {
  check_sinkhorn_step_args(plan, labels, rows, count);
  const int64_t n = plan.size(0), m = plan.size(1);
  auto out = plan.contiguous().clone();
  const auto lab = labels.contiguous();
  const auto r = rows.contiguous();
  const auto c = count.contiguous();
  constexpr int kT = kSinkhornThreads;
  ex.launch(sinkhorn_step_kernel<kT>, grid_for(n, kT), kT, 0,
            SinkhornStepParams{lab.data_ptr<int64_t>(), c.data_ptr<double>(), n, m, c.numel(), r.data_ptr<double>(),
                               out.data_ptr<double>()});
  return out;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> sinkhorn_finish(Exec& ex, const at::Tensor& plan, const at::Tensor& labels,
                                                   const at::Tensor& count) {
  check_plan_args(plan, labels, count, "count", 1);
  const int64_t n = plan.size(0), m = plan.size(1);
  const auto L = plan.contiguous();
  const auto lab = labels.contiguous();
  const auto c = count.contiguous();
  auto q = at::zeros({n, m}, plan.options().dtype(at::kFloat));
  auto assignment = at::full({n}, -1, labels.options());
  constexpr int kT = kSinkhornThreads;
  ex.launch(sinkhorn_finish_kernel<kT>, grid_for(n, kT), kT, 0,
            SinkhornFinishParams{lab.data_ptr<int64_t>(), nullptr, c.data_ptr<double>(), n, m, c.numel(),
                                 L.data_ptr<double>(), q.data_ptr<float>(), assignment.data_ptr<int64_t>()});
  return {q, assignment};
}

// ==== scatter_mean ===============================================================================

template <class Exec>
std::tuple<at::Tensor, at::Tensor> scatter_mean(Exec& ex, const at::Tensor& x, const at::Tensor& index,
                                                int64_t num_segments) {
  check_embeddings(x);
  check_index_vector(index, "index", x.size(0), x);
  TORCH_CHECK(num_segments >= 0, "num_segments must be >= 0 (got ", num_segments, ")");
  const int64_t n = x.size(0), d = x.size(1);
  auto mean = at::zeros({num_segments, d}, x.options());
  auto count = at::zeros({num_segments}, index.options());
  if (n == 0 || num_segments == 0) return {mean, count};
  const auto idx = index.contiguous();
  check_range_device(ex, idx, num_segments, "index", "num_segments", /*allow_negative=*/true, 0, false);
  at::Tensor keys, perm, offsets;
  std::tie(keys, perm, offsets) = sort_by_segment(ex, idx, num_segments);
  const int64_t channel_blocks = std::max<int64_t>(1, (d + kScatterThreads - 1) / kScatterThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_mean_cuda", [&] {
    ex.launch(scatter_mean_kernel<scalar_t>, grid_for(num_segments * channel_blocks, 1), kScatterThreads, 0,
              ScatterMeanParams<scalar_t>{x.data_ptr<scalar_t>(), d, x.stride(0), x.stride(1),
                                          perm.data_ptr<int64_t>(), perm.numel(), offsets.data_ptr<int64_t>(),
                                          num_segments,
                                          channel_blocks, mean.data_ptr<scalar_t>(), count.data_ptr<int64_t>()});
  });
  return {mean, count};
}

template <class Exec>
at::Tensor scatter_mean_backward(Exec& ex, const at::Tensor& grad_mean, const at::Tensor& index,
                                 const at::Tensor& count) {
  TORCH_CHECK(grad_mean.dim() == 2, "grad_mean must be [S, D] (got ", shape_str(grad_mean), ")");
  check_floating(grad_mean, "grad_mean");
  const int64_t s = grad_mean.size(0), d = grad_mean.size(1);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "index must be a [N] int64 tensor (got ",
              shape_str(index), " ", index.scalar_type(), ")");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == s && count.scalar_type() == at::kLong,
              "count must be [S] int64 with S == grad_mean.size(0) == ", s, " (got ", shape_str(count), " ",
              count.scalar_type(), ")");
  check_same_device(index, grad_mean, "index", "grad_mean");
  check_same_device(count, grad_mean, "count", "grad_mean");
  const int64_t n = index.size(0);
  auto grad_x = at::empty({n, d}, grad_mean.options());
  if (n == 0 || d == 0) return grad_x;
  const auto idx = index.contiguous();
  check_range_device(ex, idx, s, "index", "num_segments", /*allow_negative=*/true, 0, false);
  const auto g = grad_mean.contiguous();
  const auto cnt = count.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scatter_mean_backward_cuda", [&] {
    ex.launch(scatter_mean_backward_kernel<scalar_t>, grid_for(n * d, kScatterBackwardThreads),
              kScatterBackwardThreads, 0,
              ScatterMeanBackwardParams<scalar_t>{g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                                                  cnt.data_ptr<int64_t>(), n, d, s, grad_x.data_ptr<scalar_t>()});
  });
  return grad_x;
}

}  // namespace cuda
}  // namespace protoseg
