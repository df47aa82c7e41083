"""What a prediction becomes on disk: class-id PNGs, submission PNGs (Cityscapes label ids),
colourised panels and overlays with a legend. Every file is written atomically (temporary
file, rename), so an interrupted run never leaves a half-written image behind."""

from __future__ import annotations

import os

import cv2
import numpy as np

from protoseg.data.datasets import CAMVID_CLASSES, CAMVID_PALETTE, CITYSCAPES_LABEL_IDS, read_image
from protoseg.engine.checkpoint import atomic_write


# Data sets whose own colours are known, by their class names (protoseg/data/datasets.py).
DATASET_PALETTES = {tuple(CAMVID_CLASSES): CAMVID_PALETTE}


def palette(classes: int | list[str]) -> np.ndarray:
    """[K, 3] uint8 RGB colours for K classes, or for the classes named: a data set's own colours
    where the names are its classes (CamVid's), else the PASCAL VOC bit-interleaving scheme.
    colorize() draws ignore in white."""
    if not isinstance(classes, int):
        known = DATASET_PALETTES.get(tuple(classes))
        if known is not None:
            return np.asarray(known, np.uint8)
        classes = len(classes)
    num_classes = classes
    colours = np.zeros((num_classes, 3), np.uint8)
    for k in range(num_classes):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[k] = (r, g, b)
    return colours


def colorize(label: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 RGB."""
    out = np.full(label.shape + (3,), 255, np.uint8)
    valid = (label != ignore_index) & (label < len(colours))
    out[valid] = colours[label[valid]]
    return out


def write_png(path: str, image: np.ndarray) -> None:
    """[H, W] uint8/uint16 ids or [H, W, 3] uint8 RGB, written atomically (folders created)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise RuntimeError(f"cannot encode {path} as PNG (array {image.dtype} {list(image.shape)})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(encoded.tobytes()))


def class_id_image(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[H, W] class ids as uint8, or uint16 when there are more than 256 classes."""
    return pred.astype(np.uint8 if num_classes <= 256 else np.uint16)


def submission_image(pred: np.ndarray, dataset: str, num_classes: int) -> np.ndarray:
    """The ids a data set's official evaluation reads: Cityscapes label ids (train id ->
    label id), ADE20K's 1..150 (0 is "other"), and the class ids themselves elsewhere."""
    if dataset == "cityscapes":
        if num_classes != len(CITYSCAPES_LABEL_IDS):
            raise ValueError(f"Cityscapes label ids exist for the 19 train ids only (data.num_classes "
                             f"is {num_classes})")
        return np.asarray(CITYSCAPES_LABEL_IDS, np.uint8)[pred]
    if dataset == "ade20k":
        return (pred + 1).astype(np.uint8)
    return class_id_image(pred, num_classes)


def png_name(image_path: str) -> str:
    """<image file stem>.png: for Cityscapes <city>_<seq>_<frame>_leftImg8bit.png, the pattern
    cityscapesscripts and the test server match."""
    return os.path.splitext(os.path.basename(image_path))[0] + ".png"


def overlay(image: np.ndarray, pred: np.ndarray, class_names: list[str], alpha: float = 0.5) -> np.ndarray:
    """The colourised prediction blended over `image` ([H, W, 3] uint8 RGB), with a legend of
    the classes present to its right."""
    colours = palette(class_names)
    colour = colorize(pred, colours, ignore_index=-1)
    blended = (image.astype(np.float32) * (1 - alpha) + colour * alpha).astype(np.uint8)
    present = [int(k) for k in np.unique(pred) if 0 <= k < len(class_names)]
    font, scale, row = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 16
    text_width = max([cv2.getTextSize(class_names[k], font, scale, 1)[0][0] for k in present] or [0])
    legend_w, legend_h = 28 + text_width, 6 + row * len(present)
    height, width = image.shape[:2]
    canvas = np.full((max(height, legend_h), width + legend_w, 3), 255, np.uint8)
    canvas[:height, :width] = blended
    for i, k in enumerate(present):
        top = 4 + i * row
        colour = tuple(int(c) for c in colours[k])
        cv2.rectangle(canvas, (width + 6, top), (width + 17, top + 11), colour, thickness=-1)
        cv2.rectangle(canvas, (width + 6, top), (width + 17, top + 11), (0, 0, 0), thickness=1)
        cv2.putText(canvas, class_names[k], (width + 22, top + 10), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def write_panel(folder: str, image_path: str, label: np.ndarray, pred: np.ndarray, class_names: list[str],
                ignore_index: int = 255) -> None:
    """folder/<image stem>.png: input | ground truth | prediction, colourised side by side."""
    colours = palette(class_names)
    gt = colorize(label, colours, ignore_index)
    shown = read_image(image_path)
    if shown.shape != gt.shape:  # label-sized inputs only; else show the maps alone
        shown = np.zeros_like(gt)
    panel = np.concatenate([shown, gt, colorize(pred, colours, ignore_index)], axis=1)
    write_png(os.path.join(folder, png_name(image_path)), panel)
