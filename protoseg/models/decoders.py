"""Decoder heads: multi-scale backbone features -> one feature map [B, C, H/s, W/s].

- HRNetHead (the paper's): all branches upsampled to stride 4 and concatenated, 3x3 conv, BN,
  ReLU, dropout. Stride 4.
- FCNHead: two 3x3 conv-BN-ReLU on the last feature map, dropout. Stride of that map (8 for a
  dilated ResNet).
- ASPPHead (DeepLabV3): 1x1 and three dilated 3x3 branches plus image pooling on the last
  feature map, fused by a 1x1 conv, dropout.
- UperNetHead: pyramid pooling on the last map, FPN over all maps, fused at stride 4.
- SegFormerHead (the all-MLP decoder of SegFormer, Xie et al. 2021): each map linearly
  projected to C channels (a per-pixel Linear, i.e. a 1x1 conv), upsampled to stride 4,
  concatenated deepest first, fused by a 1x1 conv-BN-ReLU, dropout. Stride 4.
- LiteHead, for mobile backbones (EfficientNet-Lite, MobileNet): each map to 3/4 C channels
  by a 1x1 conv-BN-ReLU, upsampled to stride 4, concatenated, fused by a depthwise 3x3 conv-BN-
  ReLU and a 1x1 conv-BN-ReLU to C, dropout. Stride 4.

Every bilinear resize uses the model's `align_corners` (model.align_corners).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _resize(x: Tensor, size, align_corners: bool) -> Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class HRNetHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, dropout: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.fuse = conv_bn_relu(sum(in_channels), channels)
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        x = torch.cat([_resize(f, size, self.align_corners) for f in features], dim=1)
        return self.dropout(self.fuse(x))


class FCNHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, dropout: float, align_corners: bool):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_channels[-1], channels), conv_bn_relu(channels, channels))
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.dropout(self.convs(features[-1]))


class ASPPHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, dropout: float, align_corners: bool,
                 rates=(12, 24, 36)):
        super().__init__()
        cin = in_channels[-1]
        self.branches = nn.ModuleList([conv_bn_relu(cin, channels, 1)] +
                                      [conv_bn_relu(cin, channels, 3, r) for r in rates])
        self.pool = conv_bn_relu(cin, channels, 1)
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        x = torch.cat([b(x) for b in self.branches] + [pooled], dim=1)
        return self.dropout(self.project(x))


class UperNetHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, dropout: float, align_corners: bool,
                 pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.align_corners = align_corners
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList([conv_bn_relu(in_channels[-1], channels, 1) for _ in pool_scales])
        self.ppm_fuse = conv_bn_relu(in_channels[-1] + channels * len(pool_scales), channels)
        self.laterals = nn.ModuleList([conv_bn_relu(c, channels, 1) for c in in_channels[:-1]])
        self.fpn = nn.ModuleList([conv_bn_relu(channels, channels) for _ in in_channels[:-1]])
        self.fuse = conv_bn_relu(channels * len(in_channels), channels)
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        top = features[-1]
        pyramid = [top] + [_resize(conv(F.adaptive_avg_pool2d(top, s)), top.shape[-2:], self.align_corners)
                           for s, conv in zip(self.pool_scales, self.ppm)]
        levels = [lateral(f) for lateral, f in zip(self.laterals, features[:-1])]
        levels.append(self.ppm_fuse(torch.cat(pyramid, dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down pathway
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:], self.align_corners)
        outs = [fpn(level) for fpn, level in zip(self.fpn, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.dropout(self.fuse(torch.cat([_resize(o, size, self.align_corners) for o in outs], dim=1)))


class SegFormerHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, dropout: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        self.linears = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        self.fuse = conv_bn_relu(channels * len(in_channels), channels, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        levels = [_resize(linear(f), size, self.align_corners) for linear, f in zip(self.linears, features)]
        return self.dropout(self.fuse(torch.cat(levels[::-1], dim=1)))


class LiteHead(nn.Module):
    """Why this head for a mobile backbone: EfficientNet-Lite's maps are narrow (24, 40, 112,
    320 channels at strides 4-32), so 1x1 laterals to 3/4 C keep every stride cheaply; the fused
    map is at stride 4 because CamVid's thin classes (pole, sign, pedestrian, bicyclist) are a
    few pixels wide at stride 8, where LR-ASPP predicts; and the fuse is a depthwise-separable
    3x3 (MobileNet's block), which gives each pixel its neighbours at a fraction of a dense 3x3's
    cost at stride 4 (docs/camvid.md has the timings)."""

    def __init__(self, in_channels: list[int], channels: int, dropout: float, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners
        lateral = channels * 3 // 4
        width = lateral * len(in_channels)
        self.laterals = nn.ModuleList([conv_bn_relu(c, lateral, 1) for c in in_channels])
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), conv_bn_relu(width, channels, 1))
        self.dropout = nn.Dropout2d(dropout)
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        levels = [_resize(lateral(f), size, self.align_corners) for lateral, f in zip(self.laterals, features)]
        return self.dropout(self.fuse(torch.cat(levels, dim=1)))


DECODERS = {"hrnet": HRNetHead, "fcn": FCNHead, "aspp": ASPPHead, "upernet": UperNetHead,
            "segformer": SegFormerHead, "lite": LiteHead}


def build_decoder(name: str, in_channels: list[int], channels: int, dropout: float,
                  align_corners: bool = True) -> nn.Module:
    if name not in DECODERS:
        raise ValueError(f"model.decoder must be one of {sorted(DECODERS)} (got {name!r})")
    return DECODERS[name](in_channels, channels, dropout, align_corners)
