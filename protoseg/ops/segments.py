"""Segmented ops: Sinkhorn-Knopp over all classes at once (whole, or composed from its steps
around a reduction of its marginals), and a deterministic scatter mean."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from protoseg.ops._registration import (
    autocast_to_float32,
    check,
    check_embeddings,
    check_floating,
    check_index_vector,
    check_positive,
    forbid_double_backward,
    same_device,
)

__all__ = ["scatter_mean", "sinkhorn", "sinkhorn_reduced"]  # protoseg.ops re-exports these

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
    return compose_sinkhorn(_ops, scores, labels, int(num_classes), int(iterations), float(epsilon), all_reduce)


def compose_sinkhorn(P, scores, labels, k, iterations, epsilon, all_reduce=None):
    """The composition of :func:`sinkhorn_reduced` over the step ops of namespace ``P``
    (``torch.ops.protoseg``; tests/test_emulated.py passes the emulated CUDA launch sequences)."""
    reduce = all_reduce or (lambda t, op: None)
    perm, offsets = P.sinkhorn_segments(labels, k)
    class_max = P.segment_reduce(scores, perm, offsets, True, True)
    count = (offsets[1:] - offsets[:-1]).to(torch.float64)
    reduce(class_max, "max")
    reduce(count, "sum")
    plan = P.sinkhorn_exp(scores, labels, class_max, epsilon)
    total = P.segment_reduce(plan, perm, offsets, False, True)
    reduce(total, "sum")
    plan = P.sinkhorn_scale(plan, labels, total)
    for _ in range(iterations):
        rows = P.segment_reduce(plan, perm, offsets, False, False)
        reduce(rows, "sum")
        plan = P.sinkhorn_step(plan, labels, rows, count)
    return P.sinkhorn_finish(plan, labels, count)


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


# ---- fake kernels (see _registration.py) ----


@torch.library.register_fake("protoseg::sinkhorn")
def _(scores, labels, num_classes, iterations, epsilon):
    check(scores.dim() == 2, f"scores must be [N, M] (got {list(scores.shape)})")
    check_floating(scores, "scores")
    check_index_vector(labels, "labels", scores, "scores")
    check(num_classes >= 1, f"num_classes must be >= 1 (got {num_classes})")
    check(iterations >= 0, f"iterations must be >= 0 (got {iterations})")
    check_positive(epsilon, "epsilon")
    check(scores.shape[1] >= 1 or scores.shape[0] == 0,
          f"scores must have at least one prototype column (got {list(scores.shape)})")
    return scores.new_empty(scores.shape, dtype=torch.float32), labels.new_empty(labels.shape)


@torch.library.register_fake("protoseg::sinkhorn_segments")
def _(labels, num_classes):
    check(labels.dim() == 1 and labels.dtype == torch.int64, f"labels must be an [N] int64 vector (got {labels.dtype} {list(labels.shape)})")
    check(num_classes >= 1, f"num_classes must be >= 1 (got {num_classes})")
    valid = torch.library.get_ctx().new_dynamic_size()
    return labels.new_empty(valid), labels.new_empty(num_classes + 1)


@torch.library.register_fake("protoseg::segment_reduce")
def _(values, perm, offsets, is_max, all_columns):
    check(values.dim() == 2, f"values must be [N, M] (got {list(values.shape)})")
    check(perm.dim() == 1 and perm.dtype == torch.int64, "perm must be an int64 vector")
    check(offsets.dim() == 1 and offsets.numel() >= 1 and offsets.dtype == torch.int64,
           "offsets must be an [S + 1] int64 vector")
    same_device(perm, values, "perm", "values")
    same_device(offsets, values, "offsets", "values")
    shape = (offsets.shape[0] - 1,) if all_columns else (offsets.shape[0] - 1, values.shape[1])
    return values.new_empty(shape, dtype=torch.float64)


def _marginal(t: Tensor, name: str, dim: int, ref: Tensor, ref_name: str) -> None:
    check(t.dim() == dim and t.dtype == torch.float64 and t.shape[0] >= 1,
           f"{name} must be a float64 {'[K]' if dim == 1 else '[K, M]'} tensor (got {t.dtype} {list(t.shape)})")
    if dim == 2:
        check(t.shape[1] == ref.shape[1], f"{name} must have {ref_name}.size(1) = {ref.shape[1]} columns")
    same_device(t, ref, name, ref_name)


def _plan(plan: Tensor, labels: Tensor) -> None:
    check(plan.dim() == 2 and plan.dtype == torch.float64,
           f"plan must be a float64 [N, M] tensor (got {plan.dtype} {list(plan.shape)})")
    check_index_vector(labels, "labels", plan, "plan")


@torch.library.register_fake("protoseg::sinkhorn_exp")
def _(scores, labels, class_max, epsilon):
    check(scores.dim() == 2, f"scores must be [N, M] (got {list(scores.shape)})")
    check_floating(scores, "scores")
    check_index_vector(labels, "labels", scores, "scores")
    _marginal(class_max, "class_max", 1, scores, "scores")
    check_positive(epsilon, "epsilon")
    return scores.new_empty(scores.shape, dtype=torch.float64)


@torch.library.register_fake("protoseg::sinkhorn_scale")
def _(plan, labels, class_total):
    _plan(plan, labels)
    _marginal(class_total, "class_total", 1, plan, "plan")
    return plan.new_empty(plan.shape)


@torch.library.register_fake("protoseg::sinkhorn_step")
def _(plan, labels, rows, count):
    _plan(plan, labels)
    _marginal(rows, "rows", 2, plan, "plan")
    _marginal(count, "count", 1, plan, "plan")
    check(count.shape[0] == rows.shape[0], f"count must be [K] with K == rows.size(0) = {rows.shape[0]}")
    return plan.new_empty(plan.shape)


@torch.library.register_fake("protoseg::sinkhorn_finish")
def _(plan, labels, count):
    _plan(plan, labels)
    _marginal(count, "count", 1, plan, "plan")
    return plan.new_empty(plan.shape, dtype=torch.float32), labels.new_empty(labels.shape)



@torch.library.register_fake("protoseg::scatter_mean")
def _(x, index, num_segments):
    check_embeddings(x)
    check_index_vector(index, "index", x)
    check(num_segments >= 0, f"num_segments must be >= 0 (got {num_segments})")
    return x.new_empty(num_segments, x.shape[1]), index.new_empty(num_segments)


@torch.library.register_fake("protoseg::scatter_mean_backward")
def _(grad_mean, index, count):
    return grad_mean.new_empty(index.shape[0], grad_mean.shape[1])
