"""Sinkhorn-Knopp over every class at N = 32768 pixels, M = 10, K = 19, 150, 847: the one-call
op (ops.sinkhorn) vs the same arithmetic composed from its step ops (ops.sinkhorn_reduced with
no all-reduce, what a distributed run calls). The two are checked to agree bitwise before
either is timed; the ratio says whether the one-call op can be dropped for the composition
(docs/performance.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import KS, M, N, run

from protoseg import ops

IMPLS = {"sinkhorn": ops.sinkhorn, "composed_steps": ops.sinkhorn_reduced}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_sinkhorn(benchmark, k, impl):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(N, M, generator=g) * 2 - 1  # cosines
    labels = torch.randint(0, k, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -1
    fn = IMPLS[impl]
    if impl == "composed_steps":
        for a, b in zip(fn(scores, labels, k), ops.sinkhorn(scores, labels, k)):
            assert torch.equal(a, b), "the composed steps and the one-call op disagree"
    run(benchmark, f"sinkhorn K={k}", impl, lambda: fn(scores, labels, k), baseline="sinkhorn")
