// Device code of the segmented Sinkhorn-Knopp: every class at once, in double, over pixels
// sorted by class (common.cuh: keys, offsets). L [n_sorted, M] double holds the plan in sorted
// pixel order, so each class is a contiguous run of rows.
//
// Per call: class max -> exp -> class total -> scale, then `iterations` x {per-class column sums
// (segment_reduce_kernel) -> per-pixel step}, then the scatter back to pixel order. Every
// reduction is a fixed-shape block reduction, so the result is bitwise reproducible; no host
// synchronisation anywhere in the loop.
#pragma once

#include "cuda/common.cuh"

namespace protoseg {
namespace cuda {

// Per segment s (one block per segment, grid-stride), reduce rows [offsets[s], offsets[s+1])
// of in[.., M]: column-wise into out[s, M] (all_columns false) or over everything into out[s]
// (all_columns true). Sum or max. Rows are read through perm (value(i, j) =
// in[perm[i] * M + j]) when perm is set, else directly (in[i * M + j]). Offsets are clamped to
// [0, n] and rows outside [0, rows) skipped, so a bad perm or offsets (segment_reduce takes them
// from the caller, unchecked on the device) never reads out of bounds.
// Thread layout: for a group of `cols` <= blockDim columns, thread t reduces column t % cols
// over rows (t / cols), (t / cols) + P, ... with P = blockDim / cols row lanes, so consecutive
// threads read consecutive addresses; the P partials of a column are then combined in lane
// order by one thread. Empty segments give 0 (sum) or -inf (max).
template <class in_t>
struct SegmentReduceParams {
  const in_t* in;
  const int64_t* perm;     // [n] or null
  const int64_t* offsets;  // [S + 1]
  int64_t n;               // entries of perm (rows of in when perm is null)
  int64_t rows;            // rows of in
  int64_t num_segments, m;
  bool is_max, all_columns;
  double* out;  // [S, M] or [S]
};

constexpr int kSegmentReduceThreads = 256;

template <class in_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kSegmentReduceThreads) segment_reduce_kernel(SegmentReduceParams<in_t> p) {
  constexpr int kThreads = kSegmentReduceThreads;
  PS_SHARED_ARRAY(double, partial, kThreads);
  PS_SHARED_ARRAY(double, column, kThreads);
  const int t = threadIdx.x;
  const double init = p.is_max ? -ps::infinity<double>() : 0.0;
  for (int64_t s = blockIdx.x; s < p.num_segments; s += gridDim.x) {
    const int64_t begin = ps::min<int64_t>(ps::max<int64_t>(p.offsets[s], 0), p.n);
    const int64_t end = ps::min<int64_t>(ps::max<int64_t>(p.offsets[s + 1], begin), p.n);
    double total = init;
    for (int64_t j0 = 0; j0 < p.m; j0 += kThreads) {
      const int64_t cols = ps::min<int64_t>(p.m - j0, kThreads);
      const int64_t lanes = kThreads / cols;
      const int64_t lane = t / cols, j = j0 + t % cols;
      double acc = init;
      if (lane < lanes) {
        for (int64_t i = begin + lane; i < end; i += lanes) {
          const int64_t row = p.perm != nullptr ? p.perm[i] : i;
          if (row < 0 || row >= p.rows) continue;
          const double v = static_cast<double>(p.in[row * p.m + j]);
          acc = p.is_max ? ps::max(acc, v) : acc + v;
        }
      }
      partial[t] = acc;
      ps::sync_threads();
      if (t < cols) {
        double r = init;
        for (int64_t q = 0; q < lanes; ++q) {
          const double v = partial[q * cols + t];
          r = p.is_max ? ps::max(r, v) : r + v;
        }
        if (p.all_columns) {
          column[t] = r;
        } else {
          p.out[s * p.m + j] = r;
        }
      }
      ps::sync_threads();
      if (p.all_columns && t == 0) {
        for (int64_t c = 0; c < cols; ++c) total = p.is_max ? ps::max(total, column[c]) : total + column[c];
      }
      ps::sync_threads();  // partial and column are rewritten by the next group / segment
    }
    if (p.all_columns && t == 0) p.out[s] = total;
  }
}

// The per-pixel kernels run on the plan L [n, M] in sorted order (sinkhorn: keys = sorted class
// ids, perm = sorted position -> pixel) or in pixel order (the distributed steps: keys = labels,
// perm null). Rows whose key is outside [0, K) are skipped.
PS_HD bool sinkhorn_row_valid(int64_t k, int64_t num_classes) {
  return k >= 0 && k < num_classes;
}

// Per position i: L[i, :] = exp((scores[perm[i], :] - class_max[k]) / epsilon).
template <class scalar_t>
struct SinkhornInitParams {
  const scalar_t* scores;  // [N, M] contiguous, pixel order
  const int64_t* perm;     // [n] position -> pixel, or null (pixel order)
  const int64_t* keys;     // [n] class ids
  int64_t n, m, num_classes;
  const double* class_max;  // [K]
  double epsilon;
  double* L;  // [n, M]
};

constexpr int kSinkhornThreads = 256;

template <class scalar_t>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kSinkhornThreads) sinkhorn_init_kernel(SinkhornInitParams<scalar_t> p) {
  const int64_t total = p.n * p.m;
  for (int64_t e = int64_t(blockIdx.x) * kSinkhornThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kSinkhornThreads) {
    const int64_t i = e / p.m, j = e % p.m;
    const int64_t k = p.keys[i];
    if (!sinkhorn_row_valid(k, p.num_classes)) continue;
    const int64_t pixel = p.perm != nullptr ? p.perm[i] : i;
    // A division, not a multiplication by 1 / epsilon: as the CPU kernel, bit for bit.
    p.L[e] = ps::exp((static_cast<double>(p.scores[pixel * p.m + j]) - p.class_max[k]) / p.epsilon);
  }
}

