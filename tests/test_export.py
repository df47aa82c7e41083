"""tools/export.py and protoseg.export: the exported programs (ONNX in onnxruntime, pt2 loaded
back, an AOTInductor package in a fresh process) against the eager model, at input sizes that
are not multiples of the stride; the metadata; the bad-input errors.

Exporting costs tens of seconds and compiling an AOTInductor package minutes, so each is done
once per module: one export_program of a tiny random protoseg model serves the CLI's ONNX export
and the pt2 test, and the AOTInductor test compiles a small host model (a stride-4 conv stem
under protoseg's PrototypeHead) rather than the HRNet."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_CONFIG
from torch import nn

import protoseg.export
from protoseg.config import TestConfig, config_to_dict, load_config
from protoseg.engine.predict import predict
from protoseg.export import (
    Deployable,
    export_model,
    export_program,
    load_exported,
    save_program,
    verify_checkpoint,
)
from protoseg.models.head import PrototypeHead
from protoseg.models.segmentor import build_model

# Neither a multiple of the tiny HRNet's stride (32) nor of each other; batch 2 then 1.
SIZES = [(2, 45, 71), (1, 50, 37)]
OUTPUTS = ("logits", "open_set_score")


def export_cli(*args: str) -> tuple[int, str, str]:
    """tools/export.py's main in this process (no second torch import): (status, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("tools_export", os.path.join(ROOT, "tools", "export.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = module.main(list(args))
        except SystemExit as e:  # argparse's own errors
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, checkpoint path, model in eval mode) of a random tiny protoseg model whose
    DigitScenes val scenes are 45 x 45 (not a multiple of its stride)."""
    folder = tmp_path_factory.mktemp("export")
    config = folder / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(run=folder / "run", data=folder / "data", classifier="prototype"))
    cfg = load_config(str(config), ["data.scene_size=45", "data.scenes_train=1"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = folder / "tiny.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 0}, path)
    return folder, str(path), model


def images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_matches(outputs, expected) -> None:
    """Same shapes, within 1e-4, and the same argmax of the logits on >= 99.9% of pixels."""
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4
    agreement = (outputs[0].argmax(dim=1) == expected[0].argmax(dim=1)).float().mean().item()
    assert agreement >= 0.999


def eager_outputs(model, x):
    """What the export must reproduce: the logits of predict.py (tools/test.py's path) and the
    model's open-set score, padded and cropped back as predict.py does."""
    with torch.no_grad():
        score = Deployable(model, 32, OUTPUTS)(x)[1]
        return predict(model, x, TestConfig()), score


@pytest.fixture(scope="module")
def program(tiny):
    """The tiny model's exported program with the open-set score: the one export of the module."""
    return export_program(tiny[2], open_set=True)


@pytest.fixture(scope="module")
def onnx_export(tiny, program):
    """tools/export.py --format onnx --open-set --verify on the tiny checkpoint: (path, stdout).
    Its export_program call returns the module's program (the same function of the same model,
    so one export serves every test)."""
    folder, checkpoint, _ = tiny
    path = str(folder / "tiny.onnx")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protoseg.export, "export_program", lambda model, **kwargs: program)
        status, out, err = export_cli(checkpoint, "--format", "onnx", "--out", path, "--open-set", "--verify")
    assert status == 0, err
    return path, out


def test_onnx_in_onnxruntime_matches_eager(tiny, onnx_export):
    path, _ = onnx_export
    run = load_exported(path, "onnx")
    for size in SIZES:
        x = images(*size)
        assert_matches(run(x), eager_outputs(tiny[2], x))


def test_onnx_metadata_holds_the_preprocessing(onnx_export):
    meta = {p.key: json.loads(p.value) for p in onnx.load(onnx_export[0]).metadata_props}
    assert meta["mean"] == [123.675, 116.28, 103.53] and meta["std"] == [58.395, 57.12, 57.375]
    assert meta["channel_order"] == "rgb" and meta["outputs"] == list(OUTPUTS) and meta["size_divisor"] == 32
    assert len(meta["class_names"]) == 11


def test_miou_from_onnx_equals_eager_evaluation(tiny, onnx_export):
    _, checkpoint, _ = tiny
    path, out = onnx_export
    result = verify_checkpoint(checkpoint, path, "onnx", open_set=True)
    assert result["images"] == 4 and result["sizes"] == [[45, 45]]
    assert result["miou_exported"] == result["miou_eager"]
    assert result["max_abs_diff"] < 1e-4 and result["score_max_abs_diff"] < 1e-4
    assert result["argmax_agreement"] >= 0.999
    assert f"mIoU {100 * result['miou_exported']:.2f} (exported) vs {100 * result['miou_eager']:.2f} (eager)" in out


