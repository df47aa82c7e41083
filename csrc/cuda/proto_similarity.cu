// proto_similarity on CUDA: chunks of pixels through cuBLAS into a bounded tile, reduced by the
// fused max/argmax epilogue; the backward scatters grad_scores into a tile at the winning
// prototypes and multiplies it by p_hat. Launch sequence: proto_similarity.cuh; the kernels are
// the shared pass's (prototype_pass.cu).
#include "cuda/proto_similarity.cuh"

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("proto_similarity", &protoseg::cuda::proto_similarity<protoseg::cuda::CudaExec>);
  m.impl("proto_similarity_backward", &protoseg::cuda::proto_similarity_backward<protoseg::cuda::CudaExec>);
}
#endif  // __CUDA_ARCH__
