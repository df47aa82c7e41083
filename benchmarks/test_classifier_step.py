"""A training step of the prototype classifier (forward, backward, Sinkhorn, update) at
N x D = 32768 x 720, M = 10, K = 19, 150, 847: fused ops vs the transcription of the released
implementation vs two floors, the strict one (S = X P^T, then S P: the two GEMMs any
implementation must spend) and the softmax one (softmax(X P^T) P), and inference
(proto_similarity) vs one plain GEMM. The fused step and the transcription are checked against
each other, and proto_similarity against the reference, before anything is timed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import KS, ROUNDS, D, M, N, run

from protoseg import ops
from protoseg.models import PrototypeClassifier


def make_problem(k: int, n: int = N, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    target = torch.randint(0, k, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.1] = -1  # ignored (255 is a class when K = 847)
    torch.manual_seed(seed)
    fused = PrototypeClassifier(D, k, M, ignore_index=-1).to(dtype).train()
    reference = copy.deepcopy(fused)
    reference.impl = "reference"
    return x, target, fused, reference


def step(model, x, target):
    x = x.detach().requires_grad_()
    logits, ppc, ppd = model(x, target)
    (logits.logsumexp(dim=1).mean() + 0.01 * ppc + 0.001 * ppd).backward()
    return logits, ppc, ppd, x.grad


def check_agreement(k: int):
    """fused and reference agree (in float64, so that no near-tie flips an argmax) on a slice
    of the problem before either is timed."""
    x, target, fused, reference = make_problem(k, n=min(N, 2048), seed=1, dtype=torch.float64)
    a, b = step(fused, x, target), step(reference, x, target)
    for name, u, v in zip(("logits", "ppc", "ppd", "grad"), a, b):
        torch.testing.assert_close(u, v, msg=f"fused and reference disagree on {name}")
    torch.testing.assert_close(fused.prototypes, reference.prototypes)


FLOORS = ("strict_floor", "softmax_floor")


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("impl", [*FLOORS, "fused", "reference"])
def test_training_step(benchmark, k, impl):
    x, target, fused, reference = make_problem(k)
    if impl in FLOORS:
        p = F.normalize(fused.prototypes, dim=-1).reshape(k * M, D)
        if impl == "strict_floor":

            def fn():
                (x @ p.t()) @ p

        else:

            def fn():
                torch.softmax(x @ p.t(), dim=1) @ p

    else:
        if impl == "fused":
            check_agreement(k)
        model = fused if impl == "fused" else reference

        def fn():
            step(model, x, target)

    rounds = 1 if impl == "reference" and k > 200 else ROUNDS  # the released loop takes a minute there
    run(benchmark, f"train step K={k}", impl, fn, baseline=FLOORS, rounds=rounds)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("impl", ["one_gemm", "proto_similarity"])
def test_similarity(benchmark, k, impl):
    x, _, fused, _ = make_problem(k)
    p = F.normalize(fused.prototypes, dim=-1)
    if impl == "one_gemm":
        flat = p.reshape(k * M, D)

        def fn():
            x @ flat.t()

    else:
        from protoseg.ops import reference

        small = x[:2048]
        torch.testing.assert_close(ops.proto_similarity(small, p)[0], reference.proto_similarity(small, p)[0])

        def fn():
            ops.proto_similarity(x, p)

    run(benchmark, f"inference K={k}", impl, fn, baseline="one_gemm")
