// sinkhorn on the CPU: every class's Sinkhorn-Knopp in one call. Pixels are counting-sorted by
// label once; classes then run in parallel, each sequentially over its own pixels in pixel
// order and in double, so the result is bitwise the same for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/segments.h"

namespace protoseg {
namespace {

// One class: L = exp((S - max) / eps)^T [M, n], normalised to sum 1, then `iterations` of
// {rows (prototypes) to 1/M, columns (pixels) to 1/n}, finally times n. Stored pixel-major.
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
      const double v = std::exp((static_cast<double>(scores[pixels[i] * m + j]) - mx) / epsilon);
      L[i * m + j] = v;
      total += v;
    }
  for (auto& v : L) v /= total;
  for (int64_t it = 0; it < iterations; ++it) {
    std::fill(row.begin(), row.end(), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) row[j] += L[i * m + j];
    for (int64_t i = 0; i < n; ++i) {
      double col = 0;
      for (int64_t j = 0; j < m; ++j) {
        L[i * m + j] = L[i * m + j] / row[j] / static_cast<double>(m);
        col += L[i * m + j];
      }
      for (int64_t j = 0; j < m; ++j) L[i * m + j] = L[i * m + j] / col / static_cast<double>(n);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    float* qi = q + pixels[i] * m;
    int64_t best = 0;
    for (int64_t j = 0; j < m; ++j) {
      const double v = L[i * m + j] * static_cast<double>(n);
      qi[j] = static_cast<float>(v);
      if (v > L[i * m + best] * static_cast<double>(n)) best = j;
    }
    assignment[pixels[i]] = best;
  }
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

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) { m.impl("sinkhorn", &protoseg::sinkhorn_cpu); }
