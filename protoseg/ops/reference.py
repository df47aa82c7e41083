"""Every protoseg operator in plain PyTorch: the specification, the test oracle and the
benchmark baseline. Written for clarity, not speed: these materialise the [N, K*M] similarity
matrix and loop over classes in Python where the method does.

Shapes: x [N, D]; prototypes [K, M, D]; labels [N] int64 in [0, K) or negative (ignored);
target [N] int64 in [0, K*M) or == ignore_index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Every L2 normalisation divides by max(||x||, NORM_EPS), as F.normalize (the kernels' kNormEps,
# csrc/norm_eps.h).
NORM_EPS = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every op accumulates in: float64 for float64 inputs, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalized(x: torch.Tensor, prototypes: torch.Tensor):
    acc = acc_dtype(x.dtype)
    x_hat = F.normalize(x.to(acc), dim=-1, eps=NORM_EPS)
    p_hat = F.normalize(prototypes.to(acc), dim=-1, eps=NORM_EPS)
    return x_hat, p_hat


def proto_similarity(x: torch.Tensor, prototypes: torch.Tensor):
    """scores [N, K] (dtype of x) = max_m cos(x_n, p_km); index [N, K] int64 = argmax (first)."""
    k, m, d = prototypes.shape
    x_hat, p_hat = _normalized(x, prototypes)
    sim = (x_hat @ p_hat.reshape(k * m, d).t()).view(-1, k, m)
    index = sim.argmax(dim=2)
    scores = sim.gather(2, index.unsqueeze(2)).squeeze(2)
    return scores.to(x.dtype), index


def proto_contrast_loss(x, prototypes, target, temperature: float, ignore_index: int):
    """ppc = mean CE over all K*M prototypes of cos / temperature; ppd = mean (1 - cos_target)^2."""
    k, m, d = prototypes.shape
    x_hat, p_hat = _normalized(x, prototypes)
    valid = target != ignore_index
    if not bool(valid.any()):
        zero = (x.sum() * 0).to(x.dtype)
        return zero, zero.clone()
    logits = x_hat[valid] @ p_hat.reshape(k * m, d).t()
    t = target[valid]
    ppc = F.cross_entropy(logits / temperature, t)
    ppd = (1 - logits.gather(1, t[:, None])).pow(2).mean()
    return ppc.to(x.dtype), ppd.to(x.dtype)


def proto_train(x, prototypes, labels, temperature: float, weight=None, bias=None, eps: float = 1e-5):
    """The fused training pass (see csrc/protoseg.cpp): scores, index, own, lse, weighted, x_hat,
    stats. With weight and bias, x first goes through LayerNorm (see layer_norm_normalize)."""
    k, m, d = prototypes.shape
    if weight is not None:
        x_hat, stats = layer_norm_normalize(x, weight, bias, eps)
        rows = _layer_norm_rows(x, weight, bias, eps)
        _, p_hat = _normalized(x, prototypes)
    else:
        rows, p_hat = _normalized(x, prototypes)
        norm = x.to(rows.dtype).norm(dim=1)
        x_hat, stats = rows.to(x.dtype), torch.stack((torch.zeros_like(norm), torch.ones_like(norm), norm), dim=1)
    flat = p_hat.reshape(k * m, d)
    logits = rows @ flat.t()
    sim = logits.view(-1, k, m)
    index = sim.argmax(dim=2)
    scores = sim.gather(2, index.unsqueeze(2)).squeeze(2)
    valid = labels >= 0
    own = sim[torch.arange(x.shape[0], device=x.device), labels.clamp(min=0)] * valid[:, None]
    lse = torch.logsumexp(logits / temperature, dim=1)
    weighted = torch.softmax(logits / temperature, dim=1) @ flat
    return scores.to(x.dtype), index, own, lse, weighted, x_hat, stats


def sinkhorn_one_class(scores: torch.Tensor, iterations: int, epsilon: float) -> torch.Tensor:
    """Sinkhorn-Knopp for one class's pixels, as the released code: scores [n, M] -> Q [n, M].

    The per-class maximum is subtracted before exp (it cancels in the first normalisation) so
    that exp(1 / 0.05) cannot overflow.
    """
    n, m = scores.shape
    L = torch.exp((scores - scores.max()) / epsilon).t()  # [M, n]
    L = L / L.sum()
    for _ in range(iterations):
        L = L / L.sum(dim=1, keepdim=True)
        L = L / m
        L = L / L.sum(dim=0, keepdim=True)
        L = L / n
    L = L * n
    return L.t()


def sinkhorn(scores, labels, num_classes: int, iterations: int, epsilon: float):
    """q [N, M] float32 (ignored rows 0), assignment [N] int64 = argmax_m q (-1 where ignored).

    Each class is solved independently over its own pixels, in float64 here (the oracle).
    """
    n, m = scores.shape
    q = torch.zeros(n, m, dtype=torch.float64, device=scores.device)
    s = scores.to(torch.float64)
    for k in range(num_classes):
        sel = labels == k
        if bool(sel.any()):
            q[sel] = sinkhorn_one_class(s[sel], iterations, epsilon)
    assignment = torch.where(labels >= 0, q.argmax(dim=1), torch.full_like(labels, -1))
    return q.to(torch.float32), assignment


def scatter_mean(x, index, num_segments: int):
    """mean [S, D] (dtype of x; 0 for empty segments), count [S] int64; negative index skipped."""
    acc = acc_dtype(x.dtype)
    keep = index >= 0
    idx = index[keep]
    sums = torch.zeros(num_segments, x.shape[1], dtype=acc, device=x.device)
    sums.index_add_(0, idx, x[keep].to(acc))
    count = torch.bincount(idx, minlength=num_segments)
    mean = sums / count.clamp(min=1).unsqueeze(1).to(acc)
    return mean.to(x.dtype), count


def _layer_norm_rows(x, weight, bias, eps: float):
    """The unit rows of LayerNorm(x) in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    y = F.layer_norm(x.to(acc), (x.shape[1],), weight.to(acc), bias.to(acc), eps)
    return F.normalize(y, dim=-1, eps=NORM_EPS)


def layer_norm_normalize(x, weight, bias, eps: float):
    """out [N, D] (dtype of x) = unit rows of LayerNorm(x); stats [N, 3] = (mean, rstd, ||y||)."""
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    y = F.layer_norm(xa, (x.shape[1],), weight.to(acc), bias.to(acc), eps)
    mean = xa.mean(dim=1)
    rstd = torch.rsqrt((xa - mean[:, None]).square().mean(dim=1) + eps)
    norm = y.norm(dim=1)
    return F.normalize(y, dim=-1, eps=NORM_EPS).to(x.dtype), torch.stack((mean, rstd, norm), dim=1)
