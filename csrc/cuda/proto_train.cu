// proto_train on CUDA: the fused training pass. Per chunk: S = x_hat p_hat^T (cuBLAS), one
// epilogue for max/argmax, own-class scores and the row logsumexp (softmax left in the tile),
// then the second GEMM softmax(S) p_hat for `weighted`. The backward is one GEMM per chunk. The
// optional LayerNorm runs as an ATen composite around them. Launch sequence: proto_train.cuh;
// the kernels are the shared pass's (prototype_pass.cu).
#include "cuda/proto_train.cuh"

// Host side: hidden from the per-architecture device passes (see cuda_exec.cuh).
#ifndef __CUDA_ARCH__
#include <torch/library.h>

#include "cuda/cuda_exec.cuh"

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) {
  m.impl("proto_train", &protoseg::cuda::proto_train<protoseg::cuda::CudaExec>);
  m.impl("proto_train_backward", &protoseg::cuda::proto_train_backward<protoseg::cuda::CudaExec>);
}
#endif  // __CUDA_ARCH__
