"""The segmentor: backbone -> decoder -> softmax or prototype classifier -> logits at image size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.config import Config
from protoseg.models.backbones import Backbone
from protoseg.models.decoders import build_decoder
from protoseg.models.head import ProjectionHead, classify, train_classifier
from protoseg.models.prototype import PrototypeClassifier


class Segmentor(nn.Module):
    """forward(images [B, 3, H, W], labels [B, H, W] int64 | None) -> dict with
    "logits" [B, K, H, W] (upsampled bilinearly to the image, with `align_corners`); in training
    mode with the prototype classifier and labels given, "ppc" and "ppd" (scalars); in eval mode
    with the prototype classifier, "open_set_score" [B, 1, H, W]: 1 - the pixel's largest cosine
    to any prototype (at feature resolution, upsampled like the logits)."""

    def __init__(self, backbone: Backbone, decoder: nn.Module, num_classes: int, *,
                 classifier: str = "prototype", proj_dim: int = 720, projection: str = "default",
                 align_corners: bool = True, ignore_index: int = 255, prototype_kwargs: dict | None = None):
        super().__init__()
        if classifier not in ("prototype", "softmax"):
            raise ValueError(f"model.classifier must be 'prototype' or 'softmax' (got {classifier!r})")
        self.backbone, self.decoder = backbone, decoder
        self.num_classes, self.ignore_index, self.align_corners = num_classes, ignore_index, align_corners
        self.uses_prototypes = classifier == "prototype"
        if self.uses_prototypes:
            self.projection = ProjectionHead(decoder.out_channels, proj_dim, projection)
            self.classifier = PrototypeClassifier(proj_dim, num_classes, ignore_index=ignore_index,
                                                  **(prototype_kwargs or {}))
        else:
            self.classifier = nn.Conv2d(decoder.out_channels, num_classes, 1)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        size = images.shape[-2:]
        if not self.uses_prototypes:
            logits = self.classifier(self.decoder(self.backbone(images)))
            return {"logits": self.upsample(logits, size)}
        if not (self.training and labels is not None):
            maps = self.embed(images)
            score = 1 - maps["similarity"].amax(dim=1, keepdim=True)
            return {"logits": self.upsample(maps["logits"], size),
                    "open_set_score": self.upsample(score, size)}
        e = self.projection(self.decoder(self.backbone(images)))
        logits, ppc, ppd = train_classifier(self.classifier, e, labels)
        return {"logits": self.upsample(logits, size), "ppc": ppc, "ppd": ppd}

    def embed(self, images: Tensor) -> dict[str, Tensor]:
        """Inference of the prototype classifier at feature resolution [h, w], every map
        [B, C, h, w]: "embedding" the unit pixel embeddings (C = D), "similarity" each class's
        best cosine (C = K), "nearest" int64 the index of that class's nearest prototype
        (C = K), "logits" (C = K, before upsampling)."""
        if not self.uses_prototypes:
            raise ValueError("embed needs model.classifier = prototype (this model is a softmax classifier)")
        return classify(self.classifier, self.projection(self.decoder(self.backbone(images))))

    def upsample(self, x: Tensor, size) -> Tensor:
        """Maps [B, C, h, w] at feature resolution -> [B, C, *size], as the logits are resized."""
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)


def compute_loss(out: dict[str, Tensor], labels: Tensor, *, ignore_index: int = 255,
                 class_weights: Tensor | None = None, ppc_weight: float = 0.01,
                 ppd_weight: float = 0.001) -> tuple[Tensor, dict[str, Tensor]]:
    """seg cross-entropy (+ ppc_weight * PPC + ppd_weight * PPD when present).

    Returns (total, terms) where terms maps "seg", "ppc", "ppd" to detached scalars."""
    seg = cross_entropy(out["logits"].float(), labels, weight=class_weights, ignore_index=ignore_index)
    total, terms = seg, {"seg": seg.detach()}
    if "ppc" in out:
        total = total + ppc_weight * out["ppc"] + ppd_weight * out["ppd"]
        terms.update(ppc=out["ppc"].detach(), ppd=out["ppd"].detach())
    return total, terms


def cross_entropy(logits: Tensor, labels: Tensor, **kwargs) -> Tensor:
    """F.cross_entropy over the classes of logits [B, K, H, W]. Channels-last logits (the
    prototype classifier's, and any model's under train.channels_last) are taken as their rows
    [B*H*W, K], the same loss: ATen's log_softmax would first copy them to NCHW, which at K = 847
    is a pass over hundreds of MB. Not below 16 classes: ATen's softmax over a last dimension
    narrower than one AVX-512 vector runs 8-10x slower than the copy and the NCHW kernel
    (docs/performance.md#the-demo-end-to-end)."""
    if (logits.dim() == 4 and logits.shape[1] >= 16 and not logits.is_contiguous()
            and logits.is_contiguous(memory_format=torch.channels_last)):
        return F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), labels.reshape(-1), **kwargs)
    return F.cross_entropy(logits, labels, **kwargs)


def build_model(cfg: Config) -> Segmentor:
    """The segmentor of `cfg`, in the memory format the run trains and predicts in
    (train.channels_last)."""
    m, d = cfg.model, cfg.data
    backbone = Backbone(m.backbone, pretrained=m.pretrained, checkpoint=m.backbone_checkpoint,
                        output_stride=m.output_stride, img_size=tuple(d.crop_size), hrnet_fuse=m.hrnet_fuse)
    decoder = build_decoder(m.decoder, backbone.channels, m.decoder_channels, m.dropout, m.align_corners)
    prototype_kwargs = dict(
        num_prototypes=m.num_prototypes, momentum=m.momentum, temperature=m.temperature,
        sinkhorn_iterations=m.sinkhorn_iterations, sinkhorn_epsilon=m.sinkhorn_epsilon,
        impl=m.prototype_impl, update_assignment=m.update_assignment,
        sinkhorn_scope=m.sinkhorn_scope, update_scope=m.update_scope,
    )
    model = Segmentor(backbone, decoder, d.num_classes, classifier=m.classifier, proj_dim=m.proj_dim,
                      projection=m.projection, align_corners=m.align_corners, ignore_index=d.ignore_index,
                      prototype_kwargs=prototype_kwargs)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def load_trained_model(cfg: Config, state: dict) -> Segmentor:
    """The model of `cfg` with the weights of checkpoint `state`; nothing is downloaded or read
    for the backbone (the checkpoint has every weight)."""
    cfg.model.pretrained, cfg.model.backbone_checkpoint = False, ""
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model


def backbone_parameters(model: Segmentor) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, all others), for the backbone learning-rate multiplier."""
    backbone = {id(p) for p in model.backbone.parameters()}
    rest = [p for p in model.parameters() if id(p) not in backbone]
    return list(model.backbone.parameters()), rest

