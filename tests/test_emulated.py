"""The CUDA kernels, executed on the CPU: every op's shipped launch sequence (csrc/cuda/<op>.cuh)
and kernels (csrc/cuda/*.cuh) run by the CPU grid executor (tests/emulated/grid_executor.h), with
torch's CPU GEMM and sort standing in for cuBLAS and cub, checked against protoseg/ops/reference.py
(and bitwise against the CPU kernels where those are bitwise reproducible).

Sizes are small but cover several blocks per kernel (test_every_kernel_ran_on_several_blocks),
partial chunks (the tile budget is lowered so the pass runs in several chunks, the last one
partial), empty segments, ignored pixels and N = 0.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import protoseg.ops  # registers the CPU ops
from protoseg.ops import reference as ref
from protoseg.ops.segments import compose_sinkhorn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "emulated"))
import emulated_module  # noqa: E402
import test_ops  # noqa: E402  (its op_calls: every op's calls on one sample)

pytestmark = pytest.mark.slow  # compiling the emulation alone takes about 40 s

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def emu():
    module = emulated_module.load()
    module.set_tile_budget(1 << 25)
    return module


def test_every_protoseg_op_is_emulated(emu):
    # The bindings are generated from csrc/cuda/*.cu (emulated_module.py): every schema of
    # csrc/protoseg.cpp has a CUDA launch sequence and so an emulated one.
    schemas = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("protoseg::")}
    missing = sorted(op for op in schemas if not hasattr(emu, op))
    assert not missing, f"ops without an emulated CUDA launch sequence: {missing}"
    assert len(emulated_module.cuda_ops()) == len(schemas) - 2  # layer_norm_normalize(+backward): an ATen composite


def _tensors(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_op_call_matches_the_cpu_kernel(chunked, dtype):
    # Every (op, args) of tests/test_ops.py (opcheck's list), through the CUDA launch sequence in
    # several partial chunks, against the CPU kernel: exact for integer outputs, the dtype's
    # accumulation tolerance for the rest.
    tol = {torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
    for case in [test_ops.CASE[name] for name in ("empty", "odd", "transposed", "strided")]:
        chunked.set_tile_budget(7 * case.k * case.m)
        s = test_ops.make_sample(case, dtype)
        for op, args in test_ops.op_calls(s):
            name = op._schema.name.split("::")[1]
            args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            args += [a.default_value for a in op._schema.arguments[len(args):]]
            for want, got in zip(_tensors(op(*args)), _tensors(getattr(chunked, name)(*args)), strict=True):
                what = f"{name} on {case.name}"
                if want.dtype in (torch.int64, torch.bool):
                    assert torch.equal(got, want), what
                else:
                    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def chunked(emu):
    """Tiles of at most 7 rows whatever K*M: several chunks, the last one partial."""
    yield emu
    emu.set_tile_budget(1 << 25)


def _inputs(n, d, k, m, dtype, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if noncontiguous:
        x = torch.randn(d, n, generator=g, dtype=torch.float64).t()
    p = torch.randn(k, m, d, generator=g, dtype=torch.float64)
    if n > 2 and dtype in (torch.float32, torch.float64):
        x[1] = 0  # a zero row: the eps-clamped branch (its gradient, g / 1e-12, overflows half)
    return x.to(dtype), p.to(dtype)


def _check(ours, ref_lowp, ref64, dtype, what):
    """float32/64: close to the fp64 reference. Half precision: error against fp64 at most about
    twice the error of the reference run in the same precision (STYLE.md rule 13)."""
    ours, ref_lowp, ref64 = ours.double(), ref_lowp.double(), ref64.double()
    err = (ours - ref64).abs().max().item() if ours.numel() else 0.0
    base = (ref_lowp - ref64).abs().max().item() if ours.numel() else 0.0
    bound = 2 * base + ATOL[dtype] * max(1.0, ref64.abs().max().item() if ours.numel() else 1.0)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (reference in {dtype}: {base:.3g})"


def _grad_ref(fn, x, *args):
    """Gradient of fn(x, ...) -> scalar, by autograd through the reference in float64."""
    xr = x.detach().double().requires_grad_()
    fn(xr, *args).backward()
    return xr.grad


# ---- proto_similarity -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_proto_similarity(chunked, dtype):
    emu = chunked
    n, d, k, m = 45, 24, 6, 4
    x, p = _inputs(n, d, k, m, dtype)
    emu.set_tile_budget(7 * k * m)
    scores, index = emu.proto_similarity(x, p)
    s64, i64 = ref.proto_similarity(x.double(), p.double())
    s_lp, _ = ref.proto_similarity(x, p)
    assert scores.dtype == dtype and index.dtype == torch.int64 and scores.shape == (n, k)
    _check(scores, s_lp, s64, dtype, "scores")
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(index, i64)
    else:  # near-ties may flip in low precision: the chosen prototype must score the maximum
        sim = (torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(
            p.double(), dim=2).reshape(k * m, d).t()).view(n, k, m)
        _check(sim.gather(2, index[..., None])[..., 0], s_lp, s64, dtype, "score at index")

    g = torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grad = emu.proto_similarity_backward(g, x, p, index)
    assert grad.dtype == dtype and grad.shape == (n, d)

    def loss(xr, pr, gr, idx):
        xh = torch.nn.functional.normalize(xr, dim=1, eps=ref.NORM_EPS)
        ph = torch.nn.functional.normalize(pr, dim=2, eps=ref.NORM_EPS)
        sel = ph[torch.arange(k)[None, :], idx]  # [n, k, d] the winning prototypes
        return (gr[..., None] * xh[:, None, :] * sel).sum()

    g64 = _grad_ref(loss, x, p.double(), g.double(), index)
    glp = _grad_ref(loss, x.float(), p.float(), g.float(), index) if dtype != torch.float64 else g64
    _check(grad, glp, g64, dtype, "grad_x")


TRAIN_OUTPUTS = ("scores", "index", "own", "lse", "weighted", "x_hat", "stats")


# ---- proto_train ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_proto_train(chunked, dtype, temperature):
    emu = chunked
    n, d, k, m = 41, 20, 5, 3
    x, p = _inputs(n, d, k, m, dtype, seed=2)
    labels = torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(3))
    labels[:3] = -1
    emu.set_tile_budget(7 * k * m)
    out = emu.proto_train(x, p, labels, temperature, None, None, 1e-5)
    out64 = ref.proto_train(x.double(), p.double(), labels, temperature)
    out_lp = ref.proto_train(x, p, labels, temperature)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert [t.dtype for t in out] == [dtype, torch.int64, acc, acc, acc, dtype, acc]
    for name, a, b, c in zip(TRAIN_OUTPUTS, out, out_lp, out64, strict=True):
        if name == "index":
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(a, c)
            continue
        _check(a, b, c, dtype, name)
    assert torch.all(out[2][labels < 0] == 0)

    gen = torch.Generator().manual_seed(4)
    gs = torch.randn(n, k, generator=gen, dtype=torch.float64)
    go = torch.randn(n, m, generator=gen, dtype=torch.float64)
    gl = torch.randn(n, generator=gen, dtype=torch.float64)
    index = out[1]

    def loss(xr, use_s, use_o, use_l):
        xh = torch.nn.functional.normalize(xr, dim=1, eps=ref.NORM_EPS)
        ph = torch.nn.functional.normalize(p.double(), dim=2, eps=ref.NORM_EPS)
        sim = (xh @ ph.reshape(k * m, d).t()).view(n, k, m)
        total = xr.sum() * 0
        if use_s:
            total = total + (gs * sim.gather(2, index[..., None])[..., 0]).sum()
        if use_o:
            own = sim[torch.arange(n), labels.clamp(min=0)] * (labels >= 0)[:, None]
            total = total + (go * own).sum()
        if use_l:
            total = total + (gl * torch.logsumexp(sim.reshape(n, -1) / temperature, dim=1)).sum()
        return total

    uses = [(True, True, True)]
    if dtype == torch.float32 and temperature == 0.1:  # each term alone, and no term at all
        uses += [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]
    for use in uses:
        args = [t.to(dtype if i == 0 else acc) if u else None for i, (t, u) in enumerate(zip((gs, go, gl), use))]
        grad, grad_w, grad_b = emu.proto_train_backward(*args, x, p, labels, index, out[4], temperature, None, None,
                                                        out[6])
        assert grad_w.shape == (0,) and grad_b.shape == (0,)
        g64 = _grad_ref(loss, x, *use)
        glp = _grad_ref(loss, x.float(), *use) if dtype != torch.float64 else g64
        _check(grad, glp, g64, dtype, f"grad_x {use}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_proto_train_layer_norm(chunked, dtype):
    # The LayerNorm that the CUDA entry point runs around the pass (cuda/proto_train.cuh): outputs and
    # the gradients of x, weight and bias against the reference with autograd.
    emu = chunked
    n, d, k, m = 37, 12, 4, 3
    x, p = _inputs(n, d, k, m, dtype, seed=21)
    gen = torch.Generator().manual_seed(22)
    labels = torch.randint(-1, k, (n,), generator=gen)
    w64 = 1 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    b64 = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    w, b = w64.to(dtype), b64.to(dtype)
    emu.set_tile_budget(7 * k * m)
    out = emu.proto_train(x, p, labels, 0.1, w, b, 1e-5)
    out_lp = ref.proto_train(x, p, labels, 0.1, w, b)
    out64 = ref.proto_train(x.double(), p.double(), labels, 0.1, w64, b64)
    for name, a, b_, c in zip(TRAIN_OUTPUTS, out, out_lp, out64, strict=True):
        if name != "index":
            _check(a, b_, c, dtype, name)
    gs = torch.randn(n, k, generator=gen, dtype=torch.float64)
    gl = torch.randn(n, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grads = emu.proto_train_backward(gs.to(dtype), None, gl.to(acc), x, p, labels, out[1], out[4], 0.1, w, b, out[6])

    index = out[1]

    def oracle(xr, wr, br):
        # Through our argmax (a near-tie may go the other way in another precision).
        leaves = [t.detach().clone().requires_grad_(True) for t in (xr, wr, br)]
        rows = ref._layer_norm_rows(*leaves, 1e-5)
        ph = torch.nn.functional.normalize(p.to(rows.dtype), dim=2, eps=ref.NORM_EPS).reshape(k * m, d)
        sim = rows @ ph.t()
        scores = sim.view(n, k, m).gather(2, index[..., None])[..., 0]
        lse = torch.logsumexp(sim / 0.1, dim=1)
        return torch.autograd.grad((scores * gs.to(rows.dtype)).sum() + (lse * gl.to(rows.dtype)).sum(), leaves)

    g64 = oracle(x.double(), w64, b64)
    glp = oracle(x.float(), w.float(), b.float()) if dtype != torch.float64 else g64
    for name, a, b_, c in zip(("grad_x", "grad_weight", "grad_bias"), grads, glp, g64):
        _check(a, b_, c, dtype, name)


# ---- the contrast losses: composed from proto_train's own and lse (ops.contrast_losses) --------


@pytest.mark.parametrize("dtype", DTYPES)
def test_contrast_losses_over_the_emulated_pass(chunked, dtype):
    """PPC/PPD have no kernels of their own: ops.contrast_losses over the emulated proto_train's
    own and lse, and its gradient through the emulated proto_train_backward, match the reference
    contrast loss."""
    emu = chunked
    n, d, k, m = 43, 16, 4, 3
    x, p = _inputs(n, d, k, m, dtype, seed=5)
    target = torch.randint(0, k * m, (n,), generator=torch.Generator().manual_seed(6))
    target[::5] = -1
    labels, assignment = torch.where(target >= 0, target // m, -1), torch.where(target >= 0, target % m, -1)
    emu.set_tile_budget(7 * k * m)
    _, index, own, lse, weighted, _, stats = emu.proto_train(x, p, labels, 0.1, None, None, 1e-5)
    own, lse = own.requires_grad_(), lse.requires_grad_()
    ppc, ppd = protoseg.ops.contrast_losses(own, lse, assignment, 0.1)
    r64 = ref.proto_contrast_loss(x.double(), p.double(), target, 0.1, -1)
    rlp = ref.proto_contrast_loss(x, p, target, 0.1, -1)
    _check(ppc.to(dtype), rlp[0], r64[0], dtype, "ppc")
    _check(ppd.to(dtype), rlp[1], r64[1], dtype, "ppd")

    def loss(xr, pr):
        a, b = ref.proto_contrast_loss(xr, pr, target, 0.1, -1)
        return 0.7 * a - 1.3 * b

    g_own, g_lse = torch.autograd.grad(0.7 * ppc - 1.3 * ppd, (own, lse))
    grad = emu.proto_train_backward(None, g_own, g_lse, x, p, labels, index, weighted, 0.1, None, None, stats)[0]
    g64 = _grad_ref(loss, x, p.double())
    glp = _grad_ref(loss, x.float(), p.float()) if dtype != torch.float64 else g64
    _check(grad, glp, g64, dtype, "grad_x")


# ---- sinkhorn -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn(emu, dtype):
    n, m, k = 150, 5, 7  # class 5 empty, class 6 one pixel, M > 1, several blocks of pixels
    g = torch.Generator().manual_seed(8)
    scores = torch.rand(n, m, generator=g).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=g)
    labels[::7] = -1
    labels[10] = 6
    q, a = emu.sinkhorn(scores, labels, k, 3, 0.05)
    rq, ra = ref.sinkhorn(scores, labels, k, 3, 0.05)
    assert q.dtype == torch.float32 and a.dtype == torch.int64
    torch.testing.assert_close(q, rq, rtol=1e-6, atol=1e-7)
    assert torch.equal(a, ra)
    assert torch.all(q[labels < 0] == 0) and torch.all(a[labels < 0] == -1)
    # The CPU kernel computes the same doubles in the same order within each pixel: equal.
    cq, ca = torch.ops.protoseg.sinkhorn(scores, labels, k, 3, 0.05)
    torch.testing.assert_close(q, cq, rtol=1e-6, atol=0)
    assert torch.equal(a, ca)
    # Deterministic: a second run is bitwise identical.
    q2, a2 = emu.sinkhorn(scores, labels, k, 3, 0.05)
    assert torch.equal(q, q2) and torch.equal(a, a2)


@pytest.mark.parametrize("m", [1, 300])
def test_sinkhorn_column_groups(emu, m):
    """M = 1 (one column) and M > 256 threads (the reduction walks column groups)."""
    n, k = 40, 3
    g = torch.Generator().manual_seed(9)
    scores = torch.rand(n, m, generator=g)
    labels = torch.randint(-1, k, (n,), generator=g)
    q, a = emu.sinkhorn(scores, labels, k, 2, 0.1)
    rq, ra = ref.sinkhorn(scores, labels, k, 2, 0.1)
    torch.testing.assert_close(q, rq, rtol=1e-6, atol=1e-7)
    assert torch.equal(a, ra)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_steps(emu, dtype):
    """The distributed caller's step ops on the executor: composed, bitwise the kernel's
    single-call sinkhorn (the same kernels and reduction order); each step against the CPU op on
    the same input (per-pixel steps bitwise, sums to rounding: the block reduction adds in
    another order)."""
    n, m, k = 600, 5, 7  # class 5 empty, class 6 one pixel, several blocks
    g = torch.Generator().manual_seed(14)
    scores = torch.rand(n, m, generator=g).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=g)
    labels[::7] = -1
    labels[10] = 6
    q, a = compose_sinkhorn(emu, scores, labels, k, 3, 0.05)
    q1, a1 = emu.sinkhorn(scores, labels, k, 3, 0.05)
    assert torch.equal(q, q1) and torch.equal(a, a1)

    P = torch.ops.protoseg
    perm, offsets = emu.sinkhorn_segments(labels, k)
    cperm, coffsets = P.sinkhorn_segments(labels, k)
    assert torch.equal(perm, cperm) and torch.equal(offsets, coffsets)
    class_max = emu.segment_reduce(scores, perm, offsets, True, True)
    assert torch.equal(class_max, P.segment_reduce(scores, perm, offsets, True, True))
    plan = emu.sinkhorn_exp(scores, labels, class_max, 0.05)
    assert torch.equal(plan, P.sinkhorn_exp(scores, labels, class_max, 0.05))
    for all_columns in (True, False):
        torch.testing.assert_close(emu.segment_reduce(plan, perm, offsets, False, all_columns),
                                   P.segment_reduce(plan, perm, offsets, False, all_columns), rtol=1e-14, atol=0)
    total = P.segment_reduce(plan, perm, offsets, False, True)
    assert torch.equal(emu.sinkhorn_scale(plan, labels, total), P.sinkhorn_scale(plan, labels, total))
    rows, count = P.segment_reduce(plan, perm, offsets, False, False), (coffsets[1:] - coffsets[:-1]).double()
    assert torch.equal(emu.sinkhorn_step(plan, labels, rows, count), P.sinkhorn_step(plan, labels, rows, count))
    eq, ea = emu.sinkhorn_finish(plan, labels, count)
    cq, ca = P.sinkhorn_finish(plan, labels, count)
    assert torch.equal(eq, cq) and torch.equal(ea, ca)


def test_segment_reduce_stays_in_bounds_on_bad_perm_and_offsets(emu):
    """On CUDA these are not checked on the host (no synchronisation in the loop): reads through a
    bad perm or offsets are skipped or clamped, never out of bounds."""
    values = torch.rand(10, 2, dtype=torch.float64)
    perm = torch.tensor([0, 1, 99, -5, 4])
    offsets = torch.tensor([0, 2, 4, 1000])
    out = emu.segment_reduce(values, perm, offsets, False, False)
    torch.testing.assert_close(out, torch.stack([values[:2].sum(0), torch.zeros(2, dtype=torch.float64),
                                                 values[4]]), rtol=1e-15, atol=0)


# ---- scatter_mean -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_mean(emu, dtype):
    n, d, s = 90, 150, 12  # D > 128 threads: two channel blocks; segments 3 and 11 empty
    g = torch.Generator().manual_seed(10)
    x = torch.randn(n, d, generator=g).to(dtype)
    index = torch.randint(0, 11, (n,), generator=g)
    index[index == 3] = -1
    mean, count = emu.scatter_mean(x, index, s)
    rm, rc = ref.scatter_mean(x, index, s)
    assert mean.dtype == dtype and torch.equal(count, rc)
    cm, cc = torch.ops.protoseg.scatter_mean(x, index, s)
    assert torch.equal(mean, cm), "the sorted-segment reduction adds rows in the CPU kernel's order"
    torch.testing.assert_close(mean.double(), rm.double(), rtol=0, atol=ATOL[dtype] * 4)
    gm = torch.randn(s, d, generator=g).to(dtype)
    grad = emu.scatter_mean_backward(gm, index, count)
    assert torch.equal(grad, torch.ops.protoseg.scatter_mean_backward(gm, index, count))


def test_scatter_mean_noncontiguous(emu):
    x = torch.randn(40, 300).t()  # [300, 40], strides (1, 300)
    index = torch.randint(-2, 5, (300,))
    mean, count = emu.scatter_mean(x, index, 5)
    cm, cc = torch.ops.protoseg.scatter_mean(x, index, 5)
    assert torch.equal(mean, cm) and torch.equal(count, cc)


# ---- layer_norm_normalize (CUDA runs it as an ATen composite: the same code here) ---------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 300])
def test_layer_norm_normalize_composite(emu, dtype, n):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(70, n, generator=g, dtype=torch.float64).t() * 3 + 1).to(dtype)  # non-contiguous
    w = (1 + 0.3 * torch.randn(70, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.3 * torch.randn(70, generator=g, dtype=torch.float64)).to(dtype)
    out, stats = emu.layer_norm_normalize(x, w, b, 1e-5)
    r_out, r_stats = ref.layer_norm_normalize(x, w, b, 1e-5)
    r64_out, r64_stats = ref.layer_norm_normalize(x.double(), w.double(), b.double(), 1e-5)
    assert out.dtype == dtype and stats.dtype == r_stats.dtype
    _check(out, r_out, r64_out, dtype, "out")
    _check(stats, r_stats, r64_stats, dtype, "stats")
    grad = torch.randn(n, 70, generator=g).to(dtype)
    ours = emu.layer_norm_normalize_backward(grad, x, w, b, stats)
    cpu = torch.ops.protoseg.layer_norm_normalize_backward(grad, x, w, b, torch.ops.protoseg.layer_norm_normalize(
        x, w, b, 1e-5)[1])
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    r64 = torch.autograd.grad(ref.layer_norm_normalize(*leaves, 1e-5)[0], leaves, grad.double())
    for name, a, c, e in zip(("grad_x", "grad_weight", "grad_bias"), ours, cpu, r64):
        assert a.dtype == dtype
        _check(a, c, e, dtype, name)


# ---- shapes, strides, empty inputs, bad input -----------------------------------------------------


def test_noncontiguous_x(chunked):
    emu = chunked
    x, p = _inputs(33, 12, 3, 4, torch.float32, seed=11, noncontiguous=True)
    assert not x.is_contiguous()
    emu.set_tile_budget(5 * 12)
    s, i = emu.proto_similarity(x, p)
    rs, ri = ref.proto_similarity(x, p)
    torch.testing.assert_close(s, rs)
    assert torch.equal(i, ri)


def test_empty_inputs(emu):
    d, k, m = 8, 3, 2
    x, p = torch.zeros(0, d), torch.randn(k, m, d)
    empty = torch.zeros(0, dtype=torch.int64)
    s, i = emu.proto_similarity(x, p)
    assert s.shape == (0, k) and i.shape == (0, k)
    assert emu.proto_similarity_backward(torch.zeros(0, k), x, p, i).shape == (0, d)
    out = emu.proto_train(x, p, empty, 0.1, None, None, 1e-5)
    assert [t.shape for t in out] == [(0, k), (0, k), (0, m), (0,), (0, d), (0, d), (0, 3)]
    assert emu.proto_train_backward(None, None, None, x, p, empty, i, out[4], 0.1, None, None, out[6])[0].shape == (0, d)
    w, b = torch.ones(d), torch.zeros(d)
    out = emu.proto_train(x, p, empty, 0.1, w, b, 1e-5)
    grads = emu.proto_train_backward(None, None, None, x, p, empty, i, out[4], 0.1, w, b, out[6])
    assert [t.shape for t in grads] == [(0, d), (d,), (d,)] and (grads[1] == 0).all()
    q, a = emu.sinkhorn(torch.zeros(0, m), empty, k, 3, 0.05)
    assert q.shape == (0, m) and a.shape == (0,)
    mean, count = emu.scatter_mean(x, empty, 4)
    assert torch.equal(mean, torch.zeros(4, d)) and torch.equal(count, torch.zeros(4, dtype=torch.int64))
    assert emu.scatter_mean_backward(torch.zeros(4, d), empty, count).shape == (0, d)


def test_out_of_range_raises(emu):
    x, p = _inputs(600, 8, 3, 2, torch.float32, seed=12)
    labels = torch.zeros(600, dtype=torch.int64)
    labels[517] = 3
    with pytest.raises(RuntimeError, match=r"labels\[517\] = 3 is out of range"):
        emu.proto_train(x, p, labels, 0.1, None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"labels\[517\] = 3 is out of range"):
        emu.sinkhorn(torch.rand(600, 2), labels, 3, 3, 0.05)
    index = torch.zeros(600, 3, dtype=torch.int64)
    index[599, 2] = 2
    with pytest.raises(RuntimeError, match=r"index\[1799\] = 2 is out of range"):
        emu.proto_similarity_backward(torch.ones(600, 3), x, p, index)
    seg = torch.zeros(600, dtype=torch.int64)
    seg[0] = 4
    with pytest.raises(RuntimeError, match=r"index\[0\] = 4 is out of range"):
        emu.scatter_mean(x, seg, 4)
    with pytest.raises(RuntimeError, match="prototypes must be"):
        emu.proto_similarity(x, torch.randn(3, 2, 9))


def _device_cases():
    """Every executor-driven op with its arguments; the first tensor is the one whose device the
    CUDA entry point (csrc/cuda/<op>.cu) hands to its executor, whose guard used to come first."""
    x, p = _inputs(40, 8, 3, 2, torch.float32, seed=13)
    labels = torch.randint(-1, 3, (40,))
    scores, index = ref.proto_similarity(x, p)
    weighted, stats = torch.zeros(40, 8), torch.zeros(40, 2)
    return {
        "proto_similarity": (x, p),
        "proto_similarity_backward": (x, torch.ones(40, 3), p, index),
        "proto_train": (x, p, labels, 0.1, None, None, 1e-5),
        "proto_train_backward": (x, torch.ones(40, 3), None, None, p, labels, index, weighted, 0.1, None, None,
                                 stats),
        "sinkhorn": (torch.rand(40, 2), labels, 3, 3, 0.05),
        "scatter_mean": (x, labels, 3),
        "scatter_mean_backward": (torch.ones(3, 8), labels, torch.ones(3, dtype=torch.int64)),
    }


def _call(emu, name, args):
    """The op with `args`; backward ops list their guarding tensor first, then the schema's order."""
    if name == "proto_similarity_backward":
        x, g, p, index = args
        return emu.proto_similarity_backward(g, x, p, index)
    if name == "proto_train_backward":
        x, gs, go, gl, *rest = args
        return emu.proto_train_backward(gs, go, gl, x, *rest)
    return getattr(emu, name)(*args)


