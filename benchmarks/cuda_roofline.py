"""The CUDA path's roofline, computed from the shipped launch sequence.

Runs the shipped launch sequences (the host side of csrc/cuda/<op>.cuh) on the CPU grid
executor in record-only mode: no kernel executes; every launch and every GEMM records, from its
arguments, the bytes of global memory it reads and writes and its FLOPs (each kernel's
launch_cost, beside it in csrc/cuda/<op>.cuh). Bytes to the buffers that the launch sequence
sized to stay in the GPU's L2 cache (plan_chunks in csrc/cuda/prototype_pass.cuh, which runs with
each GPU's L2 size here) are L2 traffic; the rest is HBM traffic. Each record's bound time is the
largest of HBM bytes / HBM bandwidth, all bytes / L2 bandwidth and FLOPs / peak; the table sums
them per kernel.

    python benchmarks/cuda_roofline.py            # N = 2^20, D = 720, K*M = 190 and 8470

Cases: `proto_similarity`, and one training step of the classifier without its feature
LayerNorm (proto_train, sinkhorn, proto_train_backward, scatter_mean of the unit rows), in
  fp32: float32 x, strict fp32 GEMMs;
  tf32: float32 x, TF32 GEMMs (torch.backends.cuda.matmul.allow_tf32);
  bf16: bfloat16 x (as autocast passes it on): the first GEMM in bf16 with fp32 accumulation,
        the others (their operands are the fp32 tile and p_hat) in TF32.
The floor beside each: similarity, one GEMM of x against the prototypes (or reading x and
writing the scores, if larger); the step, its three GEMMs (S, softmax(S) P, the backward's
G P) or reading x twice and writing grad_x, whichever is larger; GEMMs at the peak of x's own
dtype (bf16 tensor cores for bf16 x). Last, `sinkhorn` as one call against the composition of its
step ops (`ops.sinkhorn_reduced`), with the composition's ATen copies of the plan added at HBM
bandwidth. ATen operations inside the
launch sequence (copies, sorts, the L2 normalisation composite) are not modelled: they are
listed under the table with the pixel-sized tensors they touched.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "emulated"))
import emulated_module  # noqa: E402

from protoseg.ops.segments import compose_sinkhorn  # noqa: E402


N, D, M = 1 << 20, 720, 10
KS = (19, 847)
# Dense peaks: HBM bandwidth, FP32 on CUDA cores, TF32 and BF16 on tensor cores (NVIDIA's data
# sheets for the SXM parts; the sparse figures are twice these). L2: the size the device reports
# (50 MiB on both) and a bandwidth that no data sheet gives: 5.5 TB/s is of the order measured on
# an H100 PCIe by microbenchmarks, taken for both as the conservative figure.
GPUS = {
    "H100 SXM": {"bandwidth": 3.35e12, "fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12,
                 "l2": 50 << 20, "l2_bandwidth": 5.5e12},
    "H200": {"bandwidth": 4.8e12, "fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12,
             "l2": 50 << 20, "l2_bandwidth": 5.5e12},
}
MODES = {"fp32": (torch.float32, "fp32"), "tf32": (torch.float32, "tf32"), "bf16": (torch.bfloat16, "tf32")}


def gemm_peak(name: str, gpu: dict, float_gemm: str) -> float:
    if "BFloat16" in name or "Half" in name:
        return gpu["bf16"]
    return gpu[float_gemm] if "Float" in name else gpu["fp32"]  # double GEMMs do not occur


def bound(record, gpu: dict, float_gemm: str) -> float:
    name, read, written, flops, l2 = record
    peak = gemm_peak(name, gpu, float_gemm) if name.startswith("gemm") else gpu["fp32"]
    return max((read + written - l2) / gpu["bandwidth"], (read + written) / gpu["l2_bandwidth"], flops / peak)


def similarity(emu, x, p, labels):
    emu.proto_similarity(x, p)


def training_step(emu, x, p, labels):
    k, m = p.shape[:2]
    scores, index, own, lse, weighted, x_hat, stats = emu.proto_train(x, p, labels, 0.1, None, None, 1e-5)
    emu.sinkhorn(own, labels, k, 3, 0.05)
    emu.proto_train_backward(torch.empty_like(scores), torch.empty_like(own), torch.empty_like(lse), x, p, labels,
                             index, weighted, 0.1, None, None, stats)
    emu.scatter_mean(x_hat, labels * m, k * m)


class _Composed:
    """The emulated step ops for compose_sinkhorn in record-only mode, but for sinkhorn_segments's
    outputs: nothing executes there, so the emulated perm would have a length read from
    uninitialised memory; its launches are recorded and the CPU op gives the true perm and offsets."""

    def __init__(self, emu):
        self.emu = emu

    def __getattr__(self, name):
        return getattr(self.emu, name)

    def sinkhorn_segments(self, labels, k):
        self.emu.sinkhorn_segments(labels, k)
        return torch.ops.protoseg.sinkhorn_segments(labels, k)


def sinkhorn_bound(emu, fn, k: int, gpu: dict) -> tuple[float, int, float]:
    """Sinkhorn alone on N pixels with K classes equally likely: (bound seconds of the launches,
    launches, bound seconds of the ATen copies at HBM bandwidth)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.empty(N, M)
    labels = torch.randint(0, k, (N,), generator=g)
    records, prof = record_case(emu, lambda e, *a: fn(e, scores, labels, k), None, None, None, gpu["l2"])
    return sum(bound(r, gpu, "fp32") for r in records), len(records), aten_copy_bytes(prof) / gpu["bandwidth"]


