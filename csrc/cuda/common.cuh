// What every CUDA op shares: accumulation types, deterministic warp and block reductions, the
// device-side range check and the sorted-segment offsets; then, on the host side only, the
// launch-cost model and the host functions that launch those kernels.
//
// Every csrc/cuda/<op>.cuh has the same two parts. The device part (raw pointers and sizes, no
// ATen) compiles with nvcc and, through cuda/portability.h, with the host compiler for the CPU
// grid executor (tests/emulated/). The host part, behind `#ifndef __CUDA_ARCH__`, is the op's
// launch sequence written once against an executor `Exec` (cuda_exec.cuh on a GPU, the grid
// executor in tests), with each kernel's launch cost: nvcc's per-architecture device passes never
// parse ATen, which would more than double the build.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/portability.h"
#include "norm_eps.h"

namespace protoseg {
namespace cuda {

// X(T) for every floating type an op accepts (explicit instantiations).
#define PROTOSEG_FOR_FLOATING_TYPES(X) X(float) X(double) X(c10::Half) X(c10::BFloat16)

constexpr int kWarpSize = 32;

// fp32 accumulation for half, bfloat16 and float; fp64 for double.
template <class T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <class T>
using acc_t = typename Acc<T>::type;

// Butterfly reductions: every lane ends with the same value, combined in a fixed order, so the
// result does not depend on timing (deterministic).
template <class T>
PS_DEVICE T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += ps::shfl_xor(v, offset);
  return v;
}
template <class T>
PS_DEVICE T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = ps::max(v, ps::shfl_xor(v, offset));
  return v;
}

// Sum over the block (blockDim.x == kThreads, a multiple of 32); every thread gets the result.
// Warp partials are added in warp order. Ends with a barrier so the scratch can be reused.
template <int kThreads, class T>
PS_DEVICE T block_sum(T v) {
  static_assert(kThreads % kWarpSize == 0, "block_sum needs whole warps");
  PS_SHARED_ARRAY(T, partial, kThreads / kWarpSize);
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) partial[warp] = v;
  ps::sync_threads();
  T total = partial[0];
  for (int w = 1; w < kThreads / kWarpSize; ++w) total += partial[w];
  ps::sync_threads();
  return total;
}

// ---- device-side range check ----------------------------------------------------------------
// Labels, targets and indices live on the GPU; checking them on the host would copy them. This
// kernel records the position of the first offending entry with an integer atomicMin into
// `first_bad` (initialised to n); the host reads that one value once, before any kernel uses
// the vector, and raises naming the entry (see range_check_host.h). The kernels themselves also
// treat out-of-range entries as ignored, so nothing reads or writes out of bounds even if the
// check were skipped: bad input can raise, never corrupt memory.
struct RangeCheckParams {
  const int64_t* values;  // [n]
  int64_t n;
  int64_t upper;           // valid: [0, upper)
  bool allow_negative;     // negative entries are "ignored", not errors
  bool has_ignore;         // entries equal to `ignore` are fine
  int64_t ignore;
  unsigned long long* first_bad;  // [1], n when all entries are valid
};

constexpr int kRangeCheckThreads = 256;

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) range_check_kernel(RangeCheckParams p) {
  unsigned long long first = static_cast<unsigned long long>(p.n);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t v = p.values[i];
    const bool ok = (v >= 0 && v < p.upper) || (p.allow_negative && v < 0) || (p.has_ignore && v == p.ignore);
    if (!ok) {
      first = static_cast<unsigned long long>(i);
      break;  // later entries of this thread have larger positions
    }
  }
  if (first < static_cast<unsigned long long>(p.n)) ps::atomic_min_u64(p.first_bad, first);
}

// ---- sorted segments ------------------------------------------------------------------------
// Pixels are grouped by segment id (class for Sinkhorn, bucket for scatter_mean) with a stable
// sort of `keys` (cub radix sort through at::sort, deterministic): key = id for ids in
// [0, S), S for negative (ignored) ids, so ignored pixels sort last. offsets[s] is the first
// sorted position with key >= s, for s in [0, S]; segment s is [offsets[s], offsets[s + 1]).

struct SegmentKeysParams {
  const int64_t* ids;  // [n]
  int64_t n;
  int64_t num_segments;
  int64_t* keys;  // [n]
};

constexpr int kSegmentThreads = 256;