@pytest.mark.parametrize("name", list(_device_cases()))
def test_mixed_devices_name_the_argument(emu, name):
    """The device checks run before the launch sequence touches the device (as CUDAGuard would):
    with the guarding tensor on another device than the rest, the error names an argument and
    the devices. Control: with every tensor on that device the checks pass and touching it fails
    (meta tensors have no data), so an op that touched the device before checking would fail
    the first assertion with that other message."""
    args = _device_cases()[name]
    moved = (args[0].to("meta"),) + args[1:]
    with pytest.raises(RuntimeError, match=r"must be on the same device as .*\(got (meta and cpu|cpu and meta)\)"):
        _call(emu, name, moved)
    everything = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    with pytest.raises(RuntimeError) as failure:
        _call(emu, name, everything)
    assert "same device" not in str(failure.value)


def test_record_only_costs_the_launch_sequence_without_running_it(chunked):
    """benchmarks/cuda_roofline.py's mode: every launch and GEMM of the shipped sequence is
    recorded with its bytes and FLOPs (hand-computed here for proto_similarity in three
    chunks), and nothing runs (the kernels' outputs are left as allocated)."""
    n, d, k, m = 50, 8, 3, 2
    x, p = _inputs(n, d, k, m, torch.float32, seed=15)
    chunked.set_tile_budget(20 * k * m)  # chunks of 20, 20 and 10 rows
    chunked.take_records()
    chunked.set_record_only(True)
    try:
        chunked.proto_similarity(x, p)
    finally:
        chunked.set_record_only(False)
    records = chunked.take_records()
    names = [r[0].replace("protoseg::cuda::", "") for r in records]
    # p_hat, then 1 / ||x|| for every row in one launch, then each chunk's GEMM and epilogue
    assert names == ["NormalizeParams<float>"] * 2 + ["gemm Float", "EpilogueParams<float>"] * 3
    gemms = [r for r in records if r[0].startswith("gemm")]
    assert sum(r[3] for r in gemms) == 2 * n * k * m * d
    assert [r[1] for r in gemms] == [(rows * d + d * k * m) * 4 for rows in (20, 20, 10)]
    normalize_x = records[1]  # float32 x: only 1 / ||x|| is written
    assert normalize_x[1] == n * d * 4 and normalize_x[2] == n * 4
    epilogue = [r for r in records if "Epilogue" in r[0]]
    assert sum(r[1] for r in epilogue) == n * k * m * 4 + n * 4  # the tile and the norms, read once
    assert sum(r[2] for r in epilogue) == n * k * (4 + 8)  # scores and index written
    assert all(r[4] == 0 for r in records)  # no L2 modelled: every byte is HBM traffic
    assert chunked.take_records() == []


