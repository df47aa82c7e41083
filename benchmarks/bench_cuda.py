"""CUDA benchmarks: the protoseg CUDA path against plain cuBLAS GEMMs of the same shapes (the
floor of docs/design.md section 3), at N = 1M pixels, D = 720, K*M = 190 and 8470, float32 and
bfloat16. Checks every timed op and the training step against the CPU kernels on a slice before
timing; reports times and ratios measured in one process, with the achieved bandwidth and
FLOP rate of each call:
- bytes: what the call must move at least: every input read once and every output written
  once (the GEMM floors: X and P read, the [N, K*M] product written, and for the second GEMM
  read again and its [N, D] result written, although they pass chunk by chunk through one
  reused tile);
- FLOPs: those of the GEMM floor the call is compared with, 2*N*D*K*M per GEMM (one for
  proto_similarity, two for the training forward and step), i.e. useful work, not all the
  work the kernels do (the step's backward runs a third GEMM).

    python benchmarks/bench_cuda.py [--json PATH]   # prints a table; exits 0 without a GPU
    pytest benchmarks/bench_cuda.py                 # the same, as a test (skips without a GPU)

Environment: PROTOSEG_BENCH_CUDA_N (default 1048576), PROTOSEG_BENCH_CUDA_KM ("19x10,847x10").
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import protoseg.ops as ops
from protoseg.engine.checkpoint import atomic_write

N = int(os.environ.get("PROTOSEG_BENCH_CUDA_N", str(1 << 20)))
D = 720
SHAPES = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("PROTOSEG_BENCH_CUDA_KM", "19x10,847x10").split(",")]
TILE_BUDGET = 1 << 25  # entries of the [rows, K*M] tile (kDefaultTileBudget in csrc/cuda/prototype_pass.cuh)


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
    """Drawn on `device` itself: 2^20 x 720 normal values take seconds on one CPU thread."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, D, generator=g, device=device).to(dtype)
    p = torch.nn.functional.normalize(torch.randn(k, m, D, generator=g, device=device), dim=2).to(dtype)
    labels = torch.randint(-1, k, (n,), generator=g, device=device)
    weight = (1 + 0.1 * torch.randn(D, generator=g, device=device)).to(dtype)
    bias = (0.1 * torch.randn(D, generator=g, device=device)).to(dtype)
    return [x, p, labels, weight, bias]


def check_agreement(k, m, dtype):
    """Everything bench() times, on a 4096-pixel slice, CUDA against the CPU kernels."""
    cpu_args = inputs(4096, k, m, dtype, "cpu")
    dev_args = [t.cuda() for t in cpu_args]
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


def nbytes(*values) -> int:
    """Bytes of every tensor in `values` (nested in tuples, lists and named tuples)."""
    return sum(nbytes(*v) if isinstance(v, (tuple, list)) else v.numel() * v.element_size()
               for v in values if isinstance(v, (torch.Tensor, tuple, list)))


def bench(k, m, dtype):
    """Rows {op, baseline, bytes, ms, flops}: the GEMM floors, then the ops, at this shape."""
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

    size = xa.element_size()
    floors = [("gemm1", gemm1, size * (N * D + km * D + N * km), 1),
              ("gemm2", gemm2, size * (2 * N * D + km * D + 2 * N * km), 2)]
    ops_in = (x, p, labels, weight, bias)
    calls = [("similarity", lambda: ops.proto_similarity(x, p), (x, p), "gemm1", 1),
             ("train_forward", lambda: ops.proto_train(x, p, labels, 0.1, weight, bias), ops_in, "gemm2", 2),
             ("train_step", lambda: train_step(x, p, labels, weight, bias, k, m), ops_in, "gemm2", 2)]
    timed = [{"op": op, "baseline": None, "bytes": b, "gemms": g, "ms": cuda_time(fn)}
             for op, fn, b, g in floors]
    timed += [{"op": op, "baseline": base, "bytes": nbytes(given, fn()), "gemms": g, "ms": cuda_time(fn)}
              for op, fn, given, base, g in calls]
    for r in timed:
        r["flops"] = r.pop("gemms") * 2 * N * D * km
    return timed


def measure():
    """Agreement first, then the timings, for every dtype and shape: one row per op and shape
    with its time, its ratio to its GEMM baseline, GB/s and TFLOP/s."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for k, m in SHAPES:
            check_agreement(k, m, dtype)
            rows = bench(k, m, dtype)
            ms = {r["op"]: r["ms"] for r in rows}
            for r in rows:
                results.append({"dtype": str(dtype).removeprefix("torch."), "K": k, "M": m, "KM": k * m, **r,
                                "ratio": r["ms"] / ms[r["baseline"]] if r["baseline"] else None,
                                "GB_per_s": r["bytes"] / r["ms"] / 1e6,
                                "TFLOP_per_s": r["flops"] / r["ms"] / 1e9})
    return {"device": torch.cuda.get_device_name(), "N": N, "D": D, "rows": results}


def report(measured):
    lines = [f"N = {measured['N']}, D = {measured['D']}, device {measured['device']} "
             f"(ms; ratio to the op's plain GEMM baseline; GB/s and TFLOP/s as the docstring counts them)"]
    for r in measured["rows"]:
        ratio = f"{r['ratio']:5.2f}x {r['baseline']}" if r["baseline"] else ""
        lines.append(f"{r['dtype']:9s} K*M={r['KM']:5d}  {r['op']:13s} {r['ms']:9.3f} ms  {ratio:13s} "
                     f"{r['GB_per_s']:7.0f} GB/s  {r['TFLOP_per_s']:7.1f} TFLOP/s")
    return "\n".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bench_cuda():
    print("\n" + report(measure()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (docs/gpu_check.md)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device, nothing to time")
    else:
        measured = measure()
        print(report(measured))
        if args.json:
            atomic_write(args.json, lambda f: f.write(json.dumps(measured, indent=2).encode()))
