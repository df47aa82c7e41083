"""One DataLoader worker's throughput on the training data: each sample read and transformed by
the data set `build_train_loader` builds (SegmentationDataset with TrainTransform: decode, label
checks, random scale, crop, flip, photometric distortion, to tensors), one at a time in this
process, with OpenCV on one thread as `_worker_init` sets it in a worker.

Data: synthetic scenes written to a temporary folder in each data set's layout and file format
(protoseg/data/datasets.py's split_layout), at the sizes and settings of the paper's configs:

- cityscapes: 2048x1024 PNG images and PNG train-id labels; configs/cityscapes_hrnet48_protoseg.yaml
  (crop 1024x512, scale 0.5-2, flip, photometric distortion);
- ade20k: 683x512 JPEG images and PNG labels (0 = other); configs/ade20k_hrnet48_protoseg.yaml
  (crop 512x512, scale 0.5-2, flip, photometric distortion).

A scene is a smooth colour field with pixel noise (so that PNG and JPEG compress it as they do a
photograph, not as flat colour or pure noise) and a label map of 32x32-pixel blocks; the summary
gives the files' sizes, since decoding time follows them. A round is SAMPLES samples, different
draws of scale, crop, flip and jitter, the same ones in every round; images/s per worker is
SAMPLES over a round's mean time.

Against the step: one GPU's step takes the config's batch_size / GPUS crops (its runs are
torchrun --nproc-per-node=4), so n workers keep up with steps as short as
crops / (n x images/s per worker); the summary gives that for one worker and for the config's
data.num_workers.

Groups: "data pipeline: <data set>" times the transform as it is (`current`) against the transform
as it was before random_scale_crop computed only the crop, the flip copied, photometric_distortion
worked in place and normalize_image transposed once (`before`, the baseline, kept in this file
only), after checking that the two give the same labels to the bit, and without the photometric
distortion images within 1 of 255 per value; "data pipeline: OpenCV threads" times
cityscapes with OpenCV on one thread (baseline) and on its default pool of one thread per core,
what a worker used before `_worker_init` set one thread (the outputs are checked to be equal).

Sizes: PROTOSEG_BENCH_PIPELINE_SCALE (default 1) scales the images and crops (make test: 0.125).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import cv2
import numpy as np
import pytest
import torch
from conftest import note, run

from protoseg.config import load_config
from protoseg.data.datasets import split_layout
from protoseg.data.loader import build_train_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = float(os.environ.get("PROTOSEG_BENCH_PIPELINE_SCALE", "1"))
IMAGES = 4  # files per data set
SAMPLES = 16  # per round: items (i % IMAGES, epoch i // IMAGES), so every draw differs
GPUS = 4  # the configs' torchrun --nproc-per-node=4
# data set: (config, image height and width, image format, label values in the files, their ignore value)
DATASETS = {"cityscapes": ("cityscapes_hrnet48_protoseg.yaml", (1024, 2048), ".png", 19, 255),
            "ade20k": ("ade20k_hrnet48_protoseg.yaml", (512, 683), ".jpg", 151, 0)}


def _scaled(n: int) -> int:
    return max(1, round(n * SCALE))


def _scene(h: int, w: int, values: int, ignore: int, rng: np.random.Generator):
    """(image [h, w, 3] uint8, label [h, w] uint8 in [0, values), 1 block in 20 `ignore`)."""
    colours = rng.uniform(0, 255, (h // 64 + 2, w // 64 + 2, 3)).astype(np.float32)
    image = cv2.resize(colours, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 3, (h, w, 3))
    blocks = rng.integers(0, values, (h // 32 + 1, w // 32 + 1))
    blocks[rng.random(blocks.shape) < 0.05] = ignore
    label = cv2.resize(blocks.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _write(dataset: str, root: str) -> str:
    """IMAGES scenes of `dataset` under root, in its layout; returns a line on the file sizes."""
    _, (h, w), ext, values, ignore = DATASETS[dataset]
    h, w = _scaled(h), _scaled(w)
    images, labels, label_suffix, image_suffix = split_layout(dataset, root, "train")
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(IMAGES):
        image, label = _scene(h, w, values, ignore, rng)
        paths = (os.path.join(images, "city", f"{i:06d}{image_suffix}{ext}"),
                 os.path.join(labels, "city", f"{i:06d}{label_suffix}"))
        os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
        os.makedirs(os.path.dirname(paths[1]), exist_ok=True)
        cv2.imwrite(paths[0], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(paths[1], label)
        sizes.append([os.path.getsize(p) / 1e3 for p in paths])
    image_kb, label_kb = np.mean(sizes, axis=0)
    return (f"{dataset}: {IMAGES} synthetic {w}x{h} {ext} images of {image_kb:.0f} KB, "
            f"labels {label_kb:.0f} KB")


def make_pipeline(dataset: str, root: str):
    """(the training data set of `dataset` as build_train_loader builds it, over IMAGES scenes
    written under root; the crops one GPU's step takes; the config's workers per GPU; a line on
    the files' sizes)."""
    config = os.path.join(ROOT, "configs", DATASETS[dataset][0])
    cfg = load_config(config)
    crops, workers = cfg.train.batch_size // GPUS, cfg.data.num_workers
    ch, cw = (_scaled(v) for v in cfg.data.crop_size)
    cfg = load_config(config, [f"data.root={root}", f"data.crop_size=[{ch},{cw}]", "data.num_workers=0",
                               f"train.batch_size={IMAGES}"])  # the sampler wants a batch's worth of files
    files = _write(dataset, root)
    return build_train_loader(cfg, rank=0, world_size=1, start_iter=0).dataset, crops, workers, files


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """data set -> make_pipeline's (data set, crops per GPU step, workers per GPU)."""
    out = {}
    for dataset in DATASETS:
        *out[dataset], files = make_pipeline(dataset, str(tmp_path_factory.mktemp(dataset)))
        note(files)
    return out


@pytest.fixture(autouse=True)
def opencv_one_thread():
    cv2.setNumThreads(0)  # as _worker_init sets it in each DataLoader worker: serial
    yield
    cv2.setNumThreads(-1)  # OpenCV's default


ITEMS = [(i % IMAGES, i // IMAGES) for i in range(SAMPLES)]


def samples(dataset):
    return [dataset[item] for item in ITEMS]


def _scale_crop_before(image, label, t, rng):
    scale = rng.uniform(*t.scale_range)
    h, w = label.shape
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    ch, cw = t.crop_size
    h, w = label.shape
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=[float(v) for v in t.mean])
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=t.ignore_index)
        h, w = label.shape
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def _photometric_before(image, rng):
    image = image.astype(np.float32)
    if rng.random() < 0.5:
        image = image + rng.uniform(-32, 32)
    if rng.random() < 0.5:
        image = image * rng.uniform(0.5, 1.5)
    image = np.clip(image, 0, 255)
    do_saturation, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_saturation or do_hue:
        hsv = cv2.cvtColor(image / 255.0, cv2.COLOR_RGB2HSV)
        if do_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-36, 36)) % 360
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
    return image