# A tile row larger than an x row (K*M = 16 > D = 8), and an L2 cache of which kL2Share (3/4) holds
# p_hat (16 x 8 x 4 bytes) and 128 rows of 16 * 4 (tile) + 8 * (4 + 2 * 4) (x, grad_x and the
# [rows, D] product) bytes each: plan_chunks (csrc/cuda/prototype_pass.cuh) cuts chunks of 128 rows.
L2_CASE = {"n": 300, "d": 8, "k": 4, "m": 4, "l2": (16 * 8 * 4 + 128 * (16 * 4 + 8 * 12)) * 4 // 3 + 8}


@pytest.fixture
def l2_planned(emu):
    emu.set_l2_bytes(L2_CASE["l2"])
    yield emu
    emu.set_l2_bytes(0)


def test_chunks_sized_for_l2_keep_the_tile_and_prototypes_there(l2_planned):
    """Where a tile row outweighs an x row, the pass runs in chunks whose tile, prototypes and rows
    fit in L2 (128, 128 and 44 rows here), and the roofline's records count the tile's and the
    prototypes' bytes as L2 traffic, by hand: x, labels, the outputs stay HBM traffic."""
    emu = l2_planned
    n, d, k, m = (L2_CASE[key] for key in "ndkm")
    km = k * m
    x, p = _inputs(n, d, k, m, torch.float32, seed=21)
    labels = torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(22))
    emu.take_records()
    emu.set_record_only(True)
    try:
        out = emu.proto_train(x, p, labels, 0.1, None, None, 1e-5)
        emu.proto_train_backward(torch.ones(n, k), torch.ones(n, m), torch.ones(n), x, p, labels, out[1], out[4],
                                 0.1, None, None, out[6])
    finally:
        emu.set_record_only(False)
    records = [(r[0].replace("protoseg::cuda::", ""),) + tuple(r[1:]) for r in emu.take_records()]
    gemms = [r for r in records if r[0] == "gemm Float"]
    assert [r[3] / (2 * d * km) for r in gemms] == [128, 128, 128, 128, 44, 44] + [128, 128, 44]
    tile, p_bytes = lambda rows: rows * km * 4, km * d * 4
    for rows, (first, second) in zip((128, 128, 44), zip(gemms[0:6:2], gemms[1:6:2])):
        assert first[4] == p_bytes + tile(rows)  # x read from HBM; p_hat read and the tile written in L2
        assert second[4] == tile(rows) + p_bytes  # `weighted` written to HBM
    for rows, gemm in zip((128, 128, 44), gemms[6:]):  # the backward's G p_hat: its [rows, D] product in L2 too
        assert gemm[4] == gemm[1] + gemm[2] == tile(rows) + p_bytes + rows * d * 4
    epilogue = [r for r in records if r[0] == "EpilogueParams<float>"]
    assert [r[4] for r in epilogue] == [2 * tile(rows) for rows in (128, 128, 44)]  # read, softmax written
    grad_tile = [r for r in records if r[0] == "GradTileParams<float>"]
    assert [r[4] for r in grad_tile] == [r[2] for r in grad_tile] == [tile(rows) for rows in (128, 128, 44)]
    assemble = [r for r in records if r[0] == "GradParams<float>"]
    assert [r[4] for r in assemble] == [rows * d * 4 for rows in (128, 128, 44)]
    assert all(r[4] == 0 for r in records if r[0] in ("NormalizeParams<float>", "RangeCheckParams"))


