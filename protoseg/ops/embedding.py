"""The embedding normalisation of ProtoSeg as one op: LayerNorm over the channels, then each
row scaled to unit length (docs/design.md section 1, inference step 2). Fused, it reads and writes
the [N, D] embeddings once each way instead of the four passes and four [N, D] temporaries of
``F.normalize(F.layer_norm(x))`` and its backward."""

from __future__ import annotations

import torch
from torch import Tensor

from protoseg.ops._registration import (
    autocast_to_x_dtype,
    check,
    check_layer_norm_args,
    forbid_double_backward,
)
from protoseg.ops.reference import acc_dtype

__all__ = ["layer_norm_normalize"]  # protoseg.ops re-exports these

_ops = torch.ops.protoseg


def layer_norm_normalize(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.normalize(F.layer_norm(x, (D,), weight, bias, eps), dim=-1)`` in one pass.

    Args:
        x: [N, D] float16/bfloat16/float32/float64 (any strides).
        weight, bias: [D], the LayerNorm affine, same dtype and device as x.
        eps: the LayerNorm's variance epsilon (the L2 normalisation uses 1e-12, as F.normalize).

    Returns:
        [N, D] contiguous, dtype of x (computed in float32/64): unit rows.

    Differentiable in x, weight and bias. Deterministic: the weight and bias gradients are summed
    in fixed blocks of rows, so they are bitwise the same for any thread count.
    """
    return _ops.layer_norm_normalize(x, weight, bias, float(eps))[0]


def _setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, stats)


def _backward(ctx, grad_out, _grad_stats):
    if grad_out is None or not any(ctx.needs_input_grad[:3]):
        return None, None, None, None
    x, weight, bias, stats = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _ops.layer_norm_normalize_backward(grad_out, x, weight, bias, stats)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None, None)


torch.library.register_autograd("protoseg::layer_norm_normalize", _backward, setup_context=_setup)
autocast_to_x_dtype("protoseg::layer_norm_normalize")
forbid_double_backward("protoseg::layer_norm_normalize_backward")


# ---- fake kernels (see _registration.py) ----




@torch.library.register_fake("protoseg::layer_norm_normalize")
def _(x, weight, bias, eps):
    check_layer_norm_args(x, weight, bias)
    check(0 <= eps < float("inf"), f"eps must be a non-negative finite number (got {eps})")
    return x.new_empty(x.shape), x.new_empty(x.shape[0], 3, dtype=acc_dtype(x.dtype))


@torch.library.register_fake("protoseg::layer_norm_normalize_backward")
def _(grad_out, x, weight, bias, stats):
    check_layer_norm_args(x, weight, bias)
    check(grad_out.shape == x.shape, f"grad_out must be {list(x.shape)} (got {list(grad_out.shape)})")
    check(stats.shape == (x.shape[0], 3), f"stats must be [{x.shape[0]}, 3] (got {list(stats.shape)})")
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)