template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) segment_keys_kernel(SegmentKeysParams p) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t v = p.ids[i];
    p.keys[i] = (v >= 0 && v < p.num_segments) ? v : p.num_segments;
  }
}

struct SegmentOffsetsParams {
  const int64_t* sorted_keys;  // [n], non-decreasing, values in [0, S]
  int64_t n;
  int64_t num_segments;  // S
  int64_t* offsets;      // [S + 1]
};

// Position i in [0, n] writes offsets[s] = i for every s in (key[i - 1], key[i]] (key[-1] = -1,
// key[n] = S): each s in [0, S] is written exactly once, no atomics.
template <int kThreads>
PS_GLOBAL void PS_LAUNCH_BOUNDS(kThreads) segment_offsets_kernel(SegmentOffsetsParams p) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i <= p.n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t prev = i == 0 ? -1 : p.sorted_keys[i - 1];
    const int64_t cur = i == p.n ? p.num_segments : p.sorted_keys[i];
    for (int64_t s = prev + 1; s <= cur; ++s) p.offsets[s] = i;
  }
}

// Grid size for a grid-stride loop over `work` items with `threads` per block.
PS_HD unsigned grid_for(int64_t work, int threads, int64_t max_blocks = int64_t{1} << 20) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

}  // namespace cuda
}  // namespace protoseg

// ---- host side: launch costs (the roofline model) and the launch sequence ----------------
// Hidden from nvcc's per-architecture device passes (parsing ATen there would triple the build)
#ifndef __CUDA_ARCH__
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <string>
#include <tuple>

namespace protoseg {
namespace cuda {

// What one launch reads and writes in global memory and its FLOPs, from its parameters
// (benchmarks/cuda_roofline.py). Every element is counted once per launch (ideal caching within a
// launch, none across launches, except for the buffers a launch sequence sizes to stay in L2: see
// Exec::l2_resident); a multiply-add counts 2 FLOPs, an exp 1. Each parameter struct's overload
// sits with its kernel; the deleted template makes a kernel without one a compile error in the
// roofline's executor.
struct LaunchCost {
  double read = 0, written = 0, flops = 0;
  // Of read + written, the bytes that touch `workspace`, a chunk's scratch buffer (the pass's
  // [rows, K*M] tile, the backward's [rows, D] product), which the executor counts as L2 traffic
  // where the launch sequence declared it resident.
  const void* workspace = nullptr;
  double workspace_bytes = 0;
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

inline LaunchCost launch_cost(const RangeCheckParams& p) { return {p.n * costs::kIndex, 0, double(p.n)}; }
inline LaunchCost launch_cost(const SegmentKeysParams& p) { return {p.n * costs::kIndex, p.n * costs::kIndex, 0}; }
inline LaunchCost launch_cost(const SegmentOffsetsParams& p) {
  return {p.n * costs::kIndex, (p.num_segments + 1) * costs::kIndex, 0};
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
  RangeCheckParams p{.values = v.data_ptr<int64_t>(),
                     .n = n,
                     .upper = upper,
                     .allow_negative = allow_negative,
                     .has_ignore = has_ignore,
                     .ignore = ignore,
                     .first_bad = reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>())};
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
            SegmentKeysParams{.ids = ids.data_ptr<int64_t>(),
                              .n = n,
                              .num_segments = num_segments,
                              .keys = keys.data_ptr<int64_t>()});
  auto [sorted, perm] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto offsets = at::empty({num_segments + 1}, ids.options());
  ex.launch(segment_offsets_kernel<kSegmentThreads>, grid_for(n + 1, kSegmentThreads), kSegmentThreads, 0,
            SegmentOffsetsParams{.sorted_keys = sorted.data_ptr<int64_t>(),
                                 .n = n,
                                 .num_segments = num_segments,
                                 .offsets = offsets.data_ptr<int64_t>()});
  return {sorted, perm, offsets};
}

// The host functions above are compiled once for the GPU, in common.cu, the one translation unit
// holding their kernels; `prefix` is `template` there and `extern template` in cuda_exec.cuh.
#define PROTOSEG_COMMON_HOST_FUNCTIONS(prefix, Exec)                                                            \
  prefix void check_range_device<Exec>(Exec&, const at::Tensor&, int64_t, const char*, const char*, bool, int64_t, \
                                       bool);                                                                 \
  prefix std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_by_segment<Exec>(Exec&, const at::Tensor&, int64_t);

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
