"""Segmented ops: Sinkhorn-Knopp over all classes at once (whole, or composed from its steps
around a reduction of its marginals), and a deterministic scatter mean."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from protoseg.ops._registration import autocast_to_float32, forbid_double_backward

_ops = torch.ops.protoseg


def sinkhorn(
    scores: Tensor, labels: Tensor, num_classes: int, iterations: int = 3, epsilon: float = 0.05
) -> tuple[Tensor, Tensor]:
    """Sinkhorn-Knopp equipartition of each class's pixels over the class's M prototypes.

    For every class k independently, over the n_k pixels labelled k: L = exp(S / epsilon)^T
    [M, n_k], normalised to sum 1, then ``iterations`` times {each prototype row to 1/M, each
    pixel column to 1/n_k}, finally times n_k (as the released code; each class's maximum is
    subtracted before exp, which the first normalisation cancels). Computed in float64.

    Args:
        scores: [N, M] floating: each pixel's similarity to its own class's prototypes.
        labels: [N] int64 in [0, num_classes), or negative for ignored pixels.

    Returns:
        q: [N, M] float32 transport plan; rows of valid pixels sum to 1, ignored rows are 0.
        assignment: [N] int64 argmax_m q (ties to the smallest m), -1 where ignored.

    No gradient. Bitwise deterministic whatever the thread count.
    """
    return _ops.sinkhorn(scores, labels, int(num_classes), int(iterations), float(epsilon))


def sinkhorn_reduced(
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    iterations: int = 3,
    epsilon: float = 0.05,
    all_reduce: Callable[[Tensor, str], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`sinkhorn` composed from its steps (csrc/protoseg.cpp), with every marginal passed
    through ``all_reduce(tensor, op)`` (op "max" or "sum", in place) before it is used: the
    per-class maxima and pixel counts [K], the per-class totals [K] and, each iteration, the
    per-(class, prototype) row sums [K, M]. With an all-reduce over processes it is Sinkhorn over
    the batch of every process; with none it is :func:`sinkhorn` (bitwise on the CPU).
    """
    k = int(num_classes)
    reduce = all_reduce or (lambda t, op: None)
    perm, offsets = _ops.sinkhorn_segments(labels, k)
    class_max = _ops.segment_reduce(scores, perm, offsets, True, True)
    count = (offsets[1:] - offsets[:-1]).to(torch.float64)
    reduce(class_max, "max")
    reduce(count, "sum")
    plan = _ops.sinkhorn_exp(scores, labels, class_max, float(epsilon))
    total = _ops.segment_reduce(plan, perm, offsets, False, True)
    reduce(total, "sum")
    plan = _ops.sinkhorn_scale(plan, labels, total)
    for _ in range(int(iterations)):
        rows = _ops.segment_reduce(plan, perm, offsets, False, False)
        reduce(rows, "sum")
        plan = _ops.sinkhorn_step(plan, labels, rows, count)
    return _ops.sinkhorn_finish(plan, labels, count)


def scatter_mean(x: Tensor, index: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Mean of the rows of x per segment.

    Args:
        x: [N, D] floating (any strides).
        index: [N] int64 segment of each row in [0, num_segments), negative rows are skipped.

    Returns:
        mean: [num_segments, D], dtype of x (accumulated in float32/64); 0 for empty segments.
        count: [num_segments] int64 rows per segment.

    Bitwise deterministic whatever the thread count (sorted-segment sums, no atomics).
    Differentiable in x: grad_x[n] = grad_mean[index[n]] / count[index[n]].
    """
    return _ops.scatter_mean(x, index, int(num_segments))


def _scatter_setup(ctx, inputs, output):
    _, index, _ = inputs
    _, count = output
    ctx.mark_non_differentiable(count)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(index, count)


def _scatter_backward(ctx, grad_mean, _grad_count):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    index, count = ctx.saved_tensors
    return _ops.scatter_mean_backward(grad_mean, index, count), None, None


torch.library.register_autograd("protoseg::scatter_mean", _scatter_backward, setup_context=_scatter_setup)


def _sinkhorn_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)  # an assignment, not a function to differentiate


def _sinkhorn_backward(ctx, _grad_q, _grad_assignment):
    return None, None, None, None, None


torch.library.register_autograd("protoseg::sinkhorn", _sinkhorn_backward, setup_context=_sinkhorn_setup)
autocast_to_float32("protoseg::sinkhorn")
forbid_double_backward("protoseg::scatter_mean_backward")
