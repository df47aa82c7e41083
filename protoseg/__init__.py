"""protoseg: prototype-based semantic segmentation with fused CPU/CUDA operators."""

from protoseg import ops

__all__ = ["ops", "Predictor", "PrototypeHead", "integrations"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # protoseg.Predictor, PrototypeHead and integrations import the models (timm) on first use,
    # so that `import protoseg` for the operators alone stays light.
    if name == "Predictor":
        from protoseg.predictor import Predictor

        return Predictor
    if name == "PrototypeHead":
        from protoseg.models.head import PrototypeHead

        return PrototypeHead
    if name == "integrations":
        import protoseg.integrations

        return protoseg.integrations
    raise AttributeError(f"module 'protoseg' has no attribute {name!r}")
