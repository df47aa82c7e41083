// Every kernel the CUDA sources instantiate, each once: the device passes of csrc/cuda/*.cu see
// exactly kernels.cuh and these instantiations (their host side is hidden behind
// #ifndef __CUDA_ARCH__, see csrc/cuda/kernels.cuh), so `nvcc -Xptxas=-v` on this file reports
// the registers and spills of the shipped kernels in seconds, without parsing ATen.
#include "cuda/kernels.cuh"

PROTOSEG_INSTANTIATE_RANGE_CHECK()
PROTOSEG_INSTANTIATE_SEGMENT_SORT()
PROTOSEG_INSTANTIATE_PASS_ONLY()
PROTOSEG_INSTANTIATE_CONTRAST_KERNELS()
PROTOSEG_INSTANTIATE_SINKHORN_ONLY()
PROTOSEG_INSTANTIATE_SCATTER_ONLY()
