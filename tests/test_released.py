"""The released models in protoseg: tools/convert_released.py against the released code itself
(with PROTOSEG_RELEASED_SRC, a checkout of tfzhou/ProtoSeg), against the released key names
and shapes (tests/fixtures/released_hrnet48_keys.json, always), and its errors; the MiT
backbone against SegFormer's own (with PROTOSEG_SEGFORMER_SRC, a checkout of NVlabs/SegFormer)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import ROOT, tool_command
from protoseg.config import ConfigError, config_from_dict, config_to_dict, load_config
from protoseg.data.transforms import EvalTransform, normalization
from protoseg.engine.checkpoint import load_run
from protoseg.models.backbones import Backbone, WeightsError, load_mit_checkpoint
from protoseg.models.released import (PROTO, SOFTMAX, ReleasedCheckpointError, convert_state, released_architecture,
                                      released_config)
from protoseg.models.segmentor import build_model
from protoseg.predictor import Predictor
from released_code import RELEASED_SRC, SEGFORMER_SRC

FIXTURE = pathlib.Path(ROOT, "tests", "fixtures", "released_hrnet48_keys.json")
CONFIGS = {PROTO: "configs/cityscapes_hrnet48_protoseg.yaml", SOFTMAX: "configs/cityscapes_hrnet48_softmax.yaml"}


def _convert(tmp_path, released: str, architecture: str, *extra):
    out = tmp_path / f"{architecture}.pth"
    result = subprocess.run(tool_command("convert_released.py", released, "--config",
                                         os.path.join(ROOT, CONFIGS[architecture]), "--out", str(out), *extra),
                            capture_output=True, text=True)
    return result, out


def _randomise(model: torch.nn.Module) -> None:
    """Random BatchNorm statistics and affines, LayerNorm affines and conv biases: the default
    initialisation (mean 0, variance 1, weight 1, bias 0) would hide a statistic in the wrong place."""
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):
            n = module.weight.shape
            module.weight.data = 1 + 0.1 * torch.randn(n, generator=g, dtype=module.weight.dtype)
            module.bias.data = 0.1 * torch.randn(n, generator=g, dtype=module.bias.dtype)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean = 0.1 * torch.randn(n, generator=g, dtype=module.running_mean.dtype)
                module.running_var = 0.5 + torch.rand(n, generator=g, dtype=module.running_var.dtype)
        elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=g, dtype=module.bias.dtype)


needs_released = pytest.mark.skipif(
    not RELEASED_SRC or not all(importlib.util.find_spec(m) for m in ("einops", "yacs")),
    reason="set PROTOSEG_RELEASED_SRC to a checkout of github.com/tfzhou/ProtoSeg (and pip install einops "
           "yacs, which it imports) to compare with the released code itself")


@needs_released
@pytest.mark.parametrize("architecture", [PROTO, SOFTMAX])
def test_converted_model_equals_released_forward_in_float64(tmp_path, architecture):
    from released_code import build_released

    torch.manual_seed(0)
    released = build_released(architecture).double()
    _randomise(released)
    released.eval()
    # As openseg saves it: the DataParallel-wrapped model's state dict under "state_dict".
    path = tmp_path / "released.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in released.state_dict().items()}}, path)
    result, out = _convert(tmp_path, str(path), architecture)
    assert result.returncode == 0, result.stderr
    state, cfg = load_run(str(out))
    ours = build_model(cfg).double().eval()
    ours.load_state_dict(state["model"])
    for size in [(2, 3, 128, 256), (1, 3, 96, 160)]:
        x = torch.randn(size, dtype=torch.float64)
        with torch.no_grad():
            expected = released(x)
            # openseg's tester resizes the network's output to the image, align_corners=True
            expected = F.interpolate(expected, size=size[-2:], mode="bilinear", align_corners=True)
            logits = ours(x)["logits"]
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)


@pytest.mark.skipif(not SEGFORMER_SRC, reason="set PROTOSEG_SEGFORMER_SRC to a checkout of github.com/NVlabs/SegFormer "
                                               "to compare MiT with SegFormer's own mix_transformer.py")
def test_mit_b0_equals_segformer_mix_transformer_in_float64(tmp_path):
    from released_code import segformer_mix_transformer

    torch.manual_seed(0)
    segformer = segformer_mix_transformer().mit_b0().double()
    _randomise(segformer)  # its LayerNorms too, so an epsilon or an order would show
    segformer.eval()
    torch.save(segformer.state_dict(), tmp_path / "mit_b0.pth")  # as SegFormer's ImageNet files hold it
    ours = Backbone("mit_b0").double().eval()  # float64 before loading: the file's weights unrounded
    load_mit_checkpoint(ours.body, str(tmp_path / "mit_b0.pth"))
    for size in [(2, 3, 64, 96), (1, 3, 75, 50)]:
        x = torch.randn(size, dtype=torch.float64)
        with torch.no_grad():
            expected, features = segformer(x), ours(x)
        assert len(features) == len(expected) == 4
        for stage, (f, e) in enumerate(zip(features, expected)):
            assert f.shape == e.shape, stage
            torch.testing.assert_close(f, e, rtol=0, atol=1e-10, msg=f"stage {stage + 1} differs")


def _fixture_state(architecture: str) -> dict[str, torch.Tensor]:
    """Random tensors under the released model's names and shapes, as openseg saves them, scaled
    so that activations stay finite through the network."""
    keys = json.loads(FIXTURE.read_text())
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in keys["backbone"] + keys[architecture]:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:  # conv weights, variance 1 / fan-in
            state[key] = torch.randn(shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif key.endswith("weight"):  # norms
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = (1 if key == "prototypes" else 0.1) * torch.randn(shape, generator=g)
    if architecture == PROTO:  # one module under two names in the released model
        for key in [k for k in state if k.startswith("proj_head.mlp2.")]:
            state[key] = state[key.replace("mlp2", "proj")]
    return state


@pytest.mark.parametrize("architecture", [PROTO, SOFTMAX])
def test_released_keys_convert_and_load_strictly(architecture):
    state = _fixture_state(architecture)
    assert released_architecture(state, "fixture") == architecture
    cfg = released_config(load_config(os.path.join(ROOT, CONFIGS[architecture]), ["model.pretrained=false"]), state,
                          architecture)
    model = build_model(cfg).eval()
    model.load_state_dict(convert_state(state, architecture, model.state_dict(), "fixture"), strict=True)
    ours = model.state_dict()
    # Each released tensor where the released model uses it (this table, not the converter's).
    same = {"backbone." + k: "backbone.body." + k for k in (key.removeprefix("backbone.") for key in state)
            if "backbone." + k in state}
    same.update({"cls_head.0.weight": "decoder.fuse.0.weight", "cls_head.1.0.weight": "decoder.fuse.1.weight",
                 "cls_head.1.0.bias": "decoder.fuse.1.bias", "cls_head.1.0.running_var": "decoder.fuse.1.running_var"})
    if architecture == PROTO:
        same.update({"proj_head.proj.0.weight": "projection.mlp.0.weight", "proj_head.proj.0.bias": "projection.mlp.0.bias",
                     "proj_head.proj.2.weight": "projection.mlp.2.weight", "proj_head.proj.2.bias": "projection.mlp.2.bias",
                     "feat_norm.weight": "classifier.feat_norm.weight", "feat_norm.bias": "classifier.feat_norm.bias",
                     "mask_norm.weight": "classifier.mask_norm.weight", "mask_norm.bias": "classifier.mask_norm.bias"})
        assert torch.equal(ours["classifier.prototypes"], F.normalize(state["prototypes"], dim=-1))
        assert cfg.model.projection == "released" and cfg.model.temperature == 1.0
    else:
        same["cls_head.3.weight"] = "classifier.weight"
        assert torch.equal(ours["classifier.bias"], torch.zeros(19))
    for released, key in same.items():
        assert torch.equal(ours[key], state[released]), released
    assert cfg.model.hrnet_fuse == "bilinear" and cfg.model.align_corners and cfg.train.amp == "none"


def test_folded_bias_is_the_released_head_in_training_and_eval():
    """conv + bias then BN (released) against conv then BN with running_mean - bias (converted),
    float64: equal outputs in both modes, and running means that stay `bias` apart."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g,
                                                                                          dtype=torch.float64)
    mean, var = torch.randn(6, generator=g, dtype=torch.float64), 0.5 + torch.rand(6, generator=g, dtype=torch.float64)
    state = {"cls_head.0.weight": weight, "cls_head.0.bias": bias, "cls_head.1.0.weight": torch.ones(6),
             "cls_head.1.0.bias": torch.zeros(6), "cls_head.1.0.running_mean": mean, "cls_head.1.0.running_var": var,
             "cls_head.1.0.num_batches_tracked": torch.tensor(3), "cls_head.3.weight": torch.zeros(2, 6, 1, 1)}
    model_state = {"decoder.fuse.0.weight": weight, "decoder.fuse.1.weight": torch.ones(6),
                   "decoder.fuse.1.bias": torch.zeros(6), "decoder.fuse.1.running_mean": mean,
                   "decoder.fuse.1.running_var": var, "decoder.fuse.1.num_batches_tracked": torch.tensor(0),
                   "classifier.weight": torch.zeros(2, 6, 1, 1), "classifier.bias": torch.zeros(2)}
    converted = convert_state(state, SOFTMAX, model_state, "f.pth")
    released_mean, ours_mean = mean.clone(), converted["decoder.fuse.1.running_mean"].clone()
    x = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    for training in (False, True):
        expected = F.batch_norm(F.conv2d(x, weight, bias, padding=1), released_mean, var.clone(), training=training)
        ours = F.batch_norm(F.conv2d(x, converted["decoder.fuse.0.weight"], padding=1), ours_mean, var.clone(),
                            training=training)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(released_mean - ours_mean, bias, rtol=0, atol=1e-12)  # after a training step


