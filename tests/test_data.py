import os
import signal

import cv2
import numpy as np
import pytest
import torch

from protoseg.data import digitscenes
from protoseg.data.datasets import SampleError, SegmentationDataset, dataset_pairs, folder_pairs
from protoseg.data.loader import TrainSampler, _worker_init, collate
from protoseg.data.transforms import (EvalTransform, TrainTransform, normalize_image, random_scale_crop,
                                      wrap_hue)

MEAN, STD = np.array([120.0, 110.0, 100.0], np.float32), np.array([60.0, 60.0, 60.0], np.float32)


def _write_pair(folder, name, image, label):
    os.makedirs(folder / "images", exist_ok=True)
    os.makedirs(folder / "labels", exist_ok=True)
    cv2.imwrite(str(folder / "images" / f"{name}.png"), image)
    cv2.imwrite(str(folder / "labels" / f"{name}.png"), label)


def _dataset(folder, num_classes=11, **kwargs):
    pairs = folder_pairs(str(folder / "images"), str(folder / "labels"))
    return SegmentationDataset(pairs, num_classes, EvalTransform(MEAN, STD), **kwargs)


def test_digitscenes_is_deterministic_and_well_formed(tmp_path):
    assert digitscenes.ensure_digitscenes(str(tmp_path / "a"), 6, 3, 32)
    assert not digitscenes.ensure_digitscenes(str(tmp_path / "a"), 6, 3, 32)  # already there
    assert digitscenes.ensure_digitscenes(str(tmp_path / "b"), 6, 3, 32)
    for split, count in (("train", 6), ("val", 3)):
        pairs = dataset_pairs("digitscenes", str(tmp_path / "a"), split)
        assert len(pairs) == count
        for image_path, label_path in pairs:
            other = image_path.replace(str(tmp_path / "a"), str(tmp_path / "b"))
            assert open(image_path, "rb").read() == open(other, "rb").read()
            image, label = cv2.imread(image_path), cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
            assert image.shape == (32, 32, 3) and label.shape == (32, 32)
            assert set(np.unique(label)) <= set(range(11)) | {255}


