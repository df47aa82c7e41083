// kernels(): the CPU kernels for the instruction set ATen chose (at::get_cpu_capability, which
// honours ATEN_CPU_CAPABILITY, and is what torch.backends.cpu.get_cpu_capability() prints), so
// that our kernels and ATen's always run the same path.
// The AVX2 and AVX-512 builds exist on x86-64 with GCC (cpu/kernels_avx2.cpp,
// cpu/kernels_avx512.cpp); elsewhere the baseline build runs.
#include <ATen/Version.h>

#include <string>

#include "cpu/kernels.h"

namespace protoseg {
namespace cpu {

namespace baseline {
const Kernels& table();
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
namespace avx2 {
const Kernels& table();
}
namespace avx512 {
const Kernels& table();
}
#endif

const Kernels& kernels() {
  static const Kernels& chosen = [] () -> const Kernels& {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return avx512::table();
    if (capability == "AVX2") return avx2::table();
#endif
    return baseline::table();
  }();
  return chosen;
}

}  // namespace cpu
}  // namespace protoseg
