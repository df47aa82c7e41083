// The CPU kernels for AVX2 with FMA (cpu/kernels_impl.h): the instruction set ATen calls AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PROTOSEG_ISA avx2
#define PROTOSEG_ISA_NAME "avx2"
#define PROTOSEG_VEC_BYTES 32
#define PROTOSEG_ISA_TARGET "avx2,fma,f16c"
#include "cpu/kernels_impl.h"
#endif
