"""Semantic segmentation metrics from a confusion matrix (reset / process / evaluate)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import Tensor

from protoseg.engine.checkpoint import atomic_write


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """[K, K] int64 counts, rows = ground truth, columns = prediction, over pixels whose label
    is not ignore. Labels outside [0, K) that are not ignore are an error."""
    label = label.reshape(-1)
    pred = pred.reshape(-1)
    valid = label != ignore_index
    label, pred = label[valid].long(), pred[valid].long()
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        bad = label[(label < 0) | (label >= num_classes)].unique()[:8].tolist()
        raise ValueError(f"label values {bad} are outside [0, {num_classes}) and not ignore ({ignore_index})")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes)


def metrics_from_confusion(cm: Tensor, class_names: list[str]) -> dict:
    """mIoU, mAcc (mean class recall) and aAcc (pixel accuracy), plus per-class IoU/Acc.
    Classes absent from both ground truth and prediction have IoU NaN and are left out of the
    means (as detectron2 and mmseg do)."""
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    predicted = cm.sum(0)
    union = gt + predicted - tp
    iou = tp / union  # 0/0 -> NaN for classes seen nowhere
    acc = tp / gt
    present = gt > 0
    return {
        "mIoU": float(iou[union > 0].mean()) if (union > 0).any() else float("nan"),
        "mAcc": float(acc[present].mean()) if present.any() else float("nan"),
        "aAcc": float(tp.sum() / cm.sum()) if cm.sum() > 0 else float("nan"),
        "IoU": {name: float(v) for name, v in zip(class_names, iou)},
        "Acc": {name: float(v) for name, v in zip(class_names, acc)},
        "pixels": int(cm.sum()),
    }


class SegEvaluator:
    """Accumulates a confusion matrix over batches; `evaluate` sums it over all ranks. Pixels
    labelled `unknown_index` (classes unseen in training, an open-set val split) are left out
    like ignored ones: the metrics are over the known classes."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None, ignore_index: int = 255,
                 unknown_index: int = -1):
        self.num_classes = num_classes
        self.class_names = class_names or [f"class_{k}" for k in range(num_classes)]
        self.ignore_index, self.unknown_index = ignore_index, unknown_index
        self.reset()

    def reset(self) -> None:
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def process(self, pred: Tensor, label: Tensor) -> None:
        """pred, label: [B, H, W] (or any matching shapes) of class ids."""
        if self.unknown_index >= 0:
            label = label.masked_fill(label == self.unknown_index, self.ignore_index)
        self.cm += confusion_matrix(pred, label, self.num_classes, self.ignore_index).cpu()

    def evaluate(self) -> dict:
        cm = self.cm
        if dist.is_available() and dist.is_initialized():
            cm = cm.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(cm)
            cm = cm.cpu()
        return metrics_from_confusion(cm, self.class_names)


def format_table(results: dict) -> str:
    names = list(results["IoU"])
    width = max(12, max(len(n) for n in names) + 2)
    lines = [f"{'class':<{width}}{'IoU':>8}{'Acc':>8}", "-" * (width + 16)]
    for name in names:
        lines.append(f"{name:<{width}}{100 * results['IoU'][name]:>8.2f}{100 * results['Acc'][name]:>8.2f}")
    lines.append("-" * (width + 16))
    lines.append(f"mIoU {100 * results['mIoU']:.2f}   mAcc {100 * results['mAcc']:.2f}   "
                 f"aAcc {100 * results['aAcc']:.2f}")
    return "\n".join(lines)


def save_results(results: dict, path: str) -> None:
    """As JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode()))
