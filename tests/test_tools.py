"""End-to-end runs of tools/train.py and tools/test.py as subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tool_command

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

    # a folder given by overrides, with colourised predictions
    data = tmp_path / "data"
    result = _run(tool_command("test.py", config, str(run / "checkpoint_last.pth"),
                               f"data.val_images={data}/images/val", f"data.val_labels={data}/labels/val",
                               "--save-pred", str(tmp_path / "pred")))
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout
    assert sorted(os.listdir(tmp_path / "pred")) == [f"{i:06d}.png" for i in range(4)]
    assert json.loads((run / "test_results.json").read_text())["pixels"] > 0


def test_config_errors_exit_2_naming_the_key(tiny_config):
    result = _run(tool_command("train.py", tiny_config(), "train.learning_rate=1"))
    assert result.returncode == 2
    assert "unknown key(s) train.learning_rate" in result.stderr


@pytest.mark.slow
def test_two_process_gloo_run_keeps_replicas_identical(tiny_config, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "tools", "train.py"), tiny_config()]
    result = _run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = [r for r in _records(tmp_path / "run") if "checkpoint" in r]
    # every save compares exact fingerprints of all parameters and buffers (prototypes
    # included) across the ranks, and raises if one differs
    assert [r["iter"] for r in saved] == [2, 4] and all(r["replicas_identical"] == 2 for r in saved)
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", weights_only=True)
    assert len(state["rng"]) == 2


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
