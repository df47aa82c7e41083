"""Peak memory of one training step at the largest K: fused vs the released transcription.

Each implementation runs in a child process; the figure is the growth of its peak resident
set during the step (ru_maxrss after the step minus ru_maxrss after building the inputs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KS, N, note

CHILD = """
import json, resource, sys
import torch
sys.path.insert(0, {bench_dir!r})
from test_classifier_step import make_problem, step
x, target, fused, reference = make_problem({k})
model = fused if {impl!r} == "fused" else reference
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(model, x, target)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_mb": (after - before) / 1024}}))
"""


def peak_mb(impl: str, k: int) -> float:
    code = CHILD.format(bench_dir=str(Path(__file__).parent), k=k, impl=impl)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.parametrize("k", [max(KS)])
def test_peak_memory(k):
    fused, reference = peak_mb("fused", k), peak_mb("reference", k)
    note(
        f"peak memory of a training step, N={N} K={k}: fused {fused:.0f} MB, reference {reference:.0f} MB "
        f"({fused / max(reference, 1.0):.3f}x reference)"
    )
    assert fused <= reference
