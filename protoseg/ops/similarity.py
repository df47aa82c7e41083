"""Pixel-prototype similarity ops: proto_similarity, proto_contrast_loss and the fused
training pass proto_train. Shapes: N pixels, D channels, K classes, M prototypes per class.

All three L2-normalise x and the prototypes inside (eps 1e-12, as F.normalize), accumulate in
float32 (float64 for float64 inputs), never hold the [N, K*M] products whole, and are
differentiable in x only: prototypes are a moving-average buffer, never learned by gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from protoseg.ops._registration import (
    autocast_to_x_dtype,
    check,
    check_embeddings,
    check_index_vector,
    check_layer_norm_args,
    check_positive,
    forbid_double_backward,
)
from protoseg.ops.reference import acc_dtype

__all__ = ["TrainPass", "proto_contrast_loss", "proto_similarity", "proto_train"]  # protoseg.ops re-exports these

_ops = torch.ops.protoseg


def proto_similarity(x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class maximum cosine similarity between pixels and prototypes.

    Args:
        x: [N, D] float16/bfloat16/float32/float64 pixel embeddings (any strides).
        prototypes: [K, M, D], same dtype and device as x.

    Returns:
        scores: [N, K], dtype of x: ``max_m cos(x_n, p_km)``.
        index: [N, K] int64: the maximising m, ties to the smallest.

    Deterministic. Differentiable in x (the backward gathers each row's winning prototypes).
    """
    return _ops.proto_similarity(x, prototypes)


def proto_contrast_loss(
    x: Tensor, prototypes: Tensor, target: Tensor, temperature: float = 0.1, ignore_index: int = -1
) -> tuple[Tensor, Tensor]:
    """Pixel-prototype contrast (PPC) and distance (PPD) losses.

    Args:
        x: [N, D] pixel embeddings; prototypes: [K, M, D] (same dtype and device).
        target: [N] int64, each in [0, K*M) (index into the flattened prototypes) or equal to
            ignore_index; any other value raises.
        temperature: PPC logits are cos / temperature (paper 0.1; the released code used 1).

    Returns:
        ppc: scalar, mean over valid pixels of cross-entropy over all K*M prototypes.
        ppd: scalar, mean over valid pixels of (1 - cos(x_n, p_target))^2.
        Both 0 with zero gradient when no pixel is valid. dtype of x.

    Differentiable in x. The backward recomputes the products (two GEMMs); training should use
    :func:`proto_train`, whose single pass already holds what the gradient needs.
    """
    return _ops.proto_contrast_loss(x, prototypes, target, float(temperature), int(ignore_index))


class TrainPass(NamedTuple):
    """What one training step needs from the pixel x prototype products (see proto_train)."""

    scores: Tensor  # [N, K], dtype of x: per-class max cosine
    index: Tensor  # [N, K] int64: per-class argmax
    own: Tensor  # [N, M] float32/64: cosine to the pixel's own-class prototypes, 0 if ignored
    lse: Tensor  # [N] float32/64: logsumexp over all K*M of cos / temperature
    weighted: Tensor  # [N, D] float32/64: softmax-weighted prototype sum (kept for the backward)
    x_hat: Tensor  # [N, D], dtype of x: the unit rows the products were taken with (no gradient)
    stats: Tensor  # [N, 3] float32/64: (mean, rstd, ||y||) per row (kept for the backward)


