// sinkhorn on the CPU: every class's Sinkhorn-Knopp in one call. Pixels are counting-sorted by
// label once; classes then run in parallel, each sequentially over its own pixels in pixel
// order and in double, so the result is bitwise the same for any thread count.
//
// The same arithmetic split at its reductions (sinkhorn_segments, segment_reduce, sinkhorn_exp,
// sinkhorn_scale, sinkhorn_step, sinkhorn_finish: the ops a distributed caller composes around
// all-reduces of the [K] and [K, M] marginals, protoseg/models/prototype.py global_sinkhorn).
// The per-element and per-row expressions below are shared, and segment_reduce sums in the
// order sinkhorn_class does, so composed in one process they give bitwise sinkhorn's result.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/segments.h"

namespace protoseg {
namespace {

// A division, not a multiplication by 1 / epsilon, as the CUDA kernels do: bit for bit.
template <typename scalar_t>
double exp_entry(scalar_t score, double class_max, double epsilon) {
  return std::exp((static_cast<double>(score) - class_max) / epsilon);
}

// One iteration's per-pixel step given the class's prototype row sums: prototype rows to 1/M,
// then the pixel's column to 1/count.
void step_row(double* li, const double* row, int64_t m, double count) {
  double col = 0;
  for (int64_t j = 0; j < m; ++j) {
    li[j] = li[j] / row[j] / static_cast<double>(m);
    col += li[j];
  }
  for (int64_t j = 0; j < m; ++j) li[j] = li[j] / col / count;
}

// q = L * count (float), returns argmax_j (ties to the smallest j).
int64_t finish_row(const double* li, int64_t m, double count, float* qi) {
  int64_t best = 0;
  for (int64_t j = 0; j < m; ++j) {
    const double v = li[j] * count;
    qi[j] = static_cast<float>(v);
    if (v > li[best] * count) best = j;
  }
  return best;
}

template <typename scalar_t>
void sinkhorn_class(const scalar_t* scores, const int64_t* pixels, int64_t n, int64_t m, int64_t iterations,
                    double epsilon, float* q, int64_t* assignment) {
  std::vector<double> L(n * m), row(m);
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) mx = std::max(mx, static_cast<double>(scores[pixels[i] * m + j]));
  double total = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const double v = exp_entry(scores[pixels[i] * m + j], mx, epsilon);
      L[i * m + j] = v;
      total += v;
    }
  for (auto& v : L) v /= total;
  for (int64_t it = 0; it < iterations; ++it) {
    std::fill(row.begin(), row.end(), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) row[j] += L[i * m + j];
    for (int64_t i = 0; i < n; ++i) step_row(L.data() + i * m, row.data(), m, static_cast<double>(n));
  }
  for (int64_t i = 0; i < n; ++i)
    assignment[pixels[i]] = finish_row(L.data() + i * m, m, static_cast<double>(n), q + pixels[i] * m);
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& scores, const at::Tensor& labels,
                                                int64_t num_classes, int64_t iterations, double epsilon) {
  check_sinkhorn_args(scores, labels, num_classes, iterations, epsilon);
  const int64_t n = scores.size(0), m = scores.size(1);
  const auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  check_range_host(lp, n, num_classes, "labels", "num_classes", /*allow_negative=*/true, 0, false);
  auto q = at::zeros({n, m}, scores.options().dtype(at::kFloat));
  auto assignment = at::full({n}, -1, labels.options());
  if (n == 0) return {q, assignment};
  const auto s = scores.contiguous();
  const auto seg = cpu::sort_by_segment(lp, n, num_classes);
  float* qp = q.data_ptr<float>();
  int64_t* ap = assignment.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, num_classes, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t begin = seg.offsets[k], count = seg.offsets[k + 1] - begin;
        if (count > 0) sinkhorn_class(sp, seg.order.data() + begin, count, m, iterations, epsilon, qp, ap);
      }
    });
  });
  return {q, assignment};
}

// ---- the steps of sinkhorn, for a distributed caller ------------------------------------------

// perm [n_valid]: the pixels with a label, grouped by class in pixel order; offsets [K + 1].
std::tuple<at::Tensor, at::Tensor> sinkhorn_segments_cpu(const at::Tensor& labels, int64_t num_classes) {
  check_segments_args(labels, num_classes);
  const auto lab = labels.contiguous();
  const int64_t n = lab.numel();
  check_range_host(lab.data_ptr<int64_t>(), n, num_classes, "labels", "num_classes", true, 0, false);
  const auto seg = cpu::sort_by_segment(lab.data_ptr<int64_t>(), n, num_classes);
  auto perm = at::empty({static_cast<int64_t>(seg.order.size())}, lab.options());
  auto offsets = at::empty({num_classes + 1}, lab.options());
  std::copy(seg.order.begin(), seg.order.end(), perm.data_ptr<int64_t>());
  std::copy(seg.offsets.begin(), seg.offsets.end(), offsets.data_ptr<int64_t>());
  return {perm, offsets};
}

// The CPU checks perm and offsets fully (the CUDA kernels, which must not synchronise in the
// loop, only keep their reads in bounds).
void check_segments_content(const at::Tensor& perm, const at::Tensor& offsets, int64_t rows) {
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int64_t s = offsets.numel() - 1;
  TORCH_CHECK(op[0] == 0 && op[s] == perm.numel(), "offsets must run from 0 to perm.numel() = ", perm.numel(),
              " (got ", op[0], " .. ", op[s], ")");
  for (int64_t i = 0; i < s; ++i)
    TORCH_CHECK(op[i] <= op[i + 1], "offsets must be non-decreasing (offsets[", i, "] = ", op[i], " > offsets[",
                i + 1, "] = ", op[i + 1], ")");
  check_range_host(perm.data_ptr<int64_t>(), perm.numel(), rows, "perm", "values.size(0)", false, 0, false);
}

