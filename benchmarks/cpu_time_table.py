"""docs/performance.md's single-thread CPU-time table: robust to other load on the machine, unlike the
wall times of `pytest benchmarks/`.

    python benchmarks/cpu_time_table.py 19,150          # N = PROTOSEG_BENCH_N (32768)
    PROTOSEG_BENCH_N=4096 python benchmarks/cpu_time_table.py 847

"floor" is the strict two-GEMM floor (S = X P^T, then S P), "softmax_floor" the same with the
softmax between; "pass" is one read and write of a fresh [N, D] tensor (allocation included), "pass_into" the
same into a tensor that already exists (the difference is what the allocation costs); "classifier" is
the whole training step of the prototype classifier (its feature LayerNorm and normalisation,
similarity, PPC and PPD forward and backward, the class LayerNorm, Sinkhorn and the update). The released transcription is
timed up to K = 150 (at 847 one step takes minutes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conftest import D, N, machine  # noqa: E402
from test_classifier_step import make_problem, step  # noqa: E402

from protoseg import ops  # noqa: E402


def best_cpu_time(fn, rounds: int = 2) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main(ks: list[int]) -> None:
    torch.set_num_threads(1)
    print(machine(), flush=True)
    for k in ks:
        x, target, fused, reference = make_problem(k)
        p = F.normalize(fused.prototypes, dim=-1)
        flat = p.reshape(-1, D)
        buf = torch.empty_like(x)
        fns = {
            "pass": lambda: x * 2,  # one read and one write of the [N, D] embeddings
            "pass_into": lambda: torch.mul(x, 2, out=buf),
            "gemm": lambda: x @ flat.t(),
            "floor": lambda: (x @ flat.t()) @ flat,
            "softmax_floor": lambda: torch.softmax(x @ flat.t(), dim=1) @ flat,
            "similarity": lambda: ops.proto_similarity(x, p),
            "classifier": lambda: step(fused, x, target),
        }
        if k <= 150:
            fns["reference"] = lambda: step(reference, x, target)
        t = {name: best_cpu_time(fn) for name, fn in fns.items()}
        line = f"K={k} N={N}: " + " ".join(f"{name}={v * 1e3:.0f}ms" for name, v in t.items())
        line += f" | sim/gemm={t['similarity'] / t['gemm']:.2f}"
        line += f" classifier/floor={t['classifier'] / t['floor']:.2f}"
        if "reference" in t:
            line += f" reference/classifier={t['reference'] / t['classifier']:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main([int(k) for k in (sys.argv[1] if len(sys.argv) > 1 else "19,150").split(",")])
