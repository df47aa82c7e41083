"""Helpers shared by the op modules' registrations.

The fake (meta) kernels beside each op (output shapes and dtypes for torch.compile, opcheck and
meta tensors) repeat the C++ checks that do not read tensor values (ranks, sizes, dtypes,
devices), with the same messages naming the argument; the helpers below are those checks."""

from __future__ import annotations

import torch
from torch import Tensor

DEVICE_TYPES = ("cpu", "cuda")


_LIB = torch.library.Library("protoseg", "IMPL")


def autocast_to_float32(op_name: str) -> None:
    """Under autocast the op sees float32 inputs: Sinkhorn's exp(score / 0.05) overflows in half
    precision."""
    for device_type in DEVICE_TYPES:
        torch.library.register_autocast(op_name, device_type, torch.float32)


def autocast_to_x_dtype(op_name: str) -> None:
    """Under autocast the op runs in the dtype of its first argument x, and its other
    floating-point tensors (prototypes, LayerNorm weight and bias) are cast to that dtype, as
    autocast casts a layer's weights. The kernels accumulate in fp32 whatever x's dtype, and the
    CUDA GEMM multiplies half-precision x in its own dtype, so copying x up to float32 would cost
    a pass over [N, D] and buy nothing."""
    name = op_name.split("::")[1]
    op = getattr(torch.ops.protoseg, name).default
    for device_type in DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, x, *rest, excluded=excluded):
            rest = [r.to(x.dtype) if isinstance(r, Tensor) and r.is_floating_point() else r for r in rest]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(x, *rest)

        _LIB.impl(name, kernel, key, with_keyset=True)


def forbid_double_backward(op_name: str) -> None:
    """Backward ops take no gradient: differentiating them again raises instead of silently
    returning nothing."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{op_name} is not differentiable: double backward through protoseg ops is not supported")

    torch.library.register_autograd(op_name, backward, setup_context=lambda ctx, inputs, output: None)


def check(cond, message: str) -> None:
    torch._check(cond, lambda: message)


def same_device(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    check(t.device == ref.device, f"{name} must be on the same device as {ref_name} (got {t.device} and {ref.device})")


def check_floating(t: Tensor, name: str) -> None:
    check(t.dtype.is_floating_point, f"{name} must be float16, bfloat16, float32 or float64 (got {t.dtype})")


def check_positive(value: float, name: str) -> None:
    check(0.0 < value < float("inf"), f"{name} must be a positive finite number (got {value})")


def check_embeddings(x: Tensor, prototypes: Tensor | None = None) -> None:
    check(x.dim() == 2, f"x must be [N, D] (got {list(x.shape)})")
    check_floating(x, "x")
    if prototypes is not None:
        check(
            prototypes.dim() == 3 and prototypes.shape[2] == x.shape[1],
            f"prototypes must be [K, M, D] with D == x.size(1) (got {list(prototypes.shape)} and x {list(x.shape)})",
        )
        check(prototypes.shape[0] > 0 and prototypes.shape[1] > 0,
              f"prototypes must have at least one class and one prototype per class (got {list(prototypes.shape)})")
        check(prototypes.dtype == x.dtype, f"prototypes must have the dtype of x (got {prototypes.dtype} and x {x.dtype})")
        same_device(prototypes, x, "prototypes", "x")


def check_index_vector(t: Tensor, name: str, x: Tensor, x_name: str = "x") -> None:
    check(t.dtype == torch.int64, f"{name} must be int64 (got {t.dtype})")
    check(t.dim() == 1 and t.shape[0] == x.shape[0], f"{name} must be [N] with N == {x_name}.size(0)")
    same_device(t, x, name, x_name)


def check_layer_norm_args(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    check_embeddings(x)
    for t, name in ((weight, "weight"), (bias, "bias")):
        check(
            t.dim() == 1 and t.shape[0] == x.shape[1],
            f"{name} must be [D] with D == x.size(1) == {x.shape[1]} (got {list(t.shape)})",
        )
        check(t.dtype == x.dtype, f"{name} must have the dtype of x (got {t.dtype} and x {x.dtype})")
        same_device(t, x, name, "x")
