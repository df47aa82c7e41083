"""OpenCV transforms on (image [H, W, 3] uint8/float32 RGB, label [H, W] uint8) pairs.

Every random transform takes an explicit `np.random.Generator`; the dataset derives one per
sample from (seed, epoch, index), so augmentation does not depend on worker processes or on
global RNG state and a resumed run sees exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch


@dataclass
class TrainTransform:
    """Random scale, crop with ignore padding, horizontal flip, photometric jitter, normalise."""

    crop_size: tuple[int, int]  # (height, width)
    scale_range: tuple[float, float]
    flip: bool
    photometric: bool
    mean: np.ndarray  # [3] in the images' RGB order, 0-255
    std: np.ndarray
    ignore_index: int = 255
    bgr: bool = False  # the network takes the channels as B, G, R

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        image, label = random_scale_crop(image, label, self.scale_range, self.crop_size, self.mean,
                                         self.ignore_index, rng)
        if self.flip and rng.random() < 0.5:
            # Copies, not [:, ::-1] views: numpy runs every later pass over a negative-stride view
            # (the float conversion, the labels' int64 copy) element by element, without SIMD.
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        if self.photometric:
            image = photometric_distortion(image, rng)
        return to_tensors(image, label, self.mean, self.std, self.bgr)


@dataclass
class EvalTransform:
    """Evaluation and prediction: normalise only (protoseg/engine/predict.py does the rest)."""

    mean: np.ndarray  # [3] in the images' RGB order, 0-255
    std: np.ndarray
    bgr: bool = False  # the network takes the channels as B, G, R

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None):
        return to_tensors(image, label, self.mean, self.std, self.bgr)

    def image(self, image: np.ndarray) -> torch.Tensor:
        """[H, W, 3] RGB -> [3, H, W] float32, exactly as for an evaluated sample."""
        return normalize_image(image, self.mean, self.std, self.bgr)


def normalization(cfg) -> dict:
    """The transforms' mean and std (in the images' RGB order) and `bgr`, from a Config's
    data.mean and data.std (in the network's channel order) and data.channel_order."""
    bgr = cfg.data.channel_order == "bgr"
    order = slice(None, None, -1 if bgr else 1)
    return {"mean": np.asarray(cfg.data.mean, np.float32)[order],
            "std": np.asarray(cfg.data.std, np.float32)[order], "bgr": bgr}


def random_scale_crop(image, label, scale_range, crop_size, mean, ignore_index, rng):
    """A random crop (height, width) of (image, label) resized by a random scale, padded with the
    mean colour and ignore where the scaled pair is smaller than the crop.

    Only the crop is computed, not the whole scaled pair (a 2048x1024 image at scale 2 is 16x
    the pixels of a 1024x512 crop). The labels are bitwise those of cv2.resize INTER_NEAREST
    then cropping; the image is the bilinear resample cv2.resize INTER_LINEAR computes, from
    warpAffine at the same source positions, within 1 of it per uint8 value (the two round their
    weights differently: tests/test_data.py).
    """
    h, w = label.shape
    ch, cw = crop_size
    scale = rng.uniform(*scale_range)
    sh, sw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))  # the scaled size
    y, x = int(rng.integers(0, max(sh, ch) - ch + 1)), int(rng.integers(0, max(sw, cw) - cw + 1))
    vh, vw = min(ch, sh - y), min(cw, sw - x)  # the crop's part inside the scaled pair
    # Scaled pixel (i, j) as cv2.resize maps it to the source, with fx = 1 / (sw / w) as resize
    # computes it: bilinear at ((j + 0.5) * fx - 0.5, (i + 0.5) * fy - 0.5) with edge pixels
    # replicated; nearest at (floor(j * fx), floor(i * fy)) clamped to the last pixel.
    fx, fy = 1.0 / (sw / w), 1.0 / (sh / h)
    to_source = np.array([[fx, 0.0, (x + 0.5) * fx - 0.5], [0.0, fy, (y + 0.5) * fy - 0.5]])
    image = cv2.warpAffine(image, to_source, (vw, vh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REPLICATE)
    rows = np.minimum(np.floor(np.arange(y, y + vh) * fy).astype(np.intp), h - 1)
    cols = np.minimum(np.floor(np.arange(x, x + vw) * fx).astype(np.intp), w - 1)
    label = label.take(rows, axis=0).take(cols, axis=1)
    if vh < ch or vw < cw:
        image = cv2.copyMakeBorder(image, 0, ch - vh, 0, cw - vw, cv2.BORDER_CONSTANT,
                                   value=[float(v) for v in mean])
        label = cv2.copyMakeBorder(label, 0, ch - vh, 0, cw - vw, cv2.BORDER_CONSTANT, value=ignore_index)
    return image, label


def photometric_distortion(image, rng):
    """Brightness, contrast, saturation and hue jitter, each applied with probability 1/2:
    [H, W, 3] RGB 0-255 -> a new [H, W, 3] float32 array (the arithmetic is in place on it)."""
    image = image.astype(np.float32)
    if rng.random() < 0.5:
        image += rng.uniform(-32, 32)
    if rng.random() < 0.5:
        image *= rng.uniform(0.5, 1.5)
    np.clip(image, 0, 255, out=image)
    do_saturation, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_saturation or do_hue:
        image /= 255.0
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # float: H in [0, 360), S, V in [0, 1]
        if do_saturation:
            saturation = hsv[..., 1]
            saturation *= rng.uniform(0.5, 1.5)
            np.clip(saturation, 0, 1, out=saturation)
        if do_hue:
            hue = hsv[..., 0]
            hue += rng.uniform(-36, 36)
            wrap_hue(hue)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        image *= 255.0
    return image


def wrap_hue(hue: np.ndarray) -> None:
    """hue % 360 in place, for hue in [-360, 720): the floats np.remainder gives (360 for a tiny
    negative hue too), without np.remainder's division. -0.0 stays -0.0 (np.remainder: +0.0);
    a hue in [0, 360) plus a nonzero offset is never -0.0."""
    np.subtract(hue, 360, out=hue, where=hue >= 360)
    np.add(hue, 360, out=hue, where=hue < 0)


def to_tensors(image, label, mean, std, bgr=False):
    return normalize_image(image, mean, std, bgr), torch.from_numpy(label.astype(np.int64, order="C"))


def normalize_image(image, mean, std, bgr=False) -> torch.Tensor:
    """[H, W, 3] RGB (0-255) -> [3, H, W] float32, (image - mean) / std with mean and std in RGB
    order; with `bgr` the channels are then reversed (B, G, R)."""
    channels = np.asarray(image).transpose(2, 0, 1)
    if bgr:
        channels, mean, std = channels[::-1], mean[::-1], std[::-1]
    # One transposing copy into float32, then in place: the same float32 operations as
    # (x - mean) / std on [H, W, 3], without two fresh arrays and a second, transposing copy.
    out = np.array(channels, np.float32, order="C")
    out -= mean[:, None, None]
    out /= std[:, None, None]
    return torch.from_numpy(out)
