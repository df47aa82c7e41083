"""Where one training step of the fused classifier spends its time: three steps under the torch
profiler, ops sorted by self CPU time (docs/performance.md's breakdown).

    python benchmarks/profile_step.py [K]        # N = PROTOSEG_BENCH_N (32768), D = 720, M = 10

The forward kernel of proto_train has no profiler record of its own: its non-GEMM time is the
self time of `GeneratedBackwardFor_protoseg_proto_train_default` (the autograd wrapper that
calls it), and the `aten::mm` under it are its chunked GEMMs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import machine  # noqa: E402
from test_classifier_step import make_problem, step  # noqa: E402


def main(k: int) -> None:
    print(machine(), flush=True)
    x, target, fused, _ = make_problem(k)
    for _ in range(2):
        step(fused, x, target)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(fused, x, target)
    print(f"K = {k}, 3 steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 19)
