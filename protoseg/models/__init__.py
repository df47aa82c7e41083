"""Segmentation models: backbones, decoders, classifiers."""

from protoseg.models.head import PrototypeHead
from protoseg.models.prototype import PrototypeClassifier
from protoseg.models.segmentor import Segmentor, build_model, compute_loss

__all__ = ["PrototypeClassifier", "PrototypeHead", "Segmentor", "build_model", "compute_loss"]
