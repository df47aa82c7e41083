// The vectorised CPU kernels behind the ops, chosen at run time by the CPU's instruction set.
//
// Each is compiled once per capability (cpu/kernels_avx512.cpp, cpu/kernels_avx2.cpp,
// cpu/kernels_default.cpp, from the one source cpu/kernels_impl.h) and picked by
// at::native::get_cpu_capability(), as ATen picks its own kernels: ATEN_CPU_CAPABILITY=avx2 or
// =default forces a lower path. The op entry points (cpu/<op>.cpp) check arguments, allocate
// outputs and call through kernels(); they are compiled for baseline x86-64, so one built
// library runs on any x86-64 CPU.
//
// Layouts: x [N, D] any strides, dtype scalar_t (float16, bfloat16, float32, float64);
// acc_t = at::opmath_type<scalar_t> (float32, or float64 for float64); p_hat [K*M, D] acc_t
// contiguous, unit rows. Pointers typed void* hold the dtype named in their comment; a null
// pointer skips that output or gradient term.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <tuple>

#include "norm_eps.h"

namespace protoseg {
namespace cpu {

// How a row of x becomes its unit row x_hat (docs/design.md section 1, inference step 2):
// x_hat = y / max(||y||, 1e-12), with y = LayerNorm_D(x; weight, bias, eps) when weight is set,
// else y = x.
struct RowNorm {
  const void* weight = nullptr;  // [D] acc_t
  const void* bias = nullptr;    // [D] acc_t
  double eps = 0.0;
};

// One chunked pass over the pixel x prototype products (cpu/kernels_impl.h). With p_hat
// undefined only the rows are normalised (x_hat and stats), as layer_norm_normalize does.
struct PassArgs {
  at::Tensor x;
  at::Tensor p_hat;
  int64_t num_classes = 0, num_prototypes = 0;
  RowNorm norm;
  void* x_hat = nullptr;             // [N, D] scalar_t contiguous
  void* stats = nullptr;             // [N, 3] acc_t: mean, rstd, ||y|| (0, 1, ||x|| without LayerNorm)
  void* scores = nullptr;            // [N, K] scalar_t: max over the class's M prototypes
  int64_t* index = nullptr;          // [N, K] argmax, ties to the smallest m
  const int64_t* labels = nullptr;   // [N], for `own`
  void* own = nullptr;               // [N, M] acc_t: the row's own-class products (0 if labels[n] < 0)
  void* lse = nullptr;               // [N] acc_t: logsumexp_j S[n, j] / temperature
  void* weighted = nullptr;          // [N, D] acc_t: sum_j softmax_j(S[n] / temperature) p_hat_j (needs lse)
  double temperature = 1.0;
};

// The gradient of x (and of the LayerNorm affine) from the terms below, summed per row into
// grad_x_hat, then taken through the row normalisation:
//   grad_x_hat[n] = grad_out[n]
//                 + sum_k grad_scores[n,k] p_hat[k*M + index[n,k]]
//                 + sum_m grad_own[n,m] p_hat[labels[n]*M + m]          (labels[n] >= 0)
//                 + grad_lse[n] / temperature * weighted[n]
struct GradArgs {
  at::Tensor x;
  at::Tensor p_hat;                  // may be undefined when only grad_out is given
  int64_t num_classes = 0, num_prototypes = 0;
  RowNorm norm;
  const void* stats = nullptr;       // [N, 3] acc_t from the forward pass; required with norm.weight
  const void* grad_out = nullptr;    // [N, D] scalar_t contiguous
  const void* grad_scores = nullptr; // [N, K] scalar_t contiguous
  const int64_t* index = nullptr;    // [N, K]
  const void* grad_own = nullptr;    // [N, M] acc_t contiguous
  const int64_t* labels = nullptr;   // [N]
  const void* grad_lse = nullptr;    // [N] acc_t
  const void* weighted = nullptr;    // [N, D] acc_t contiguous
  double temperature = 1.0;
  void* grad_x = nullptr;            // [N, D] scalar_t contiguous
  // [grad_blocks(N), 2, D] acc_t with norm.weight: per block of kGradBlockRows rows, the sums of
  // grad_y * z and grad_y (weight and bias gradients), to be added block after block so the
  // result does not depend on the thread count.
  void* norm_partial = nullptr;
};

constexpr int64_t kGradBlockRows = 256;
inline int64_t grad_blocks(int64_t n) { return (n + kGradBlockRows - 1) / kGradBlockRows; }

struct Kernels {
  const char* isa;  // "avx512", "avx2" or "default"
  void (*pass)(const PassArgs&);
  void (*grad)(const GradArgs&);
};

// The kernels for this CPU (or for ATEN_CPU_CAPABILITY), chosen on first use.
const Kernels& kernels();

// grad_weight and grad_bias [D] of dtype `out` from GradArgs::norm_partial [blocks, 2, D]: the
// blocks added one after another, so the bits do not depend on the thread count.
inline std::tuple<at::Tensor, at::Tensor> sum_norm_partials(const at::Tensor& partial, at::ScalarType out) {
  const int64_t blocks = partial.size(0), d = partial.size(2);
  auto grad_weight = at::zeros({d}, partial.options());
  auto grad_bias = at::zeros({d}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "protoseg_sum_norm_partials", [&] {
    const scalar_t* pp = partial.data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      for (int64_t c = 0; c < d; ++c) {
        gw[c] += pp[blk * 2 * d + c];
        gb[c] += pp[blk * 2 * d + d + c];
      }
    }
  });
  return {grad_weight.to(out), grad_bias.to(out)};
}

// p_hat = prototypes / max(||p||, kNormEps) as a contiguous [K*M, D] tensor of the accumulation type.
inline at::Tensor normalized_prototypes(const at::Tensor& prototypes, at::ScalarType acc) {
  auto p = prototypes.reshape({-1, prototypes.size(2)}).to(acc);
  return (p / p.norm(2, {1}, /*keepdim=*/true).clamp_min(kNormEps)).contiguous();
}

}  // namespace cpu
}  // namespace protoseg
