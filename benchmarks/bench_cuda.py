"""CUDA benchmarks: the protoseg CUDA path against plain cuBLAS GEMMs of the same shapes (the
floor of DESIGN.md section 3), at N = 1M pixels, D = 720, K*M = 190 and 8470, float32 and
bfloat16. Checks agreement with the CPU ops on a slice before timing; reports times and
ratios measured in one process, next to the H100 roofline estimates of README_cuda_section.md.

    python benchmarks/bench_cuda.py            # prints a table; exits 0 without a GPU
    pytest benchmarks/bench_cuda.py            # the same, as a test (skips without a GPU)

Environment: PROTOSEG_BENCH_CUDA_N (default 1048576), PROTOSEG_BENCH_CUDA_KM ("19x10,847x10").
"""

from __future__ import annotations

import os

import pytest
import torch

import protoseg.ops as ops

N = int(os.environ.get("PROTOSEG_BENCH_CUDA_N", str(1 << 20)))
D = 720
SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("PROTOSEG_BENCH_CUDA_KM", "19x10,847x10").split(",")]
TILE_BUDGET = 1 << 25  # entries of the [rows, K*M] tile (csrc/cuda/launchers.h kDefaultTileBudget)


def cuda_time(fn, reps=10):
    """Mean milliseconds per call, CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def check_agreement(k, m, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, D, generator=g).to(dtype)
    p = torch.randn(k, m, D, generator=g).to(dtype)
    labels = torch.randint(-1, k, (4096,), generator=g)
    cpu = ops.proto_train(x, p, labels, 0.1)
    dev = ops.proto_train(x.cuda(), p.cuda(), labels.cuda(), 0.1)
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=2e-2)
    for name, a, b in zip(cpu._fields, dev, cpu):
        if name != "index":
            torch.testing.assert_close(a.cpu().float(), b.float(), msg=f"CUDA and CPU disagree on {name}", **tol)


def bench(k, m, dtype):
    km = k * m
    dev = "cuda"
    x = torch.randn(N, D, device=dev, dtype=dtype)
    p = torch.nn.functional.normalize(torch.randn(k, m, D, device=dev, dtype=dtype), dim=2)
    labels = torch.randint(-1, k, (N,), device=dev)
    acc = torch.float32
    flat = p.reshape(km, D).to(acc)
    rows = max(1, min(N, TILE_BUDGET // km))
    xa = torch.empty(rows, D, device=dev, dtype=acc)
    tile = torch.empty(rows, km, device=dev, dtype=acc)
    w = torch.empty(rows, D, device=dev, dtype=acc)

    def gemm1():  # S = X P^T, chunked into the same bounded tile
        for s in range(0, N, rows):
            r = min(rows, N - s)
            torch.mm(xa[:r], flat.t(), out=tile[:r])

    def gemm2():  # S = X P^T and softmax(S) P: the training floor
        for s in range(0, N, rows):
            r = min(rows, N - s)
            torch.mm(xa[:r], flat.t(), out=tile[:r])
            torch.mm(tile[:r], flat, out=w[:r])

    def similarity():
        ops.proto_similarity(x, p)

    def train_forward():
        ops.proto_train(x, p, labels, 0.1)

    xg = x.detach().requires_grad_()

    def train_step():
        out = ops.proto_train(xg, p, labels, 0.1)
        q, a = ops.sinkhorn(out.own, labels, k, 3, 0.05)
        target = torch.where(labels >= 0, labels * m + a, -1)
        own_t = out.own.gather(1, a.clamp(min=0)[:, None])[:, 0]
        valid = (target >= 0).to(acc)
        loss = out.scores.float().logsumexp(1).mean() + 0.01 * ((out.lse - own_t / 0.1) * valid).mean() + 0.001 * (
            ((1 - own_t) ** 2) * valid).mean()
        loss.backward()
        ops.scatter_mean(x.detach(), target, km)

    t = {name: cuda_time(fn) for name, fn in [("gemm1", gemm1), ("gemm2", gemm2), ("similarity", similarity),
                                              ("train_forward", train_forward), ("train_step", train_step)]}
    return t


def report():
    lines = [f"N = {N}, D = {D}, device {torch.cuda.get_device_name()} (ms; ratio to the plain GEMM floor)"]
    for dtype in (torch.float32, torch.bfloat16):
        for k, m in SHAPES:
            check_agreement(k, m, dtype)
            t = bench(k, m, dtype)
            lines.append(
                f"{str(dtype):15s} K*M={k * m:5d}  1 GEMM {t['gemm1']:8.2f}  2 GEMMs {t['gemm2']:8.2f} | "
                f"similarity {t['similarity']:8.2f} ({t['similarity'] / t['gemm1']:.2f}x)  "
                f"train fwd {t['train_forward']:8.2f} ({t['train_forward'] / t['gemm2']:.2f}x)  "
                f"train step {t['train_step']:8.2f} ({t['train_step'] / t['gemm2']:.2f}x)"
            )
    return "\n".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bench_cuda():
    print("\n" + report())


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device, nothing to time")
    else:
        print(report())
