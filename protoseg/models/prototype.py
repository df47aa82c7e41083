"""The nonparametric prototype classifier of ProtoSeg (Zhou et al., CVPR 2022).

A drop-in replacement for a softmax (1x1 conv) classifier: each class is represented by M
prototypes, unit vectors kept as a moving-average buffer (never learned by gradient). A pixel's
class score is its best cosine similarity to the class's prototypes; training adds the
pixel-prototype contrast (PPC) and distance (PPD) losses against prototypes assigned by
Sinkhorn-Knopp equipartition, and moves the prototypes towards the mean of their correctly
classified pixels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg import ops
from protoseg.ops.reference import sinkhorn_one_class

IMPLS = ("fused", "reference")
ASSIGNMENTS = ("argmax", "gumbel")
SCOPES = ("global", "local")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sinkhorn(scores: Tensor, labels: Tensor, num_classes: int, iterations: int, epsilon: float):
    """ops.sinkhorn over the batch of every rank: its steps run as protoseg ops on each rank and
    only the marginals ([K] maxima, counts and totals, [K, M] row sums) are all-reduced, so
    equipartition holds over the global batch. Same arguments and results as
    :func:`protoseg.ops.sinkhorn`; a single process calls the op directly."""
    if _world_size() == 1:
        return ops.sinkhorn(scores, labels, num_classes, iterations, epsilon)
    ops_of = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    return ops.sinkhorn_reduced(
        scores, labels, num_classes, iterations, epsilon, lambda t, op: dist.all_reduce(t, op=ops_of[op])
    )


def usage_buckets(nearest: Tensor, pred: Tensor, labels: Tensor, num_prototypes: int) -> Tensor:
    """[N] int64: for each pixel classified correctly (pred == labels), the prototype k * M + m
    of its class it is nearest to; K * M for every other pixel. nearest [N, K] int64 (argmax
    over each class's prototypes, as proto_similarity's index), pred and labels [N] (labels
    negative: ignored)."""
    k, m = nearest.shape[1], num_prototypes
    correct = (labels >= 0) & (pred == labels)
    own = nearest.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(correct, labels * m + own, torch.full_like(labels, k * m))


def usage_counts(nearest: Tensor, pred: Tensor, labels: Tensor, num_prototypes: int) -> Tensor:
    """[K, M] int64: for each prototype, the correctly classified pixels of its class that it
    is the nearest prototype of (arguments as `usage_buckets`). Written without data-dependent
    shapes, so it runs inside a compiled training step."""
    k, m = nearest.shape[1], num_prototypes
    bucket = usage_buckets(nearest, pred, labels, m)
    counts = torch.zeros(k * m + 1, dtype=torch.int64, device=nearest.device)
    return counts.scatter_add_(0, bucket, torch.ones_like(bucket))[:-1].view(k, m)


class PrototypeClassifier(nn.Module):
    """Classifies pixel embeddings by their nearest class prototypes.

    Args:
        dim: D, the embedding channels.
        num_classes: K.
        num_prototypes: M prototypes per class (paper: 10).
        momentum: gamma of the moving-average update (0.999).
        temperature: PPC logits are cos / temperature. Paper 0.1; the released code used 1.
        sinkhorn_iterations, sinkhorn_epsilon: Sinkhorn-Knopp settings (3, 0.05).
        ignore_index: label of pixels that take no part (255).
        impl: "fused" (protoseg ops: one pass over the pixel x prototype products, O(N*K)
            memory) or "reference" (a plain-PyTorch transcription of the released code, with its
            [N, K*M] matrices and per-class Python loop: the parity and benchmark baseline).
        update_assignment: which prototype a pixel updates. "argmax" of the Sinkhorn plan (the
            same prototype the contrast target uses); "gumbel" reproduces the released code's
            hard Gumbel-softmax sample of the plan (tau 0.5), which makes the update nearly random.
        sinkhorn_scope: "global" all-reduces the Sinkhorn marginals so equipartition holds over
            the batch of every rank; "local" reproduces the released per-GPU Sinkhorn.
        update_scope: "global" all-reduces the update's sums and counts, so every rank applies
            the same update; "local" reproduces the released code: each rank updates on its own
            batch, then the prototypes are averaged over ranks.

    The released code also re-creates the prototypes as a new Parameter every step, leaving a
    stale copy in the optimizer; that copy is never read, so the behaviour has no numerical
    effect and is deliberately not reproduced.

    Forward: ``x`` [N, D] embeddings (after the projection head). Returns the class logits
    [N, K] (the per-class max cosine after the class LayerNorm, "mask norm"). In training mode
    with ``target`` [N] int64 (class per pixel at feature resolution, ``ignore_index`` for
    ignored pixels) it returns ``(logits, ppc, ppd)`` and updates the prototypes in place
    (without autograd), using only the pixels whose predicted class is their label; `usage`
    then holds that batch's :func:`usage_counts` (None before the first training step).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_prototypes: int = 10,
        *,
        momentum: float = 0.999,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        ignore_index: int = 255,
        impl: str = "fused",
        update_assignment: str = "argmax",
        sinkhorn_scope: str = "global",
        update_scope: str = "global",
    ):
        super().__init__()
        for name, value, choices in (
            ("impl", impl, IMPLS),
            ("update_assignment", update_assignment, ASSIGNMENTS),
            ("sinkhorn_scope", sinkhorn_scope, SCOPES),
            ("update_scope", update_scope, SCOPES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices} (got {value!r})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (got {momentum})")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive (got {temperature})")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index when num_classes = {num_classes}")
        self.num_classes, self.num_prototypes, self.dim = num_classes, num_prototypes, dim
        self.momentum, self.temperature = momentum, temperature
        self.sinkhorn_iterations, self.sinkhorn_epsilon = sinkhorn_iterations, sinkhorn_epsilon
        self.ignore_index, self.impl = ignore_index, impl
        self.update_assignment, self.sinkhorn_scope, self.update_scope = update_assignment, sinkhorn_scope, update_scope
        self.feat_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        prototypes = torch.empty(num_classes, num_prototypes, dim)
        nn.init.trunc_normal_(prototypes, std=0.02)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1))
        # A plain attribute, not a buffer: it differs between ranks and belongs in no checkpoint.
        self.usage: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
            f"impl={self.impl}, temperature={self.temperature}, momentum={self.momentum}"
        )

    def forward(self, x: Tensor, target: Tensor | None = None):
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [N, {self.dim}] (got {list(x.shape)})")
        training = self.training and target is not None
        if training and (target.dim() != 1 or target.shape[0] != x.shape[0]):
            raise ValueError(f"target must be [N] with N == x.size(0) == {x.shape[0]} (got {list(target.shape)})")
        if self.impl == "reference":
            return self._forward_reference(self.feat_norm(x), target if training else None)
        if not training:
            return self.mask_norm(self.similarity(x)[1])
        prototypes = F.normalize(self.prototypes, dim=-1)
        norm = self.feat_norm

        labels = torch.where(target == self.ignore_index, torch.full_like(target, -1), target.long())
        # feat_norm, the L2 normalisation and the products in one pass; out.x_hat are the unit rows.
        out = ops.proto_train(x, prototypes, labels, self.temperature, norm.weight, norm.bias, norm.eps)
        logits = self.mask_norm(out.scores)
        with torch.no_grad():
            sinkhorn = global_sinkhorn if self.sinkhorn_scope == "global" else ops.sinkhorn
            q, assignment = sinkhorn(
                out.own.detach(), labels, self.num_classes, self.sinkhorn_iterations, self.sinkhorn_epsilon
            )
        valid = labels >= 0
        ppc, ppd = ops.contrast_losses(out.own, out.lse, assignment, self.temperature)
        with torch.no_grad():
            update_with = self._gumbel_assignment(q, valid) if self.update_assignment == "gumbel" else assignment
            pred = logits.argmax(dim=1)
            self.usage = usage_counts(out.index, pred, labels, self.num_prototypes)
            correct = valid & (pred == labels)
            bucket = torch.where(correct, labels * self.num_prototypes + update_with, torch.full_like(labels, -1))
            self._update(out.x_hat, bucket)
        return logits, ppc, ppd

    def similarity(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, D] -> (x_hat [N, D] the unit embeddings after feat_norm, scores [N, K] each
        class's best cosine, index [N, K] int64 its nearest prototype; ties to the smallest m),
        what inference computes; the logits are mask_norm(scores)."""
        norm = self.feat_norm
        # feat_norm and the L2 normalisation in one op, then the similarity.
        x_hat = ops.layer_norm_normalize(x, norm.weight, norm.bias, norm.eps)
        scores, index = ops.proto_similarity(x_hat, F.normalize(self.prototypes, dim=-1))
        return x_hat, scores, index

    @staticmethod
    def _gumbel_assignment(q: Tensor, valid: Tensor) -> Tensor:
        # The released code's F.gumbel_softmax(Q, tau=0.5, hard=True): the plan's probabilities
        # are treated as logits.
        sample = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        sample[valid] = F.gumbel_softmax(q[valid], tau=0.5, hard=True).argmax(dim=1)
        return sample

    @torch.no_grad()
    def _update(self, x_hat: Tensor, bucket: Tensor) -> None:
        """p <- normalize(gamma p + (1 - gamma) normalize(f)) where f is the sum of the unit
        embeddings in the prototype's bucket (-1: no bucket) and the bucket is non-empty."""
        k, m, d = self.prototypes.shape
        mean, count = ops.scatter_mean(x_hat, bucket, k * m)
        sums = mean.to(self.prototypes.dtype) * count.unsqueeze(1).to(self.prototypes.dtype)
        world = _world_size()
        if world > 1 and self.update_scope == "global":
            dist.all_reduce(sums)
            dist.all_reduce(count)
        self._momentum_update(sums.view(k, m, d), count.view(k, m))
        if world > 1 and self.update_scope == "local":
            dist.all_reduce(self.prototypes)
            self.prototypes.div_(world)

    def _momentum_update(self, sums: Tensor, count: Tensor) -> None:
        moved = F.normalize(self.momentum * self.prototypes + (1 - self.momentum) * F.normalize(sums, dim=-1), dim=-1)
        # A non-finite batch (the trainer stops on its loss) must not leave NaN prototypes behind.
        # Tested on the sums, not on `moved` (the same rows: finite sums give finite moved rows):
        # Inductor's CPU outer-loop fusion fails on a finiteness reduction over `moved` feeding this
        # in-place copy (KeyError 'bufN' in try_outer_loop_fusion_with_local_buf, torch 2.14).
        keep = (count > 0).unsqueeze(-1) & torch.isfinite(sums).all(dim=-1, keepdim=True)
        self.prototypes.copy_(torch.where(keep, moved, self.prototypes))

    def _forward_reference(self, x: Tensor, target: Tensor | None):
        """The released implementation (HRNet_W48_Proto.forward / prototype_learning and the
        PPC/PPD losses), transcribed op for op in plain PyTorch, with this module's options."""
        k, m, d = self.prototypes.shape
        _c = F.normalize(x, dim=-1)
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
        protos = self.prototypes.clone()
        masks = torch.einsum("nd,kmd->nmk", _c, protos)
        out_seg = self.mask_norm(torch.amax(masks, dim=1))
        if target is None:
            return out_seg

        gt_seg = target.long()
        pred_seg = torch.max(out_seg, 1)[1]
        mask = gt_seg == pred_seg
        labels = torch.where(gt_seg == self.ignore_index, -1, gt_seg)
        self.usage = usage_counts(masks.argmax(dim=1).detach(), pred_seg, labels, m)
        contrast_logits = torch.mm(_c, protos.view(-1, d).t())
        # The released code leaves ignored pixels at 255 here, which collides with prototype 255
        # once K*M > 255; -1 keeps the transcription right for any vocabulary.
        contrast_target = torch.where(gt_seg == self.ignore_index, -1, gt_seg).float()
        with torch.no_grad():
            new = protos.clone()
            for c in range(k):
                selected = gt_seg == c
                init_q = masks[..., c][selected]
                if init_q.shape[0] == 0:
                    continue
                q = sinkhorn_one_class(init_q, self.sinkhorn_iterations, self.sinkhorn_epsilon)
                indexs = q.argmax(dim=1)
                if self.update_assignment == "gumbel":
                    q = F.gumbel_softmax(q, tau=0.5, hard=True)
                else:
                    q = F.one_hot(indexs, m).to(q.dtype)
                m_k = mask[selected]
                c_k = _c[selected]
                m_q = q * m_k.unsqueeze(1).to(q.dtype)
                c_q = c_k * m_k.unsqueeze(1).to(c_k.dtype)
                f = m_q.transpose(0, 1) @ c_q
                n = torch.sum(m_q, dim=0)
                if torch.sum(n) > 0:
                    f = F.normalize(f, p=2, dim=-1)
                    new[c, n != 0, :] = f[n != 0, :] * (1 - self.momentum) + new[c, n != 0, :] * self.momentum
                contrast_target[selected] = indexs.float() + (m * c)
            self.prototypes.copy_(F.normalize(new, dim=-1))
            if _world_size() > 1:
                dist.all_reduce(self.prototypes)
                self.prototypes.div_(_world_size())

        ppc = F.cross_entropy(contrast_logits / self.temperature, contrast_target.long(), ignore_index=-1)
        keep = contrast_target != -1
        logits = torch.gather(contrast_logits[keep], 1, contrast_target[keep][:, None].long())
        ppd = (1 - logits).pow(2).mean()
        return out_seg, ppc, ppd
