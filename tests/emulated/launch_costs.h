// Global-memory traffic and arithmetic of one kernel launch, from its parameters alone, for the
// modelled roofline (benchmarks/cuda_roofline.py). Every array element a kernel reads or writes
// is counted once per launch (ideal caching within a launch, none across launches); FLOPs count
// the kernel's arithmetic per element, a multiply-add as 2 and an exp as 1.
//
// One overload per parameter struct of csrc/cuda/*.cuh; the deleted template makes a new kernel
// without a cost a compile error in the emulated module.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/proto_contrast_loss.cuh"
#include "cuda/prototype_pass.cuh"
#include "cuda/scatter_mean.cuh"
#include "cuda/sinkhorn.cuh"

namespace protoseg {
namespace cuda {

struct LaunchCost {
  double read = 0, written = 0, flops = 0;
};

template <class P>
LaunchCost launch_cost(const P&) = delete;

namespace costs {
constexpr double kIndex = sizeof(int64_t);
template <class T>
constexpr double bytes() {
  return sizeof(T);
}
template <class T>
double if_set(const T* p, double v) {
  return p != nullptr ? v : 0.0;
}
}  // namespace costs

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
  c.read = r * km * bytes<acc>() + if_set(p.inv_norm, r * bytes<acc>()) + if_set(p.labels, r * kIndex) +
           if_set(p.target, r * kIndex);
  c.written = if_set(p.scores, r * p.num_classes * bytes<T>()) + if_set(p.index, r * p.num_classes * kIndex) +
              if_set(p.own, r * p.num_prototypes * bytes<acc>()) + if_set(p.target_logit, r * bytes<acc>()) +
              if_set(p.lse, r * bytes<acc>()) + (training ? r * km * bytes<acc>() : 0.0);
  c.flops = r * km * (training ? 6 : p.lse != nullptr ? 5 : 1);
  return c;
}

template <class T>
LaunchCost launch_cost(const GradTileParams<T>& p) {
  using acc = acc_t<T>;
  using namespace costs;
  const double r = p.rows, k = p.num_classes, m = p.num_prototypes;
  LaunchCost c;
  c.read = if_set(p.grad_scores, r * k * (bytes<T>() + kIndex)) + if_set(p.grad_own, r * m * bytes<acc>() + r * kIndex) +
           if_set(p.coef_target, r * (bytes<acc>() + kIndex));
  c.written = r * k * m * bytes<acc>();
  c.flops = r * (k + m + 1);
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
  return c;
}

inline LaunchCost launch_cost(const RangeCheckParams& p) { return {p.n * costs::kIndex, 0, double(p.n)}; }
inline LaunchCost launch_cost(const SegmentKeysParams& p) { return {p.n * costs::kIndex, p.n * costs::kIndex, 0}; }
inline LaunchCost launch_cost(const SegmentOffsetsParams& p) {
  return {p.n * costs::kIndex, (p.num_segments + 1) * costs::kIndex, 0};
}

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

template <class acc>
LaunchCost launch_cost(const ContrastPartialsParams<acc>& p) {
  return {p.n * (2 * sizeof(acc) + costs::kIndex), 0, 6.0 * p.n};
}

template <class T>
LaunchCost launch_cost(const ContrastFinalizeParams<T>& p) {
  return {p.blocks * 3 * sizeof(double), 3 * sizeof(double), 3.0 * p.blocks};
}

template <class acc>
LaunchCost launch_cost(const ContrastCoefParams<acc>& p) {
  return {p.n * (sizeof(acc) + costs::kIndex), 2.0 * p.n * sizeof(acc), 4.0 * p.n};
}

template <class T>
LaunchCost launch_cost(const ScatterMeanParams<T>& p) {
  const double e = double(p.n) * p.d;
  return {e * sizeof(T) + p.n * costs::kIndex, double(p.num_segments) * p.d * sizeof(T) + p.num_segments * costs::kIndex,
          e};
}

template <class T>
LaunchCost launch_cost(const ScatterMeanBackwardParams<T>& p) {
  const double e = double(p.n) * p.d;
  return {double(p.num_segments) * p.d * sizeof(T) + p.n * costs::kIndex + p.num_segments * costs::kIndex,
          e * sizeof(T), e};
}

}  // namespace cuda
}  // namespace protoseg