def test_chunks_sized_for_l2_compute_the_same(l2_planned):
    """The L2 plan (float32, the case above) changes the chunking only: proto_train and its
    backward still equal the float64 reference."""
    emu = l2_planned
    n, d, k, m = (L2_CASE[key] for key in "ndkm")
    x, p = _inputs(n, d, k, m, torch.float32, seed=23)
    labels = torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(24))
    scores, index, own, lse, weighted, x_hat, stats = emu.proto_train(x, p, labels, 0.1, None, None, 1e-5)
    r = ref.proto_train(x.double(), p.double(), labels, 0.1)
    assert torch.equal(index, r[1])
    for got, want in zip((scores, own, lse, weighted), (r[0], r[2], r[3], r[4])):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    g_scores, g_own, g_lse = (torch.randn(*shape, generator=torch.Generator().manual_seed(25))
                              for shape in ((n, k), (n, m), (n,)))
    grad = emu.proto_train_backward(g_scores, g_own, g_lse, x, p, labels, index, weighted, 0.1, None, None, stats)[0]

    def loss(xr):
        s, _, o, lse_r, _ = ref.proto_train(xr, p.double(), labels, 0.1)[:5]
        return (s * g_scores.double()).sum() + (o * g_own.double()).sum() + (lse_r * g_lse.double()).sum()

    torch.testing.assert_close(grad.double(), _grad_ref(loss, x), rtol=1e-4, atol=1e-4)


