// The CPU kernels for AVX-512 (cpu/kernels_impl.h): the instruction set ATen calls AVX512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PROTOSEG_ISA avx512
#define PROTOSEG_ISA_NAME "avx512"
#define PROTOSEG_VEC_BYTES 64
#define PROTOSEG_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"
#include "cpu/kernels_impl.h"
#endif