def compare_sinkhorn(emu) -> None:
    """The one-call sinkhorn against the composition of its step ops (ops.sinkhorn_reduced, which
    a distributed run calls), as docs/performance.md weighs keeping both."""
    one_call = lambda e, s, lab, k: e.sinkhorn(s, lab, k, 3, 0.05)  # noqa: E731
    composed = lambda e, s, lab, k: compose_sinkhorn(_Composed(e), s, lab, k, 3, 0.05)  # noqa: E731
    print(f"\nsinkhorn, N = {N}, M = {M}, 3 iterations: one call vs its step ops composed; bound ms of the "
          "launches (their number), + the composition's ATen copies of the plan at HBM bandwidth")
    for k in KS:
        for g, gpu in GPUS.items():
            (a, na, ca), (b, nb, cb) = (sinkhorn_bound(emu, fn, k, gpu) for fn in (one_call, composed))
            print(f"  K = {k:4d} {g:9s} one call {(a + ca) * 1e3:7.3f} ms ({na})   composed {b * 1e3:7.3f} ms ({nb})"
                  f" + copies {cb * 1e3:6.3f} ms   composed / one call {(b + cb) / (a + ca):5.2f}x")


def floor(case: str, x, km: int, gpu: dict, float_gemm: str) -> float:
    """The mode's ideal: GEMMs at the peak of x's own dtype (bf16 on tensor cores for bf16 x)."""
    gemm_flops = 2.0 * N * km * D
    peak = gpu["bf16"] if x.dtype == torch.bfloat16 else gpu[float_gemm]
    if case == "similarity":
        return max(gemm_flops / peak, (N * D * x.element_size() + N * (km // M) * (x.element_size() + 8)) / gpu["bandwidth"])
    return max(3 * gemm_flops / peak, 3 * N * D * x.element_size() / gpu["bandwidth"])


VIEWS = {"aten::narrow", "aten::slice", "aten::unsqueeze", "aten::view", "aten::reshape", "aten::as_strided",
         "aten::select", "aten::t", "aten::transpose", "aten::expand", "aten::empty_like", "aten::empty",
         "aten::contiguous"}


def outermost_aten(prof):
    """The ATen ops of the profile not called by another ATen op (what the launch sequence itself
    called)."""
    for e in prof.events():
        if e.name.startswith("aten::") and e.cpu_parent is not None and not e.cpu_parent.name.startswith("aten::"):
            yield e


def unmodelled_aten(prof) -> dict[str, int]:
    """ATen ops that ran inside the protoseg calls on pixel-sized tensors (views and uninitialised
    allocations aside): name -> calls."""
    out: dict[str, int] = defaultdict(int)
    for e in outermost_aten(prof):
        if e.name not in VIEWS and any(shape and shape[0] == N for shape in e.input_shapes if isinstance(shape, list)):
            out[e.name] += 1
    return dict(out)


def aten_copy_bytes(prof) -> float:
    """Bytes read and written by the outermost ATen clones in the profile (the composition's copies
    of the [N, M] float64 plan), which the launch records do not hold."""
    sizes = {"double": 8, "float": 4, "long int": 8}
    return sum(2 * math.prod(e.input_shapes[0]) * sizes[e.input_dtypes[0]]
               for e in outermost_aten(prof) if e.name == "aten::clone")


def record_case(emu, fn, x, p, labels, l2_bytes: int):
    """The case's records with chunks planned for an L2 cache of l2_bytes, and the profile."""
    emu.take_records()
    emu.set_l2_bytes(l2_bytes)
    emu.set_record_only(True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            with torch.profiler.record_function("protoseg_case"):
                fn(emu, x, p, labels)
    finally:
        emu.set_record_only(False)
        emu.set_l2_bytes(0)
    return emu.take_records(), prof


def run_case(emu, case: str, fn, k: int, mode: str):
    dtype, float_gemm = MODES[mode]
    x = torch.empty(N, D, dtype=dtype)  # never touched: nothing executes
    p = torch.randn(k, M, D).to(dtype)
    labels = torch.zeros(N, dtype=torch.int64)
    by_l2 = {size: record_case(emu, fn, x, p, labels, size) for size in sorted({gpu["l2"] for gpu in GPUS.values()})}
    records, prof = by_l2[GPUS["H100 SXM"]["l2"]]
    km = k * M
    print(f"\n{case}, K*M = {km}, {mode}: N = {N}, D = {D}, {len(records)} launches and GEMMs (H100 SXM)")
    rows = defaultdict(lambda: [0, 0.0, 0.0, 0.0, {g: 0.0 for g in GPUS}])
    for g, gpu in GPUS.items():
        for r in by_l2[gpu["l2"]][0]:
            row = rows[r[0].replace("protoseg::cuda::", "")]
            row[4][g] += bound(r, gpu, float_gemm)
    for r in records:
        row = rows[r[0].replace("protoseg::cuda::", "")]
        row[0] += 1
        row[1] += r[1] + r[2] - r[4]
        row[2] += r[4]
        row[3] += r[3]
    head = (f"  {'kernel':42s} {'calls':>6s} {'HBM GB':>8s} {'L2 GB':>8s} {'GFLOP':>9s}"
            + "".join(f" {g + ' ms':>12s}" for g in GPUS))
    print(head)
    totals = {g: 0.0 for g in GPUS}
    gemms = {g: 0.0 for g in GPUS}
    for name, (calls, hbm, l2, flops, times) in sorted(rows.items(), key=lambda kv: -kv[1][4]["H100 SXM"]):
        print(f"  {name:42s} {calls:6d} {hbm / 1e9:8.2f} {l2 / 1e9:8.2f} {flops / 1e9:9.1f}"
              + "".join(f" {times[g] * 1e3:12.3f}" for g in GPUS))
        for g in GPUS:
            totals[g] += times[g]
            if name.startswith("gemm"):
                gemms[g] += times[g]
    floors = {g: floor(case, x, km, gpu, float_gemm) for g, gpu in GPUS.items()}
    print(f"  {'total':42s} {'':6s} {'':8s} {'':8s} {'':9s}" + "".join(f" {totals[g] * 1e3:12.3f}" for g in GPUS))
    print(f"  {'floor':42s} {'':6s} {'':8s} {'':8s} {'':9s}" + "".join(f" {floors[g] * 1e3:12.3f}" for g in GPUS))
    print(f"  {'total / floor':42s} {'':6s} {'':8s} {'':8s} {'':9s}" + "".join(f" {totals[g] / floors[g]:11.2f}x" for g in GPUS))
    print(f"  {'total / its GEMMs':42s} {'':6s} {'':8s} {'':8s} {'':9s}" + "".join(f" {totals[g] / gemms[g]:11.2f}x" for g in GPUS))
    aten = unmodelled_aten(prof)
    if aten:
        print("  not modelled (ATen, on pixel-sized tensors): " + ", ".join(f"{n} x{c}" for n, c in sorted(aten.items())))
    return {g: (totals[g], floors[g], gemms[g]) for g in GPUS}


def main() -> None:
    emu = emulated_module.load()
    summary = []
    for case, fn in (("similarity", similarity), ("training step", training_step)):
        for k in KS:
            for mode in MODES:
                summary.append((case, k * M, mode, run_case(emu, case, fn, k, mode)))
    print("\nSummary (bound ms; ratio to the floor; ratio to the case's own GEMMs)")
    print(f"  {'case':14s} {'K*M':>5s} {'mode':5s}" + "".join(f" {g + ': ms, /floor, /GEMMs':>30s}" for g in GPUS))
    for case, km, mode, res in summary:
        print(f"  {case:14s} {km:5d} {mode:5s}" + "".join(
            f" {res[g][0] * 1e3:12.2f} {res[g][0] / res[g][1]:7.2f}x {res[g][0] / res[g][2]:7.2f}x" for g in GPUS))
    compare_sinkhorn(emu)


if __name__ == "__main__":
    main()