// Per segment s, over rows perm[offsets[s] .. offsets[s + 1]) in that order, then columns:
// the maximum or the sum of everything ([S]) or of each column ([S, M]), in double.
at::Tensor segment_reduce_cpu(const at::Tensor& values, const at::Tensor& perm, const at::Tensor& offsets,
                              bool is_max, bool all_columns) {
  check_segment_reduce_args(values, perm, offsets);
  const int64_t m = values.size(1), s = offsets.numel() - 1;
  const auto v = values.contiguous();
  const auto pm = perm.contiguous();
  const auto off = offsets.contiguous();
  check_segments_content(pm, off, values.size(0));
  const double init = is_max ? -std::numeric_limits<double>::infinity() : 0.0;
  auto out = all_columns ? at::full({s}, init, values.options().dtype(at::kDouble))
                         : at::full({s, m}, init, values.options().dtype(at::kDouble));
  const int64_t* pp = pm.data_ptr<int64_t>();
  const int64_t* op = off.data_ptr<int64_t>();
  double* out_p = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "segment_reduce_cpu", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, s, 1, [&](int64_t b, int64_t e) {
      for (int64_t seg = b; seg < e; ++seg) {
        double* acc = out_p + (all_columns ? seg : seg * m);
        for (int64_t i = op[seg]; i < op[seg + 1]; ++i)
          for (int64_t j = 0; j < m; ++j) {
            const double x = static_cast<double>(vp[pp[i] * m + j]);
            double& a = all_columns ? acc[0] : acc[j];
            a = is_max ? std::max(a, x) : a + x;
          }
      }
    });
  });
  return out;
}

// Applies fn(row of plan, class) to every pixel with a label in [0, K); the rest stay 0.
template <class Fn>
void for_labelled_rows(const at::Tensor& labels, int64_t num_classes, Fn fn) {
  const auto lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  at::parallel_for(0, lab.numel(), 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (lp[i] >= 0 && lp[i] < num_classes) fn(i, lp[i]);
  });
}

at::Tensor sinkhorn_exp_cpu(const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& class_max,
                            double epsilon) {
  check_sinkhorn_exp_args(scores, labels, class_max, epsilon);
  const int64_t m = scores.size(1);
  const auto s = scores.contiguous();
  const auto mx = class_max.contiguous();
  auto plan = at::zeros(scores.sizes(), scores.options().dtype(at::kDouble));
  double* lp = plan.data_ptr<double>();
  const double* xp = mx.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "sinkhorn_exp_cpu", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    for_labelled_rows(labels, mx.numel(), [&](int64_t i, int64_t k) {
      for (int64_t j = 0; j < m; ++j) lp[i * m + j] = exp_entry(sp[i * m + j], xp[k], epsilon);
    });
  });
  return plan;
}

at::Tensor sinkhorn_scale_cpu(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& class_total) {
  check_plan_args(plan, labels, class_total, "class_total", 1);
  const int64_t m = plan.size(1);
  auto out = plan.contiguous().clone();
  const auto total = class_total.contiguous();
  double* lp = out.data_ptr<double>();
  const double* tp = total.data_ptr<double>();
  for_labelled_rows(labels, total.numel(), [&](int64_t i, int64_t k) {
    for (int64_t j = 0; j < m; ++j) lp[i * m + j] /= tp[k];
  });
  return out;
}

at::Tensor sinkhorn_step_cpu(const at::Tensor& plan, const at::Tensor& labels, const at::Tensor& rows,
                             const at::Tensor& count) {
  check_sinkhorn_step_args(plan, labels, rows, count);
  const int64_t m = plan.size(1);
  auto out = plan.contiguous().clone();
  const auto r = rows.contiguous();
  const auto c = count.contiguous();
  double* lp = out.data_ptr<double>();
  const double* rp = r.data_ptr<double>();
  const double* cp = c.data_ptr<double>();
  for_labelled_rows(labels, c.numel(), [&](int64_t i, int64_t k) { step_row(lp + i * m, rp + k * m, m, cp[k]); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_finish_cpu(const at::Tensor& plan, const at::Tensor& labels,
                                                       const at::Tensor& count) {
  check_plan_args(plan, labels, count, "count", 1);
  const int64_t m = plan.size(1);
  const auto L = plan.contiguous();
  const auto c = count.contiguous();
  auto q = at::zeros(plan.sizes(), plan.options().dtype(at::kFloat));
  auto assignment = at::full({plan.size(0)}, -1, labels.options());
  const double* lp = L.data_ptr<double>();
  const double* cp = c.data_ptr<double>();
  float* qp = q.data_ptr<float>();
  int64_t* ap = assignment.data_ptr<int64_t>();
  for_labelled_rows(labels, c.numel(),
                    [&](int64_t i, int64_t k) { ap[i] = finish_row(lp + i * m, m, cp[k], qp + i * m); });
  return {q, assignment};
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("sinkhorn", &protoseg::sinkhorn_cpu);
  m.impl("sinkhorn_segments", &protoseg::sinkhorn_segments_cpu);
  m.impl("segment_reduce", &protoseg::segment_reduce_cpu);
  m.impl("sinkhorn_exp", &protoseg::sinkhorn_exp_cpu);
  m.impl("sinkhorn_scale", &protoseg::sinkhorn_scale_cpu);
  m.impl("sinkhorn_step", &protoseg::sinkhorn_step_cpu);
  m.impl("sinkhorn_finish", &protoseg::sinkhorn_finish_cpu);
}
