"""Shared setup for the benchmarks: problem sizes, and a table of ratios printed at the end.

Every benchmark checks that what it times agrees with its baseline first, and records its
mean time under (group, name); the summary divides each time by its group's baseline, all
measured in this one process.

Sizes: PROTOSEG_BENCH_N pixels (default 32768), D = 720, M = 10, and K in
PROTOSEG_BENCH_K (default "19,150,847").
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

N = int(os.environ.get("PROTOSEG_BENCH_N", "32768"))
D = int(os.environ.get("PROTOSEG_BENCH_D", "720"))
M = 10
KS = [int(k) for k in os.environ.get("PROTOSEG_BENCH_K", "19,150,847").split(",")]
ROUNDS = int(os.environ.get("PROTOSEG_BENCH_ROUNDS", "3"))

_TIMES: dict[str, dict[str, float]] = defaultdict(dict)
_BASELINES: dict[str, str] = {}
_EXTRA: list[str] = []


def run(benchmark, group: str, name: str, fn, *, baseline: str, rounds: int = ROUNDS):
    """Times fn with pytest-benchmark (one warm-up round) and records its mean for the table."""
    benchmark.group = group
    benchmark.name = name
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    _TIMES[group][name] = benchmark.stats.stats.mean
    _BASELINES[group] = baseline


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
    tr.section("protoseg: ratios against the baseline measured in the same process")
    for group, times in _TIMES.items():
        base = _BASELINES[group]
        for name, t in times.items():
            ratio = f"{t / times[base]:.2f}x {base}" if base in times else "(no baseline)"
            tr.write_line(f"{group:<34} {name:<22} {t * 1e3:10.1f} ms   {ratio}")
        if "fused" in times and "reference" in times:
            speedup = times["reference"] / times["fused"]
            tr.write_line(f"{group:<34} {'reference / fused':<22} {speedup:10.2f}x")
    for line in _EXTRA:
        tr.write_line(line)
