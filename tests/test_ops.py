"""The protoseg operators against their plain-PyTorch spec (protoseg/ops/reference.py).

One sample generator (`make_sample` over CASES) feeds correctness, gradcheck and opcheck.
Tolerances follow STYLE.md 13: float64 is compared tightly; float32, bfloat16 and float16 by the
relative rule: our error against the float64 reference is at most about twice the error of the
plain-PyTorch reference run in the same precision, plus a tiny absolute slack.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode

import protoseg.ops as ops
from protoseg.ops import reference as ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CPU_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


# ---- sample inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    k: int
    m: int
    d: int
    layout: str = "contiguous"  # or "transposed" (x = [D, N].t()) or "strided" (every other column)
    ignore_index: int = -1


CASES = [
    Case("empty", 0, 3, 4, 8),
    Case("one", 1, 3, 1, 8),  # M = 1 too
    Case("odd", 37, 5, 3, 7),
    Case("transposed", 50, 4, 3, 6, "transposed"),
    Case("strided", 45, 6, 2, 5, "strided"),
    # 2^22 // 8470 = 495 rows per chunk: two chunks, the second partial; x transposed.
    Case("km8470", 600, 847, 10, 16, "transposed"),
    # 2^22 // 72000 < 64, so chunks of the 64-row minimum (64 + 64 + 12 rows); K*M > 255 with
    # ignore_index 255.
    Case("min_rows", 140, 6000, 12, 4, "strided", ignore_index=255),
    # The CPU backward's register tiles: D = 100 is one 64-float tile (three 32-double tiles)
    # plus a tail; 40 classes are three class slabs; 600 pixels are three pixel blocks.
    Case("tiled", 600, 40, 3, 100),
]
CASE = {c.name: c for c in CASES}
SMALL = [CASE[name] for name in ("one", "odd", "transposed", "strided")]
CASE_IDS = [c.name for c in CASES]


class Sample(NamedTuple):
    case: Case
    x: torch.Tensor  # [N, D], layout per case
    prototypes: torch.Tensor  # [K, M, D]
    labels: torch.Tensor  # [N] in [0, K) or negative
    target: torch.Tensor  # [N] in [0, K*M) or == ignore_index (where labels < 0)
    scores: torch.Tensor  # [N, M] own-class similarities for sinkhorn, non-contiguous when x is


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, 1::2] = t
        return wide[:, 1::2]  # column stride 2 and a storage offset
    return t


def make_sample(case: Case, dtype: torch.dtype, seed: int = 0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    n, k, m, d = case.n, case.k, case.m, case.d
    x = _layout(torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype), case.layout)
    prototypes = torch.randn(k, m, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < 0.2
    labels[ignored] = torch.randint(-5, 0, (int(ignored.sum()),), generator=g)
    target = labels * m + torch.randint(0, m, (n,), generator=g)
    target[ignored] = case.ignore_index
    scores = _layout(torch.rand(n, m, generator=g, dtype=torch.float64).mul(2).sub(1).to(dtype), case.layout)
    return Sample(case, x, prototypes, labels, target, scores)


def sample_inputs(dtype: torch.dtype, cases=CASES):
    for case in cases:
        yield make_sample(case, dtype)


# ---- the relative-error rule (STYLE.md 13) ---------------------------------------------------


def assert_matches(ours, ref_lp, ref64, what: str = ""):
    """ours and ref_lp ran in the same precision; ref64 is the float64 reference on the same inputs."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if ref_lp is not None:
        assert ours.dtype == ref_lp.dtype, f"{what}: dtype {ours.dtype} != {ref_lp.dtype}"
    if ours.numel() == 0:
        return
    if not ours.dtype.is_floating_point:
        assert torch.equal(ours, ref64), what
        return
    assert not ours.isnan().any(), f"{what}: NaN"
    if ours.dtype == torch.float64:
        torch.testing.assert_close(ours, ref64, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")
        return
    ref64 = ref64.double()
    err = (ours.double() - ref64).abs().max().item()
    base = (ref_lp.double() - ref64).abs().max().item()
    slack = 1e-6 * (1 + ref64.abs().max().item())
    assert err <= 2 * base + slack, f"{what}: error {err:.3g} > 2 x reference error {base:.3g} + {slack:.3g}"


def _f64(*tensors):
    return [t.double() if t.is_floating_point() else t for t in tensors]


def _grad(fn, x, layout: str = "contiguous"):
    """d fn(x) / d x, with x fed to fn in the given layout (a view of a contiguous leaf)."""
    leaf = x.detach().contiguous().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(_layout(leaf, layout)), leaf)
    return g


def _check_index(index, x, prototypes, tol):
    """index is a per-class argmax: the similarity it picks is the maximum (up to tol)."""
    k, m, d = prototypes.shape
    x_hat, p_hat = ref._normalized(x.double(), prototypes.double())
    sim = (x_hat @ p_hat.reshape(k * m, d).t()).view(-1, k, m)
    assert index.dtype == torch.int64 and ((index >= 0) & (index < m)).all()
    picked = sim.gather(2, index.unsqueeze(2)).squeeze(2)
    assert (picked >= sim.amax(dim=2) - tol).all()