@pytest.mark.slow
def test_converted_checkpoint_is_a_protoseg_checkpoint(tmp_path):
    state = {f"module.{k}": v for k, v in _fixture_state(PROTO).items()}
    path = tmp_path / "released.pth"
    torch.save({"state_dict": state, "config_dict": {"network": {"backbone": "hrnet48"}}}, path)
    result, out = _convert(tmp_path, str(path), PROTO)
    assert result.returncode == 0, result.stderr
    saved, cfg = load_run(str(out))
    assert saved["iteration"] == 0 and cfg.model.classifier == "prototype" and cfg.model.num_prototypes == 10
    assert torch.equal(saved["model"]["classifier.prototypes"], F.normalize(state["module.prototypes"], dim=-1))
    fine_tune = load_config(str(out.with_suffix(".yaml")))  # the config written beside it
    assert config_to_dict(fine_tune) == config_to_dict(cfg)
    # Predictor (and through it tools/infer.py) takes it, and feeds the network B, G, R.
    predictor = Predictor.from_checkpoint(str(out), device="cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    probs = predictor.predict(rgb, return_probs=True)[1]
    x = (torch.from_numpy(rgb[..., ::-1].astype(np.float32)) - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor(
        [58.395, 57.12, 57.375])
    with torch.no_grad():
        logits = predictor.model(x.permute(2, 0, 1)[None])["logits"][0]
    torch.testing.assert_close(torch.as_tensor(probs), logits.softmax(dim=0), rtol=1e-4, atol=1e-5)
    # tools/test.py takes it too, scoring the same prediction.
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), rgb[..., ::-1])
    label = np.random.default_rng(1).integers(0, 19, (64, 96)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "labels" / "a.png"), label)
    result = subprocess.run(tool_command("test.py", str(out), f"data.val_images={tmp_path / 'images'}",
                                         f"data.val_labels={tmp_path / 'labels'}", "data.num_workers=0",
                                         "--out", str(tmp_path / "results.json")), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    prediction = logits.argmax(dim=0).numpy()
    expected_acc = float((prediction == label).mean())
    assert json.loads((tmp_path / "results.json").read_text())["aAcc"] == pytest.approx(expected_acc, abs=1e-6)


def _one_line(result, *parts):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.mark.slow
def test_bad_released_checkpoints_are_one_line_naming_file_and_key(tmp_path):
    state = _fixture_state(PROTO)
    head = {k: v for k, v in state.items() if not k.startswith("backbone.")}  # small files for the tool
    ocr = {k: v for k, v in head.items() if k.startswith("cls_head.")}
    ocr["spatial_ocr_head.object_context_block.f_pixel.0.weight"] = torch.zeros(256, 512, 1, 1)
    torch.save(ocr, tmp_path / "ocr.pth")
    _one_line(_convert(tmp_path, str(tmp_path / "ocr.pth"), PROTO)[0], str(tmp_path / "ocr.pth"),
              "spatial_ocr_head.object_context_block.f_pixel.0.weight", "not a released")

    del head["feat_norm.bias"]
    torch.save(head, tmp_path / "missing.pth")
    _one_line(_convert(tmp_path, str(tmp_path / "missing.pth"), PROTO)[0], "missing.pth", "feat_norm.bias",
              "classifier.feat_norm.bias", "[720]")

    torch.save({"prototypes": torch.zeros(19, 10, 720)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    _one_line(_convert(tmp_path, str(tmp_path / "truncated.pth"), PROTO)[0], "truncated.pth", "cannot be read")
    _one_line(_convert(tmp_path, str(tmp_path / "nothere.pth"), PROTO)[0], "nothere.pth", "does not exist")


def test_a_tensor_of_another_width_or_without_place_is_named():
    state = _fixture_state(PROTO)
    cfg = released_config(load_config(os.path.join(ROOT, CONFIGS[PROTO]), ["model.pretrained=false"]), state, PROTO)
    model_state = build_model(cfg).state_dict()
    narrow = dict(state, **{"backbone.transition1.0.0.weight": torch.zeros(32, 256, 3, 3)})  # W32's
    with pytest.raises(ReleasedCheckpointError, match=r"^f.pth: backbone.transition1.0.0.weight has shape "
                                                      r"\[32, 256, 3, 3\], the model's backbone.body"):
        convert_state(narrow, PROTO, model_state, "f.pth")
    extra = dict(state, **{"aux_head.weight": torch.zeros(3)})
    with pytest.raises(ReleasedCheckpointError, match=r"^f.pth: aux_head.weight \(shape \[3\]\) has no counterpart"):
        convert_state(extra, PROTO, model_state, "f.pth")
    del state["backbone.stage4.2.fuse_layers.0.3.1.running_var"]
    with pytest.raises(ReleasedCheckpointError, match=r"^f.pth: no tensor for backbone.body.stage4.2.fuse_layers.0.3.1.running_var \(shape \[48\]\)"):
        convert_state(state, PROTO, model_state, "f.pth")
    contrast = {k: v for k, v in _fixture_state(SOFTMAX).items()}
    contrast.update({k: v for k, v in state.items() if k.startswith("proj_head.")})
    with pytest.raises(ReleasedCheckpointError, match=r"^f.pth is a released contrastive model"):
        released_architecture(contrast, "f.pth")
    twins = dict(state, **{"proj_head.mlp2.0.bias": torch.zeros(720)})
    with pytest.raises(ReleasedCheckpointError, match="proj_head.mlp2.0.bias differs from proj_head.proj.0.bias"):
        convert_state(twins, PROTO, model_state, "f.pth")


def test_hrnet_imagenet_weights_in_the_official_format_load(tmp_path):
    # HRNet-Image-Classification's file (hrnetv2_w48_imagenet_pretrained.pth, which the released
    # training starts from) has timm's names and a classification head; here a random W18-small.
    official = timm.create_model("hrnet_w18_small").state_dict()
    assert any(k.startswith("incre_modules.") for k in official)
    torch.save(official, tmp_path / "imagenet.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}}, tmp_path / "wrapped.pth")
    for name in ("imagenet.pth", "wrapped.pth"):
        body = Backbone("hrnet_w18_small", checkpoint=str(tmp_path / name)).body.state_dict()
        assert body.keys() <= official.keys()
        assert all(torch.equal(body[k], official[k]) for k in body)
    official["stage2.0.fuse_layers.0.1.0.weight"] = torch.zeros(16, 33, 1, 1)
    torch.save(official, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad.pth: stage2.0.fuse_layers.0.1.0.weight has shape \[16, 33, 1, 1\]"):
        Backbone("hrnet_w18_small", checkpoint=str(tmp_path / "bad.pth"))


def test_bilinear_fuse_is_hrnet_segmentation_code():
    """Each fused branch as HRNet's segmentation code computes it (openseg's and the official
    HighResolutionModule.forward, transcribed): branch 0, then each other branch j in order,
    through its fuse layer, resized bilinearly with align_corners=True where j > i; then ReLU."""
    torch.manual_seed(0)
    bilinear = Backbone("hrnet_w18_small").eval()
    nearest = Backbone("hrnet_w18_small", hrnet_fuse="nearest").eval()
    nearest.load_state_dict(bilinear.state_dict())
    # timm's fuse layer from branch 3 into branch 0: conv, BN, Upsample; here conv, BN, nothing
    assert isinstance(nearest.body.stage4[0].fuse_layers[0][3][2], torch.nn.Upsample)
    assert isinstance(bilinear.body.stage4[0].fuse_layers[0][3][2], torch.nn.Identity)
    module = bilinear.body.stage4[0]  # four branches
    x = [torch.randn(1, c, 40 // 2 ** i, 24 // 2 ** i) for i, c in enumerate((16, 32, 64, 128))]
    with torch.no_grad():
        branches = [branch(t) for branch, t in zip(module.branches, x)]
        expected = []
        for i in range(4):
            y = branches[0] if i == 0 else module.fuse_layers[i][0](branches[0])
            for j in range(1, 4):
                t = module.fuse_layers[i][j](branches[j])
                y = y + (F.interpolate(t, size=branches[i].shape[-2:], mode="bilinear", align_corners=True)
                         if j > i else t)
            expected.append(torch.relu(y))
        for ours, e in zip(module([t.clone() for t in x]), expected):
            torch.testing.assert_close(ours, e, rtol=0, atol=0)
        image = torch.randn(1, 3, 96, 64)
        assert (bilinear(image)[0] - nearest(image)[0]).abs().max() > 1e-2  # another function
    with pytest.raises(ValueError, match="model.hrnet_fuse must be one of"):
        Backbone("hrnet_w18_small", hrnet_fuse="bicubic")


def test_a_checkpoint_saved_before_the_fuse_option_keeps_nearest():
    stored = config_to_dict(load_config(os.path.join(ROOT, CONFIGS[PROTO])))
    del stored["model"]["hrnet_fuse"]
    assert config_from_dict(stored).model.hrnet_fuse == "nearest"
    assert load_config(os.path.join(ROOT, "configs", "digitscenes_protoseg.yaml")).model.hrnet_fuse == "bilinear"


def test_released_input_is_bgr_normalised_in_that_order(tmp_path):
    # The converted config feeds the network as openseg does: channel 0 is blue, less 0.485 * 255.
    state = _fixture_state(PROTO)
    cfg = released_config(load_config(os.path.join(ROOT, CONFIGS[PROTO]), ["model.pretrained=false"]), state, PROTO)
    assert cfg.data.channel_order == "bgr"
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    x = EvalTransform(**normalization(cfg)).image(rgb)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [(50 - 123.675) / 58.395, (100 - 116.28) / 57.12,
                                                    (200 - 103.53) / 57.375], rtol=1e-6)
    cfg.data.channel_order = "rgb"
    x = EvalTransform(**normalization(cfg)).image(rgb)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [(200 - 123.675) / 58.395, (100 - 116.28) / 57.12,
                                                    (50 - 103.53) / 57.375], rtol=1e-6)
    with pytest.raises(ConfigError, match="data.channel_order must be one of rgb, bgr"):
        load_config(os.path.join(ROOT, CONFIGS[PROTO]), ["data.channel_order=rbg"])