// Per position: L[i, :] /= class_total[k].
struct SinkhornScaleParams {
  const int64_t* keys;
  int64_t n, m, num_classes;
  const double* class_total;  // [K]
  double* L;
};

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) sinkhorn_scale_kernel(SinkhornScaleParams p) {
  const int64_t total = p.n * p.m;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t k = p.keys[e / p.m];
    if (sinkhorn_row_valid(k, p.num_classes)) p.L[e] /= p.class_total[k];
  }
}

// One iteration's per-pixel step, given the per-class prototype row sums rows[K, M]:
//   L[i, j] = L[i, j] / rows[k, j] / M;  then  L[i, :] = L[i, :] / (sum_j L[i, j]) / n_k.
struct SinkhornStepParams {
  const int64_t* keys;
  const double* count;  // [K] n_k, pixels per class
  int64_t n, m, num_classes;
  const double* rows;  // [K, M]
  double* L;
};

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) sinkhorn_step_kernel(SinkhornStepParams p) {
  const double dm = static_cast<double>(p.m);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t k = p.keys[i];
    if (!sinkhorn_row_valid(k, p.num_classes)) continue;
    const double count = p.count[k];
    double* li = p.L + i * p.m;
    const double* rk = p.rows + k * p.m;
    double col = 0;
    for (int64_t j = 0; j < p.m; ++j) {
      const double v = li[j] / rk[j] / dm;
      li[j] = v;
      col += v;
    }
    for (int64_t j = 0; j < p.m; ++j) li[j] = li[j] / col / count;
  }
}

// Back to pixel order: q[perm[i], :] = L[i, :] * n_k (float), assignment = argmax (ties to the
// smallest m). Ignored pixels keep the zeros / -1 the outputs were created with.
struct SinkhornFinishParams {
  const int64_t* keys;
  const int64_t* perm;   // or null (pixel order)
  const double* count;  // [K]
  int64_t n, m, num_classes;
  const double* L;
  float* q;             // [N, M]
  int64_t* assignment;  // [N]
};

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) sinkhorn_finish_kernel(SinkhornFinishParams p) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t k = p.keys[i];
    if (!sinkhorn_row_valid(k, p.num_classes)) continue;
    const double count = p.count[k];
    const double* li = p.L + i * p.m;
    const int64_t pixel = p.perm != nullptr ? p.perm[i] : i;
    float* qi = p.q + pixel * p.m;
    int64_t best = 0;
    double best_v = li[0] * count;
    for (int64_t j = 0; j < p.m; ++j) {
      const double v = li[j] * count;
      qi[j] = static_cast<float>(v);
      if (v > best_v) {
        best_v = v;
        best = j;
      }
    }
    p.assignment[pixel] = best;
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

template <class T>
LaunchCost launch_cost(const SegmentReduceParams<T>& p) {
  const double e = double(p.n) * p.m;
  const double out = p.all_columns ? p.num_segments : double(p.num_segments) * p.m;
  return {e * sizeof(T) + costs::if_set(p.perm, p.n * costs::kIndex) + (p.num_segments + 1) * costs::kIndex,
          out * sizeof(double), e};
}

template <class T>
LaunchCost launch_cost(const SinkhornInitParams<T>& p) {
  const double e = double(p.n) * p.m;
  return {e * sizeof(T) + p.n * costs::kIndex + costs::if_set(p.perm, p.n * costs::kIndex), e * sizeof(double),
          3 * e};
}

