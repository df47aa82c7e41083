// Negative control for the ThreadSanitizer test: a kernel with a missing __syncthreads (every
// thread reads a neighbour's shared-memory slot right after writing its own). Run with
// "race" it must be reported; with "sync" (the barrier in place) it must not. Shows that the
// executor's threads are visible to TSan and its barrier is what orders them.
#include <cstdio>
#include <cstring>

#include "grid_executor.h"

struct Params {
  float* out;
  bool sync;
};

template <int kThreads>
PS_GLOBAL void neighbour_kernel(Params p) {
  PS_SHARED_ARRAY(float, buf, kThreads);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x + blockIdx.x);
  if (p.sync) ps::sync_threads();
  p.out[blockIdx.x * kThreads + threadIdx.x] = buf[(threadIdx.x + 1) % kThreads];
}

int main(int argc, char** argv) {
  const bool sync = argc > 1 && std::strcmp(argv[1], "sync") == 0;
  static float out[4 * 64];
  ps_emu::launch(neighbour_kernel<64>, ps_emu::Dim3(4), ps_emu::Dim3(64), 0, Params{out, sync});
  std::printf("%s done: out[0] = %g\n", sync ? "sync" : "race", out[0]);
  return 0;
}
