"""Segmentation models: backbones, decoders, classifiers."""

from protoseg.models.prototype import PrototypeClassifier
from protoseg.models.segmentor import Segmentor, build_model, compute_loss

__all__ = ["PrototypeClassifier", "Segmentor", "build_model", "compute_loss"]