inline LaunchCost launch_cost(const SinkhornScaleParams& p) {
  const double e = double(p.n) * p.m;
  return {e * sizeof(double) + p.n * costs::kIndex, e * sizeof(double), e};
}

inline LaunchCost launch_cost(const SinkhornStepParams& p) {
  const double e = double(p.n) * p.m;
  return {e * sizeof(double) + p.n * costs::kIndex + double(p.num_classes) * (p.m + 1) * sizeof(double),
          e * sizeof(double), 4 * e};
}

inline LaunchCost launch_cost(const SinkhornFinishParams& p) {
  const double e = double(p.n) * p.m;
  return {e * sizeof(double) + p.n * costs::kIndex + costs::if_set(p.perm, p.n * costs::kIndex),
          e * sizeof(float) + p.n * costs::kIndex, 2 * e};
}

// Launches of segment_reduce_kernel over `in` [rows, M] (through perm, or directly when perm is
// undefined) into out [S] or [S, M].
template <class Exec, class in_t>
void launch_segment_reduce(Exec& ex, const in_t* in, const at::Tensor& perm, const at::Tensor& offsets,
                           int64_t rows, int64_t m, bool is_max, bool all_columns, at::Tensor& out) {
  const int64_t s = offsets.numel() - 1;
  const int64_t n = perm.defined() ? perm.numel() : rows;
  ex.launch(segment_reduce_kernel<in_t>, grid_for(s, 1), kSegmentReduceThreads, 0,
            SegmentReduceParams<in_t>{.in = in,
                                      .perm = ptr_or_null<int64_t>(perm),
                                      .offsets = offsets.data_ptr<int64_t>(),
                                      .n = n,
                                      .rows = rows,
                                      .num_segments = s,
                                      .m = m,
                                      .is_max = is_max,
                                      .all_columns = all_columns,
                                      .out = out.data_ptr<double>()});
}

// Pixels per class as float64 (the n_k of the iterations), from the segment offsets.
inline at::Tensor segment_counts(const at::Tensor& offsets) {
  return (offsets.slice(0, 1) - offsets.slice(0, 0, -1)).to(at::kDouble);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> sinkhorn(const at::Tensor& scores, const at::Tensor& labels,
                                            int64_t num_classes, int64_t iterations, double epsilon) {
  Exec ex(scores.device());
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
              SinkhornInitParams<scalar_t>{.scores = sp,
                                           .perm = pp,
                                           .keys = kp,
                                           .n = n,
                                           .m = m,
                                           .num_classes = k,
                                           .class_max = class_stat.data_ptr<double>(),
                                           .epsilon = epsilon,
                                           .L = lp});
  });
  const at::Tensor no_perm;  // L is already in sorted order
  launch_segment_reduce(ex, static_cast<const double*>(lp), no_perm, offsets, n, m, false, true, class_stat);
  ex.launch(sinkhorn_scale_kernel<kT>, grid_for(n * m, kT), kT, 0,
            SinkhornScaleParams{.keys = kp,
                                .n = n,
                                .m = m,
                                .num_classes = k,
                                .class_total = class_stat.data_ptr<double>(),
                                .L = lp});
  for (int64_t it = 0; it < iterations; ++it) {
    launch_segment_reduce(ex, static_cast<const double*>(lp), no_perm, offsets, n, m, false, false, rows);
    ex.launch(sinkhorn_step_kernel<kT>, grid_for(n, kT), kT, 0,
              SinkhornStepParams{.keys = kp,
                                 .count = cp,
                                 .n = n,
                                 .m = m,
                                 .num_classes = k,
                                 .rows = rows.data_ptr<double>(),
                                 .L = lp});
  }
  ex.launch(sinkhorn_finish_kernel<kT>, grid_for(n, kT), kT, 0,
            SinkhornFinishParams{.keys = kp,
                                 .perm = pp,
                                 .count = cp,
                                 .n = n,
                                 .m = m,
                                 .num_classes = k,
                                 .L = lp,
                                 .q = q.data_ptr<float>(),
                                 .assignment = assignment.data_ptr<int64_t>()});
  return {q, assignment};
}

// ---- the steps of sinkhorn, for a distributed caller (csrc/protoseg.cpp) ----
// The per-pixel kernels run on the plan in pixel order (keys = labels, perm null). Only
// sinkhorn_segments synchronises with the host (its range check of the labels, and reading
// back how many pixels are labelled).