# ---- coverage ---------------------------------------------------------------------------------------


def test_larger_grids(emu):
    """Sizes at which every kernel runs on more than one block."""
    n, d, k, m = 280, 40, 4, 3
    x, p = _inputs(n, d, k, m, torch.float32, seed=13)
    labels = torch.randint(-1, k, (n,), generator=torch.Generator().manual_seed(14))
    emu.set_tile_budget(160 * k * m)  # two chunks: 160 + 120 rows
    try:
        out = emu.proto_train(x, p, labels, 0.1, None, None, 1e-5)
        r = ref.proto_train(x, p, labels, 0.1)
        torch.testing.assert_close(out[3], r[3])
        torch.testing.assert_close(out[4], r[4])
        q, a = emu.sinkhorn(out[2], labels, k, 3, 0.05)
        assert torch.equal(a, ref.sinkhorn(out[2], labels, k, 3, 0.05)[1])
    finally:
        emu.set_tile_budget(1 << 25)


EXPECTED_KERNELS = [
    "NormalizeParams<float>", "EpilogueParams<float>", "GradParams<float>",
    "GradTileParams<float>",
    "RangeCheckParams", "SegmentKeysParams", "SegmentOffsetsParams", "SegmentReduceParams<double>",
    "SegmentReduceParams<float>", "SinkhornInitParams<float>", "SinkhornScaleParams", "SinkhornStepParams",
    "SinkhornFinishParams", "ScatterMeanParams<float>", "ScatterMeanBackwardParams<float>",
]


def test_every_kernel_ran_on_several_blocks(emu):
    """Runs last in this file: every kernel (one params struct each) was launched, with > 1 block."""
    stats = {name.replace("protoseg::cuda::", ""): v for name, v in emu.launch_stats().items()}
    for kernel in EXPECTED_KERNELS:
        assert kernel in stats, f"{kernel} never ran under the executor"
        assert stats[kernel][1] > 1, f"{kernel} only ever ran on one block"
    for dtype in ("double", "c10::Half", "c10::BFloat16"):
        assert f"EpilogueParams<{dtype}>" in stats and f"GradParams<{dtype}>" in stats
