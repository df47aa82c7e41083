"""protoseg: prototype-based semantic segmentation with fused CPU/CUDA operators."""

from protoseg import ops

__all__ = ["ops"]
__version__ = "0.1.0"
