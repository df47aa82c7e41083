"""What the prototypes do, per class: how its correctly classified pixels spread over its M
prototypes (each prototype's share by nearest prototype, and the normalised entropy of the
shares: 1 = evenly used, 0 = one prototype takes all), how many prototypes win no pixel
("dead"), and the mean pairwise cosine between the class's prototypes (1 = collapsed).

The counts come from the classifier: `PrototypeClassifier.usage` after a training step (the
training batch), or `val_usage` over a loader (the evaluation). The trainer logs both
(protoseg/engine/trainer.py); tools/visualize.py draws them.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from protoseg.engine.anomaly import vmf_concentration, vmf_log_normalizer
from protoseg.engine.predict import autocast, eval_batches, pad_to_multiple, size_divisor
from protoseg.models.head import downsample_labels, to_pixels
from protoseg.models.prototype import usage_buckets, usage_counts


def usage_statistics(counts: Tensor, prototypes: Tensor, class_names: list[str]) -> dict:
    """counts [K, M] (pixels won by each prototype), prototypes [K, M, D] -> per-class
    "pixels", "shares" [M], "entropy" (NaN for a class without pixels or with M = 1), "dead"
    (None without pixels) and "cosine" (mean over the M(M-1)/2 pairs; NaN for M = 1), and the
    summary: "entropy" (mean over classes with pixels), "entropy_min" and its class, "dead" of
    "prototypes" (M times the classes with pixels), "cosine" (mean over classes)."""
    counts = counts.detach().double().cpu()
    k, m = counts.shape
    if prototypes.shape[:2] != (k, m):
        raise ValueError(f"prototypes must be [K, M, D] = [{k}, {m}, D] like counts "
                         f"(got {list(prototypes.shape)})")
    unit = F.normalize(prototypes.detach().double().cpu(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # [K, M, M]
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)  # each pair twice
    cosine = off_diagonal / (m * (m - 1)) if m > 1 else torch.full((k,), math.nan)
    pixels = counts.sum(1)
    shares = counts / pixels.clamp(min=1).unsqueeze(1)
    # p log(1/p) rather than -p log p: a single prototype gives 0.0, not -0.0
    terms = torch.where(shares > 0, shares * shares.clamp(min=1e-300).reciprocal().log(),
                        torch.zeros_like(shares))
    entropy = terms.sum(1) / math.log(m) if m > 1 else torch.full((k,), math.nan)
    entropy = torch.where(pixels > 0, entropy, torch.full_like(entropy, math.nan))
    dead = (counts == 0).sum(1)
    classes = {}
    for i, name in enumerate(class_names):
        used = bool(pixels[i] > 0)
        classes[name] = {"pixels": int(pixels[i]), "shares": [float(s) for s in shares[i]],
                         "entropy": float(entropy[i]), "dead": int(dead[i]) if used else None,
                         "cosine": float(cosine[i])}
    used = pixels > 0
    summary = {"entropy": math.nan, "entropy_min": math.nan, "entropy_min_class": None,
               "dead": int(dead[used].sum()), "prototypes": int(used.sum()) * m,
               "cosine": float(cosine.mean())}
    if used.any() and m > 1:
        low = int(torch.where(used, entropy, torch.full_like(entropy, math.inf)).argmin())
        summary.update(entropy=float(entropy[used].mean()), entropy_min=float(entropy[low]),
                       entropy_min_class=class_names[low])
    return {**summary, "classes": classes}


def format_statistics(stats: dict) -> str:
    """One line: prototypes: usage entropy 0.83 (min 0.41, class 7), dead 3/110, intra-class
    cosine 0.38."""
    low = ""
    if stats["entropy_min_class"]:
        low = f" (min {stats['entropy_min']:.2f}, class {stats['entropy_min_class']})"
    return (f"prototypes: usage entropy {stats['entropy']:.2f}{low}, "
            f"dead {stats['dead']}/{stats['prototypes']}, intra-class cosine {stats['cosine']:.2f}")


def summary_scalars(stats: dict) -> dict[str, float]:
    """The summary numbers of `usage_statistics` (for TensorBoard and the training log)."""
    return {key: float(stats[key]) for key in ("entropy", "entropy_min", "dead", "cosine")}


def feature_labels(labels: Tensor, size: tuple[int, int], num_classes: int, ignore_index: int) -> Tensor:
    """[B, H, W] labels -> [B, h, w] at feature resolution by nearest neighbour, as the training
    step sees them, with ignore and any value outside [0, K) (unknown classes) as -1."""
    y = downsample_labels(labels, size)
    return torch.where((y == ignore_index) | (y < 0) | (y >= num_classes), torch.full_like(y, -1), y)


def _labelled_features(model, loader, device: torch.device, amp: str):
    """For each batch of `loader` (whole images, one scale): (model.embed's maps, the labels at
    feature resolution [B, h, w] with -1 for ignore and unknown). `model`: a prototype Segmentor."""
    divisor = size_divisor(model)
    for batch in eval_batches(model, loader):
        images = pad_to_multiple(batch["images"].to(device), divisor, 0.0)
        labels = pad_to_multiple(batch["labels"].to(device), divisor, model.ignore_index)
        with autocast(device, amp):
            out = model.embed(images)
        yield out, feature_labels(labels, out["logits"].shape[-2:], model.classifier.num_classes, model.ignore_index)


@torch.no_grad()
def val_usage(model, loader, device: torch.device, amp: str = "none") -> Tensor:
    """[K, M] int64: over the images of `loader` (whole, one scale) and summed over ranks, the
    pixels each prototype wins among the correctly classified pixels of its class, at feature
    resolution (the pixels the update would use). `model` is a prototype Segmentor."""
    classifier = model.classifier
    counts = torch.zeros(classifier.num_classes, classifier.num_prototypes, dtype=torch.int64, device=device)
    for out, y in _labelled_features(model, loader, device, amp):
        counts += usage_counts(to_pixels(out["nearest"]), out["logits"].argmax(1).view(-1), y.view(-1),
                               classifier.num_prototypes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts.cpu()


@torch.no_grad()
def fit_vmf(model, loader, device: torch.device, amp: str = "none") -> dict:
    """The von Mises-Fisher fit of the open-set score "vmf" (protoseg/engine/anomaly.py): one
    pass over `loader` (whole images, one scale; summed over ranks) collects, for each
    prototype, the correctly classified pixels of its class it is nearest to (the pixels of
    `val_usage`), and fits the concentration of their unit embeddings around it. Returns
    "kappa", "log_norm", "mean_cosine" [K, M] float64 (kappa 0 and log_norm -inf where a
    prototype has no pixel: it never wins), "count" [K, M] int64, and "prototypes" [K, M, D],
    the unit prototypes it was fitted for."""
    classifier = model.classifier
    k, m = classifier.num_classes, classifier.num_prototypes
    count = torch.zeros(k * m + 1, dtype=torch.float64, device=device)
    cosine_sum = torch.zeros(k * m + 1, dtype=torch.float64, device=device)
    for out, y in _labelled_features(model, loader, device, amp):
        y = y.view(-1)
        bucket = usage_buckets(to_pixels(out["nearest"]), out["logits"].argmax(1).view(-1), y, m)
        # A correctly classified pixel's best cosine in its class is its cosine to that prototype.
        cosine = to_pixels(out["similarity"]).gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
        count.index_add_(0, bucket, torch.ones_like(cosine, dtype=torch.float64))
        cosine_sum.index_add_(0, bucket, cosine.double())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        dist.all_reduce(cosine_sum)
    count, cosine_sum = count[:-1].view(k, m).cpu(), cosine_sum[:-1].view(k, m).cpu()
    used = count > 0
    mean_cosine = torch.where(used, cosine_sum / count.clamp(min=1), torch.zeros_like(cosine_sum))
    kappa = torch.zeros_like(mean_cosine)
    log_norm = torch.full_like(mean_cosine, -math.inf)
    if used.any():
        kappa[used] = torch.from_numpy(vmf_concentration(mean_cosine[used].numpy(), classifier.dim))
        log_norm[used] = torch.from_numpy(vmf_log_normalizer(kappa[used].numpy(), classifier.dim))
    return {"kappa": kappa, "log_norm": log_norm, "count": count.long(), "mean_cosine": mean_cosine,
            "prototypes": F.normalize(classifier.prototypes.detach().float(), dim=-1).cpu()}
