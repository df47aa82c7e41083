// The epsilon of every L2 normalisation in the kernels: x / max(||x||, kNormEps), as
// F.normalize (protoseg/ops/reference.py's NORM_EPS on the Python side). No includes: the CPU
// kernels, the CUDA kernels and their CPU emulation all read it.
#pragma once

namespace protoseg {

constexpr double kNormEps = 1e-12;

}  // namespace protoseg
