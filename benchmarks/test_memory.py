"""Peak memory of one training step at the largest K: fused vs the released transcription.
At the target's size (N = 32768, K = 847) the fused step must stay within 1/4 of the
transcription's peak; at the toy sizes `make test` runs it must at least not exceed it.
The same at the size configs/ade20k_full_hrnet48_protoseg.yaml gives the classifier on one GPU
(its per-GPU batch of crops at stride 4, K = 847, its D and M).

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
from conftest import D, KS, M, N, note

TARGET_N, TARGET_K, TARGET_RATIO = 32768, 847, 0.25
ADE20K_FULL = Path(__file__).parent.parent / "configs" / "ade20k_full_hrnet48_protoseg.yaml"
ADE20K_FULL_GPUS = 8  # its run line: torchrun --nproc-per-node=8 (MaskFormer's 16 images on 8 GPUs)

CHILD = """
import json, resource, sys
import torch
sys.path.insert(0, {bench_dir!r})
from test_classifier_step import make_problem, step


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


x, target, fused, reference = make_problem({k}, n={n})
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


def peak_mb(impl: str, k: int, n: int = N) -> float:
    code = CHILD.format(bench_dir=str(Path(__file__).parent), k=k, n=n, impl=impl)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def ade20k_full_size() -> tuple[int, int]:
    """(N, K) of one GPU's classifier step under configs/ade20k_full_hrnet48_protoseg.yaml."""
    from protoseg.config import load_config

    cfg = load_config(str(ADE20K_FULL))
    assert (cfg.model.proj_dim, cfg.model.num_prototypes) == (D, M), "make_problem's D and M"
    h, w = cfg.data.crop_size
    return cfg.train.batch_size // ADE20K_FULL_GPUS * (h // 4) * (w // 4), cfg.data.num_classes


@pytest.mark.parametrize("size", ["bench", "ade20k_full"])
def test_peak_memory(size):
    if size == "ade20k_full" and N < TARGET_N:
        pytest.skip(f"toy sizes (N = {N}, make test): the config's size runs with make bench")
    n, k = (N, max(KS)) if size == "bench" else ade20k_full_size()
    if size == "bench" and (n, k) == ade20k_full_size():
        pytest.skip("the same size as the ade20k_full case")
    fused, reference = peak_mb("fused", k, n), peak_mb("reference", k, n)
    note(
        f"peak memory of a training step, N={n} K={k} ({size}): fused {fused:.0f} MB, reference "
        f"{reference:.0f} MB ({fused / max(reference, 1.0):.3f}x reference)"
    )
    assert reference > 0, "the reference step allocates its [N, K*M] matrices: a zero peak means no measurement"
    if n >= TARGET_N and k >= TARGET_K:
        assert fused <= TARGET_RATIO * reference, f"fused peak {fused:.0f} MB > 1/4 of {reference:.0f} MB"
    else:
        assert fused <= reference
