"""`torch.ops.protoseg.*`: typed wrappers, fake kernels, autograd and autocast rules, each op's
beside its wrapper (similarity.py, segments.py, embedding.py; csrc/protoseg.cpp names, per op,
the module holding its fake kernel).

Importing this module loads the compiled library (protoseg._C), whose C++ side declares every
schema (csrc/protoseg.cpp) and registers the CPU (and CUDA) kernels.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which protoseg._C links against)

from protoseg import _C  # noqa: F401  (registers the operators)
from protoseg.ops import embedding, reference, segments, similarity
from protoseg.ops.embedding import *
from protoseg.ops.segments import *
from protoseg.ops.similarity import *

__all__ = ["reference"] + embedding.__all__ + segments.__all__ + similarity.__all__
