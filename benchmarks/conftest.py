"""Shared setup for the benchmarks: problem sizes, and a table of ratios printed at the end.

Every benchmark checks that what it times agrees with its baseline first, and records its
mean time under (group, name); the summary divides each time by its group's baseline, all
measured in this one process.

Sizes: PROTOSEG_BENCH_N pixels (default 32768), D = 720, M = 10, and K in
PROTOSEG_BENCH_K (default "19,150,847"). The summary starts with the machine: CPU model, the
instruction set our kernels and ATen's run (ATEN_CPU_CAPABILITY forces a lower one), the BLAS
and the thread count, because the ratios differ between machines.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

import pytest
import torch

N = int(os.environ.get("PROTOSEG_BENCH_N", "32768"))
D = int(os.environ.get("PROTOSEG_BENCH_D", "720"))
M = 10
KS = [int(k) for k in os.environ.get("PROTOSEG_BENCH_K", "19,150,847").split(",")]
ROUNDS = int(os.environ.get("PROTOSEG_BENCH_ROUNDS", "3"))

_TIMES: dict[str, dict[str, float]] = defaultdict(dict)
_BASELINES: dict[str, tuple[str, ...]] = {}
_EXTRA: list[str] = []


def machine() -> str:
    """CPU model, ISA path, BLAS and threads of this process, for every printed figure."""
    import protoseg._C as _C

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    blas_name = blas.group(1) if blas else "unknown"
    if blas_name == "mkl" and mkl:
        blas_name += f" {mkl.group(1)}"
    return (f"CPU: {model}; ISA path: protoseg {_C.cpu_isa()}, ATen {torch.backends.cpu.get_cpu_capability()}; "
            f"BLAS: {blas_name}; threads: {torch.get_num_threads()}")


def run(benchmark, group: str, name: str, fn, *, baseline: str | tuple[str, ...], rounds: int = ROUNDS):
    """Times fn with pytest-benchmark (one warm-up round) and records its mean for the table;
    each time is divided by the group's baseline(s)."""
    benchmark.group = group
    benchmark.name = name
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    _TIMES[group][name] = benchmark.stats.stats.mean
    _BASELINES[group] = (baseline,) if isinstance(baseline, str) else tuple(baseline)


def note(line: str) -> None:
    """A line for the summary (memory figures, which pytest-benchmark does not time)."""
    _EXTRA.append(line)


@pytest.fixture(scope="session")
def sizes():
    return N, D, M


def pytest_terminal_summary(terminalreporter):
    if not _TIMES and not _EXTRA:
        return
    tr = terminalreporter
    tr.section("protoseg: ratios against the baselines measured in the same process")
    tr.write_line(machine())
    for group, times in _TIMES.items():
        for name, t in times.items():
            ratios = [f"{t / times[b]:.2f}x {b}" for b in _BASELINES[group] if b in times]
            tr.write_line(f"{group:<34} {name:<22} {t * 1e3:10.1f} ms   {', '.join(ratios) or '(no baseline)'}")
        if "fused" in times and "reference" in times:
            speedup = times["reference"] / times["fused"]
            tr.write_line(f"{group:<34} {'reference / fused':<22} {speedup:10.2f}x")
    for line in _EXTRA:
        tr.write_line(line)
