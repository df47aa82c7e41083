"""The classifier's embedding normalisation, forward and backward, at N x D = 32768 x 720:
ops.layer_norm_normalize (one fused pass each way) vs the composition it replaces,
F.normalize(F.layer_norm(x)), both with autograd, checked to agree (values and the gradients of
x, weight and bias) before either is timed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import D, N, run

from protoseg import ops


def _composed(x, weight, bias):
    return F.normalize(F.layer_norm(x, (x.shape[1],), weight, bias, 1e-5), dim=-1)


IMPLS = {"layer_norm_then_normalize": _composed, "layer_norm_normalize": ops.layer_norm_normalize}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_layer_norm_normalize(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, D, generator=g) * 3 + 1).requires_grad_()
    weight = (1 + 0.3 * torch.randn(D, generator=g)).requires_grad_()
    bias = (0.3 * torch.randn(D, generator=g)).requires_grad_()
    grad = torch.randn(N, D, generator=g)
    fn = IMPLS[impl]
    if impl == "layer_norm_normalize":  # forward and backward agree before either is timed
        ours = fn(x, weight, bias)
        theirs = _composed(x, weight, bias)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for name, a, b in zip(("x", "weight", "bias"), torch.autograd.grad(ours, (x, weight, bias), grad),
                              torch.autograd.grad(theirs, (x, weight, bias), grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")

    def step():
        torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad)

    run(benchmark, "embedding norm fwd+bwd", impl, step, baseline="layer_norm_then_normalize")
