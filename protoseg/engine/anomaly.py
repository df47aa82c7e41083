"""Open-set (anomaly) evaluation: how well a per-pixel score separates pixels of classes unseen
in training (labelled data.unknown_index, the positives) from pixels of the known classes (the
negatives). The score is protoseg/engine/predict.py's open-set score: 1 - the largest cosine to
any prototype, or 1 - the largest softmax probability for the softmax baseline.

Metrics: AUROC and average precision (scikit-learn), and the false-positive rate at 95%
true-positive rate (the share of known pixels scored at least as high as the threshold that
first flags 95% of the unknown ones)."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
from torch import Tensor


def anomaly_metrics(score: np.ndarray, unknown: np.ndarray) -> dict:
    """score [N] float, unknown [N] bool (True: a pixel of an unseen class) -> "AUROC", "AP",
    "FPR@95", and the pixel counts "unknown_pixels", "known_pixels". Both kinds must occur."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    score, unknown = np.asarray(score, np.float64).ravel(), np.asarray(unknown, bool).ravel()
    if score.shape != unknown.shape:
        raise ValueError(f"score and unknown must have the same length (got {score.size} and {unknown.size})")
    positives = int(unknown.sum())
    if positives == 0 or positives == unknown.size:
        raise ValueError(f"anomaly metrics need unknown and known pixels (got {positives} unknown of "
                         f"{unknown.size}); does the val split label unseen classes with data.unknown_index?")
    # Every threshold kept: dropping collinear points could skip the one where TPR reaches 95%.
    fpr, tpr, _ = roc_curve(unknown, score, drop_intermediate=False)
    return {"AUROC": float(roc_auc_score(unknown, score)),
            "AP": float(average_precision_score(unknown, score)),
            "FPR@95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
            "unknown_pixels": positives, "known_pixels": int(unknown.size - positives)}


class AnomalyEvaluator:
    """Collects (score, unknown?) of the labelled pixels over batches (reset / process /
    evaluate, like SegEvaluator): unknown = label == unknown_index, known = label in [0, K);
    ignore and other values take no part. At most `max_pixels_per_image` pixels of an image are
    kept (a seeded uniform sample), which bounds memory on large images; `evaluate` gathers
    the ranks' pixels."""

    def __init__(self, num_classes: int, unknown_index: int, max_pixels_per_image: int = 50_000,
                 seed: int = 0):
        if unknown_index < num_classes:
            raise ValueError(f"unknown_index must be a label value outside [0, {num_classes}) "
                             f"(got {unknown_index}; set data.unknown_index)")
        self.num_classes, self.unknown_index = num_classes, unknown_index
        self.max_pixels_per_image, self.seed = max_pixels_per_image, seed
        self.reset()

    def reset(self) -> None:
        self.scores: list[np.ndarray] = []
        self.unknown: list[np.ndarray] = []
        self.rng = np.random.default_rng(self.seed)

    def process(self, score: Tensor, label: Tensor) -> None:
        """score [B, H, W] float, label [B, H, W] class ids."""
        for s, y in zip(score.detach().float().cpu().numpy(), label.cpu().numpy()):
            s, y = s.ravel(), y.ravel()
            unknown = y == self.unknown_index
            keep = np.flatnonzero(unknown | ((y >= 0) & (y < self.num_classes)))
            if keep.size > self.max_pixels_per_image:
                keep = np.sort(self.rng.choice(keep, self.max_pixels_per_image, replace=False))
            self.scores.append(s[keep])
            self.unknown.append(unknown[keep])

    def evaluate(self) -> dict:
        parts = (np.concatenate(self.scores or [np.zeros(0)]),
                 np.concatenate(self.unknown or [np.zeros(0, bool)]))
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = tuple(np.concatenate([g[i] for g in gathered]) for i in range(2))
        return anomaly_metrics(*parts)


def format_anomaly(results: dict) -> str:
    return (f"open set: AUROC {100 * results['AUROC']:.2f}   AP {100 * results['AP']:.2f}   "
            f"FPR@95 {100 * results['FPR@95']:.2f}   ({results['unknown_pixels']} unknown, "
            f"{results['known_pixels']} known pixels)")