template <class Exec>
std::tuple<at::Tensor, at::Tensor> sinkhorn_segments(const at::Tensor& labels, int64_t num_classes) {
  Exec ex(labels.device());
  check_segments_args(labels, num_classes);
  const auto lab = labels.contiguous();
  check_range_device(ex, lab, num_classes, "labels", "num_classes", /*allow_negative=*/true, 0, false);
  auto [keys, perm, offsets] = sort_by_segment(ex, lab, num_classes);
  // Ignored pixels sort last (key K): perm keeps the labelled ones, as the CPU's counting sort.
  const int64_t valid = offsets[num_classes].template item<int64_t>();
  return {perm.slice(0, 0, valid).clone(), offsets};
}

template <class Exec>
at::Tensor segment_reduce(const at::Tensor& values, const at::Tensor& perm, const at::Tensor& offsets,
                          bool is_max, bool all_columns) {
  Exec ex(values.device());
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
at::Tensor sinkhorn_exp(const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& class_max,
                        double epsilon) {
  Exec ex(scores.device());
  check_sinkhorn_exp_args(scores, labels, class_max, epsilon);
  const int64_t n = scores.size(0), m = scores.size(1);
  const auto s = scores.contiguous();
  const auto lab = labels.contiguous();
  const auto mx = class_max.contiguous();
  auto plan = at::zeros({n, m}, scores.options().dtype(at::kDouble));
  constexpr int kT = kSinkhornThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_exp_cuda", [&] {
    ex.launch(sinkhorn_init_kernel<scalar_t>, grid_for(n * m, kT), kT, 0,
              SinkhornInitParams<scalar_t>{.scores = s.data_ptr<scalar_t>(),
                                           .perm = nullptr,
                                           .keys = lab.data_ptr<int64_t>(),
                                           .n = n,
                                           .m = m,
                                           .num_classes = mx.numel(),
                                           .class_max = mx.data_ptr<double>(),
                                           .epsilon = epsilon,
                                           .L = plan.data_ptr<double>()});
  });
  return plan;
}

template <class Exec>
at::Tensor sinkhorn_scale(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& class_total) {
  Exec ex(plan.device());
  check_plan_args(plan, labels, class_total, "class_total", 1);
  const int64_t n = plan.size(0), m = plan.size(1);
  auto out = plan.contiguous().clone();
  const auto lab = labels.contiguous();
  const auto total = class_total.contiguous();
  constexpr int kT = kSinkhornThreads;
  ex.launch(sinkhorn_scale_kernel<kT>, grid_for(n * m, kT), kT, 0,
            SinkhornScaleParams{.keys = lab.data_ptr<int64_t>(),
                                .n = n,
                                .m = m,
                                .num_classes = total.numel(),
                                .class_total = total.data_ptr<double>(),
                                .L = out.data_ptr<double>()});
  return out;
}

template <class Exec>
at::Tensor sinkhorn_step(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& rows,
                         const at::Tensor& count) {
  Exec ex(plan.device());
  check_sinkhorn_step_args(plan, labels, rows, count);
  const int64_t n = plan.size(0), m = plan.size(1);
  auto out = plan.contiguous().clone();
  const auto lab = labels.contiguous();
  const auto r = rows.contiguous();
  const auto c = count.contiguous();
  constexpr int kT = kSinkhornThreads;
  ex.launch(sinkhorn_step_kernel<kT>, grid_for(n, kT), kT, 0,
            SinkhornStepParams{.keys = lab.data_ptr<int64_t>(),
                               .count = c.data_ptr<double>(),
                               .n = n,
                               .m = m,
                               .num_classes = c.numel(),
                               .rows = r.data_ptr<double>(),
                               .L = out.data_ptr<double>()});
  return out;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> sinkhorn_finish(const at::Tensor& plan, const at::Tensor& labels,
                                                   const at::Tensor& count) {
  Exec ex(plan.device());
  check_plan_args(plan, labels, count, "count", 1);
  const int64_t n = plan.size(0), m = plan.size(1);
  const auto L = plan.contiguous();
  const auto lab = labels.contiguous();
  const auto c = count.contiguous();
  auto q = at::zeros({n, m}, plan.options().dtype(at::kFloat));
  auto assignment = at::full({n}, -1, labels.options());
  constexpr int kT = kSinkhornThreads;
  ex.launch(sinkhorn_finish_kernel<kT>, grid_for(n, kT), kT, 0,
            SinkhornFinishParams{.keys = lab.data_ptr<int64_t>(),
                                 .perm = nullptr,
                                 .count = c.data_ptr<double>(),
                                 .n = n,
                                 .m = m,
                                 .num_classes = c.numel(),
                                 .L = L.data_ptr<double>(),
                                 .q = q.data_ptr<float>(),
                                 .assignment = assignment.data_ptr<int64_t>()});
  return {q, assignment};
}

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
