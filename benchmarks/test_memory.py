"""Peak memory of one training step at the largest K: fused vs the released transcription.
At the target's size (N = 32768, K = 847) the fused step must stay within 1/4 of the
transcription's peak; at the toy sizes `make test` runs it must at least not exceed it.

Each implementation runs in a child process; the figure is how far the step raises the
process's resident set above what it held before the step: the kernel's peak-RSS mark
(VmHWM) is reset just before the step (/proc/self/clear_refs) and read after it. Where that
reset is not available, ru_maxrss stands in (an underestimate when the setup's own peak was
higher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import KS, N, note

TARGET_N, TARGET_K, TARGET_RATIO = 32768, 847, 0.25

CHILD = """
import json, resource, sys
import torch
sys.path.insert(0, {bench_dir!r})
from test_classifier_step import make_problem, step


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


x, target, fused, reference = make_problem({k})
model = fused if {impl!r} == "fused" else reference
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before, peak = status_kb("VmRSS"), lambda: status_kb("VmHWM")
except OSError:
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
step(model, x, target)
print(json.dumps({{"peak_mb": (peak() - before) / 1024}}))
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
    assert reference > 0, "the reference step allocates its [N, K*M] matrices: a zero peak means no measurement"
    if N >= TARGET_N and k >= TARGET_K:
        assert fused <= TARGET_RATIO * reference, f"fused peak {fused:.0f} MB > 1/4 of {reference:.0f} MB"
    else:
        assert fused <= reference
