"""Pixel-prototype similarity ops: proto_similarity and the fused training pass proto_train,
and the contrast losses composed from proto_train's outputs (contrast_losses,
proto_contrast_loss). Shapes: N pixels, D channels, K classes, M prototypes per class.

All of them L2-normalise x and the prototypes inside (eps 1e-12, as F.normalize), accumulate in
float32 (float64 for float64 inputs), never hold the [N, K*M] products whole, and are
differentiable in x only: prototypes are a moving-average buffer, never learned by gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

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

__all__ = ["TrainPass", "contrast_losses", "proto_contrast_loss", "proto_similarity", "proto_train"]  # protoseg.ops re-exports these

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
    weight and bias); the contrast losses follow from them without touching the products again
    (:func:`contrast_losses`). ``x_hat`` carries no gradient (it is what the prototype update
    averages). Two GEMMs forward (products, softmax @ prototypes), none backward. Deterministic
    for a fixed thread count.
    """
    return TrainPass(*_ops.proto_train(x, prototypes, labels, float(temperature), weight, bias, float(eps)))


def contrast_losses(own: Tensor, lse: Tensor, assignment: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """PPC and PPD from :func:`proto_train`'s outputs: the one place their formula is written.

    Args:
        own: [N, M] and lse: [N], as :class:`TrainPass` (the pass run with this temperature).
        assignment: [N] int64, each pixel's prototype a_n in [0, M) within its own class (the
            class proto_train was given as its label), negative for pixels that take no part.
        temperature: the temperature proto_train's ``lse`` was taken at.

    Returns:
        ppc: scalar, mean over valid pixels of ``lse_n - own[n, a_n] / temperature``, the
            cross-entropy over all K*M prototypes of cos / temperature with target (label, a_n).
        ppd: scalar, mean over valid pixels of ``(1 - own[n, a_n])^2``.
        Both in the dtype of ``own`` (float32/64), 0 with zero gradient when no pixel is valid.

    Differentiable through own and lse, so through proto_train's backward (no GEMM).
    """
    valid = assignment >= 0
    own_target = own.gather(1, assignment.clamp(min=0).unsqueeze(1)).squeeze(1)
    n_valid = valid.sum().clamp(min=1)
    zero = own_target.new_zeros(())
    ppc = torch.where(valid, lse - own_target / temperature, zero).sum() / n_valid
    ppd = torch.where(valid, (1 - own_target).pow(2), zero).sum() / n_valid
    return ppc, ppd


def _check_target_values(target: Tensor, num_targets: int, ignore_index: int) -> None:
    """Every target in [0, K*M) or == ignore_index, read on the host as the kernels' range checks
    are (one synchronisation on CUDA). Traced or fake tensors have no values to read: there
    proto_contrast_loss sends a bad target to a label proto_train's own check rejects."""
    if torch.compiler.is_compiling() or target.device.type == "meta" or is_fake(target):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_targets))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(
            f"target[{i}] = {int(target[i])} is out of range: expected a value in [0, K*M = {num_targets}) "
            f"or ignore_index = {ignore_index}"
        )


def proto_contrast_loss(
    x: Tensor, prototypes: Tensor, target: Tensor, temperature: float = 0.1, ignore_index: int = -1
) -> tuple[Tensor, Tensor]:
    """Pixel-prototype contrast (PPC) and distance (PPD) losses, composed: :func:`proto_train`
    (without LayerNorm: x is only L2-normalised) with labels ``target // M``, then
    :func:`contrast_losses` with assignment ``target % M``.

    Args:
        x: [N, D] pixel embeddings; prototypes: [K, M, D] (same dtype and device).
        target: [N] int64, each in [0, K*M) (index into the flattened prototypes) or equal to
            ignore_index; any other value raises (eagerly naming target; under torch.compile
            proto_train's check raises, naming labels).
        temperature: PPC logits are cos / temperature (paper 0.1; the released code used 1).

    Returns:
        ppc: scalar, mean over valid pixels of cross-entropy over all K*M prototypes.
        ppd: scalar, mean over valid pixels of (1 - cos(x_n, p_target))^2.
        Both 0 with zero gradient when no pixel is valid. dtype of x.

    Differentiable in x. Costs proto_train's two GEMMs forward and none backward; a training
    step that already runs proto_train should call :func:`contrast_losses` on its outputs.
    """
    # What the composition itself reads; proto_train checks the rest (prototypes' D, dtype and
    # device, after autocast has cast them).
    check_embeddings(x)
    check(prototypes.dim() == 3, f"prototypes must be [K, M, D] with D == x.size(1) (got {list(prototypes.shape)} "
          f"and x {list(x.shape)})")
    check(prototypes.shape[0] > 0 and prototypes.shape[1] > 0,
          f"prototypes must have at least one class and one prototype per class (got {list(prototypes.shape)})")
    check_index_vector(target, "target", x)
    check_positive(temperature, "temperature")
    k, m = prototypes.shape[0], prototypes.shape[1]
    _check_target_values(target, k * m, ignore_index)
    ignored = target == ignore_index
    # A negative target that is not ignore_index becomes label K, and one >= K*M a label >= K:
    # proto_train's range check rejects both wherever the check above could not run.
    labels = torch.where(ignored, -1, torch.where(target < 0, k, target.div(m, rounding_mode="floor")))
    assignment = torch.where(ignored, -1, target.remainder(m))
    out = proto_train(x, prototypes, labels, temperature)
    ppc, ppd = contrast_losses(out.own, out.lse, assignment, temperature)
    return ppc.to(x.dtype), ppd.to(x.dtype)


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

for _name in ("proto_similarity", "proto_train"):
    autocast_to_x_dtype(f"protoseg::{_name}")
for _name in ("proto_similarity_backward", "proto_train_backward"):
    forbid_double_backward(f"protoseg::{_name}")


# FLOPs for torch.utils.flop_counter, which cannot see inside the ops: their GEMMs over the
# [N, D] x [D, K*M] products, 2*N*D*K*M each (one in proto_similarity, two in proto_train; their
# backwards gather and scale rows, no GEMM). The element-wise epilogues are not counted, as the
# counter counts no element-wise ATen op either.
def _gemm_flops(gemms: int):
    def flops(x_shape, prototypes_shape, *args, out_shape=None, **kwargs) -> int:
        (n, d), (k, m, _) = x_shape, prototypes_shape
        return gemms * 2 * n * d * k * m

    return flops


register_flop_formula(_ops.proto_similarity)(_gemm_flops(1))
register_flop_formula(_ops.proto_train)(_gemm_flops(2))


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