def proto_train(
    x: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> TrainPass:
    """The fused training pass: one pass over the [N, K*M] products, in bounded chunks.

    Args:
        x: [N, D] pixel embeddings; prototypes: [K, M, D] (same dtype and device).
        labels: [N] int64 class of each pixel in [0, K), negative for ignored pixels.
        temperature: for ``lse``.
        weight, bias: [D] (dtype and device of x), both or neither. When given, each row goes
            through ``LayerNorm(x; weight, bias, eps)`` before its L2 normalisation, inside the
            pass (the classifier's feature norm: ``x_hat`` is then exactly
            :func:`layer_norm_normalize` of x).

    Returns a :class:`TrainPass`. ``scores``, ``own`` and ``lse`` are differentiable in x (and in
    weight and bias); the contrast losses follow from them without touching the products again:
    ``ppc_n = lse_n - own[n, a_n] / temperature`` and ``ppd_n = (1 - own[n, a_n])^2`` for the
    pixel's assigned prototype a_n. ``x_hat`` carries no gradient (it is what the prototype update
    averages). Two GEMMs forward (products, softmax @ prototypes), none backward. Deterministic
    for a fixed thread count.
    """
    return TrainPass(*_ops.proto_train(x, prototypes, labels, float(temperature), weight, bias, float(eps)))


# ---- autograd: thin glue around the backward ops ---------------------------------------------


def _similarity_setup(ctx, inputs, output):
    x, prototypes = inputs
    _, index = output
    ctx.mark_non_differentiable(index)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(x, prototypes, index)


def _similarity_backward(ctx, grad_scores, _grad_index):
    if not ctx.needs_input_grad[0]:
        return None, None
    x, prototypes, index = ctx.saved_tensors
    return _ops.proto_similarity_backward(grad_scores, x, prototypes, index), None


torch.library.register_autograd(
    "protoseg::proto_similarity", _similarity_backward, setup_context=_similarity_setup
)


def _contrast_setup(ctx, inputs, output):
    x, prototypes, target, temperature, ignore_index = inputs
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(x, prototypes, target)


def _contrast_backward(ctx, grad_ppc, grad_ppd):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    x, prototypes, target = ctx.saved_tensors
    grad_x = _ops.proto_contrast_loss_backward(
        grad_ppc, grad_ppd, x, prototypes, target, ctx.temperature, ctx.ignore_index
    )
    return grad_x, None, None, None, None


torch.library.register_autograd(
    "protoseg::proto_contrast_loss", _contrast_backward, setup_context=_contrast_setup
)


def _train_setup(ctx, inputs, output):
    # Arguments left at their defaults (weight=None, bias=None, eps) may be absent from inputs.
    x, prototypes, labels, temperature = inputs[:4]
    weight, bias = (inputs[4:6] + (None, None))[:2]
    _, index, _, _, weighted, x_hat, stats = output
    ctx.mark_non_differentiable(index, weighted, x_hat, stats)
    ctx.set_materialize_grads(False)  # unused outputs stay None: no [N, D] zero gradients
    ctx.temperature = temperature
    if any(ctx.needs_input_grad[i] for i in (0, 4, 5) if i < len(inputs)):
        ctx.save_for_backward(x, prototypes, labels, index, weighted, weight, bias, stats)


def _train_backward(ctx, grad_scores, _grad_index, grad_own, grad_lse, _grad_weighted, _grad_x_hat, _grad_stats):
    count = len(ctx.needs_input_grad)
    needs = tuple(ctx.needs_input_grad) + (False,) * (7 - count)
    if not (needs[0] or needs[4] or needs[5]):
        return (None,) * count
    x, prototypes, labels, index, weighted, weight, bias, stats = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _ops.proto_train_backward(
        grad_scores, grad_own, grad_lse, x, prototypes, labels, index, weighted, ctx.temperature, weight, bias, stats
    )
    grads = (
        grad_x if needs[0] else None,
        None,
        None,
        None,
        grad_weight if needs[4] else None,
        grad_bias if needs[5] else None,
        None,
    )
    return grads[:count]


torch.library.register_autograd("protoseg::proto_train", _train_backward, setup_context=_train_setup)

for _name in ("proto_similarity", "proto_contrast_loss", "proto_train"):
    autocast_to_x_dtype(f"protoseg::{_name}")
for _name in ("proto_similarity_backward", "proto_contrast_loss_backward", "proto_train_backward"):
    forbid_double_backward(f"protoseg::{_name}")


# ---- fake kernels (see _registration.py) ----


@torch.library.register_fake("protoseg::proto_similarity")
def _(x, prototypes):
    check_embeddings(x, prototypes)
    n, k = x.shape[0], prototypes.shape[0]
    return x.new_empty(n, k), x.new_empty(n, k, dtype=torch.int64)


@torch.library.register_fake("protoseg::proto_similarity_backward")
def _(grad_scores, x, prototypes, index):
    check_embeddings(x, prototypes)
    return x.new_empty(x.shape)


@torch.library.register_fake("protoseg::proto_contrast_loss")
def _(x, prototypes, target, temperature, ignore_index):
    check_embeddings(x, prototypes)
    check_index_vector(target, "target", x)
    check_positive(temperature, "temperature")
    return x.new_empty(()), x.new_empty(())


@torch.library.register_fake("protoseg::proto_contrast_loss_backward")
def _(grad_ppc, grad_ppd, x, prototypes, target, temperature, ignore_index):
    check_embeddings(x, prototypes)
    check_index_vector(target, "target", x)
    check_positive(temperature, "temperature")
    return x.new_empty(x.shape)


def _optional_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    check(
        (weight is None) == (bias is None),
        f"weight and bias must be given together (got weight {'None' if weight is None else 'a tensor'} "
        f"and bias {'None' if bias is None else 'a tensor'})",
    )
    if weight is not None:
        check_layer_norm_args(x, weight, bias)
    return weight is not None


@torch.library.register_fake("protoseg::proto_train")
def _(x, prototypes, labels, temperature, weight=None, bias=None, eps=1e-5):
    check_embeddings(x, prototypes)
    check_index_vector(labels, "labels", x)
    check_positive(temperature, "temperature")
    _optional_layer_norm(x, weight, bias)
    n, d = x.shape
    k, m = prototypes.shape[0], prototypes.shape[1]
    acc = acc_dtype(x.dtype)
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
    check_embeddings(x, prototypes)
    check_index_vector(labels, "labels", x)
    check_positive(temperature, "temperature")
    if _optional_layer_norm(x, weight, bias):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)
    return x.new_empty(x.shape), x.new_empty(0), x.new_empty(0)