def test_open_set_digitscenes_keeps_unknown_digits_out_of_training_and_labels_them_in_val(tmp_path):
    root = str(tmp_path / "open")
    assert digitscenes.ensure_digitscenes(root, 30, 30, 32, unknown_digits=[8, 9], unknown_index=254)
    values = {}
    for split in ("train", "val"):
        values[split] = set()
        for _, label_path in dataset_pairs("digitscenes", root, split):
            values[split] |= set(np.unique(cv2.imread(label_path, cv2.IMREAD_UNCHANGED)).tolist())
    assert values["train"] <= set(range(9)) | {255}  # background and digits 0-7 only
    assert 254 in values["val"] and values["val"] <= set(range(9)) | {254, 255}
    assert digitscenes.class_names([8, 9]) == ["background"] + [str(d) for d in range(8)]
    # the known digits keep their scenes' layout: a closed-set val scene with no 8 or 9 is the same
    closed = str(tmp_path / "closed")
    digitscenes.ensure_digitscenes(closed, 30, 30, 32)
    same = 0
    for (image, label), (closed_image, closed_label) in zip(dataset_pairs("digitscenes", root, "val"),
                                                            dataset_pairs("digitscenes", closed, "val")):
        a, b = cv2.imread(label, cv2.IMREAD_UNCHANGED), cv2.imread(closed_label, cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(np.where(a == 254, b, a), b)  # 254 exactly where an 8 or 9 is
        assert set(np.unique(b[a == 254])) <= {9, 10}
        same += open(image, "rb").read() == open(closed_image, "rb").read()
    assert same == 30  # val scenes draw from every digit, as the closed set's do
    with pytest.raises(ValueError, match=r"data.unknown_index in \[9, 255\)"):
        digitscenes.ensure_digitscenes(root, 30, 30, 32, unknown_digits=[8, 9], unknown_index=3)
    # the data set accepts the unknown value only when told it
    pairs = dataset_pairs("digitscenes", root, "val")
    dataset = SegmentationDataset(pairs, 9, EvalTransform(MEAN, STD), unknown_index=254)
    assert any((dataset[i][1] == 254).any() for i in range(30))
    with pytest.raises(SampleError, match=r"value\(s\) \[254\] outside \[0, 9\)"):
        [SegmentationDataset(pairs, 9, EvalTransform(MEAN, STD))[i] for i in range(30)]


def test_digitscenes_train_and_val_use_disjoint_digit_images():
    train, val = digitscenes.digit_pool(1797, "train"), digitscenes.digit_pool(1797, "val")
    assert not set(train) & set(val)
    assert len(train) + len(val) == 1797


def test_unreadable_image_names_the_file_or_is_skipped_and_counted(tmp_path):
    _write_pair(tmp_path, "good", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    _write_pair(tmp_path, "bad", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))
    bad = tmp_path / "images" / "bad.png"
    bad.write_bytes(bad.read_bytes()[:20])  # truncated
    with pytest.raises(SampleError, match="bad.png"):
        _dataset(tmp_path)[0]
    dataset = _dataset(tmp_path, on_error="skip")
    batch = collate([dataset[0], dataset[1]])
    assert batch["skipped"] == 1 and batch["images"].shape == (1, 3, 8, 8)


def test_out_of_range_label_names_the_file_and_value(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    label[0, 0], label[1, 1] = 17, 255
    _write_pair(tmp_path, "x", np.zeros((8, 8, 3), np.uint8), label)
    with pytest.raises(SampleError, match=r"labels/x\.png has value\(s\) \[17\]"):
        _dataset(tmp_path)[0]
    assert _dataset(tmp_path, num_classes=18)[0][1][1, 1] == 255  # 255 is ignore, not an error


def test_label_of_the_wrong_size_is_an_error(tmp_path):
    _write_pair(tmp_path, "x", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(SampleError, match="is 9x8 but image"):
        _dataset(tmp_path)[0]


def test_reduce_zero_label_maps_zero_to_ignore(tmp_path):
    _write_pair(tmp_path, "x", np.zeros((2, 2, 3), np.uint8), np.array([[0, 1], [150, 2]], np.uint8))
    _, label = _dataset(tmp_path, num_classes=150, reduce_zero_label=True).load(0)
    assert label.tolist() == [[255, 0], [149, 1]]


def test_ade20k_full_reads_16_bit_tiff_labels_with_65535_ignored(tmp_path):
    # MaskFormer's prepare_ade20k_full_sem_seg.py writes uint16 TIFFs: train ids 0..846, 65535 = none.
    from protoseg.data.ade20k_full import ADE20K_FULL_CLASSES
    from protoseg.data.datasets import class_names

    assert len(ADE20K_FULL_CLASSES) == 847 == len(set(ADE20K_FULL_CLASSES))
    assert ADE20K_FULL_CLASSES[0] == "wall" and ADE20K_FULL_CLASSES[2] == "sky"
    assert class_names("ade20k_full", 847) == list(ADE20K_FULL_CLASSES)
    image = tmp_path / "images_detectron2" / "training" / "ADE_train_1.jpg"
    label = tmp_path / "annotations_detectron2" / "training" / "ADE_train_1.tif"
    for path in (image, label):
        os.makedirs(path.parent, exist_ok=True)
    cv2.imwrite(str(image), np.zeros((2, 3, 3), np.uint8))
    cv2.imwrite(str(label), np.array([[0, 255, 846], [65535, 300, 1]], np.uint16))
    pairs = dataset_pairs("ade20k_full", str(tmp_path), "train")
    dataset = SegmentationDataset(pairs, 847, EvalTransform(MEAN, STD), ignore_index=65535)
    _, loaded = dataset.load(0)
    assert loaded.tolist() == [[0, 255, 846], [65535, 300, 1]]
    crop = TrainTransform((4, 4), (1.0, 1.0), False, False, MEAN, STD, 65535)
    _, cropped, _ = SegmentationDataset(pairs, 847, crop, ignore_index=65535)[0]
    assert set(cropped.unique().tolist()) == {0, 1, 255, 300, 846, 65535}  # padding is ignore
    cv2.imwrite(str(label), np.array([[0, 847, 846], [65535, 300, 1]], np.uint16))
    with pytest.raises(SampleError, match=r"ADE_train_1.tif has value\(s\) \[847\]"):
        dataset.load(0)


def test_missing_label_is_reported_at_construction(tmp_path):
    _write_pair(tmp_path, "x", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8))
    os.remove(tmp_path / "labels" / "x.png")
    with pytest.raises(FileNotFoundError, match="no label .*x.png"):
        folder_pairs(str(tmp_path / "images"), str(tmp_path / "labels"))


def test_train_transform_shapes_and_ignore_padding():
    rng = np.random.default_rng(0)
    transform = TrainTransform((24, 40), (0.5, 1.5), True, True, MEAN, STD)
    image, label = transform(np.full((20, 30, 3), 7, np.uint8), np.ones((20, 30), np.uint8), rng)
    assert image.shape == (3, 24, 40) and image.dtype == torch.float32
    assert label.shape == (24, 40) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= {1, 255}
    image, label = random_scale_crop(np.zeros((2, 2, 3), np.float32), np.ones((2, 2), np.uint8), (1.0, 1.0),
                                     (4, 4), MEAN, 255, rng)
    assert (label == 255).sum() == 12 and np.allclose(image[3, 3], MEAN)


def _resize_then_crop(image, label, scale_range, crop_size, mean, ignore_index, rng):
    """random_scale_crop's spec: the whole pair resized, padded, then cropped."""
    scale = rng.uniform(*scale_range)
    h, w = label.shape
    size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    ch, cw = crop_size
    ph, pw = max(ch - size[1], 0), max(cw - size[0], 0)
    image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=[float(v) for v in mean])
    label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ignore_index)
    y, x = int(rng.integers(0, label.shape[0] - ch + 1)), int(rng.integers(0, label.shape[1] - cw + 1))
    return image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


