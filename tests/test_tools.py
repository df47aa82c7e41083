"""End-to-end runs of tools/train.py and tools/test.py as subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from conftest import BF16_CHANNELS_LAST, COMPILED, ROOT, tool_command
from protoseg.engine.evaluator import SegEvaluator

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _records(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_train_then_test_writes_everything(tiny_config, tmp_path):
    config = tiny_config()
    result = _run(tool_command("train.py", config))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "checkpoint_last.pth", "iter_0000004.pth", "eval_results.json", "tensorboard"):
        assert (run / name).exists(), name
    records = _records(run)
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("eval" in r for r in records)
    assert "mIoU" in result.stdout and "background" in result.stdout
    # prototype statistics: every training log step (this batch) and every evaluation (val)
    assert all({"entropy", "dead", "cosine"} <= set(r["prototypes"]) for r in records if "loss" in r)
    evaluated = [r for r in records if "eval" in r]
    assert all(len(r["prototypes"]["classes"]) == 11 for r in evaluated)
    assert "prototypes: usage entropy" in result.stdout

    # a folder given by overrides (after an option: they may come anywhere), with colourised predictions
    data = tmp_path / "data"
    result = _run(tool_command("test.py", config, str(run / "checkpoint_last.pth"),
                               "--save-pred", str(tmp_path / "pred"),
                               f"data.val_images={data}/images/val", f"data.val_labels={data}/labels/val"))
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout
    assert sorted(os.listdir(tmp_path / "pred")) == [f"{i:06d}.png" for i in range(4)]
    tested = json.loads((run / "test_results.json").read_text())
    assert tested["pixels"] > 0

    # the checkpoint alone: its stored config, the overrides on top
    alone = tmp_path / "alone.json"
    result = _run(tool_command("test.py", str(run / "checkpoint_last.pth"),
                               f"data.val_images={data}/images/val", f"data.val_labels={data}/labels/val",
                               "--out", str(alone)))
    assert result.returncode == 0, result.stderr
    assert json.loads(alone.read_text()) == tested

    # tools/infer.py on the same images, its PNGs scored against the labels: test.py's mIoU
    result = _run(tool_command("infer.py", str(run / "checkpoint_last.pth"), f"{data}/images/val",
                               "--out", str(tmp_path / "infer")))
    assert result.returncode == 0, result.stderr
    assert "4 images segmented" in result.stdout
    evaluator = SegEvaluator(11)
    for i in range(4):
        pred = cv2.imread(str(tmp_path / "infer" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(data / "labels" / "val" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint8 and pred.shape == label.shape
        evaluator.process(torch.from_numpy(pred), torch.from_numpy(label))
        overlay = cv2.imread(str(tmp_path / "infer" / f"{i:06d}_overlay.png"), cv2.IMREAD_COLOR)
        assert overlay.shape[0] >= 32 and overlay.shape[1] > 32  # the image, and the legend beside it
    assert evaluator.evaluate()["mIoU"] == tested["mIoU"]


@pytest.mark.slow
def test_infer_reports_bad_inputs_by_name_and_writes_the_rest(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint()
    inputs = tmp_path / "inputs"
    (inputs / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(inputs / "a.png"), rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    cv2.imwrite(str(inputs / "nested" / "b.jpg"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = _run(tool_command("infer.py", checkpoint, str(inputs), str(tmp_path / "nothing*.png"),
                               "test.flip=true", "--out", str(out)))
    assert result.returncode == 1
    assert "broken.png" in result.stderr and "nothing*.png" in result.stderr
    assert "2 images segmented" in result.stdout and "2 failed" in result.stdout
    assert sorted(os.listdir(out)) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    assert cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED).shape == (30, 41)
    assert not [n for n in os.listdir(out) if "tmp" in n]  # written through temporary files

    # two images with one stem would overwrite each other: refused before anything runs
    cv2.imwrite(str(inputs / "nested" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    result = _run(tool_command("infer.py", checkpoint, str(inputs), "--out", str(tmp_path / "out2")))
    assert result.returncode == 2 and "both be written as a.png" in result.stderr
    result = _run(tool_command("infer.py", checkpoint, "--out", str(out), str(inputs), "model.proj_dim=8"))
    assert result.returncode == 2 and "only test.key=value" in result.stderr


@pytest.mark.slow
def test_format_only_writes_class_ids_of_a_split_without_labels(tiny_checkpoint, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    cv2.imwrite(str(images / "x.png"), np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8))
    checkpoint = tiny_checkpoint()
    result = _run(tool_command("test.py", checkpoint, f"data.val_images={images}", "--format-only",
                               str(tmp_path / "sub")))
    assert result.returncode == 0, result.stderr
    written = cv2.imread(str(tmp_path / "sub" / "x.png"), cv2.IMREAD_UNCHANGED)
    result = _run(tool_command("infer.py", checkpoint, str(images / "x.png"), "--out", str(tmp_path / "inf")))
    np.testing.assert_array_equal(written, cv2.imread(str(tmp_path / "inf" / "x.png"), cv2.IMREAD_UNCHANGED))
    result = _run(tool_command("test.py", checkpoint, "test.mode=slide"))
    assert result.returncode == 2 and "test.crop_size" in result.stderr


def test_config_errors_exit_2_naming_the_key(tiny_config):
    result = _run(tool_command("train.py", tiny_config(), "--stop-after", "1", "train.learning_rate=1"))
    assert result.returncode == 2
    assert "unknown key(s) train.learning_rate" in result.stderr


# Two ranks compiling cold take 80 s of make test's 15 minutes on 2 cores: run with
# PROTOSEG_TEST_DDP_COMPILE=1 (it passed in make test at commit 455fc2e).
DDP_COMPILE = pytest.mark.skipif(not os.environ.get("PROTOSEG_TEST_DDP_COMPILE"),
                                 reason="set PROTOSEG_TEST_DDP_COMPILE=1: two ranks compiling take minutes")


@pytest.mark.slow
@pytest.mark.parametrize("ranks, overrides", [(2, []), (1, []), (2, BF16_CHANNELS_LAST),
                                               pytest.param(2, COMPILED, marks=DDP_COMPILE)],
                         ids=["2", "1", "2-bf16-cl", "2-compiled"])
def test_gloo_run_keeps_replicas_identical(tiny_config, tmp_path, ranks, overrides):
    """torchrun with 2 processes, and with 1, which joins a process group too (the collectives
    of a multi-process run, NCCL on a GPU: tools/gpu_check.py's torchrun step); and 2 processes
    with the step's other options, and each compiling its step (graphs split at DDP's buckets)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           os.path.join(ROOT, "tools", "train.py"), tiny_config(), *overrides]
    result = _run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{ranks} rank(s) on cpu (gloo)" in result.stdout
    saved = [r for r in _records(tmp_path / "run") if "checkpoint" in r]
    # every save compares exact fingerprints of all parameters and buffers (prototypes
    # included) across the ranks, and raises if one differs
    assert [r["iter"] for r in saved] == [2, 4] and all(r["replicas_identical"] == ranks for r in saved)
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert len(state["rng"]) == ranks


@pytest.mark.slow
def test_sigterm_saves_and_exits_75(tiny_config, tmp_path):
    proc = subprocess.Popen(tool_command("train.py", tiny_config(), "train.iterations=1000",
                                         "train.checkpoint_interval=1000", "train.eval_interval=1000"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "continue with --resume" in out
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert 1 <= state["iteration"] < 1000
