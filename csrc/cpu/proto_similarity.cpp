// proto_similarity on the CPU: one chunked GEMM pass with a max/argmax epilogue; the backward
// is a gather of the winning prototypes (no GEMM).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/prototype_pass.h"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> proto_similarity_cpu(const at::Tensor& x, const at::Tensor& prototypes) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  auto scores = at::empty({n, k}, x.options());
  auto index = at::empty({n, k}, x.options().dtype(at::kLong));
  if (n == 0) return {scores, index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_similarity_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p_hat = cpu::normalized_prototypes(prototypes, c10::CppTypeToScalarType<acc_t>::value);
    cpu::PassOutputs<scalar_t, acc_t> out;
    out.scores = scores.data_ptr<scalar_t>();
    out.index = index.data_ptr<int64_t>();
    cpu::prototype_pass<scalar_t, acc_t>(x, p_hat, k, m, out);
  });
  return {scores, index};
}

at::Tensor proto_similarity_backward_cpu(const at::Tensor& grad_scores, const at::Tensor& x,
                                         const at::Tensor& prototypes, const at::Tensor& index) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  check_shape(grad_scores, "grad_scores", {n, k});
  check_shape(index, "index", {n, k});
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64 (got ", index.scalar_type(), ")");
  auto grad_x = cpu::empty_output({n, x.size(1)}, x.options());
  if (n == 0) return grad_x;
  const auto g = grad_scores.to(x.scalar_type()).contiguous();
  const auto idx = index.contiguous();
  check_range_host(idx.data_ptr<int64_t>(), idx.numel(), m, "index", "M", false, 0, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "proto_similarity_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p_hat = cpu::normalized_prototypes(prototypes, c10::CppTypeToScalarType<acc_t>::value);
    cpu::GradTerms<scalar_t, acc_t> terms;
    terms.grad_scores = g.data_ptr<scalar_t>();
    terms.index = idx.data_ptr<int64_t>();
    cpu::assemble_grad_x<scalar_t, acc_t>(x, p_hat, k, m, terms, grad_x);
  });
  return grad_x;
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("proto_similarity", &protoseg::proto_similarity_cpu);
  m.impl("proto_similarity_backward", &protoseg::proto_similarity_backward_cpu);
}