@pytest.mark.parametrize("label_dtype,ignore", [(np.uint8, 255), (np.int32, 65535)])
def test_random_scale_crop_is_resize_then_crop(label_dtype, ignore):
    # Pure noise, the worst case for the image: its values jump by up to 255 between pixels.
    rng = np.random.default_rng(0)
    differing = []
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        crop = tuple(int(v) for v in rng.integers(1, 200, 2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 1000, (h, w)).astype(label_dtype)
        scales, seed = (0.25, 3.0), int(rng.integers(1 << 31))
        got = random_scale_crop(image, label, scales, crop, MEAN, ignore, np.random.default_rng(seed))
        expected = _resize_then_crop(image, label, scales, crop, MEAN, ignore, np.random.default_rng(seed))
        np.testing.assert_array_equal(got[1], expected[1], strict=True)  # labels to the bit
        assert got[0].shape == expected[0].shape and got[0].dtype == np.uint8
        difference = np.abs(got[0].astype(int) - expected[0])
        assert difference.max() <= 1  # image within 1 of 255
        differing.append(difference.mean())
    assert np.mean(differing) < 0.2  # the pixels one apart are a minority


def test_wrap_hue_gives_the_floats_of_remainder():
    rng = np.random.default_rng(0)
    edges = [np.nextafter(np.float32(v), np.float32(d))
             for v in (-360, -36, 0, 360, 396, 720) for d in (-1e9, 1e9)]
    hue = np.concatenate([np.float32([-359.5, 0, 359.99997, 360, 719.5]), np.float32(edges[1:-1]),
                          -np.logspace(-45, 2.5, 2000, dtype=np.float32),  # tiny negatives: + 360 gives 360
                          360 + np.logspace(-5, 2.5, 2000, dtype=np.float32),
                          rng.uniform(-360, 720, 100_000).astype(np.float32)])
    wrapped = hue.copy()
    wrap_hue(wrapped)
    np.testing.assert_array_equal(wrapped.view(np.uint32), np.remainder(hue, 360).view(np.uint32))


@pytest.mark.parametrize("bgr", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_normalize_image_is_the_formula_to_the_bit(bgr, dtype):
    rgb = (np.random.default_rng(0).random((7, 9, 3)) * 255).astype(dtype)[:, ::-1]  # any strides
    expected = (torch.from_numpy(rgb.copy()).float() - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
    expected = expected.permute(2, 0, 1)
    image = normalize_image(rgb, MEAN, STD, bgr)
    assert image.is_contiguous() and torch.equal(image, expected.flip(0) if bgr else expected)


def test_train_sampler_resumes_and_shards_global_batches():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(TrainSampler(10, 4, seed=3, rank=0, world_size=1), 4 * 7)
    assert take(TrainSampler(10, 4, seed=3, rank=0, world_size=1, start_iter=5), 8) == full[20:28]
    # per epoch: 2 batches of 4 out of 10 samples, no repeats within an epoch
    assert len({i for i, _ in full[:8]}) == 8 and {e for _, e in full[:8]} == {0}
    r0 = take(TrainSampler(10, 4, seed=3, rank=0, world_size=2), 2 * 7)
    r1 = take(TrainSampler(10, 4, seed=3, rank=1, world_size=2), 2 * 7)
    for j in range(7):
        assert r0[2 * j:2 * j + 2] + r1[2 * j:2 * j + 2] == full[4 * j:4 * j + 4]
    with pytest.raises(ValueError, match="divisible"):
        TrainSampler(10, 3, seed=0, rank=0, world_size=2)


class _OpenCVThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        threads = len(os.listdir("/proc/self/task"))
        cv2.resize(np.zeros((256, 256, 3), np.uint8), (512, 512))  # starts OpenCV's pool if it has one
        return cv2.getNumThreads(), len(os.listdir("/proc/self/task")) - threads


def _worker_init_or_die(worker_id):
    signal.alarm(30)  # a worker hung in _worker_init dies (the loader raises) rather than outlive the test
    _worker_init(worker_id)
    signal.alarm(0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_loader_workers_run_opencv_on_one_thread():
    # This process starts OpenCV's pool first, as a trainer's may (generating DigitScenes): the
    # workers fork with its state but not its threads, and must not stop them (a worker calling
    # cv2.setNumThreads(1) waits forever to join them).
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((256, 256, 3), np.uint8), (512, 512))
    try:
        loader = torch.utils.data.DataLoader(_OpenCVThreads(), batch_size=None, num_workers=1,
                                             worker_init_fn=_worker_init_or_die)
        assert list(loader) == [[1, 0]]  # one OpenCV thread, and resizing started no other
    finally:
        cv2.setNumThreads(-1)  # OpenCV's default


@pytest.mark.parametrize("dataset,image,label", [
    ("cityscapes", "leftImg8bit/val/aachen/a_000001_leftImg8bit.png", "gtFine/val/aachen/a_000001_gtFine_labelTrainIds.png"),
    ("ade20k", "images/validation/ADE_val_1.jpg", "annotations/validation/ADE_val_1.png"),
    ("coco_stuff", "images/val2017/0001.jpg", "annotations/val2017/0001_labelTrainIds.png"),
    ("ade20k_full", "images_detectron2/validation/ADE_1.jpg", "annotations_detectron2/validation/ADE_1.tif"),
    ("folder", "images/val/x.jpg", "labels/val/x.png"),
])
def test_dataset_layouts(tmp_path, dataset, image, label):
    for rel in (image, label):
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), np.zeros((2, 2, 3) if rel == image else (2, 2), np.uint8))
    assert dataset_pairs(dataset, str(tmp_path), "val") == [(str(tmp_path / image), str(tmp_path / label))]
