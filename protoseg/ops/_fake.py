"""Fake (meta) kernels of every protoseg op: output shapes and dtypes for torch.compile,
opcheck and meta tensors. csrc/protoseg.cpp names this module (set_python_module), so every
fake kernel is registered here. They repeat the C++ checks that do not read tensor values
(ranks, sizes, dtypes, devices), with the same messages naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(cond, message: str) -> None:
    torch._check(cond, lambda: message)


def _same_device(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    _check(t.device == ref.device, f"{name} must be on the same device as {ref_name} (got {t.device} and {ref.device})")


def _embeddings(x: Tensor, prototypes: Tensor | None = None) -> None:
    _check(x.dim() == 2, f"x must be [N, D] (got {list(x.shape)})")
    _check(x.dtype.is_floating_point, f"x must be float16, bfloat16, float32 or float64 (got {x.dtype})")
    if prototypes is not None:
        _check(
            prototypes.dim() == 3 and prototypes.shape[2] == x.shape[1],
            f"prototypes must be [K, M, D] with D == x.size(1) (got {list(prototypes.shape)} and x {list(x.shape)})",
        )
        _check(prototypes.dtype == x.dtype, f"prototypes must have the dtype of x (got {prototypes.dtype} and x {x.dtype})")
        _same_device(prototypes, x, "prototypes", "x")


def _index_vector(t: Tensor, name: str, x: Tensor, x_name: str = "x") -> None:
    _check(t.dtype == torch.int64, f"{name} must be int64 (got {t.dtype})")
    _check(t.dim() == 1 and t.shape[0] == x.shape[0], f"{name} must be [N] with N == {x_name}.size(0)")
    _same_device(t, x, name, x_name)


@torch.library.register_fake("protoseg::proto_similarity")
def _(x, prototypes):
    _embeddings(x, prototypes)
    n, k = x.shape[0], prototypes.shape[0]
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.int64)


@torch.library.register_fake("protoseg::proto_similarity_backward")
def _(grad_scores, x, prototypes, index):
    _embeddings(x, prototypes)
    return x.new_empty(x.shape)


@torch.library.register_fake("protoseg::proto_contrast_loss")
def _(x, prototypes, target, temperature, ignore_index):
    _embeddings(x, prototypes)
    _index_vector(target, "target", x)
    return x.new_empty(()), x.new_empty(())


@torch.library.register_fake("protoseg::proto_contrast_loss_backward")
def _(grad_ppc, grad_ppd, x, prototypes, target, temperature, ignore_index):
    _embeddings(x, prototypes)
    _index_vector(target, "target", x)
    return x.new_empty(x.shape)


def _optional_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    _check(
        (weight is None) == (bias is None),
        f"weight and bias must be given together (got weight {'None' if weight is None else 'a tensor'} "
        f"and bias {'None' if bias is None else 'a tensor'})",
    )
    if weight is not None:
        _layer_norm_args(x, weight, bias)
    return weight is not None


@torch.library.register_fake("protoseg::proto_train")
def _(x, prototypes, labels, temperature, weight=None, bias=None, eps=1e-5):
    _embeddings(x, prototypes)
    _index_vector(labels, "labels", x)
    _optional_layer_norm(x, weight, bias)
    n, d = x.shape
    k, m = prototypes.shape[0], prototypes.shape[1]
    acc = _acc_dtype(x.dtype)
    return (
        x.new_empty(n, k),
        x.new_empty(n, k, dtype=torch.int64),
        x.new_empty(n, m, dtype=acc),
        x.new_empty(n, dtype=acc),
        x.new_empty(n, d, dtype=acc),
        x.new_empty(n, d),
        x.new_empty(n, 3, dtype=acc),
    )


@torch.library.register_fake("protoseg::proto_train_backward")
def _(grad_scores, grad_own, grad_lse, x, prototypes, labels, index, weighted, temperature, weight, bias, stats):
    _embeddings(x, prototypes)
    _index_vector(labels, "labels", x)
    if _optional_layer_norm(x, weight, bias):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)
    return x.new_empty(x.shape), x.new_empty(0), x.new_empty(0)


@torch.library.register_fake("protoseg::sinkhorn")
def _(scores, labels, num_classes, iterations, epsilon):
    _check(scores.dim() == 2, f"scores must be [N, M] (got {list(scores.shape)})")
    _index_vector(labels, "labels", scores, "scores")
    return scores.new_empty(scores.shape, dtype=torch.float32), labels.new_empty(labels.shape)


@torch.library.register_fake("protoseg::sinkhorn_segments")
def _(labels, num_classes):
    _check(labels.dim() == 1 and labels.dtype == torch.int64, f"labels must be an [N] int64 vector (got {labels.dtype} {list(labels.shape)})")
    _check(num_classes >= 1, f"num_classes must be >= 1 (got {num_classes})")
    valid = torch.library.get_ctx().new_dynamic_size()
    return labels.new_empty(valid), labels.new_empty(num_classes + 1)


@torch.library.register_fake("protoseg::segment_reduce")
def _(values, perm, offsets, is_max, all_columns):
    _check(values.dim() == 2, f"values must be [N, M] (got {list(values.shape)})")
    _check(perm.dim() == 1 and perm.dtype == torch.int64, "perm must be an int64 vector")
    _check(offsets.dim() == 1 and offsets.numel() >= 1 and offsets.dtype == torch.int64,
           "offsets must be an [S + 1] int64 vector")
    _same_device(perm, values, "perm", "values")
    _same_device(offsets, values, "offsets", "values")
    shape = (offsets.shape[0] - 1,) if all_columns else (offsets.shape[0] - 1, values.shape[1])
    return values.new_empty(shape, dtype=torch.float64)


def _marginal(t: Tensor, name: str, dim: int, ref: Tensor, ref_name: str) -> None:
    _check(t.dim() == dim and t.dtype == torch.float64 and t.shape[0] >= 1,
           f"{name} must be a float64 {'[K]' if dim == 1 else '[K, M]'} tensor (got {t.dtype} {list(t.shape)})")
    if dim == 2:
        _check(t.shape[1] == ref.shape[1], f"{name} must have {ref_name}.size(1) = {ref.shape[1]} columns")
    _same_device(t, ref, name, ref_name)


def _plan(plan: Tensor, labels: Tensor) -> None:
    _check(plan.dim() == 2 and plan.dtype == torch.float64,
           f"plan must be a float64 [N, M] tensor (got {plan.dtype} {list(plan.shape)})")
    _index_vector(labels, "labels", plan, "plan")


@torch.library.register_fake("protoseg::sinkhorn_exp")
def _(scores, labels, class_max, epsilon):
    _check(scores.dim() == 2, f"scores must be [N, M] (got {list(scores.shape)})")
    _index_vector(labels, "labels", scores, "scores")
    _marginal(class_max, "class_max", 1, scores, "scores")
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
    _check(count.shape[0] == rows.shape[0], f"count must be [K] with K == rows.size(0) = {rows.shape[0]}")
    return plan.new_empty(plan.shape)


@torch.library.register_fake("protoseg::sinkhorn_finish")
def _(plan, labels, count):
    _plan(plan, labels)
    _marginal(count, "count", 1, plan, "plan")
    return plan.new_empty(plan.shape, dtype=torch.float32), labels.new_empty(labels.shape)


def _layer_norm_args(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    _embeddings(x)
    for t, name in ((weight, "weight"), (bias, "bias")):
        _check(
            t.dim() == 1 and t.shape[0] == x.shape[1],
            f"{name} must be [D] with D == x.size(1) == {x.shape[1]} (got {list(t.shape)})",
        )
        _check(t.dtype == x.dtype, f"{name} must have the dtype of x (got {t.dtype} and x {x.dtype})")
        _same_device(t, x, name, "x")


@torch.library.register_fake("protoseg::layer_norm_normalize")
def _(x, weight, bias, eps):
    _layer_norm_args(x, weight, bias)
    _check(0 <= eps < float("inf"), f"eps must be a non-negative finite number (got {eps})")
    return x.new_empty(x.shape), x.new_empty(x.shape[0], 3, dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("protoseg::layer_norm_normalize_backward")
def _(grad_out, x, weight, bias, stats):
    _layer_norm_args(x, weight, bias)
    _check(grad_out.shape == x.shape, f"grad_out must be {list(x.shape)} (got {list(grad_out.shape)})")
    _check(stats.shape == (x.shape[0], 3), f"stats must be [{x.shape[0]}, 3] (got {list(stats.shape)})")
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


@torch.library.register_fake("protoseg::scatter_mean")
def _(x, index, num_segments):
    _embeddings(x)
    _index_vector(index, "index", x)
    _check(num_segments >= 0, f"num_segments must be >= 0 (got {num_segments})")
    return x.new_empty(num_segments, x.shape[1]), index.new_empty(num_segments)


@torch.library.register_fake("protoseg::scatter_mean_backward")
def _(grad_mean, index, count):
    return grad_mean.new_empty(index.shape[0], grad_mean.shape[1])
