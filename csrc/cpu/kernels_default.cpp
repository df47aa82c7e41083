// The CPU kernels for the baseline instruction set (cpu/kernels_impl.h): SSE2 on x86-64, and
// whatever the compiler targets elsewhere (16-byte vectors: NEON on ARM).
#define PROTOSEG_ISA baseline
#define PROTOSEG_ISA_NAME "default"
#define PROTOSEG_VEC_BYTES 16
#include "cpu/kernels_impl.h"
