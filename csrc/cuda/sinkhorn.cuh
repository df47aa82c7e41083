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
