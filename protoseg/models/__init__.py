"""Segmentation models: backbones, decoders, classifiers."""

from protoseg.models.prototype import PrototypeClassifier

__all__ = ["PrototypeClassifier"]
