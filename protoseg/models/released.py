"""The authors' trained models in protoseg: a checkpoint of the released code (tfzhou/ProtoSeg,
openseg) mapped tensor by tensor onto protoseg's model of the same network.

Two architectures of the released lib/models/nets/hrnet.py are known: HRNet_W48_Proto
(ProtoSeg) and HRNet_W48 (its softmax baseline). Their parts and protoseg's:

- backbone.*                 -> backbone.body.* (openseg's HighResolutionNet and timm's HRNet
                                share names and shapes; the fuse is bilinear, model.hrnet_fuse)
- cls_head.0 (3x3 conv)      -> decoder.fuse.0; its bias is folded into the BatchNorm after it
                                (running_mean - bias), which is exact: BN(x + b) with mean mu is
                                BN(x) with mean mu - b, in eval and, for the output, in training
- cls_head.1.0 (BN)          -> decoder.fuse.1
- proj_head.proj             -> projection.mlp (model.projection: released); proj_head.mlp2 is
                                the same module under a second name, checked equal and dropped
- prototypes, feat_norm, mask_norm -> classifier.prototypes (L2-normalised, as the released
                                forward does first), .feat_norm, .mask_norm
- cls_head.3 (1x1 conv, no bias)   -> classifier (softmax), whose bias is set to zero

Every released tensor is used and every protoseg tensor filled; otherwise ReleasedCheckpointError
names the first key without a counterpart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from protoseg.config import Config
from protoseg.models.backbones import WeightsError, check_state_dict

PROTO, SOFTMAX = "HRNet_W48_Proto", "HRNet_W48"

# What the released code does where protoseg's defaults differ (docs/fidelity.md). The converted
# config carries them, so inference is the released network and fine-tuning its training.
RELEASED_MODEL = {"backbone": "hrnet_w48", "hrnet_fuse": "bilinear", "decoder": "hrnet",
                  "decoder_channels": 720, "align_corners": True}
# openseg reads images with OpenCV and feeds them as B, G, R, normalised by ImageNet's RGB mean
# and std in that order (configs/cityscapes/H_48_D_4_proto.json: "input_mode": "BGR").
RELEASED_DATA = {"channel_order": "bgr", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
RELEASED_PROTOTYPES = {"classifier": "prototype", "projection": "released", "proj_dim": 720,
                       "temperature": 1.0, "update_assignment": "gumbel", "sinkhorn_scope": "local",
                       "update_scope": "local"}


class ReleasedCheckpointError(ValueError):
    """A file that is not a convertible checkpoint of the released code. The message is one line."""


def read_released(path: str) -> dict[str, Tensor]:
    """The state dict in an openseg checkpoint file: the "state_dict" entry of its wrapper or the
    file itself, without DataParallel's "module." prefix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ReleasedCheckpointError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 (pickle, zip and torch errors alike: the file is unusable)
        raise ReleasedCheckpointError(f"{path} cannot be read as a PyTorch checkpoint: "
                                      f"{str(e).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReleasedCheckpointError(f"{path} holds no state dict (a dict of tensors, or one under 'state_dict')")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ReleasedCheckpointError(f"{path}: entry {key!r} of its state dict is a {type(value).__name__}, "
                                          f"not a tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


def released_architecture(state: dict[str, Tensor], path: str) -> str:
    """PROTO or SOFTMAX, from the head tensors; anything else (openseg's OCR or contrast models,
    another network) is refused, naming a tensor that gives it away."""
    if "prototypes" in state and "mask_norm.weight" in state:
        if state["prototypes"].dim() != 3:
            raise ReleasedCheckpointError(f"{path}: prototypes has shape {list(state['prototypes'].shape)}, "
                                          f"not [classes, prototypes per class, channels]")
        return PROTO
    if any(k.startswith("proj_head.") for k in state):  # HRNet_W48_CONTRAST: a projection, no prototypes
        raise ReleasedCheckpointError(f"{path} is a released contrastive model (proj_head without prototypes), "
                                      f"not {PROTO} or {SOFTMAX}: it cannot be converted")
    if "cls_head.3.weight" in state:
        return SOFTMAX
    head = [k for k in state if not k.startswith("backbone.")]
    clue = next((k for k in head if not k.startswith("cls_head.")), head[0] if head else "no head tensors")
    raise ReleasedCheckpointError(f"{path} is not a released {PROTO} or {SOFTMAX} checkpoint (it has {clue}; "
                                  f"openseg's OCR, contrast and other models cannot be converted)")


def released_config(cfg: Config, state: dict[str, Tensor], architecture: str) -> Config:
    """`cfg` set to the released network, its input and its training behaviour (RELEASED_MODEL,
    RELEASED_DATA, and for ProtoSeg RELEASED_PROTOTYPES, its M taken from the checkpoint); no
    ImageNet weights needed. fp32 throughout: openseg's tester runs without autocast, and
    protoseg's evaluation follows train.amp."""
    cfg.train.amp = "none"
    m = cfg.model
    for key, value in RELEASED_MODEL.items():
        setattr(m, key, value)
    for key, value in RELEASED_DATA.items():
        setattr(cfg.data, key, value)
    m.pretrained, m.backbone_checkpoint = False, ""
    if architecture == PROTO:
        for key, value in RELEASED_PROTOTYPES.items():
            setattr(m, key, value)
        m.num_prototypes = state["prototypes"].shape[1]
    else:
        m.classifier = "softmax"
    return cfg


def convert_state(state: dict[str, Tensor], architecture: str, model_state: dict[str, Tensor],
                  path: str) -> dict[str, Tensor]:
    """`state` (released names) as a state dict of protoseg's model, whose own state dict is
    `model_state` (for the names and shapes)."""
    mapped: dict[str, Tensor] = {}
    source: dict[str, str] = {}  # protoseg key -> the released key it came from

    def put(ours: str, released: str, tensor: Tensor | None = None) -> None:
        mapped[ours] = state[released] if tensor is None else tensor
        source[ours] = released

    used = set()
    for key in state:
        if key.startswith("backbone."):
            put("backbone.body." + key.removeprefix("backbone."), key)
            used.add(key)
    heads = {"cls_head.0.weight": "decoder.fuse.0.weight"}
    for name in ("weight", "bias", "running_var", "num_batches_tracked"):
        heads[f"cls_head.1.0.{name}"] = f"decoder.fuse.1.{name}"
    if architecture == PROTO:
        for i in (0, 2):
            for name in ("weight", "bias"):
                heads[f"proj_head.proj.{i}.{name}"] = f"projection.mlp.{i}.{name}"
        for norm in ("feat_norm", "mask_norm"):
            for name in ("weight", "bias"):
                heads[f"{norm}.{name}"] = f"classifier.{norm}.{name}"
    else:
        heads["cls_head.3.weight"] = "classifier.weight"
    computed = {"cls_head.0.bias": "decoder.fuse.1.running_mean", "cls_head.1.0.running_mean":
                "decoder.fuse.1.running_mean", **({"prototypes": "classifier.prototypes"} if architecture == PROTO else {})}
    for released, ours in {**heads, **computed}.items():
        if released not in state:
            raise ReleasedCheckpointError(f"{path}: no tensor {released}, which the released {architecture} has "
                                          f"(protoseg's {ours}, shape {list(model_state[ours].shape)})")
    for released, ours in heads.items():
        put(ours, released)
        used.add(released)
    put("decoder.fuse.1.running_mean", "cls_head.1.0.running_mean",
        state["cls_head.1.0.running_mean"] - state["cls_head.0.bias"])
    used.update(("cls_head.0.bias", "cls_head.1.0.running_mean"))
    if architecture == PROTO:
        # Unit length, as the released forward makes them before any use (after its per-rank
        # averaging they are not); protoseg's update expects them so.
        put("classifier.prototypes", "prototypes", F.normalize(state["prototypes"], dim=-1))
        used.add("prototypes")
        # proj_head.mlp2 is proj_head.proj under another name
        for key in [k for k in state if k.startswith("proj_head.mlp2.")]:
            twin = key.replace("proj_head.mlp2.", "proj_head.proj.", 1)
            if twin not in state or not torch.equal(state[key], state[twin]):
                raise ReleasedCheckpointError(f"{path}: {key} differs from {twin} (in the released model they "
                                              f"are one module)")
            used.add(key)
    else:  # the released 1x1 classifier has no bias
        bias = model_state.get("classifier.bias")
        if bias is not None:
            put("classifier.bias", "cls_head.3.weight", torch.zeros_like(bias, dtype=state["cls_head.3.weight"].dtype))

    unused = [k for k in state if k not in used]
    if unused:
        raise ReleasedCheckpointError(f"{path}: {unused[0]} (shape {list(state[unused[0]].shape)}) has no counterpart "
                                      f"in protoseg's model of the released {architecture}")
    try:
        check_state_dict(mapped, model_state, path, names=source)
    except WeightsError as e:
        raise ReleasedCheckpointError(str(e)) from None
    return mapped
