// Vector code for the CPU kernels, written with GCC vector extensions of PROTOSEG_VEC_BYTES
// (64 for AVX-512, 32 for AVX2, 16 for baseline x86-64 SSE2) rather than
// `#pragma omp simd reduction`, which GCC 12 compiled to a serial scalar chain inside the
// at::parallel_for lambdas (measured: the LayerNorm row sums ran at one FMA per 4 cycles).
//
// Compiled once per instruction set inside cpu/kernels_impl.h, in the namespace
// protoseg::cpu::PROTOSEG_ISA; include it only from there.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace protoseg {
namespace cpu {
namespace PROTOSEG_ISA {

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(PROTOSEG_VEC_BYTES)));
  static constexpr int64_t lanes = PROTOSEG_VEC_BYTES / sizeof(T);
};
typedef int32_t VecI32 __attribute__((vector_size(PROTOSEG_VEC_BYTES)));

template <typename T>
inline typename Vec<T>::type load_vec(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_vec(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}

// out[i] = x[i * stride] as T, for i < d (the contiguous case vectorised).
template <typename S, typename T>
inline void load_row(const S* x, int64_t stride, int64_t d, T* __restrict out) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(x[i]);
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(x[i * stride]);
  }
}

// sum_i a[i] * b[i] with four independent vector accumulators.
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V s0{}, s1{}, s2{}, s3{};
  int64_t c = 0;
  for (; c + 4 * L <= d; c += 4 * L) {
    s0 += load_vec(a + c) * load_vec(b + c);
    s1 += load_vec(a + c + L) * load_vec(b + c + L);
    s2 += load_vec(a + c + 2 * L) * load_vec(b + c + 2 * L);
    s3 += load_vec(a + c + 3 * L) * load_vec(b + c + 3 * L);
  }
  for (; c + L <= d; c += L) s0 += load_vec(a + c) * load_vec(b + c);
  const V s = (s0 + s1) + (s2 + s3);
  T r = 0;
  for (int64_t l = 0; l < L; ++l) r += s[l];
  for (; c < d; ++c) r += a[c] * b[c];
  return r;
}

// sum_i a[i].
template <typename T>
inline T sum(const T* a, int64_t d) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V s0{}, s1{}, s2{}, s3{};
  int64_t c = 0;
  for (; c + 4 * L <= d; c += 4 * L) {
    s0 += load_vec(a + c);
    s1 += load_vec(a + c + L);
    s2 += load_vec(a + c + 2 * L);
    s3 += load_vec(a + c + 3 * L);
  }
  for (; c + L <= d; c += L) s0 += load_vec(a + c);
  const V s = (s0 + s1) + (s2 + s3);
  T r = 0;
  for (int64_t l = 0; l < L; ++l) r += s[l];
  for (; c < d; ++c) r += a[c];
  return r;
}

// max_i a[i], n >= 1.
template <typename T>
inline T row_max(const T* a, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  T r = a[0];
  int64_t c = 0;
  if (n >= L) {
    V m = load_vec(a);
    for (c = L; c + L <= n; c += L) {
      const V v = load_vec(a + c);
      m = v > m ? v : m;
    }
    for (int64_t l = 0; l < L; ++l) r = std::max(r, m[l]);
  }
  for (; c < n; ++c) r = std::max(r, a[c]);
  return r;
}

// exp(x) for x <= 0 (the Cephes expf polynomial, about 1 ulp). Inputs below the float range
// clamp to exp(-87.3) ~ 1e-38, which is 0 next to the exp(0) = 1 of a row's maximum. Written
// once for one float or a vector of them (round to nearest by the 1.5 * 2^23 trick, which needs
// no floor instruction).
template <typename F, typename I>
inline F exp_nonpositive_impl(F x) {
  const F lo = F{} - 87.3f;
  x = x < lo ? lo : x;
  const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const F z = r * r;
  F y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  I bits;
  if constexpr (sizeof(F) == sizeof(float)) {
    bits = (static_cast<I>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float exp_nonpositive(float x) { return exp_nonpositive_impl<float, int32_t>(x); }

// sum_j exp((a[j] - shift) * scale), the terms written back to a when `store`. The sum is in
// double: float partial sums over 8 vectors at most, added into a double (a float32 sum of the
// 36000 terms of K*M = 36000 loses ~20x the precision of torch.logsumexp).
inline double exp_shifted_sum(float* a, int64_t n, float shift, float scale, bool store) {
  using V = Vec<float>::type;
  constexpr int64_t L = Vec<float>::lanes;
  double total = 0;
  int64_t c = 0;
  while (c + L <= n) {
    V part{};
    for (int64_t block_end = std::min(n, c + 8 * L); c + L <= block_end; c += L) {
      const V e = exp_nonpositive_impl<V, VecI32>((load_vec(a + c) - shift) * scale);
      if (store) store_vec(a + c, e);
      part += e;
    }
    for (int64_t l = 0; l < L; ++l) total += part[l];
  }
  for (; c < n; ++c) {
    const float e = exp_nonpositive((a[c] - shift) * scale);
    if (store) a[c] = e;
    total += e;
  }
  return total;
}

inline double exp_shifted_sum(double* a, int64_t n, double shift, double scale, bool store) {
  double total = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double e = std::exp((a[c] - shift) * scale);
    if (store) a[c] = e;
    total += e;
  }
  return total;
}

}  // namespace PROTOSEG_ISA
}  // namespace cpu
}  // namespace protoseg
