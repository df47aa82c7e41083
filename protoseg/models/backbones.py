"""Backbones: timm models in features_only mode, returning NCHW feature maps (stride 4 first)."""

from __future__ import annotations

import os
import re

import timm
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_v2_original_keys
from torch import Tensor, nn

# SegFormer's Mix Transformer (Xie et al., NeurIPS 2021; NVlabs/SegFormer
# mmseg/models/backbones/mix_transformer.py, classes mit_b0..mit_b5) is PVT-v2 with other
# settings: timm's PyramidVisionTransformerV2 expresses it exactly through its constructor (the
# same overlapping patch embeddings 7/4 then 3/2, spatial-reduction attention with qkv bias, a
# depth-wise 3x3 conv in the FFN, LayerNorm eps 1e-6 in the blocks and after each stage and 1e-5
# in the patch embeddings and the reduction, stochastic depth rising linearly over all blocks).
# What differs from timm's pvt_v2_b* defaults is spelled out here: MLP ratio 4 in every stage and
# drop path 0.1. Stage widths, depths, heads and reduction ratios as SegFormer publishes them.
MIT_DEPTHS = {"mit_b0": (2, 2, 2, 2), "mit_b1": (2, 2, 2, 2), "mit_b2": (3, 4, 6, 3),
              "mit_b3": (3, 4, 18, 3), "mit_b4": (3, 8, 27, 3), "mit_b5": (3, 6, 40, 3)}


def mit_arguments(name: str) -> dict:
    """timm pvt_v2 constructor arguments that make `name` (mit_b0..mit_b5) SegFormer's MiT."""
    return dict(depths=MIT_DEPTHS[name],
                embed_dims=(32, 64, 160, 256) if name == "mit_b0" else (64, 128, 320, 512),
                num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(4, 4, 4, 4), qkv_bias=True,
                drop_path_rate=0.1)


def load_mit_checkpoint(body: nn.Module, path: str) -> None:
    """Load SegFormer's ImageNet MiT weights (NVlabs' mit_b*.pth: patch_embed1.proj, block1.0.attn.q,
    norm1, ..., a classification head) into a features_only MiT. The original names are mapped
    to timm's by timm's own PVT-v2 filter (the two share them), then to the feature wrapper's
    (stages.i -> stages_i); the head is dropped. Every other tensor must match by name and shape."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    mapped = {re.sub(r"^stages\.(\d+)", r"stages_\1", k): v
              for k, v in pvt_v2_original_keys(state, None).items() if not k.startswith("head.")}
    expected = body.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = [k for k in set(expected) & set(mapped) if mapped[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"model.backbone_checkpoint {path} is not a SegFormer MiT state dict of this size: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape "
                         f"{[(k, list(mapped[k].shape), list(expected[k].shape)) for k in wrong[:4]]}")
    body.load_state_dict(mapped)


class Backbone(nn.Module):
    """A timm feature extractor. Supported families and their outputs:

    - hrnet_w18_small, hrnet_w18_small_v2, hrnet_w32, hrnet_w48 (HRNetV2): the four branch
      outputs at strides 4, 8, 16, 32 (18+36+72+144 = 270 channels for W18, 720 for W48),
      without timm's classification "incre" modules;
    - resnet*: the four stages, the last two dilated to `output_stride` (8 or 16);
    - swin_*: the four stages (strides 4-32), any input size that is a multiple of 32;
    - convnext_*: the four stages;
    - mit_b0 .. mit_b5 (SegFormer's Mix Transformer, built with timm's PVT-v2): the four stages
      (strides 4-32), any input size.

    Weights: `pretrained` downloads timm's; `checkpoint` loads a local file instead (a timm
    state dict of the same model; for MiT, SegFormer's ImageNet mit_b*.pth), no network needed.
    timm has no MiT weights (its pvt_v2 ones are another network's), so MiT needs `checkpoint`.
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
        elif name in MIT_DEPTHS:
            kwargs.update(out_indices=(0, 1, 2, 3), **mit_arguments(name))
        else:
            raise ValueError(f"model.backbone {name!r} is not supported: use an hrnet_*, resnet*, "
                             f"swin_*, convnext_* timm model or mit_b0..mit_b5")
        if checkpoint and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"model.backbone_checkpoint {checkpoint} does not exist")
        mit = name in MIT_DEPTHS
        if mit and pretrained and not checkpoint:
            raise ValueError(f"model.pretrained: timm has no ImageNet weights for {name}; download "
                             f"SegFormer's {name}.pth and set model.backbone_checkpoint to it")
        if checkpoint and not mit:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
        else:
            kwargs.update(pretrained=pretrained and not mit)
        # MiT is timm's PVT-v2 family with SegFormer's settings (mit_arguments).
        self.body = timm.create_model(f"pvt_v2_b{name[-1]}" if mit else name, **kwargs)
        if mit and checkpoint:
            load_mit_checkpoint(self.body, checkpoint)
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