# ---- correctness against the reference, forward and backward ---------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_proto_similarity(case, dtype):
    s = make_sample(case, dtype)
    x64, p64 = _f64(s.x, s.prototypes)
    scores, index = ops.proto_similarity(s.x, s.prototypes)
    scores_lp, index_lp = ref.proto_similarity(s.x, s.prototypes)
    scores64, index64 = ref.proto_similarity(x64, p64)
    assert_matches(scores, scores_lp, scores64, "scores")
    if dtype == torch.float64:
        assert torch.equal(index, index64)
    else:
        _check_index(index, s.x, s.prototypes, tol=1e-5)

    g = torch.randn(case.n, case.k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(fn, x, p):
        return (fn(x, p)[0] * g.to(x.dtype)).sum()

    gx = _grad(lambda x: loss(ops.proto_similarity, x, s.prototypes), s.x, case.layout)
    assert gx.dtype == dtype
    # The oracle's gradient takes the oracle's argmax; in low precision ours may pick the other
    # side of a near-tie, so compare the gradient in float64 only where winners agree exactly.
    gx_lp = _grad(lambda x: loss(ref.proto_similarity, x, s.prototypes), s.x)
    gx64 = _grad(lambda x: loss(ref.proto_similarity, x, p64), x64)
    rows = (index == index64).all(dim=1)
    assert_matches(gx[rows], gx_lp[rows], gx64[rows], "grad_x")
    assert case.n == 0 or rows.float().mean() >= 0.9


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_proto_contrast_loss(case, dtype):
    s = make_sample(case, dtype)
    x64, p64 = _f64(s.x, s.prototypes)
    tau, ign = 0.1, case.ignore_index
    ppc, ppd = ops.proto_contrast_loss(s.x, s.prototypes, s.target, tau, ign)
    ppc_lp, ppd_lp = ref.proto_contrast_loss(s.x, s.prototypes, s.target, tau, ign)
    ppc64, ppd64 = ref.proto_contrast_loss(x64, p64, s.target, tau, ign)
    assert_matches(ppc, ppc_lp, ppc64, "ppc")
    assert_matches(ppd, ppd_lp, ppd64, "ppd")

    a, b = 0.7, 1.9

    def loss(fn, x, p):
        ppc, ppd = fn(x, p, s.target, tau, ign)
        return ppc * a + ppd * b

    gx = _grad(lambda x: loss(ops.proto_contrast_loss, x, s.prototypes), s.x, case.layout)
    gx_lp = _grad(lambda x: loss(ref.proto_contrast_loss, x, s.prototypes), s.x)
    gx64 = _grad(lambda x: loss(ref.proto_contrast_loss, x, p64), x64)
    assert_matches(gx, gx_lp, gx64, "grad_x")


TRAIN_OUTPUTS = ("scores", "index", "own", "lse", "weighted", "x_hat", "stats")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l2", "layer_norm"])
def test_proto_train(case, dtype, norm):
    s = make_sample(case, dtype)
    x64, p64 = _f64(s.x, s.prototypes)
    tau = 0.1
    # With the LayerNorm fused into the pass, the oracle is reference.layer_norm_normalize first.
    w, b = _layer_norm_affine(case.d, dtype) if norm == "layer_norm" else (None, None)
    w64, b64 = (w.double(), b.double()) if w is not None else (None, None)
    out = ops.proto_train(s.x, s.prototypes, s.labels, tau, w, b)
    out_lp = ref.proto_train(s.x, s.prototypes, s.labels, tau, w, b)
    out64 = ref.proto_train(x64, p64, s.labels, tau, w64, b64)
    for name, o, o_lp, o64 in zip(TRAIN_OUTPUTS, out, out_lp, out64, strict=True):
        if name == "index":
            if dtype == torch.float64:
                assert torch.equal(o, o64)
            else:
                _check_index(o, out64[5] if w is not None else s.x, s.prototypes, tol=1e-5)
        else:
            assert_matches(o, o_lp, o64, name)
    assert (out.own[s.labels < 0] == 0).all()

    # Rows where low precision picks the other side of a near-tie (see test_proto_similarity)
    # take no upstream gradient, so every gradient, the affine ones summed over rows included,
    # compares what both sides compute the same way.
    rows = (out.index == out64[1]).all(dim=1)
    assert case.n == 0 or rows.float().mean() >= 0.9
    gen = torch.Generator().manual_seed(2)
    gs = torch.randn(case.n, case.k, generator=gen, dtype=torch.float64) * rows[:, None]
    go = torch.randn(case.n, case.m, generator=gen, dtype=torch.float64) * rows[:, None]
    gl = torch.randn(case.n, generator=gen, dtype=torch.float64) * rows

    def loss(fn, x, p, w, b):
        r = fn(x, p, s.labels, tau, w, b)
        scores, own, lse = r[0], r[2], r[3]
        return sum((t * g.to(t.dtype)).sum() for t, g in ((scores, gs), (own, go), (lse, gl)))

    def grads(fn, x, p, w, b, layout="contiguous"):
        leaf = x.detach().contiguous().clone().requires_grad_(True)
        leaves = [leaf] + ([w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)]
                           if w is not None else [])
        value = loss(fn, _layout(leaf, layout), p, *(leaves[1:] or (None, None)))
        return torch.autograd.grad(value, leaves)

    ours = grads(ops.proto_train, s.x, s.prototypes, w, b, case.layout)
    ours_lp = grads(ref.proto_train, s.x, s.prototypes, w, b)
    ours64 = grads(ref.proto_train, x64, p64, w64, b64)
    for name, a, a_lp, a64 in zip(("grad_x", "grad_weight", "grad_bias"), ours, ours_lp, ours64):
        assert_matches(a, a_lp, a64, name)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_sum_over_many_classes_is_blocked(threads):
    # grad_x sums K = 6000 winning prototypes per pixel (case min_rows, D = 4, all in the scalar
    # tail). One float chain over the classes was 15 ulps of the largest entry off the float64
    # oracle; blocked sums (cpu/kernels_impl.h) stay within a few, on every path and thread count,
    # whatever the BLAS that the low-precision reference goes through does.
    case = CASE["min_rows"]
    s = make_sample(case, torch.float32)
    g = torch.randn(case.n, case.k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with num_threads(threads):
        _, index = ops.proto_similarity(s.x, s.prototypes)
        grad = torch.ops.protoseg.proto_similarity_backward(g.float(), s.x, s.prototypes, index).double()
    x64, p64 = _f64(s.x, s.prototypes)
    x_hat, p_hat = ref._normalized(x64, p64)
    winners = p_hat[torch.arange(case.k)[None, :], index]  # [N, K, D]: the prototypes that won
    g_hat = (g[..., None] * winners).sum(dim=1)
    oracle = (g_hat - x_hat * (g_hat * x_hat).sum(dim=1, keepdim=True)) / x64.norm(dim=1, keepdim=True)
    ulps = ((grad - oracle).abs().max() / (oracle.abs().max() * torch.finfo(torch.float32).eps)).item()
    assert ulps <= 6, f"{ulps:.1f} ulps of the largest gradient entry"


@pytest.mark.parametrize("used", ["scores", "own", "lse"])
def test_proto_train_gradient_through_one_output(used):
    # The backward op takes optional gradients: each output alone must give the reference gradient.
    s = make_sample(CASE["strided"], torch.float64)

    def loss(fn, x):
        r = fn(x, s.prototypes, s.labels, 0.1)
        return r[TRAIN_OUTPUTS.index(used)].square().sum()

    gx = _grad(lambda x: loss(ops.proto_train, x), s.x, "strided")
    assert_matches(gx, None, _grad(lambda x: loss(ref.proto_train, x), s.x), f"grad_x through {used}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sinkhorn(case, dtype):
    s = make_sample(case, dtype)
    q, assignment = ops.sinkhorn(s.scores, s.labels, case.k, 3, 0.05)
    # The op and the oracle both compute in float64 from the same input values: tight in every dtype.
    q64, assignment64 = ref.sinkhorn(s.scores, s.labels, case.k, 3, 0.05)
    assert q.dtype == torch.float32 and q.shape == (case.n, case.m)
    torch.testing.assert_close(q, q64, rtol=1e-6, atol=1e-7)
    assert torch.equal(assignment, assignment64)
    valid = s.labels >= 0
    assert (q[~valid] == 0).all() and (assignment[~valid] == -1).all()
    torch.testing.assert_close(q[valid].double().sum(1), torch.ones(int(valid.sum()), dtype=torch.float64))


@pytest.mark.parametrize("iterations, epsilon", [(0, 0.05), (1, 1.0), (10, 0.02)])
def test_sinkhorn_iterations_and_epsilon(iterations, epsilon):
    s = make_sample(CASE["odd"], torch.float32)
    q, assignment = ops.sinkhorn(s.scores, s.labels, 5, iterations, epsilon)
    q64, assignment64 = ref.sinkhorn(s.scores, s.labels, 5, iterations, epsilon)
    torch.testing.assert_close(q, q64, rtol=1e-6, atol=1e-7)
    assert torch.equal(assignment, assignment64)


def test_sinkhorn_takes_no_gradient():
    s = make_sample(CASE["odd"], torch.float32)
    q, assignment = ops.sinkhorn(s.scores.clone().requires_grad_(True), s.labels, 5)
    assert not q.requires_grad and not assignment.requires_grad


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_sinkhorn_steps_compose_to_sinkhorn_bitwise(case, dtype, iterations):
    """The steps of sinkhorn (the ops the distributed caller composes), with no reduction between
    them, are sinkhorn to the bit: same per-element expressions, same summation order."""
    s = make_sample(case, dtype)
    q, assignment = ops.sinkhorn(s.scores, s.labels, case.k, iterations, 0.05)
    q2, assignment2 = ops.sinkhorn_reduced(s.scores, s.labels, case.k, iterations, 0.05)
    assert torch.equal(q, q2) and torch.equal(assignment, assignment2)


def test_sinkhorn_reduced_passes_every_marginal_through_the_reduction():
    """The hook sees exactly the [K] maxima, [K] counts, [K] totals and one [K, M] row sum per
    iteration; doubling the sums of a fake second rank that holds the same pixels leaves the plan
    of a duplicated batch (every class twice its pixels): the oracle is sinkhorn on the batch
    concatenated with itself."""
    s = make_sample(CASE["odd"], torch.float64)
    k, m = CASE["odd"].k, CASE["odd"].m
    seen = []

    def twice(t, op):
        seen.append((op, tuple(t.shape)))
        if op == "sum":
            t.mul_(2)

    q, assignment = ops.sinkhorn_reduced(s.scores, s.labels, k, 3, 0.05, twice)
    assert seen == [("max", (k,)), ("sum", (k,)), ("sum", (k,))] + [("sum", (k, m))] * 3
    both, _ = ops.sinkhorn(torch.cat([s.scores, s.scores]), torch.cat([s.labels, s.labels]), k, 3, 0.05)
    torch.testing.assert_close(q, both[: s.scores.shape[0]], rtol=1e-12, atol=1e-12)
    assert torch.equal(assignment, ops.sinkhorn(s.scores, s.labels, k, 3, 0.05)[1])


def test_segment_reduce_against_a_loop():
    """Grouping by class in pixel order, and sums taken sequentially in that order (rows, then
    columns): equal to a Python loop to the bit."""
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(-1, 4, (30,), generator=gen)
    labels[labels == 2] = 0  # class 2 empty
    perm, offsets = torch.ops.protoseg.sinkhorn_segments(labels, 4)
    members = [[i for i in range(30) if labels[i] == c] for c in range(4)]
    assert perm.tolist() == sum(members, [])
    assert offsets.tolist() == [0, *torch.tensor([len(m) for m in members]).cumsum(0).tolist()]
    R = torch.ops.protoseg.segment_reduce
    v = values.tolist()
    for c, rows in enumerate(members):
        total, columns = 0.0, [0.0] * 3
        for i in rows:
            for j in range(3):
                total += v[i][j]
                columns[j] += v[i][j]
        assert R(values, perm, offsets, False, True)[c].item() == total
        assert R(values, perm, offsets, False, False)[c].tolist() == columns
        top = [max((v[i][j] for i in rows), default=float("-inf")) for j in range(3)]
        assert R(values, perm, offsets, True, False)[c].tolist() == top
        assert R(values, perm, offsets, True, True)[c].item() == max(top)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_mean(case, dtype):
    s = make_sample(case, dtype)
    num_segments = case.k * case.m
    index = torch.where(s.labels >= 0, s.target, -1)
    mean, count = ops.scatter_mean(s.x, index, num_segments)
    mean_lp, count_lp = ref.scatter_mean(s.x, index, num_segments)
    mean64, _ = ref.scatter_mean(s.x.double(), index, num_segments)
    assert_matches(mean, mean_lp, mean64, "mean")
    assert torch.equal(count, count_lp)

    g = torch.randn(num_segments, case.d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(fn, x):
        return (fn(x, index, num_segments)[0] * g.to(x.dtype)).sum()

    gx = _grad(lambda x: loss(ops.scatter_mean, x), s.x, case.layout)
    gx_lp = _grad(lambda x: loss(ref.scatter_mean, x), s.x)
    gx64 = _grad(lambda x: loss(ref.scatter_mean, x), s.x.double())
    assert_matches(gx, gx_lp, gx64, "grad_x")
    assert (gx[index < 0] == 0).all()


# ---- edge cases ------------------------------------------------------------------------------


def _layer_norm_affine(d: int, dtype: torch.dtype, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    weight = 1 + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    bias = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return weight.to(dtype), bias.to(dtype)


def _unit_layer_norm(x, weight, bias):
    """The reference composition the classifier used before the fused op."""
    return F.normalize(F.layer_norm(x, (x.shape[1],), weight, bias, 1e-5), dim=-1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_normalize(case, dtype):
    s = make_sample(case, dtype)
    x = s.x * 3 + 1  # off-centre rows, in the case's layout
    x = _layout(x.contiguous(), case.layout)
    w, b = _layer_norm_affine(case.d, dtype)
    out, stats = torch.ops.protoseg.layer_norm_normalize(x, w, b, 1e-5)
    out_lp, stats_lp = ref.layer_norm_normalize(x, w, b, 1e-5)
    out64, stats64 = ref.layer_norm_normalize(*_f64(x, w, b), 1e-5)
    assert_matches(out, out_lp, out64, "out")
    assert_matches(stats, stats_lp, stats64, "stats")

    g = torch.randn(case.n, case.d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def grads(fn, x, w, b):
        leaves = [t.detach().contiguous().clone().requires_grad_(True) for t in (x, w, b)]
        out = fn(_layout(leaves[0], case.layout), leaves[1], leaves[2])
        return torch.autograd.grad((out * g.to(out.dtype)).sum(), leaves)

    ours = grads(ops.layer_norm_normalize, x, w, b)
    lp = grads(_unit_layer_norm, x, w, b)
    r64 = grads(_unit_layer_norm, *_f64(x, w, b))
    for name, a, b_lp, c in zip(("grad_x", "grad_weight", "grad_bias"), ours, lp, r64):
        assert_matches(a, b_lp, c, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_norm_rows_follow_f_normalize(dtype):
    s = make_sample(CASE["odd"], dtype)
    x = s.x.clone()
    x[0] = 0
    x[5] = 0
    x[9] *= 1e-14  # 0 < norm < eps: divided by eps, as F.normalize
    x64, p64 = _f64(x, s.prototypes)
    gen = torch.Generator().manual_seed(4)
    gs = torch.randn(x.shape[0], s.prototypes.shape[0], generator=gen, dtype=torch.float64)

    def sim_loss(fn, x, p):
        return (fn(x, p)[0] * gs.to(x.dtype)).sum()

    def contrast_loss(fn, x, p):
        return sum(fn(x, p, s.target, 0.1, -1))

    def train_loss(fn, x, p):
        r = fn(x, p, s.labels, 0.1)
        return r[0].sum() + r[2].sum() + r[3].sum()

    for name, fn_ops, fn_ref, loss in [
        ("similarity", ops.proto_similarity, ref.proto_similarity, sim_loss),
        ("contrast", ops.proto_contrast_loss, ref.proto_contrast_loss, contrast_loss),
        ("train", ops.proto_train, ref.proto_train, train_loss),
    ]:
        value = loss(fn_ops, x, s.prototypes)
        assert_matches(value, loss(fn_ref, x, s.prototypes), loss(fn_ref, x64, p64), name)
        gx = _grad(lambda x: loss(fn_ops, x, s.prototypes), x)
        gx64 = _grad(lambda x: loss(fn_ref, x, p64), x64)
        gx_lp = _grad(lambda x: loss(fn_ref, x, s.prototypes), x)
        assert gx.isfinite().all()
        assert_matches(gx, gx_lp, gx64, f"{name} grad_x")
    scores, index = ops.proto_similarity(x, s.prototypes)
    assert (scores[0] == 0).all() and (index[0] == 0).all()


def test_argmax_ties_go_to_the_smallest_m():
    # x rows are scaled basis vectors, so every product is one coordinate of p_hat, exact in any
    # summation order; prototypes 1 and 3 of each class are the same direction, the largest one.
    k, m, d = 3, 5, 4
    p = -torch.rand(k, m, d, dtype=torch.float64) - 0.1
    p[:, 1] = torch.ones(d, dtype=torch.float64)
    p[:, 3] = 2 * p[:, 1]  # same direction, same p_hat bits
    x = 3 * torch.eye(d, dtype=torch.float64).repeat(5, 1)
    labels = torch.arange(x.shape[0]) % k
    for dtype in DTYPES:
        xd, pd = x.to(dtype), p.to(dtype)
        scores, index = ops.proto_similarity(xd, pd)
        assert (index == 1).all(), dtype
        torch.testing.assert_close(scores.double(), torch.full_like(scores, 0.5, dtype=torch.float64))
        assert (ops.proto_train(xd, pd, labels).index == 1).all(), dtype
    # Sinkhorn: columns (a, b, a, b) give q[:, 0] == q[:, 2] and q[:, 1] == q[:, 3] exactly.
    ab = torch.rand(40, 2, generator=torch.Generator().manual_seed(5))
    scores = torch.cat([ab, ab], dim=1)
    sk_labels = torch.arange(40) % 3
    q, assignment = ops.sinkhorn(scores, sk_labels, 3)
    assert torch.equal(q[:, :2], q[:, 2:])
    assert ((assignment == 0) | (assignment == 1)).all()
    assert torch.equal(assignment, ref.sinkhorn(scores, sk_labels, 3, 3, 0.05)[1])


def test_ignore_index_255_is_a_target_unless_it_is_the_ignore_index():
    k, m, d, n = 30, 10, 8, 64  # K*M = 300 > 255
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    p = torch.randn(k, m, d, generator=gen, dtype=torch.float64)
    target = torch.randint(0, k * m, (n,), generator=gen)
    target[::4] = 255
    target[1::8] = -1
    target_255 = torch.where(target == -1, 299, target)  # with ignore_index 255, -1 is not allowed
    keep = target_255 != 255

    ours = ops.proto_contrast_loss(x, p, target_255, 0.1, 255)
    subset = ops.proto_contrast_loss(x[keep], p, target_255[keep], 0.1, -1)  # 255 dropped by hand
    torch.testing.assert_close(ours, subset, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, ref.proto_contrast_loss(x, p, target_255, 0.1, 255), rtol=1e-10, atol=0)

    # ignore_index -1: 255 is an ordinary target, -1 the ignored one.
    ours = ops.proto_contrast_loss(x, p, target, 0.1, -1)
    keep = target != -1
    hand = ref.proto_contrast_loss(x[keep], p, target[keep], 0.1, 12345)
    torch.testing.assert_close(ours, hand, rtol=1e-10, atol=0)
    assert not torch.allclose(ours[0], ops.proto_contrast_loss(x, p, target_255, 0.1, 255)[0])

    # Gradients: ignored rows take none.
    xg = x.clone().requires_grad_(True)
    sum(ops.proto_contrast_loss(xg, p, target_255, 0.1, 255)).backward()
    assert (xg.grad[target_255 == 255] == 0).all() and (xg.grad[target_255 != 255] != 0).any()

    with pytest.raises(RuntimeError, match=r"target\[\d+\] = -1 is out of range"):
        ops.proto_contrast_loss(x, p, target, 0.1, -100)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_ignored(dtype):
    s = make_sample(CASE["odd"], dtype)
    n = s.x.shape[0]
    x = s.x.clone().requires_grad_(True)
    ppc, ppd = ops.proto_contrast_loss(x, s.prototypes, torch.full((n,), 255), 0.1, 255)
    assert ppc.item() == 0 and ppd.item() == 0 and ppc.dtype == dtype
    (ppc + ppd).backward()
    assert (x.grad == 0).all()

    labels = torch.full((n,), -1)
    tp = ops.proto_train(s.x, s.prototypes, labels)
    assert (tp.own == 0).all() and tp.lse.isfinite().all()
    q, assignment = ops.sinkhorn(s.scores, labels, 5)
    assert (q == 0).all() and (assignment == -1).all()

    x = s.x.clone().requires_grad_(True)
    mean, count = ops.scatter_mean(x, labels, 4)
    assert (mean == 0).all() and (count == 0).all()
    assert ops.scatter_mean(x, labels, 0)[0].shape == (0, x.shape[1])
    mean.sum().backward()
    assert (x.grad == 0).all()


# ---- gradcheck (float64) ---------------------------------------------------------------------


@contextlib.contextmanager
def num_threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_gradcheck(case):
    s = make_sample(case, torch.float64)
    p, tau, lay = s.prototypes, 0.1, case.layout  # x reaches the ops in the case's layout
    # proto_similarity is piecewise smooth: keep every winner clear of its runner-up.
    x_hat, p_hat = ref._normalized(s.x, p)
    top2 = (x_hat @ p_hat.reshape(-1, case.d).t()).view(-1, case.k, case.m).topk(min(2, case.m), dim=2).values
    assert case.m == 1 or (top2[..., 0] - top2[..., 1]).min() > 1e-4
    gen = torch.Generator().manual_seed(7)
    ws = torch.randn(case.n, case.k, generator=gen, dtype=torch.float64)
    wo = torch.randn(case.n, case.m, generator=gen, dtype=torch.float64)
    wl = torch.randn(case.n, generator=gen, dtype=torch.float64)
    index, s_count = torch.where(s.labels >= 0, s.target, -1), case.k * case.m

    def train(x, w=None, b=None):
        r = ops.proto_train(_layout(x, lay), p, s.labels, tau, w, b)
        return (r.scores * ws).sum() + (r.own * wo).sum() + (r.lse * wl).sum()

    x = s.x.detach().contiguous().clone().requires_grad_(True)
    # Thousands of tiny calls: on busy shared cores OpenMP barriers would dominate the runtime.
    with num_threads(1):
        assert torch.autograd.gradcheck(lambda x: ops.proto_similarity(_layout(x, lay), p)[0], (x,))
        assert torch.autograd.gradcheck(
            lambda x: ops.proto_contrast_loss(_layout(x, lay), p, s.target, tau, case.ignore_index), (x,)
        )
        assert torch.autograd.gradcheck(train, (x,))
        assert torch.autograd.gradcheck(lambda x: ops.scatter_mean(_layout(x, lay), index, s_count)[0], (x,))
        w, b = (t.requires_grad_(True) for t in _layer_norm_affine(case.d, torch.float64))
        assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm_normalize(_layout(x, lay), w, b), (x, w, b))
        assert torch.autograd.gradcheck(train, (x, w, b))


# ---- opcheck ---------------------------------------------------------------------------------

def op_calls(s: Sample):
    """(op, args) for every forward and backward op on one sample: opcheck here, and in
    tests/test_emulated.py the CUDA launch sequence against the CPU kernel (a new op adds its
    calls here and is covered by both)."""
    P = torch.ops.protoseg
    k, m = s.case.k, s.case.m
    x = s.x.detach()
    xg = x.clone().requires_grad_(True)
    tau = 0.1
    index = torch.where(s.labels >= 0, s.target, -1)
    scores, sim_index = ops.proto_similarity(x, s.prototypes)
    tp = ops.proto_train(x, s.prototypes, s.labels, tau)
    mean, count = ops.scatter_mean(x, index, k * m)
    gen = torch.Generator().manual_seed(8)

    def randn_like(t):
        return torch.randn(t.shape, generator=gen).to(t.dtype)

    w, b = _layer_norm_affine(x.shape[1], x.dtype)
    _, stats = P.layer_norm_normalize(x, w, b, 1e-5)
    tp_ln = ops.proto_train(x, s.prototypes, s.labels, tau, w, b)
    perm, offsets = P.sinkhorn_segments(s.labels, k)
    class_max = P.segment_reduce(s.scores, perm, offsets, True, True)
    counts = (offsets[1:] - offsets[:-1]).double()
    plan = P.sinkhorn_exp(s.scores, s.labels, class_max, 0.05)
    rows = P.segment_reduce(plan, perm, offsets, False, False)
    return [
        (P.layer_norm_normalize.default, (xg, w.requires_grad_(True), b, 1e-5)),
        (P.layer_norm_normalize_backward.default, (randn_like(x), x, w.detach(), b, stats)),
        (P.proto_similarity.default, (xg, s.prototypes)),
        (P.proto_train.default, (xg, s.prototypes, s.labels, tau)),
        (P.proto_train.default, (xg, s.prototypes, s.labels, tau, w.requires_grad_(True), b, 1e-5)),
        (P.sinkhorn.default, (s.scores, s.labels, k, 3, 0.05)),
        (P.sinkhorn_segments.default, (s.labels, k)),
        (P.segment_reduce.default, (s.scores, perm, offsets, True, True)),
        (P.segment_reduce.default, (plan, perm, offsets, False, False)),
        (P.sinkhorn_exp.default, (s.scores, s.labels, class_max, 0.05)),
        (P.sinkhorn_scale.default, (plan, s.labels, counts + 1)),
        (P.sinkhorn_step.default, (plan, s.labels, rows, counts)),
        (P.sinkhorn_finish.default, (plan, s.labels, counts)),
        (P.scatter_mean.default, (xg, index, k * m)),
        (P.proto_similarity_backward.default, (randn_like(scores), x, s.prototypes, sim_index)),
        (P.proto_train_backward.default, (randn_like(scores), randn_like(tp.own), randn_like(tp.lse),
                                          x, s.prototypes, s.labels, tp.index, tp.weighted, tau,
                                          None, None, tp.stats)),
        (P.proto_train_backward.default, (None, None, randn_like(tp.lse),
                                          x, s.prototypes, s.labels, tp.index, tp.weighted, tau,
                                          None, None, tp.stats)),
        (P.proto_train_backward.default, (randn_like(scores), randn_like(tp.own), randn_like(tp.lse),
                                          x, s.prototypes, s.labels, tp_ln.index, tp_ln.weighted, tau,
                                          w.detach(), b, tp_ln.stats)),
        (P.scatter_mean_backward.default, (randn_like(mean), index, count)),
    ]


# Nothing is excluded from opcheck's test_utils: the data-dependent range checks live only in the
# real kernels, and the fake kernels need nothing but shapes, so test_aot_dispatch_dynamic applies.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    for s in sample_inputs(dtype, [CASE["empty"], CASE["odd"], CASE["transposed"]]):
        for op, args in op_calls(s):
            torch.library.opcheck(op, args)


# ---- torch.compile ---------------------------------------------------------------------------


def _training_step(x, prototypes, labels, target):
    k, m = prototypes.shape[0], prototypes.shape[1]
    scores, index = ops.proto_similarity(x, prototypes)
    ppc, ppd = ops.proto_contrast_loss(x, prototypes, target, 0.1, -1)
    tp = ops.proto_train(x, prototypes, labels, 0.1)
    q, assignment = ops.sinkhorn(tp.own.detach(), labels, k, 3, 0.05)
    segment = torch.where(assignment >= 0, labels * m + assignment, -1)
    mean, count = ops.scatter_mean(x, segment, k * m)
    loss = scores.square().sum() + ppc + ppd + tp.lse.sum() + tp.own.square().sum() + mean.square().sum()
    return loss, index, q, assignment, count


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    s = make_sample(CASE["transposed"], torch.float32)
    compiled = torch.compile(_training_step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_training_step, compiled):
        x = s.x.detach().clone().requires_grad_(True)
        out = fn(x, s.prototypes, s.labels, s.target)
        out[0].backward()
        results.append((*out, x.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)


# ---- bad inputs ------------------------------------------------------------------------------


def _bad_calls():
    """name -> (call, the error it must raise)."""
    x, p = torch.randn(6, 4), torch.randn(3, 2, 4)
    lab, tgt = torch.tensor([0, 1, 2, -1, 0, 1]), torch.tensor([0, 5, 3, -1, 2, 1])
    sc = torch.rand(6, 2)
    sim, con, tr, sk, sm = (
        ops.proto_similarity,
        ops.proto_contrast_loss,
        ops.proto_train,
        ops.sinkhorn,
        ops.scatter_mean,
    )
    bad_long = torch.tensor([0, 1, 2, 3, 0, 1])  # 3 == K
    ln, w, b = ops.layer_norm_normalize, torch.ones(4), torch.zeros(4)
    P = torch.ops.protoseg
    perm, offsets = P.sinkhorn_segments(lab, 3)
    plan, ones_k = torch.rand(6, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    return {
        "layer_norm x rank": (lambda: ln(x[0], w, b), r"x must be \[N, D\]"),
        "layer_norm integer x": (lambda: ln(x.long(), w.long(), b.long()), "x must be float16"),
        "layer_norm weight size": (lambda: ln(x, torch.ones(5), b), r"weight must be \[D\] with D == x.size\(1\)"),
        "layer_norm bias rank": (lambda: ln(x, w, b[None]), r"bias must be \[D\]"),
        "layer_norm weight dtype": (lambda: ln(x, w.double(), b), "weight must have the dtype of x"),
        "layer_norm eps < 0": (lambda: ln(x, w, b, -1e-5), "eps must be a non-negative"),
        "sim x rank": (lambda: sim(x[None], p), r"x must be \[N, D\]"),
        "sim prototypes rank": (lambda: sim(x, p[0]), r"prototypes must be \[K, M, D\]"),
        "sim D mismatch": (lambda: sim(x, torch.randn(3, 2, 5)), r"prototypes must be \[K, M, D\] with D"),
        "sim dtype mismatch": (lambda: sim(x, p.double()), "prototypes must have the dtype of x"),
        "sim integer x": (lambda: sim(x.long(), p.long()), "x must be float16"),
        "sim no classes": (lambda: sim(x, p[:0]), "prototypes must have at least one class and one prototype"),
        "train no prototypes": (lambda: tr(x, p[:, :0], lab), "prototypes must have at least one class and one"),
        "contrast x rank": (lambda: con(x[0], p, tgt), r"x must be \[N, D\]"),
        "contrast D mismatch": (lambda: con(x, torch.randn(3, 2, 5), tgt), "prototypes must be"),
        "contrast target high": (lambda: con(x, p, torch.tensor([0, 6, 3, -1, 2, 1])), r"target\[1\] = 6"),
        "contrast target negative": (lambda: con(x, p, tgt, ignore_index=-100), r"target\[3\] = -1"),
        "contrast target int32": (lambda: con(x, p, tgt.int()), "target must be int64"),
        "contrast target length": (lambda: con(x, p, tgt[:5]), r"target must be \[N\]"),
        "contrast temperature 0": (lambda: con(x, p, tgt, 0.0), "temperature"),
        "contrast temperature < 0": (lambda: con(x, p, tgt, -0.1), "temperature"),
        "train x rank": (lambda: tr(x[None], p, lab), r"x must be \[N, D\]"),
        "train prototypes rank": (lambda: tr(x, p[0], lab), "prototypes must be"),
        "train dtype mismatch": (lambda: tr(x.double(), p, lab), "prototypes must have the dtype of x"),
        "train labels high": (lambda: tr(x, p, bad_long), r"labels\[3\] = 3"),
        "train labels int32": (lambda: tr(x, p, lab.int()), "labels must be int64"),
        "train labels length": (lambda: tr(x, p, lab[:4]), r"labels must be \[N\]"),
        "train temperature 0": (lambda: tr(x, p, lab, 0.0), "temperature"),
        "sinkhorn scores rank": (lambda: sk(sc[:, 0], lab, 3), r"scores must be \[N, M\]"),
        "sinkhorn integer scores": (lambda: sk(sc.long(), lab, 3), "scores must be float16"),
        "sinkhorn labels high": (lambda: sk(sc, bad_long, 3), r"labels\[3\] = 3"),
        "sinkhorn labels int32": (lambda: sk(sc, lab.int(), 3), "labels must be int64"),
        "sinkhorn labels length": (lambda: sk(sc, lab[1:], 3), r"labels must be \[N\]"),
        "sinkhorn epsilon 0": (lambda: sk(sc, lab, 3, 3, 0.0), "epsilon"),
        "sinkhorn epsilon < 0": (lambda: sk(sc, lab, 3, 3, -0.05), "epsilon"),
        "sinkhorn iterations < 0": (lambda: sk(sc, lab, 3, -1), "iterations"),
        "sinkhorn num_classes 0": (lambda: sk(sc, lab, 0), "num_classes"),
        "sinkhorn no columns": (lambda: sk(sc[:, :0], lab, 3), "scores must have at least one prototype column"),
        "segments labels high": (lambda: P.sinkhorn_segments(bad_long, 3), r"labels\[3\] = 3"),
        "segments labels int32": (lambda: P.sinkhorn_segments(lab.int(), 3), "labels must be an \\[N\\] int64"),
        "segments num_classes 0": (lambda: P.sinkhorn_segments(lab, 0), "num_classes"),
        "reduce values rank": (lambda: P.segment_reduce(sc[:, 0], perm, offsets, True, True), "values must be"),
        "reduce perm high": (lambda: P.segment_reduce(sc, perm + 6, offsets, True, True), r"perm\[0\] = 6"),
        "reduce offsets end": (lambda: P.segment_reduce(sc, perm, offsets.clamp(max=2), True, True),
                               "offsets must run from 0 to perm.numel"),
        "reduce offsets int32": (lambda: P.segment_reduce(sc, perm, offsets.int(), True, True), "offsets must be"),
        "exp class_max float32": (lambda: P.sinkhorn_exp(sc, lab, torch.zeros(3), 0.05), "class_max must be a float64"),
        "exp epsilon 0": (lambda: P.sinkhorn_exp(sc, lab, torch.zeros(3, dtype=torch.float64), 0.0), "epsilon"),
        "scale plan float32": (lambda: P.sinkhorn_scale(sc, lab, ones_k), "plan must be a float64"),
        "step rows columns": (lambda: P.sinkhorn_step(plan, lab, ones_k[:, None], ones_k), "rows must have plan"),
        "step count length": (lambda: P.sinkhorn_step(plan, lab, plan[:3], ones_k[:2]), "count must be"),
        "finish labels length": (lambda: P.sinkhorn_finish(plan, lab[1:], ones_k), r"labels must be \[N\]"),
        "scatter x rank": (lambda: sm(x[0], lab, 3), r"x must be \[N, D\]"),
        "scatter integer x": (lambda: sm(x.long(), lab, 3), "x must be float16"),
        "scatter index high": (lambda: sm(x, bad_long, 3), r"index\[3\] = 3"),
        "scatter index int32": (lambda: sm(x, lab.int(), 3), "index must be int64"),
        "scatter index length": (lambda: sm(x, lab[:5], 3), r"index must be \[N\]"),
        "scatter num_segments < 0": (lambda: sm(x, torch.full((6,), -1), -1), "num_segments"),
    }


BAD = _bad_calls()
# Checks of tensor values (a label out of range, offsets that do not end at N): only the kernels
# read values; everything else the fake kernels (torch.compile's, meta tensors') check too, with
# the same message.
VALUE_CHECKS = {"contrast target high", "contrast target negative", "train labels high", "sinkhorn labels high",
                "segments labels high", "reduce perm high", "reduce offsets end", "scatter index high"}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise_naming_the_argument(name):
    call, match = BAD[name]
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.parametrize("name", [n for n in BAD if n not in VALUE_CHECKS])
def test_fake_kernels_check_what_the_kernels_check(name):
    with FakeTensorMode(shape_env=ShapeEnv()):  # the tensors and calls fake: only the fake kernels run
        call, match = _bad_calls()[name]
        with pytest.raises(RuntimeError, match=match):
            call()


def _mixed_device_calls(device):
    x, p = torch.randn(6, 4), torch.randn(3, 2, 4)
    lab = torch.tensor([0, 1, 2, -1, 0, 1])
    P = torch.ops.protoseg
    same = "must be on the same device as"
    return {
        "prototypes": (P.proto_similarity.default, (x, p.to(device)), f"prototypes {same} x"),
        "labels": (P.proto_train.default, (x, p, lab.to(device), 0.1), f"labels {same} x"),
        "sinkhorn labels": (P.sinkhorn.default, (torch.rand(6, 2), lab.to(device), 3, 3, 0.05),
                            f"labels {same} scores"),
        "index": (P.scatter_mean.default, (x, lab.to(device), 3), f"index {same} x"),
        "weight": (P.layer_norm_normalize.default, (x, torch.ones(4, device=device), torch.zeros(4), 1e-5),
                   f"weight {same} x"),
    }


@pytest.mark.parametrize("name", list(_mixed_device_calls("meta")))
def test_mixed_devices_cpu_kernel_names_the_argument(name):
    # With no GPU, "meta" is the second device; redispatching to the CPU kernel checks its boundary.
    op, args, match = _mixed_device_calls("meta")[name]
    with pytest.raises(RuntimeError, match=match):
        op.redispatch(CPU_ONLY, *args)


@pytest.mark.parametrize("name", list(_mixed_device_calls("meta")))
def test_mixed_devices_public_call_names_the_argument(name):
    op, args, match = _mixed_device_calls("meta")[name]
    with pytest.raises(RuntimeError, match=match):
        op(*args)


# ---- determinism -----------------------------------------------------------------------------


def test_scatter_mean_and_sinkhorn_bitwise_deterministic_across_threads():
    gen = torch.Generator().manual_seed(9)
    n, d, k, m = 20000, 32, 19, 10
    x = torch.randn(n, d, generator=gen)
    index = torch.randint(-1, k * m, (n,), generator=gen)
    scores = torch.rand(n, m, generator=gen) * 2 - 1
    labels = torch.randint(-1, k, (n,), generator=gen)
    runs = []
    for t in (2, 2, 1, 1, 2):
        with num_threads(t):
            runs.append((*ops.scatter_mean(x, index, k * m), *ops.sinkhorn(scores, labels, k, 3, 0.05)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    mean_lp, _ = ref.scatter_mean(x, index, k * m)
    assert_matches(runs[0][0], mean_lp, ref.scatter_mean(x.double(), index, k * m)[0], "mean")
    q64, assignment64 = ref.sinkhorn(scores, labels, k, 3, 0.05)
    torch.testing.assert_close(runs[0][2], q64, rtol=1e-6, atol=1e-7)
    assert torch.equal(runs[0][3], assignment64)


def test_layer_norm_normalize_gradients_bitwise_deterministic_across_threads():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5000, 48, generator=gen)
    w, b = _layer_norm_affine(48, torch.float32)
    g = torch.randn(5000, 48, generator=gen)
    _, stats = torch.ops.protoseg.layer_norm_normalize(x, w, b, 1e-5)
    runs = []
    for t in (2, 1, 2, 1):
        with num_threads(t):
            runs.append(torch.ops.protoseg.layer_norm_normalize_backward(g, x, w, b, stats))
    for run in runs[1:]:
        for a, c in zip(runs[0], run):
            assert torch.equal(a, c)


def test_large_outputs_reuse_freed_blocks():
    # Outputs of 16 MB or more come from csrc/cpu/huge_pages.h, which keeps freed blocks for the
    # next output of the same size: the second call gets the first call's memory back, and its
    # results do not depend on what that memory held.
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(8192, 512, generator=gen)  # weighted and x_hat [8192, 512] float32 = 16 MB each
    p = torch.randn(5, 3, 512, generator=gen)
    labels = torch.randint(0, 5, (8192,), generator=gen)
    first = ops.proto_train(x, p, labels, 0.1)
    blocks, expected = {first.weighted.data_ptr(), first.x_hat.data_ptr()}, first.weighted.clone()
    del first
    second = ops.proto_train(x, p, labels, 0.1)
    assert {second.weighted.data_ptr(), second.x_hat.data_ptr()} == blocks
    assert torch.equal(second.weighted, expected)


# ---- double backward, autocast --------------------------------------------------------------


@pytest.mark.parametrize(
    "op", ["proto_similarity", "proto_contrast_loss", "proto_train", "scatter_mean", "layer_norm_normalize"]
)
def test_double_backward_raises(op):
    s = make_sample(CASE["odd"], torch.float64)
    x = s.x.clone().requires_grad_(True)
    out = {
        "proto_similarity": lambda: ops.proto_similarity(x, s.prototypes)[0],
        "proto_contrast_loss": lambda: torch.stack(ops.proto_contrast_loss(x, s.prototypes, s.target)),
        "proto_train": lambda: ops.proto_train(x, s.prototypes, s.labels).lse,
        "scatter_mean": lambda: ops.scatter_mean(x, s.labels, s.case.k)[0],
        "layer_norm_normalize": lambda: ops.layer_norm_normalize(x, *_layer_norm_affine(s.case.d, x.dtype)),
    }[op]()
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.square().sum().backward()


class _RecordDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "protoseg":
            self.seen[func.__name__] = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def test_autocast_runs_sinkhorn_in_float32():
    s = make_sample(CASE["transposed"], torch.float32)
    scores_bf16 = s.scores.to(torch.bfloat16)
    expected_bf16 = ops.sinkhorn(scores_bf16.float(), s.labels, 4)
    expected_f32 = ops.sinkhorn(s.scores, s.labels, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), _RecordDtypes() as rec:
        q, assignment = ops.sinkhorn(scores_bf16, s.labels, 4)
        assert rec.seen["sinkhorn.default"][0] == torch.float32
        q32, assignment32 = ops.sinkhorn(s.scores, s.labels, 4)
        assert rec.seen["sinkhorn.default"][0] == torch.float32
    assert q.dtype == q32.dtype == torch.float32
    assert torch.equal(q, expected_bf16[0]) and torch.equal(assignment, expected_bf16[1])
    assert torch.equal(q32, expected_f32[0]) and torch.equal(assignment32, expected_f32[1])


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_autocast_runs_the_pixel_ops_in_the_dtype_of_x(x_dtype):
    """Under autocast x is not copied up to float32: each op sees x as it came, the prototypes and
    the LayerNorm's float32 weight and bias cast to x's dtype (bitwise the call with those casts
    written out, gradients to the float32 parameters included)."""
    s = make_sample(CASE["odd"], torch.float32)
    x = s.x.to(x_dtype)
    g = torch.Generator().manual_seed(5)
    w, b = 1 + 0.3 * torch.randn(s.x.shape[1], generator=g), 0.3 * torch.randn(s.x.shape[1], generator=g)
    target = torch.where(s.labels >= 0, s.labels * s.prototypes.shape[1], torch.full_like(s.labels, -1))
    calls = [  # (the protoseg op the call dispatches, whether it takes w and b, the call)
        ("proto_similarity.default", False, lambda x, p, w, b: ops.proto_similarity(x, p)[0]),
        # the contrast losses are composed from proto_train
        ("proto_train.default", False, lambda x, p, w, b: sum(ops.proto_contrast_loss(x, p, target, 0.1, -1))),
        ("proto_train.default", True, lambda x, p, w, b: ops.proto_train(x, p, s.labels, 0.1, w, b).lse.sum()),
        ("layer_norm_normalize.default", True, lambda x, p, w, b: ops.layer_norm_normalize(x, w, b)),
    ]
    for name, affine, call in calls:
        wa, ba = w.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), _RecordDtypes() as rec:
            out = call(x, s.prototypes, wa, ba)
        assert set(rec.seen[name]) <= {x_dtype, torch.int64}, (name, rec.seen[name])
        we, be = w.clone().requires_grad_(), b.clone().requires_grad_()
        expected = call(x, s.prototypes.to(x_dtype), we.to(x_dtype), be.to(x_dtype))
        assert out.dtype == expected.dtype and torch.equal(out, expected), name
        if affine:
            out.float().sum().backward()
            expected.float().sum().backward()
            assert wa.grad.dtype == torch.float32 and torch.equal(wa.grad, we.grad), name
            assert torch.equal(ba.grad, be.grad), name


@pytest.mark.parametrize("op", ["proto_similarity", "proto_train"])
def test_flop_counter_counts_the_ops_gemms_as_for_the_reference(op):
    # torch.utils.flop_counter sees the reference's matmuls; our ops declare theirs
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    x, prototypes = torch.randn(50, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    args = (x, prototypes) if op == "proto_similarity" else (x, prototypes, torch.randint(0, 3, (50,), generator=g), 0.1)
    counts = []
    for fn in (getattr(ops, op), getattr(ref, op)):
        with FlopCounterMode(display=False) as counter:
            fn(*args)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == (1 if op == "proto_similarity" else 2) * 2 * 50 * 8 * 12