def test_pt2_loaded_back_matches_eager(tiny, program, tmp_path):
    model = tiny[2]
    path = str(tmp_path / "tiny.pt2")
    save_program(program, "pt2", path, {"mean": [1.0, 2.0, 3.0]})
    extra = {"protoseg.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["protoseg.json"]) == {"mean": [1.0, 2.0, 3.0]}
    assert not any(str(n.target).startswith("protoseg.") for n in program.graph.nodes)
    for size in SIZES:
        x = images(*size, seed=1)
        assert_matches(tuple(program.module()(x)), eager_outputs(model, x))
    assert os.listdir(tmp_path) == ["tiny.pt2"]  # no temporary file left


class TinyHost(nn.Module):
    """Someone else's segmentation model with protoseg's head in place of its classifier: a
    stride-4 conv stem, PrototypeHead, logits upsampled to the image."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = PrototypeHead(8, num_classes=5, num_prototypes=3, proj_dim=8)

    def forward(self, images):
        logits = self.head(self.stem(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


AOTI_CHECK = """
import json, sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
torch.save([runner(x) for x in torch.load(sys.argv[2])], sys.argv[3])
print(json.dumps(runner.get_metadata()))
"""


@pytest.mark.slow
def test_aoti_package_in_a_fresh_process_matches_eager(tmp_path):
    torch.manual_seed(0)
    host = TinyHost().eval()
    path = str(tmp_path / "host.pt2")
    export_model(host, "aoti", path, mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0], channel_order="bgr")
    inputs = [images(*size, seed=2) for size in SIZES]
    torch.save(inputs, tmp_path / "inputs.pt")
    # A fresh interpreter that imports torch alone: the package needs nothing of protoseg.
    done = subprocess.run([sys.executable, "-c", AOTI_CHECK, path, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    for x, outputs in zip(inputs, torch.load(tmp_path / "outputs.pt")):
        with torch.no_grad():
            assert_matches(outputs, (host(x),))
    meta = json.loads(done.stdout)
    assert json.loads(meta["std"]) == [255.0, 255.0, 255.0] and json.loads(meta["channel_order"]) == "bgr"
    assert json.loads(meta["size_divisor"]) == 1 and json.loads(meta["outputs"]) == ["logits"]


def test_open_set_on_a_softmax_checkpoint_is_one_line(tiny, tmp_path):
    folder, _, _ = tiny
    cfg = load_config(str(folder / "tiny.yaml"), ["model.classifier=softmax"])
    checkpoint = tmp_path / "softmax.pth"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg)}, checkpoint)
    status, _, err = export_cli(str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                                "--open-set")
    assert status == 2 and err.strip().count("\n") == 0
    assert "--open-set needs a prototype classifier" in err and "softmax" in err
    assert os.listdir(tmp_path) == ["softmax.pth"]


@pytest.mark.parametrize("case", ["missing checkpoint", "unknown format", "unwritable output", "no such folder"])
def test_bad_input_is_one_clear_line(tiny, tmp_path, case):
    _, checkpoint, _ = tiny
    out = str(tmp_path / "m.onnx")
    args, expected = {
        "missing checkpoint": ((str(tmp_path / "none.pth"), "--format", "onnx", "--out", out), "cannot load checkpoint"),
        "unknown format": ((checkpoint, "--format", "tflite", "--out", out), "invalid choice: 'tflite'"),
        # /proc takes no new files, whoever runs the tests (root included).
        "unwritable output": ((checkpoint, "--format", "onnx", "--out", "/proc/m.onnx"), "cannot write /proc/m.onnx"),
        "no such folder": ((checkpoint, "--format", "pt2", "--out", str(tmp_path / "no" / "m.pt2")), "does not exist"),
    }[case]
    status, _, err = export_cli(*args)
    assert status == 2 and expected in err and "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == []  # nothing written


def test_export_model_refuses_what_it_cannot_export(tmp_path):
    host = TinyHost()
    with pytest.raises(ValueError, match="format must be one of pt2, aoti, onnx"):
        export_model(host, "tflite", str(tmp_path / "m"), mean=[0] * 3, std=[1] * 3)
    with pytest.raises(ValueError, match=r"open_set_score.*prototype classifier"):
        export_model(host, "onnx", str(tmp_path / "m.onnx"), mean=[0] * 3, std=[1] * 3, open_set=True)
    assert os.listdir(tmp_path) == []
