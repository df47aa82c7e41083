"""Whole-image inference over a loader, metrics, and colourised predictions."""

from __future__ import annotations

import contextlib
import os

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from protoseg.engine.evaluator import SegEvaluator


def autocast(device: torch.device, amp: str):
    """The autocast context for train.amp ("none", "bf16", "fp16")."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"train.amp must be none, bf16 or fp16 (got {amp!r})")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def palette(num_classes: int) -> np.ndarray:
    """[K, 3] uint8 RGB colours (the PASCAL VOC bit-interleaving scheme); ignore is white."""
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


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, evaluator: SegEvaluator, device: torch.device,
                   amp: str = "none", save_dir: str = "", save_limit: int = 0) -> dict:
    """Run `model` (eval mode) over `loader`, accumulate the confusion matrix (summed over
    ranks) and return the metrics. With `save_dir`, writes up to `save_limit` (0: all) images
    as <name>.png: input | ground truth | prediction, colourised."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    colours = palette(evaluator.num_classes)
    saved = 0
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    for batch in loader:
        if "images" not in batch:
            continue
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)["logits"]
        pred = logits.argmax(dim=1)
        evaluator.process(pred, labels)
        if save_dir and (save_limit == 0 or saved < save_limit):
            for i, index in enumerate(batch["indices"].tolist()):
                if save_limit and saved >= save_limit:
                    break
                image_path = loader.dataset.pairs[index][0]
                name = os.path.splitext(os.path.basename(image_path))[0]
                shown = cv2.cvtColor(cv2.imread(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                gt = colorize(labels[i].cpu().numpy(), colours, evaluator.ignore_index)
                pr = colorize(pred[i].cpu().numpy(), colours, evaluator.ignore_index)
                if shown.shape != gt.shape:  # label-sized inputs only; else show the maps alone
                    shown = np.zeros_like(gt)
                panel = np.concatenate([shown, gt, pr], axis=1)
                cv2.imwrite(os.path.join(save_dir, name + ".png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
                saved += 1
    model.train(was_training)
    return evaluator.evaluate()
