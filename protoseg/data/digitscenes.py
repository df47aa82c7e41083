"""DigitScenes: a small segmentation data set generated from scikit-learn's bundled digits.

Each scene is a textured, noisy RGB background with a few handwritten digits (the 8x8 images
of `sklearn.datasets.load_digits`, 1797 of them) pasted at varied sizes and colours. Classes:
0 = background, 1 + d for digit d (11 in all); pixels on a digit's soft edge (where the
upsampled stroke intensity is ambiguous) are labelled 255 (ignore). Train and val scenes use
disjoint digit images (every fifth digit image goes to val).

The open-set variant (`unknown_digits`) leaves those digits out of the training scenes and
labels them `unknown_index` in val; the known digits take the class ids 1, 2, ... in order
(digits 8 and 9 unknown: classes background, 0-7, as before, and 9 classes in all).

Generation is deterministic: scene i of a split depends only on (seed, split, i). It is
written once in the standard layout and then read by the ordinary file loader:
    root/images/<split>/<i:06d>.png   RGB
    root/labels/<split>/<i:06d>.png   uint8 class ids, 255 = ignore
    root/digitscenes.json             the generation parameters (regenerated when they change)
"""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np

IGNORE_INDEX = 255
_SPLITS = {"train": 0, "val": 1}
_VERSION = 3  # bump when the generator's output changes


def class_names(unknown_digits=()) -> list[str]:
    """background and the digits that are not unknown, in class-id order."""
    return ["background"] + [str(d) for d in range(10) if d not in unknown_digits]


def digit_labels(unknown_digits=(), unknown_index: int = -1) -> np.ndarray:
    """[10] the label value of each digit: its class id, or unknown_index."""
    known = [d for d in range(10) if d not in unknown_digits]
    if unknown_digits:
        if not set(unknown_digits) <= set(range(10)):
            raise ValueError(f"data.unknown_digits must be digits 0-9 (got {list(unknown_digits)})")
        if not 1 + len(known) <= unknown_index < IGNORE_INDEX:
            raise ValueError(f"data.unknown_digits needs data.unknown_index in [{1 + len(known)}, "
                             f"{IGNORE_INDEX}): not a class id and not ignore (got {unknown_index})")
    labels = np.full(10, unknown_index, np.int64)
    labels[known] = 1 + np.arange(len(known))
    return labels


def ensure_digitscenes(root: str, scenes_train: int, scenes_val: int, size: int, seed: int = 0,
                       unknown_digits=(), unknown_index: int = -1) -> bool:
    """Generate the data set under `root` unless it is already there with these parameters.

    Returns True when it generated. Writes into a temporary folder and renames it at the end,
    so an interrupted generation leaves nothing that looks complete.
    """
    label_of = digit_labels(unknown_digits, unknown_index)
    params = {"version": _VERSION, "scenes_train": scenes_train, "scenes_val": scenes_val,
              "size": size, "seed": seed}
    if unknown_digits:  # absent for the closed-set data, so their generated folders stay valid
        params.update(unknown_digits=sorted(unknown_digits), unknown_index=unknown_index)
    marker = os.path.join(root, "digitscenes.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return False
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images.astype(np.float32) / 16.0, digits.target
    tmp = root.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in (("train", scenes_train), ("val", scenes_val)):
        pool = digit_pool(len(images), split)
        if split == "train":
            pool = pool[label_of[targets[pool]] != unknown_index]
        os.makedirs(os.path.join(tmp, "images", split))
        os.makedirs(os.path.join(tmp, "labels", split))
        for i in range(count):
            rng = np.random.default_rng([seed, _SPLITS[split], i])
            image, label = make_scene(rng, images, label_of[targets], pool, size)
            name = f"{i:06d}.png"
            cv2.imwrite(os.path.join(tmp, "images", split, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(os.path.join(tmp, "labels", split, name), label)
    with open(os.path.join(tmp, "digitscenes.json"), "w") as f:
        json.dump(params, f)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    os.replace(tmp, root)
    return True


def digit_pool(num_digits: int, split: str) -> np.ndarray:
    """Indices of the digit images a split draws from: every fifth for val, the rest for train."""
    is_val = np.arange(num_digits) % 5 == 0
    return np.flatnonzero(is_val if split == "val" else ~is_val)


def make_scene(rng: np.random.Generator, digit_images: np.ndarray, digit_labels: np.ndarray,
               pool: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image [size, size, 3] uint8 RGB, label [size, size] uint8); digit image k
    is labelled digit_labels[k]."""
    image = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(rng.integers(2, 5)):
        k = pool[rng.integers(len(pool))]
        h = int(rng.integers(round(size * 0.35), round(size * 0.6) + 1))
        w = int(round(h * rng.uniform(0.75, 1.1)))
        # 8x8 intensities in [0, 1] upsampled to the digit's size; strokes are opaque from
        # intensity 0.4 and fade out below.
        ink = np.clip(cv2.resize(digit_images[k], (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)
        alpha = np.clip((ink - 0.1) / 0.3, 0, 1)
        for _attempt in range(10):  # digits do not overlap, so every label is unambiguous
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            if all(y + h <= by or by + bh <= y or x + w <= bx or bx + bw <= x for by, bx, bh, bw in boxes):
                break
        else:
            continue
        boxes.append((y, x, h, w))
        region = image[y:y + h, x:x + w]
        colour = _contrasting_colour(rng, region.mean(axis=(0, 1)))
        region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        sub = label[y:y + h, x:x + w]
        sub[ink >= 0.15] = IGNORE_INDEX  # the ambiguous soft edge
        sub[ink >= 0.3] = digit_labels[k]
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour noise plus oriented stripes, float32 [size, size, 3] in 0-255."""
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    base = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    strength = rng.uniform(0, 40)
    return np.clip(base * 0.6 + 50 + strength * stripes[..., None], 0, 255).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour whose brightness differs from the background's by at least 80."""
    while True:
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if abs(colour.mean() - background.mean()) >= 80:
            return colour
