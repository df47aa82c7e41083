// ThreadSanitizer run of the emulated CUDA kernels (tests/test_emulated_tsan.py builds this with
// -fsanitize=thread and runs it). Every kernel runs on several blocks through the shipped launch
// sequences (csrc/cuda/<op>.cuh) on the CPU grid executor, whose host threads are real
// threads: a missing __syncthreads, a shared-memory race or a cross-block write conflict in the
// device code is reported as a data race. libtorch itself is not instrumented (its GEMM and
// sort run single-threaded here: OMP_NUM_THREADS=1).
#include <ATen/ATen.h>

#include <cstdio>

#include "cuda/proto_similarity.cuh"
#include "cuda/proto_train.cuh"
#include "cuda/scatter_mean.cuh"
#include "cuda/sinkhorn.cuh"
#include "emu_exec.h"

namespace pc = protoseg::cuda;
using Exec = pc::EmuExec;

int main() {
  at::manual_seed(0);
  const int64_t n = 300, d = 40, k = 4, m = 3;
  ps_emu::tile_budget = 170 * k * m;  // two chunks, the second partial
  auto x = at::randn({n, d});
  auto p = at::randn({k, m, d});
  auto labels = at::randint(-1, k, {n}, at::kLong);

  auto [scores, index] = pc::proto_similarity<Exec>(x, p);
  auto gx1 = pc::proto_similarity_backward<Exec>(at::randn({n, k}), x, p, index);
  auto [s2, i2, own, lse, weighted, x_hat, stats] = pc::proto_train<Exec>(x, p, labels, 0.1, {}, {}, 1e-5);
  auto gx2 = std::get<0>(pc::proto_train_backward<Exec>(at::randn({n, k}), at::randn({n, m}), at::randn({n}), x, p,
                                                  labels, i2, weighted, 0.1, {}, {}, stats));
  // With the feature LayerNorm: the ATen composite runs first, then the same pass.
  const auto weight = at::rand({d}) + 0.5, bias = at::randn({d});
  auto [s5, i5, own5, lse5, weighted5, x_hat5, stats5] = pc::proto_train<Exec>(x, p, labels, 0.1, weight, bias, 1e-5);
  auto [gx5, gw5, gb5] = pc::proto_train_backward<Exec>(at::randn({n, k}), at::randn({n, m}), at::randn({n}), x, p,
                                                  labels, i5, weighted5, 0.1, weight, bias, stats5);
  auto [q, assignment] = pc::sinkhorn<Exec>(own, labels, k, 3, 0.05);
  // The distributed caller's steps of sinkhorn (csrc/protoseg.cpp), composed in one process.
  auto [perm, offsets] = pc::sinkhorn_segments<Exec>(labels, k);
  const auto n_k = (offsets.slice(0, 1) - offsets.slice(0, 0, -1)).to(at::kDouble);
  auto plan = pc::sinkhorn_exp<Exec>(own, labels, pc::segment_reduce<Exec>(own, perm, offsets, true, true), 0.05);
  plan = pc::sinkhorn_scale<Exec>(plan, labels, pc::segment_reduce<Exec>(plan, perm, offsets, false, true));
  for (int it = 0; it < 3; ++it)
    plan = pc::sinkhorn_step<Exec>(plan, labels, pc::segment_reduce<Exec>(plan, perm, offsets, false, false), n_k);
  auto [q_steps, assignment_steps] = pc::sinkhorn_finish<Exec>(plan, labels, n_k);
  auto [mean, count] = pc::scatter_mean<Exec>(x, labels, k);
  auto gx4 = pc::scatter_mean_backward<Exec>(at::randn({k, d}), labels, count);

  // Small sanity checks (the numerics are tested in tests/test_emulated.py).
  const bool ok = at::allclose(s2, scores) && at::equal(i2, index) && gx1.isfinite().all().item<bool>() &&
                  gx2.isfinite().all().item<bool>() && lse.isfinite().all().item<bool>() &&
                  (assignment >= -1).all().item<bool>() &&
                  count.sum().item<int64_t>() == (labels >= 0).sum().item<int64_t>() &&
                  at::equal(q_steps, q) && at::equal(assignment_steps, assignment) &&
                  gx4.isfinite().all().item<bool>() && mean.isfinite().all().item<bool>() &&
                  x_hat.isfinite().all().item<bool>() && gx5.isfinite().all().item<bool>() &&
                  gw5.isfinite().all().item<bool>() && gb5.isfinite().all().item<bool>() &&
                  s5.isfinite().all().item<bool>();
  int kernels = 0;
  for (const auto& [name, stat] : ps_emu::stats) kernels += stat.launches > 0;
  std::printf("%s: %d kernels ran\n", ok ? "OK" : "MISMATCH", kernels);
  return ok ? 0 : 1;
}
