// The small portability layer that lets the device code in csrc/cuda/*.cuh compile both with
// nvcc (the shipped kernels) and with the host C++ compiler (the same kernels run by the CPU
// grid executor in tests/emulated/, see docs/design.md section 5).
//
// Device code uses only what is declared here:
//   PS_GLOBAL / PS_DEVICE / PS_HD      kernel, device-function and host+device qualifiers
//   PS_LAUNCH_BOUNDS(t)                __launch_bounds__(t, 1) (no-op on the host): with the
//                                      minimum of one block per SM stated, ptxas no longer caps
//                                      registers at 32-40 for occupancy and spills (sm_80)
//   PS_SHARED_ARRAY(T, name, count)    a block-shared array (static size)
//   PS_DYNAMIC_SHARED(T, name)         the block's dynamic shared memory as T*
//   threadIdx, blockIdx, blockDim, gridDim
//   ps::sync_threads()                 __syncthreads
//   ps::sync_warp()                    __syncwarp (all 32 lanes)
//   ps::shfl_xor / shfl_down / ballot  full-warp shuffles and ballots (all 32 lanes take part)
//   ps::atomic_min_u64 / atomic_or     integer atomics (no floating-point atomics anywhere)
//   ps::exp / log / sqrt / max / min   float and double overloads
//
// On the host the executor (tests/emulated/grid_executor.h, test-only) implements the
// Context interface below: one host thread per CUDA thread of a block, __syncthreads as a
// barrier over the block's threads, warp shuffles through a per-warp exchange between two warp
// barriers, shared memory as one arena per block, atomics as std::atomic_ref operations.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)

#define PS_GLOBAL __global__
#define PS_DEVICE __device__ __forceinline__
#define PS_HD __host__ __device__ __forceinline__
#define PS_LAUNCH_BOUNDS(threads) __launch_bounds__(threads, 1)
#define PS_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#define PS_DYNAMIC_SHARED(T, name)                                 \
  extern __shared__ __align__(16) unsigned char ps_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(ps_dynamic_smem)

namespace ps {
using Dim3 = ::dim3;
constexpr unsigned kFullMask = 0xffffffffu;

PS_DEVICE void sync_threads() { __syncthreads(); }
PS_DEVICE void sync_warp() { __syncwarp(kFullMask); }
template <class T>
PS_DEVICE T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}
template <class T>
PS_DEVICE T shfl_down(T v, unsigned delta) {
  return __shfl_down_sync(kFullMask, v, delta);
}
PS_DEVICE unsigned ballot(bool predicate) { return __ballot_sync(kFullMask, predicate); }
PS_DEVICE unsigned long long atomic_min_u64(unsigned long long* address, unsigned long long v) {
  return atomicMin(address, v);
}
PS_DEVICE int atomic_or(int* address, int v) { return atomicOr(address, v); }
}  // namespace ps

#else  // host compiler: the CPU grid executor's view

#include <atomic>

#define PS_GLOBAL inline
#define PS_DEVICE inline
#define PS_HD inline
#define PS_LAUNCH_BOUNDS(threads)
#define PS_SHARED_ARRAY(T, name, count) T* name = ::ps_emu::shared_array<T>(count)
#define PS_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::ps_emu::state.context->dynamic_shared())

namespace ps_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Implemented by the executor for the block being run.
struct Context {
  virtual ~Context() = default;
  virtual void sync_block() = 0;
  virtual void sync_warp() = 0;  // a barrier over the calling thread's warp
  // Every lane of the calling thread's warp calls this with its own value; returns the value
  // lane `src_lane` passed (src_lane is in [0, 32)).
  virtual uint64_t warp_exchange(uint64_t bits, unsigned src_lane) = 0;
  virtual unsigned char* static_shared() = 0;  // the block's arena for PS_SHARED_ARRAY
  virtual std::size_t static_shared_bytes() const = 0;
  virtual void* dynamic_shared() = 0;
};

// Per emulated CUDA thread (one host thread each).
struct ThreadState {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  Context* context = nullptr;
  unsigned exchange_parity = 0;   // which half of the warp exchange the next shuffle uses
  std::size_t shared_offset = 0;  // next free byte of the static arena; every thread of a
                                  // block makes the same declarations in the same order, so
                                  // all get the same addresses
};
inline thread_local ThreadState state;

void shared_overflow(std::size_t needed, std::size_t available);  // defined by the executor

template <class T>
T* shared_array(std::size_t count) {
  std::size_t off = (state.shared_offset + alignof(T) - 1) / alignof(T) * alignof(T);
  const std::size_t end = off + count * sizeof(T);
  if (end > state.context->static_shared_bytes()) shared_overflow(end, state.context->static_shared_bytes());
  state.shared_offset = end;
  return reinterpret_cast<T*>(state.context->static_shared() + off);
}

}  // namespace ps_emu

#define threadIdx (::ps_emu::state.thread_idx)
#define blockIdx (::ps_emu::state.block_idx)
#define blockDim (::ps_emu::state.block_dim)
#define gridDim (::ps_emu::state.grid_dim)

namespace ps {
using Dim3 = ::ps_emu::Dim3;
constexpr unsigned kFullMask = 0xffffffffu;

inline void sync_threads() { ::ps_emu::state.context->sync_block(); }
inline void sync_warp() { ::ps_emu::state.context->sync_warp(); }

template <class T>
inline T exchange_(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::ps_emu::state.context->warp_exchange(bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
inline unsigned lane_() { return ::ps_emu::state.thread_idx.x % 32u; }

template <class T>
inline T shfl_xor(T v, int lane_mask) {
  return exchange_(v, lane_() ^ static_cast<unsigned>(lane_mask));
}
template <class T>
inline T shfl_down(T v, unsigned delta) {
  const unsigned src = lane_() + delta;
  const T got = exchange_(v, src < 32u ? src : lane_());  // out of range: own value, as CUDA
  return got;
}
inline unsigned ballot(bool predicate) {
  // 32 exchanges: lane l learns every lane's predicate.
  unsigned mask = 0;
  for (unsigned l = 0; l < 32u; ++l) mask |= (exchange_<uint32_t>(predicate ? 1u : 0u, l) & 1u) << l;
  return mask;
}
inline unsigned long long atomic_min_u64(unsigned long long* address, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*address);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomic_or(int* address, int v) { return std::atomic_ref<int>(*address).fetch_or(v); }
}  // namespace ps

#endif

namespace ps {
PS_HD float exp(float x) { return ::expf(x); }
PS_HD double exp(double x) { return ::exp(x); }
PS_HD float log(float x) { return ::logf(x); }
PS_HD double log(double x) { return ::log(x); }
PS_HD float sqrt(float x) { return ::sqrtf(x); }
PS_HD double sqrt(double x) { return ::sqrt(x); }
#if defined(__CUDACC__)
PS_HD float rsqrt(float x) { return ::rsqrtf(x); }  // CUDA: at most 2 ulp
PS_HD double rsqrt(double x) { return ::rsqrt(x); }
#else
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
#endif
template <class T>
PS_HD T max(T a, T b) {
  return a < b ? b : a;
}
template <class T>
PS_HD T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
PS_HD T infinity() {
  return std::numeric_limits<T>::infinity();
}
}  // namespace ps
