"""`torch.ops.protoseg.*`: typed wrappers, fake kernels, autograd and autocast rules.

Importing this module loads the compiled library (protoseg._C), whose C++ side declares every
schema (csrc/protoseg.cpp) and registers the CPU (and CUDA) kernels.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which protoseg._C links against)

from protoseg import _C  # noqa: F401  (registers the operators)
from protoseg.ops import _fake  # noqa: F401  (fake kernels; csrc/protoseg.cpp names this module)
from protoseg.ops import reference
from protoseg.ops.embedding import layer_norm_normalize
from protoseg.ops.segments import scatter_mean, sinkhorn, sinkhorn_reduced
from protoseg.ops.similarity import TrainPass, proto_contrast_loss, proto_similarity, proto_train

__all__ = [
    "TrainPass",
    "layer_norm_normalize",
    "proto_contrast_loss",
    "proto_similarity",
    "proto_train",
    "reference",
    "scatter_mean",
    "sinkhorn",
    "sinkhorn_reduced",
]
