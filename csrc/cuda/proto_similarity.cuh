// proto_similarity's launch sequence: the shared chunked pass (prototype_pass.cuh) with the
// max/argmax epilogue; the backward scatters grad_scores into the tile at the winning
// prototypes and multiplies it by p_hat. No kernels of its own.
#pragma once

#include "cuda/prototype_pass.cuh"

// ---- host side: launch costs (the roofline model) and the launch sequence ----------------
// Hidden from nvcc's per-architecture device passes (parsing ATen there would triple the build)
#ifndef __CUDA_ARCH__
#include "checks.h"

namespace protoseg {
namespace cuda {

template <class Exec>
std::tuple<at::Tensor, at::Tensor> proto_similarity(const at::Tensor& x, const at::Tensor& prototypes) {
  Exec ex(x.device());
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
at::Tensor proto_similarity_backward(const at::Tensor& grad_scores, const at::Tensor& x,
                                     const at::Tensor& prototypes, const at::Tensor& index) {
  Exec ex(x.device());
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

}  // namespace cuda
}  // namespace protoseg
#endif  // __CUDA_ARCH__
