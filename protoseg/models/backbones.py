"""Backbones: timm models in features_only mode, returning NCHW feature maps (stride 4 first)."""

from __future__ import annotations

import os

import timm
from torch import Tensor, nn


class Backbone(nn.Module):
    """A timm feature extractor. Supported families and their outputs:

    - hrnet_w18_small, hrnet_w18_small_v2, hrnet_w32, hrnet_w48 (HRNetV2): the four branch
      outputs at strides 4, 8, 16, 32 (18+36+72+144 = 270 channels for W18, 720 for W48),
      without timm's classification "incre" modules;
    - resnet*: the four stages, the last two dilated to `output_stride` (8 or 16);
    - swin_*: the four stages (strides 4-32), any input size that is a multiple of 32;
    - convnext_*: the four stages.

    Weights: `pretrained` downloads timm's; `checkpoint` loads a local file instead (a timm
    state dict of the same model), no network needed.
    """

    def __init__(self, name: str, *, pretrained: bool = False, checkpoint: str = "",
                 output_stride: int = 8, img_size: tuple[int, int] = (512, 512)):
        super().__init__()
        kwargs: dict = {"features_only": True}
        if name.startswith("hrnet"):
            kwargs.update(feature_location="", out_indices=(1, 2, 3, 4))
        elif name.startswith(("resnet", "resnext", "seresnet")):
            if output_stride not in (8, 16, 32):
                raise ValueError(f"model.output_stride must be 8, 16 or 32 (got {output_stride})")
            kwargs.update(out_indices=(1, 2, 3, 4), output_stride=output_stride)
        elif name.startswith("swin"):
            kwargs.update(out_indices=(0, 1, 2, 3), img_size=tuple(img_size), strict_img_size=False)
        elif name.startswith("convnext"):
            kwargs.update(out_indices=(0, 1, 2, 3))
        else:
            raise ValueError(f"model.backbone {name!r} is not supported: use an hrnet_*, resnet*, "
                             f"swin_* or convnext_* timm model")
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"model.backbone_checkpoint {checkpoint} does not exist")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
        else:
            kwargs.update(pretrained=pretrained)
        self.body = timm.create_model(name, **kwargs)
        self.channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()
        self.channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"  # swin

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.body(x)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