def _normalize_before(image, mean, std, bgr):
    image = ((np.asarray(image, np.float32) - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(image[::-1] if bgr else image))


def _to_tensors_before(image, label, mean, std, bgr):
    label = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
    return _normalize_before(image, mean, std, bgr), label


def before_pipeline(dataset):
    """The data set with TrainTransform.__call__ as it was: the whole pair scaled then cropped,
    flip as views, the photometric distortion in fresh arrays, normalisation on [H, W, 3] then a
    transposed copy."""
    t = dataset.transform

    def transform(image, label, rng):
        image, label = _scale_crop_before(image, label, t, rng)
        if t.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if t.photometric:
            image = _photometric_before(image, rng)
        return _to_tensors_before(image, label, t.mean, t.std, t.bgr)

    before = copy.copy(dataset)
    before.transform = transform
    return before


def _check(got, expected, image_levels: float | None = 0.0, std=None):
    """Labels to the bit; images to the bit (image_levels 0), within image_levels of 0-255 (std:
    the normalisation's), or not compared (None)."""
    for (image, label, _), (image_0, label_0, _) in zip(got, expected, strict=True):
        assert image.dtype == image_0.dtype == torch.float32 and label.dtype == label_0.dtype == torch.int64
        assert torch.equal(label, label_0)
        if image_levels == 0:
            assert torch.equal(image, image_0)
        elif image_levels is not None:
            levels = (image - image_0).abs() * torch.from_numpy(std)[:, None, None]
            assert levels.max() <= image_levels * (1 + 1e-5), levels.max()


def _without_photometric(dataset):
    plain = copy.copy(dataset)
    plain.transform = dataclasses.replace(dataset.transform, photometric=False)
    return plain


def _per_worker(group: str, name: str, seconds: float, crops: int, workers: int) -> None:
    rate = SAMPLES / seconds
    shortest = crops / rate * 1e3  # ms of one worker per step
    note(f"{group} {name}: {rate:.1f} images/s per worker; a GPU step of {crops} crops is fed by 1 worker "
         f"if it takes >= {shortest:.0f} ms, by {workers} if >= {shortest / workers:.0f} ms")


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("impl", ["before", "current"])
def test_data_pipeline(benchmark, pipelines, dataset, impl):
    data, crops, workers = pipelines[dataset]
    if impl == "before":
        data = before_pipeline(data)
    else:  # labels to the bit; images within 1 of 255 (random_scale_crop's bound, proved in
        # tests/test_data.py), checked without the photometric distortion, whose gains multiply it
        _check(samples(data), samples(before_pipeline(data)), image_levels=None)
        plain = _without_photometric(data)
        _check(samples(plain), samples(before_pipeline(plain)), image_levels=1, std=data.transform.std)
    group = f"data pipeline: {dataset}"
    run(benchmark, group, impl, lambda: samples(data), baseline="before")
    _per_worker(group, impl, benchmark.stats.stats.mean, crops, workers)


@pytest.mark.parametrize("threads", ["1 thread", "default pool"])
def test_data_pipeline_opencv_threads(benchmark, pipelines, threads):
    data = pipelines["cityscapes"][0]
    if threads == "default pool":
        serial = samples(data)
        cv2.setNumThreads(-1)
        _check(samples(data), serial)  # OpenCV's results do not depend on its threads
    run(benchmark, "data pipeline: OpenCV threads", threads, lambda: samples(data), baseline="1 thread")
