"""tools/test.py --format-only writes Cityscapes submission PNGs that the official evaluation
(cityscapesscripts, the test server's code) scores exactly as protoseg's evaluator does."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, tool_command
from protoseg.data.datasets import CITYSCAPES_LABEL_IDS

labels = pytest.importorskip("cityscapesscripts.helpers.labels")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
FRAMES = [("aachen", 0), ("aachen", 1), ("bochum", 7)]
HEIGHT, WIDTH = 40, 72  # not multiples of the network's stride


def _run(cmd, env=ENV):
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train_ids():
    """label id -> train id (255: not evaluated), as cityscapesscripts' createTrainIdLabelImgs."""
    table = np.full(256, 255, np.uint8)
    for label in labels.labels:
        if label.id >= 0 and 0 <= label.trainId < 19:
            table[label.id] = label.trainId
    return table


def test_label_ids_are_cityscapesscripts_train_id_table():
    by_train_id = sorted((label.trainId, label.id) for label in labels.labels
                         if 0 <= label.trainId < 19 and not label.ignoreInEval)
    assert [label_id for _, label_id in by_train_id] == CITYSCAPES_LABEL_IDS


@pytest.mark.slow
def test_format_only_files_score_the_same_in_cityscapesscripts(tiny_checkpoint, tmp_path):
    root = tmp_path / "cityscapes"
    rng = np.random.default_rng(0)
    stems = []
    for city, frame in FRAMES:
        stem = f"{city}_{frame:06d}_000019"
        stems.append((city, stem))
        folder = root / "leftImg8bit" / "val" / city
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (4, 6, 3)).astype(np.float32)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        image += rng.normal(0, 20, (HEIGHT, WIDTH, 3))
        cv2.imwrite(str(folder / f"{stem}_leftImg8bit.png"), np.clip(image, 0, 255).astype(np.uint8))
    checkpoint = tiny_checkpoint("data.dataset=cityscapes", "data.num_classes=19", f"data.root={root}",
                                 "data.eval_batch_size=2")

    # 1. the submission files, written before any label exists (as for the test split)
    results = tmp_path / "results"
    out = _run(tool_command("test.py", checkpoint, "--format-only", str(results)))
    assert "wrote 3 predictions" in out.stdout
    assert sorted(os.listdir(results)) == sorted(f"{stem}_leftImg8bit.png" for _, stem in stems)
    predictions = {stem: cv2.imread(str(results / f"{stem}_leftImg8bit.png"), cv2.IMREAD_UNCHANGED)
                   for _, stem in stems}
    for p in predictions.values():
        assert p.shape == (HEIGHT, WIDTH) and p.dtype == np.uint8
        assert set(np.unique(p)) <= set(CITYSCAPES_LABEL_IDS)
    assert len(set(np.concatenate([np.unique(p) for p in predictions.values()]))) >= 3  # a varied map

    # 2. ground truth in label ids: the predictions with 40% of the pixels changed to other
    # evaluated classes or to ids the evaluation ignores (unlabeled, ego vehicle, guard rail...)
    ignored = [label.id for label in labels.labels if label.ignoreInEval and label.id >= 0]
    for city, stem in stems:
        gt = predictions[stem].copy()
        changed = rng.random(gt.shape) < 0.4
        gt[changed] = rng.choice(CITYSCAPES_LABEL_IDS + ignored, size=int(changed.sum()))
        folder = root / "gtFine" / "val" / city
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{stem}_gtFine_labelIds.png"), gt)
        cv2.imwrite(str(folder / f"{stem}_gtFine_labelTrainIds.png"), _train_ids()[gt])

    # 3. protoseg's evaluator on the same checkpoint, from the checkpoint's config alone
    ours = tmp_path / "ours.json"
    _run(tool_command("test.py", checkpoint, "--out", str(ours)))
    ours = json.loads(ours.read_text())

    # 4. the official evaluation, which finds ground truth and predictions through its
    # environment variables. Its instance-level scores (not the class IoU) call np.in1d, which
    # numpy 2.4 removed, so they are switched off.
    export = tmp_path / "export"
    export.mkdir()
    env = {**ENV, "CITYSCAPES_DATASET": str(root), "CITYSCAPES_RESULTS": str(results),
           "CITYSCAPES_EXPORT_DIR": str(export)}
    script = ("import sys; sys.argv = sys.argv[:1]\n"
              "from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official\n"
              "official.args.evalInstLevelScore = False\n"
              "official.main()\n")
    _run([sys.executable, "-c", script], env=env)
    official = json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())
    assert 0.05 < official["averageScoreClasses"] < 0.95
    assert abs(official["averageScoreClasses"] - ours["mIoU"]) < 1e-6
    for name, iou in ours["IoU"].items():
        theirs = official["classScores"][name]
        assert (np.isnan(iou) and np.isnan(theirs)) or abs(iou - theirs) < 1e-6, name
