"""Open-set (anomaly) scores and their evaluation: how well a per-pixel score separates pixels of
classes unseen in training (labelled data.unknown_index, the positives) from pixels of the known
classes (the negatives). Every score is higher for pixels less like any known class.

Scores of any classifier, from its logits [K] (ProtoSeg's: the class LayerNorm of the per-class
best cosines, which its cross-entropy trains):
- "msp": 1 - the largest softmax probability;
- "max_logit": - the largest logit;
- "energy": - logsumexp of the logits.
Scores of the prototype classifier alone, from the pixel's unit embedding and the K*M prototypes:
- "cosine": 1 - the largest cosine to any prototype;
- "proto_energy": - logsumexp over every prototype of cosine / temperature (the PPC logits);
- "vmf": - the largest log-likelihood under a von Mises-Fisher distribution per prototype, its
  mean direction the prototype and its concentration fitted on the correctly classified
  training pixels it is nearest to (protoseg/engine/prototypes.py `fit_vmf`, tools/fit_open_set.py).
The logit scores are computed from the logits at image resolution; the prototype scores at
feature resolution, then resized bilinearly as the logits are. Each forward pass of the test
protocol gives its own score maps, averaged over windows and views like the logits
(protoseg/engine/predict.py).

Metrics: AUROC and average precision (scikit-learn), and the false-positive rate at 95% true-positive
rate (the share of known pixels scored at least as high as the threshold that first flags 95% of
the unknown ones).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_SCORES = ("msp", "max_logit", "energy")
PROTOTYPE_SCORES = ("cosine", "proto_energy", "vmf")
SCORES = LOGIT_SCORES + PROTOTYPE_SCORES


def offered_scores(model: nn.Module) -> tuple[str, ...]:
    """The scores `model` offers: every one for the prototype classifier, the logit scores else."""
    return SCORES if getattr(model, "uses_prototypes", False) else LOGIT_SCORES


def check_scores(names, model: nn.Module) -> None:
    """Raise ValueError naming a score that `model` cannot give."""
    for name in names:
        if name not in SCORES:
            raise ValueError(f"unknown open-set score {name!r} (scores: {', '.join(SCORES)})")
        if name not in offered_scores(model):
            raise ValueError(f"open-set score {name} needs the prototype classifier (this model is a "
                             f"softmax classifier; its scores: {', '.join(LOGIT_SCORES)})")
    if len(set(names)) != len(names):
        raise ValueError(f"open-set scores named twice: {list(names)}")


def logit_scores(logits: Tensor, names) -> list[Tensor]:
    """logits [B, K, ...] -> one [B, ...] float32 map per name in LOGIT_SCORES."""
    logits = logits.float()
    maps = {"msp": lambda: 1 - logits.softmax(dim=1).amax(dim=1),
            "max_logit": lambda: -logits.amax(dim=1),
            "energy": lambda: -logits.logsumexp(dim=1)}
    return [maps[name]() for name in names]


# Pixels per block of prototype_scores: a [rows, K*M] float32 block of at most 2^24 entries
# (64 MB), so that the scores never hold the whole [pixels, K*M] map (GBs at K*M = 8470).
_SCORE_BLOCK = 1 << 24


def prototype_scores(embedding: Tensor, prototypes: Tensor, temperature: float, names,
                     fit: dict | None = None) -> list[Tensor]:
    """embedding [B, D, ...] unit pixel embeddings, prototypes [K, M, D] unit -> one [B, ...]
    float32 map per name in PROTOTYPE_SCORES (fit: `fit_vmf`'s, for "vmf"), computed over blocks of
    pixels."""
    d = embedding.shape[1]
    x = embedding.float().movedim(1, -1)
    shape = x.shape[:-1]  # [B, ...]
    p = prototypes.float().reshape(-1, d)  # [K*M, D], row k * M + m
    if "vmf" in names:
        kappa, log_norm = (fit[key].to(p.device, torch.float32).reshape(-1) for key in ("kappa", "log_norm"))
    maps = {"cosine": lambda c: 1 - c.amax(dim=1),
            "proto_energy": lambda c: -(c / temperature).logsumexp(dim=1),
            "vmf": lambda c: -(log_norm + kappa * c).amax(dim=1)}
    rows = max(1, _SCORE_BLOCK // p.shape[0])
    blocks = [[maps[name](cosine) for name in names]
              for cosine in (chunk @ p.t() for chunk in x.reshape(-1, d).split(rows))]
    return [torch.cat([block[i] for block in blocks]).view(shape) for i in range(len(names))]


def score_maps(model: nn.Module, images: Tensor, names, fit: dict | None = None) -> Tensor:
    """One forward pass of a Segmentor in eval mode: [B, K + S, H, W], the logits at the size of
    `images` followed by the S score maps of `names` (SCORES) in that order."""
    size = images.shape[-2:]
    if not getattr(model, "uses_prototypes", False):
        logits = model(images)["logits"]
        return torch.cat([logits] + [s.unsqueeze(1).to(logits.dtype) for s in logit_scores(logits, names)], dim=1)
    maps = model.embed(images)
    logits = model.upsample(maps["logits"], size)
    classifier = model.classifier
    named = {}
    wanted = [n for n in names if n in PROTOTYPE_SCORES]
    if wanted:
        prototypes = F.normalize(classifier.prototypes, dim=-1)
        low = torch.stack(prototype_scores(maps["embedding"], prototypes, classifier.temperature, wanted, fit), 1)
        low = model.upsample(low, size)
        named.update(zip(wanted, low.unbind(1)))
    wanted = [n for n in names if n in LOGIT_SCORES]
    named.update(zip(wanted, logit_scores(logits, wanted)))
    return torch.cat([logits.float()] + [named[n].unsqueeze(1).float() for n in names], dim=1)


# The von Mises-Fisher distribution on the unit sphere in D dimensions:
# f(x; mu, kappa) = C_D(kappa) exp(kappa mu.x), C_D(kappa) = kappa^(D/2-1) / ((2 pi)^(D/2) I_(D/2-1)(kappa)).

def _log_bessel_i(order: float, x: np.ndarray) -> np.ndarray:
    """log I_order(x), x > 0, from scipy's exponentially scaled Bessel function; where that
    underflows (x much smaller than a large order), the series' leading term, which is then exact
    to many digits."""
    from scipy.special import gammaln, ive

    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore"):
        value = np.log(ive(order, x)) + x
    leading = order * np.log(x / 2) - gammaln(order + 1)
    return np.where(np.isfinite(value), value, leading)


def vmf_log_normalizer(kappa, dim: int) -> np.ndarray:
    """log C_D(kappa) of the von Mises-Fisher density on the unit sphere in `dim` dimensions."""
    kappa = np.asarray(kappa, np.float64)
    nu = dim / 2 - 1
    return nu * np.log(kappa) - dim / 2 * np.log(2 * np.pi) - _log_bessel_i(nu, kappa)


def vmf_concentration(mean_cosine, dim: int, newton_steps: int = 2) -> np.ndarray:
    """The maximum-likelihood concentration kappa of a von Mises-Fisher distribution with a known
    mean direction, from the mean cosine R of the samples to it: the root of
    A_D(kappa) = I_(D/2)(kappa) / I_(D/2-1)(kappa) = R, started at Banerjee et al.'s (JMLR 2005)
    approximation R (D - R^2) / (1 - R^2) and refined by Newton steps (Sra, 2012)."""
    r = np.clip(np.asarray(mean_cosine, np.float64), 1e-6, 1 - 1e-9)
    kappa = r * (dim - r ** 2) / (1 - r ** 2)
    for _ in range(newton_steps):
        a = np.exp(_log_bessel_i(dim / 2, kappa) - _log_bessel_i(dim / 2 - 1, kappa))
        kappa = np.maximum(kappa - (a - r) / (1 - a ** 2 - (dim - 1) / kappa * a), 1e-6)
    return kappa


def fit_path(checkpoint: str) -> str:
    """Where tools/fit_open_set.py stores the fit of `checkpoint`: beside the file it points to
    (a checkpoint_last.pth link resolved), named <checkpoint>.vmf.pt."""
    return os.path.splitext(os.path.realpath(checkpoint))[0] + ".vmf.pt"


def load_fit(path: str, model: nn.Module) -> dict:
    """`fit_vmf`'s result saved at `path`, checked against `model`'s prototypes; ValueError
    naming the file when it is missing, unreadable or made for other prototypes."""
    if not os.path.exists(path):
        raise ValueError(f"open-set score vmf needs its fitted file {path}, which does not exist: "
                         f"run python tools/fit_open_set.py CHECKPOINT first")
    try:
        fit = torch.load(path, map_location="cpu", weights_only=True)
        prototypes = fit["prototypes"]
    except Exception as e:  # a truncated or foreign file: one line naming it
        raise ValueError(f"cannot read the open-set fit {path}: {str(e).splitlines()[0]}") from None
    own = F.normalize(model.classifier.prototypes.detach().float(), dim=-1).cpu()
    if prototypes.shape != own.shape or not torch.equal(prototypes, own):
        raise ValueError(f"the open-set fit {path} was made for other prototypes than this model's: "
                         f"run tools/fit_open_set.py on this checkpoint again")
    return fit


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
    """Collects (scores, unknown?) of the labelled pixels over batches (reset / process /
    evaluate, like SegEvaluator), for the scores `names`: unknown = label == unknown_index,
    known = label in [0, K); ignore and other values take no part. At most
    `max_pixels_per_image` pixels of an image are kept (a seeded uniform sample, the same pixels
    for every score), which bounds memory on large images; `evaluate` gathers the ranks' pixels."""

    def __init__(self, num_classes: int, unknown_index: int, names=("msp",), max_pixels_per_image: int = 50_000,
                 seed: int = 0):
        if unknown_index < num_classes:
            raise ValueError(f"unknown_index must be a label value outside [0, {num_classes}) "
                             f"(got {unknown_index}; set data.unknown_index)")
        self.num_classes, self.unknown_index, self.names = num_classes, unknown_index, tuple(names)
        self.max_pixels_per_image, self.seed = max_pixels_per_image, seed
        self.reset()

    def reset(self) -> None:
        self.scores: list[np.ndarray] = []
        self.unknown: list[np.ndarray] = []
        self.rng = np.random.default_rng(self.seed)

    def process(self, scores: Tensor, label: Tensor) -> None:
        """scores [B, S, H, W] float (S = len(names), in that order), label [B, H, W] class ids."""
        if scores.dim() != 4 or scores.shape[1] != len(self.names):
            raise ValueError(f"scores must be [B, {len(self.names)}, H, W] for {self.names} "
                             f"(got {list(scores.shape)})")
        for s, y in zip(scores.detach().float().cpu().numpy(), label.cpu().numpy()):
            s, y = s.reshape(len(self.names), -1), y.ravel()
            unknown = y == self.unknown_index
            keep = np.flatnonzero(unknown | ((y >= 0) & (y < self.num_classes)))
            if keep.size > self.max_pixels_per_image:
                keep = np.sort(self.rng.choice(keep, self.max_pixels_per_image, replace=False))
            self.scores.append(s[:, keep])
            self.unknown.append(unknown[keep])

    def evaluate(self) -> dict:
        """{score name: anomaly_metrics} over every pixel collected (of every rank)."""
        parts = (np.concatenate(self.scores or [np.zeros((len(self.names), 0))], axis=1),
                 np.concatenate(self.unknown or [np.zeros(0, bool)]))
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = (np.concatenate([g[0] for g in gathered], axis=1), np.concatenate([g[1] for g in gathered]))
        return {name: anomaly_metrics(score, parts[1]) for name, score in zip(self.names, parts[0])}


def format_anomaly(results: dict) -> str:
    """One line per score: open set, <score>: AUROC .. AP .. FPR@95 .."""
    lines = [f"open set, {name:>12}: AUROC {100 * r['AUROC']:.2f}   AP {100 * r['AP']:.2f}   "
             f"FPR@95 {100 * r['FPR@95']:.2f}" for name, r in results.items()]
    first = next(iter(results.values()))
    return "\n".join(lines + [f"({first['unknown_pixels']} unknown, {first['known_pixels']} known pixels)"])
