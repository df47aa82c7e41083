"""CUDA benchmarks: the protoseg CUDA path against plain cuBLAS GEMMs of the same shapes (the
floor of docs/design.md section 3), at N = 1M pixels, D = 720, K*M = 190 and 8470, float32 and
bfloat16. Checks every timed op and the training step against the CPU kernels on a slice before
timing; reports times and ratios measured in one process.

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


def train_step(x, p, labels, weight, bias, k, m):
    """One training step of the classifier's ops: the fused pass with the feature LayerNorm,
    Sinkhorn, the losses and their backward, the update's segment means."""
    xg = x.detach().requires_grad_()
    out = ops.proto_train(xg, p, labels, 0.1, weight, bias)
    q, a = ops.sinkhorn(out.own, labels, k, 3, 0.05)
    target = torch.where(labels >= 0, labels * m + a, -1)
    own_t = out.own.gather(1, a.clamp(min=0)[:, None])[:, 0]
    valid = (target >= 0).to(own_t.dtype)
    loss = out.scores.float().logsumexp(1).mean() + 0.01 * ((out.lse - own_t / 0.1) * valid).mean() + 0.001 * (
        ((1 - own_t) ** 2) * valid).mean()
    loss.backward()
    mean, count = ops.scatter_mean(out.x_hat, target, k * m)
    return out, q, a, mean, count, xg.grad


def inputs(n, k, m, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g).to(dtype)
    p = torch.nn.functional.normalize(torch.randn(k, m, D, generator=g), dim=2).to(dtype)
    labels = torch.randint(-1, k, (n,), generator=g)
    weight, bias = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype), (0.1 * torch.randn(D, generator=g)).to(dtype)
    return [t.to(device) for t in (x, p, labels, weight, bias)]


def check_agreement(k, m, dtype):
    """Everything bench() times, on a 4096-pixel slice, CUDA against the CPU kernels."""
    cpu_args, dev_args = inputs(4096, k, m, dtype, "cpu"), inputs(4096, k, m, dtype, "cuda")
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=2e-2)

    def close(a, b, what):
        torch.testing.assert_close(a.cpu().float(), b.float(), msg=lambda msg: f"CUDA and CPU disagree on {what}: {msg}",
                                   **tol)

    close(ops.proto_similarity(*dev_args[:2])[0], ops.proto_similarity(*cpu_args[:2])[0], "proto_similarity")
    cpu, dev = train_step(*cpu_args, k, m), train_step(*dev_args, k, m)
    for name, a, b in zip(cpu[0]._fields, dev[0], cpu[0]):
        if name != "index":
            close(a, b, f"proto_train {name}")
    close(dev[1], cpu[1], "sinkhorn q")
    assert (dev[2].cpu() == cpu[2]).float().mean() > 0.99, "sinkhorn assignments disagree"
    same = (dev[2].cpu() == cpu[2]).all()
    if same:  # the segment means and the gradient depend on the assignment
        close(dev[3], cpu[3], "scatter_mean")
        assert torch.equal(dev[4].cpu(), cpu[4]), "scatter_mean counts disagree"
        close(dev[5], cpu[5], "the step's grad_x")


def bench(k, m, dtype):
    km = k * m
    x, p, labels, weight, bias = inputs(N, k, m, dtype, "cuda")
    acc = torch.float32
    flat = p.reshape(km, D).to(acc)
    rows = max(1, min(N, TILE_BUDGET // km))
    xa = torch.empty(rows, D, device="cuda", dtype=acc)
    tile = torch.empty(rows, km, device="cuda", dtype=acc)
    w = torch.empty(rows, D, device="cuda", dtype=acc)

    def gemm1():  # S = X P^T, chunked into the same bounded tile
        for s in range(0, N, rows):
            r = min(rows, N - s)
            torch.mm(xa[:r], flat.t(), out=tile[:r])

    def gemm2():  # S = X P^T and S P: the strict training floor
        for s in range(0, N, rows):
            r = min(rows, N - s)
            torch.mm(xa[:r], flat.t(), out=tile[:r])
            torch.mm(tile[:r], flat, out=w[:r])

    t = {
        "gemm1": cuda_time(gemm1),
        "gemm2": cuda_time(gemm2),
        "similarity": cuda_time(lambda: ops.proto_similarity(x, p)),
        "train_forward": cuda_time(lambda: ops.proto_train(x, p, labels, 0.1, weight, bias)),
        "train_step": cuda_time(lambda: train_step(x, p, labels, weight, bias, k, m)),
    }
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
