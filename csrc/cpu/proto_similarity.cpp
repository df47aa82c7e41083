// proto_similarity on the CPU: one chunked GEMM pass with a max/argmax epilogue; the backward
// is a gather of the winning prototypes (no GEMM). Kernels: cpu/kernels_impl.h.
#include <torch/library.h>

#include "checks.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"

namespace protoseg {
namespace {

std::tuple<at::Tensor, at::Tensor> proto_similarity_cpu(const at::Tensor& x, const at::Tensor& prototypes) {
  check_embeddings(x);
  check_prototypes(prototypes, x);
  const int64_t n = x.size(0), k = prototypes.size(0), m = prototypes.size(1);
  auto scores = at::empty({n, k}, x.options());
  auto index = at::empty({n, k}, x.options().dtype(at::kLong));
  if (n == 0) return {scores, index};
  cpu::PassArgs a;
  a.x = x;
  a.p_hat = cpu::normalized_prototypes(prototypes, at::toOpMathType(x.scalar_type()));
  a.num_classes = k;
  a.num_prototypes = m;
  a.scores = scores.data_ptr();
  a.index = index.data_ptr<int64_t>();
  cpu::kernels().pass(a);
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
  cpu::GradArgs a;
  a.x = x;
  a.p_hat = cpu::normalized_prototypes(prototypes, at::toOpMathType(x.scalar_type()));
  a.num_classes = k;
  a.num_prototypes = m;
  a.grad_scores = g.data_ptr();
  a.index = idx.data_ptr<int64_t>();
  a.grad_x = grad_x.data_ptr();
  cpu::kernels().grad(a);
  return grad_x;
}

}  // namespace
}  // namespace protoseg

TORCH_LIBRARY_IMPL(protoseg, CPU, m) {
  m.impl("proto_similarity", &protoseg::proto_similarity_cpu);
  m.impl("proto_similarity_backward", &protoseg::proto_similarity_backward_cpu);
}
