"""The prototype head: projection + PrototypeClassifier over [B, C, H, W] feature maps, as a
module that takes the place of any model's 1x1-conv classifier (protoseg/integrations.py puts
it into torchvision, transformers and segmentation_models_pytorch models).

The functions below are the one place where feature maps become pixel rows and back, labels
are brought to feature resolution, and the classifier's inference and training passes are
applied to maps: Segmentor (segmentor.py) and PrototypeHead both call them.

Under autocast (train.amp) the projection and the classifier still compute in float32: the
cosines are divided by the temperature (0.1), which magnifies bf16's rounding tenfold. With
them in bf16 too, the DigitScenes demo lost val mIoU against float32; with them in float32 it
lost none (docs/performance.md#the-demo-end-to-end).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.models.prototype import PrototypeClassifier

PROJECTIONS = ("default", "released")


class ProjectionHead(nn.Module):
    """Decoder features [B, C, H, W] -> embeddings [B, D, H, W].

    - "default": 1x1 conv, BN, ReLU, 1x1 conv, no normalisation: the classifier LayerNorms and
      L2-normalises each pixel's embedding itself.
    - "released": the head the released code runs. Its hrnet.py imports ProjectionHead twice;
      the second, lib/models/modules/contrast.py's, wins: 1x1 conv, ReLU, 1x1 conv (no BN), then
      F.normalize(dim=-1), which on [B, D, H, W] normalises along the image WIDTH, not the
      channels (docs/design.md, section 1).
    """

    def __init__(self, cin: int, dim: int, kind: str = "default"):
        super().__init__()
        if kind not in PROJECTIONS:
            raise ValueError(f"model.projection must be one of {PROJECTIONS} (got {kind!r})")
        norm = [nn.BatchNorm2d(cin)] if kind == "default" else []
        self.mlp = nn.Sequential(nn.Conv2d(cin, cin, 1), *norm, nn.ReLU(inplace=True), nn.Conv2d(cin, dim, 1))
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        leave, x = float32(x)
        with leave:
            x = self.mlp(x)
        return F.normalize(x, p=2, dim=-1) if self.kind == "released" else x


def float32(x: Tensor) -> tuple[contextlib.AbstractContextManager, Tensor]:
    """(context, x) for the head's computation. Where autocast is on (see the module docstring):
    autocast off, and x in float32 if it came in half precision. Otherwise nothing, and x as it
    is: a float32 model exports as it traces, a float64 or bf16 model computes in its dtype."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext(), x
    return torch.autocast(device, enabled=False), x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def to_pixels(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B*H*W, C] (a view when x is channels_last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def to_maps(rows: Tensor, b: int, h: int, w: int) -> Tensor:
    """[B*H*W, C] -> [B, C, H, W], a channels_last view of the rows."""
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


def downsample_labels(labels: Tensor, size) -> Tensor:
    """[B, H, W] labels -> [B, h, w] int64 at feature resolution, nearest neighbour (ignore
    stays ignore): the labels the prototype classifier trains on."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def classify(classifier: PrototypeClassifier, e: Tensor) -> dict[str, Tensor]:
    """Inference of the classifier on embedding maps e [B, D, h, w]; every map [B, C, h, w]:
    "embedding" the unit pixel embeddings (C = D), "similarity" each class's best cosine (C = K),
    "nearest" int64 the index of that class's nearest prototype (C = K), "logits" (C = K)."""
    b, _, h, w = e.shape
    leave, e = float32(e)
    with leave:
        x_hat, similarity, nearest = classifier.similarity(to_pixels(e))
        logits = classifier.mask_norm(similarity)
    return {name: to_maps(t, b, h, w) for name, t in
            (("embedding", x_hat), ("similarity", similarity), ("nearest", nearest), ("logits", logits))}


def train_classifier(classifier: PrototypeClassifier, e: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One training pass of the classifier on embedding maps e [B, D, h, w] with labels
    [B, H, W] at any resolution (brought to [h, w] here): (logits [B, K, h, w], ppc, ppd). The
    prototypes are updated in place."""
    b, _, h, w = e.shape
    target = downsample_labels(labels, (h, w))
    leave, e = float32(e)
    with leave:
        scores, ppc, ppd = classifier(to_pixels(e), target.view(-1))
    return to_maps(scores, b, h, w), ppc, ppd


class PrototypeHead(nn.Module):
    """ProtoSeg's classifier in place of a 1x1-conv classifier: features [B, C, H, W] ->
    logits [B, K, H, W] (per-class best cosine to the class's M prototypes, after the class
    LayerNorm), at the features' resolution, so a host model's upsampling, argmax, loss and
    metrics run unchanged.

    Args:
        in_channels: C, the channels of the features the replaced classifier saw.
        num_classes: K.
        num_prototypes: M per class.
        proj_dim: D, the embedding channels (None: C).
        projection: "default" (1x1 conv, BN, ReLU, 1x1 conv), "released" (the released code's,
            see ProjectionHead) or "none" (the classifier sees the features themselves; D = C).
        ignore_index: the label of pixels that take no part.
        **prototype_kwargs: PrototypeClassifier's options (momentum, temperature, ...).

    Training, from outside the host's forward:

        head.set_labels(labels)        # optional: see below
        out = model(images)            # the host's forward calls head(features)
        loss = host_loss(out, labels) + 0.01 * ppc + 0.001 * ppd where ppc, ppd = head.loss(labels)

    A training-mode forward remembers its embeddings; ``loss(labels)`` (labels [B, H, W] at
    image resolution, any integer dtype) returns (PPC, PPD) and moves the prototypes, once per
    forward. The forward cannot know the labels, so
    it computes the logits with the inference pass (one pixel x prototype GEMM) and loss() runs
    the fused training pass (two more GEMMs): three GEMMs where Segmentor needs two. Calling
    ``set_labels(labels)`` before the forward avoids the third: the forward then runs the fused
    pass itself, and ``loss()`` (no labels) returns its PPC and PPD.

    state_dict keys: ``projection.mlp.*`` (absent with projection="none") and ``classifier.*``.
    """

    def __init__(self, in_channels: int, num_classes: int, num_prototypes: int = 10, *,
                 proj_dim: int | None = None, projection: str = "default", ignore_index: int = 255,
                 **prototype_kwargs):
        super().__init__()
        dim = in_channels if proj_dim is None else proj_dim
        if projection == "none":
            if dim != in_channels:
                raise ValueError(f"projection='none' keeps the {in_channels} feature channels (got proj_dim={proj_dim})")
            self.projection = nn.Identity()
        else:
            self.projection = ProjectionHead(in_channels, dim, projection)
        self.classifier = PrototypeClassifier(dim, num_classes, num_prototypes, ignore_index=ignore_index,
                                              **prototype_kwargs)
        self.in_channels = in_channels
        # Training state between forward and loss(): plain attributes, no checkpoint holds them.
        self._labels: Tensor | None = None  # given by set_labels for the next forward
        self._embeddings: Tensor | None = None  # the last training forward's, until loss()
        self._losses: tuple[Tensor, Tensor] | None = None  # the fused pass's, until loss()
        self._spent = False  # loss() already ran for the last training forward

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"PrototypeHead expects features [B, {self.in_channels}, H, W] "
                             f"(got {list(features.shape)})")
        e = self.projection(features)
        if not self.training:
            return classify(self.classifier, e)["logits"]
        self._spent = False
        if self._labels is not None:
            labels, self._labels = self._labels, None
            self._check_labels(labels, e)
            logits, ppc, ppd = train_classifier(self.classifier, e, labels)
            self._embeddings, self._losses = None, (ppc, ppd)
            return logits
        self._embeddings, self._losses = e, None
        return classify(self.classifier, e)["logits"]

    def set_labels(self, labels: Tensor) -> None:
        """Labels [B, H, W] for the next training forward, which then runs the fused training pass
        (no extra GEMM); get its losses with ``loss()``."""
        self._labels = labels

    def loss(self, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(PPC, PPD) of the last training forward, scalars; labels [B, H, W] unless they were
        given to set_labels() before that forward. Updates the prototypes (once per forward)."""
        if self._losses is not None:
            if labels is not None:
                raise ValueError("PrototypeHead.loss: the labels were given to set_labels() before the forward; "
                                 "call loss() without labels")
            losses, self._losses, self._spent = self._losses, None, True
            return losses
        if self._embeddings is None:
            raise RuntimeError("PrototypeHead.loss was already called for this forward: one update per step"
                               if self._spent else
                               "PrototypeHead.loss needs a training-mode forward first (model.train(), then model(images))")
        if labels is None:
            raise ValueError("PrototypeHead.loss needs labels [B, H, W] (none were given to set_labels())")
        self._check_labels(labels, self._embeddings)  # before anything changes: a rejected call can be retried
        e, self._embeddings, self._spent = self._embeddings, None, True
        _, ppc, ppd = train_classifier(self.classifier, e, labels)
        return ppc, ppd

    @staticmethod
    def _check_labels(labels: Tensor, e: Tensor) -> None:
        b, _, h, w = e.shape
        if (labels.dim() != 3 or labels.shape[0] != b or labels.shape[1] < h or labels.shape[2] < w
                or labels.dtype.is_floating_point or labels.dtype == torch.bool):
            raise ValueError(f"PrototypeHead labels must be integer [B, H, W] with B = {b} and H, W at least the "
                             f"features' {h} x {w} (image resolution; got {labels.dtype} {list(labels.shape)})")
