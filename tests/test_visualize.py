"""tools/visualize.py and tools/test.py --anomaly end to end, on tiny models (subprocesses)."""

import json
import os
import subprocess

import cv2
import pytest

from conftest import ROOT, tool_command
from protoseg.engine import plots

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_visualize_writes_four_labelled_pngs_of_the_expected_size(tiny_checkpoint, tmp_path):
    out = tmp_path / "plots"
    result = _run(tool_command("visualize.py", tiny_checkpoint(), "--out", str(out), "--images", "2",
                               "--points", "300"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prototypes: usage entropy" in result.stdout
    sizes = {"embeddings.png": plots.EMBEDDING_SIZE, "usage.png": plots.USAGE_SIZE,
             "assignments.png": (plots.ROW_WIDTH, 2 * plots.ROW_HEIGHT),
             "similarity.png": (plots.ROW_WIDTH * 3 // 4, 2 * plots.ROW_HEIGHT)}
    assert sorted(os.listdir(out)) == sorted(sizes)  # nothing else (no temporary files)
    for name, (width, height) in sizes.items():
        image = cv2.imread(str(out / name), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (height, width, 3), name
        assert image.std() > 10, f"{name} is blank"
    softmax = tiny_checkpoint("model.classifier=softmax")
    result = _run(tool_command("visualize.py", softmax, "--out", str(out)))
    assert result.returncode == 2 and "is a softmax model" in result.stderr


@pytest.mark.slow
def test_anomaly_reports_every_score_and_known_class_miou(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("data.num_classes=9", "data.unknown_digits=[8, 9]", "data.unknown_index=254",
                                 "data.scenes_val=12")
    out = tmp_path / "open.json"
    # without the fit, vmf is left out of the default scores, and asked for by name it is one line
    result = _run(tool_command("test.py", checkpoint, "--anomaly", "vmf"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "tiny_checkpoint.vmf.pt, which does not exist" in result.stderr and "fit_open_set.py" in result.stderr
    result = _run(tool_command("fit_open_set.py", checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fitted" in result.stdout and os.path.exists(tmp_path / "tiny_checkpoint.vmf.pt")
    result = _run(tool_command("test.py", checkpoint, "--anomaly", "--out", str(out)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "open set,          vmf: AUROC" in result.stdout and "prototypes: usage entropy" in result.stdout
    results = json.loads(out.read_text())
    anomaly = results["anomaly"]
    assert list(anomaly) == ["msp", "max_logit", "energy", "cosine", "proto_energy", "vmf"]
    for metrics in anomaly.values():
        assert metrics["unknown_pixels"] > 0 and metrics["known_pixels"] > 0
        assert (metrics["unknown_pixels"], metrics["known_pixels"]) == (anomaly["msp"]["unknown_pixels"],
                                                                      anomaly["msp"]["known_pixels"])
        assert 0 <= metrics["AUROC"] <= 1 and 0 <= metrics["AP"] <= 1 and 0 <= metrics["FPR@95"] <= 1
    assert list(results["IoU"]) == ["background"] + [str(d) for d in range(8)]  # known classes only
    result = _run(tool_command("test.py", checkpoint, "--anomaly", "msp", "bogus"))
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: unknown open-set score 'bogus' (scores: msp, max_logit, energy, cosine, proto_energy, vmf)")
    result = _run(tool_command("test.py", tiny_checkpoint(), "--anomaly"))
    assert result.returncode == 2 and "data.unknown_index" in result.stderr
    softmax = tiny_checkpoint("model.classifier=softmax")
    result = _run(tool_command("fit_open_set.py", softmax))
    assert result.returncode == 2 and "is a softmax classifier" in result.stderr
