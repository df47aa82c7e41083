"""Helpers shared by the op modules' registrations."""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda")


def autocast_to_float32(op_name: str) -> None:
    """Under autocast the op sees float32 inputs: its accumulation is fp32 anyway, and Sinkhorn's
    exp(score / 0.05) overflows in half precision."""
    for device_type in DEVICE_TYPES:
        torch.library.register_autocast(op_name, device_type, torch.float32)


def forbid_double_backward(op_name: str) -> None:
    """Backward ops take no gradient: differentiating them again raises instead of silently
    returning nothing."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{op_name} is not differentiable: double backward through protoseg ops is not supported")

    torch.library.register_autograd(op_name, backward, setup_context=lambda ctx, inputs, output: None)
