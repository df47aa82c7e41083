"""CPU-vs-CUDA parity of every protoseg op, forward and backward, every dtype, sizes up to
N = 1M, plus 64-bit indexing (N * D > 2^31), determinism and bad input on the device.
Needs a GPU: skips cleanly without one (the same kernels run on the CPU in test_emulated.py)."""

from __future__ import annotations

import pytest
import torch

import protoseg.ops as ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]  # -k float32 selects (tools/gpu_check.py)
TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12), torch.float16: (1e-2, 2e-3),
       torch.bfloat16: (5e-2, 2e-2)}
SIZES = [(0, 16, 3, 2), (1, 16, 3, 2), (1000, 64, 19, 10), (4099, 720, 19, 10), (2048, 720, 847, 10)]


def _problem(n, d, k, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    p = torch.randn(k, m, d, generator=g).to(dtype)
    labels = torch.randint(-1, k, (n,), generator=g)
    return x, p, labels


def _close(a, b, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.cpu().double(), b.double(), rtol=rtol, atol=atol, msg=what)


def _both(fn, *tensors):
    """fn on CPU tensors and on their CUDA copies (leaf tensors requiring grad stay leaves)."""
    cpu = fn(*tensors)
    dev = fn(*[t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
               for t in tensors])
    return cpu, dev


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_similarity_and_train_parity(dtype, size):
    n, d, k, m = size
    x, p, labels = _problem(n, d, k, m, dtype)
    s, i = ops.proto_similarity(x, p)
    sc, ic = ops.proto_similarity(x.cuda(), p.cuda())
    _close(sc, s, dtype, "scores")
    if dtype in (torch.float32, torch.float64) and n:
        assert (ic.cpu() == i).float().mean() > 0.999  # near-ties may differ by rounding
    out = ops.proto_train(x, p, labels, 0.1)
    outc = ops.proto_train(x.cuda(), p.cuda(), labels.cuda(), 0.1)
    for name, a, b in zip(out._fields, outc, out):
        if name != "index":
            _close(a, b, dtype, name)

    # backward through each differentiable output, with the CPU's index (no tie ambiguity)
    gen = torch.Generator().manual_seed(1)
    gs, go, gl = torch.randn(n, k, generator=gen), torch.randn(n, m, generator=gen), torch.randn(n, generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = (gs.to(dtype), go.to(acc), gl.to(acc), x, p, labels, out.index, out.weighted, 0.1, None, None, out.stats)
    g_cpu = torch.ops.protoseg.proto_train_backward(*args)[0]
    g_dev = torch.ops.protoseg.proto_train_backward(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])[0]
    _close(g_dev, g_cpu, dtype, "proto_train grad_x")
    # with the feature LayerNorm (an ATen composite on CUDA, fused into the pass on the CPU)
    w, b = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype), (0.3 * torch.randn(d, generator=gen)).to(dtype)
    out = ops.proto_train(x, p, labels, 0.1, w, b)
    outc = ops.proto_train(x.cuda(), p.cuda(), labels.cuda(), 0.1, w.cuda(), b.cuda())
    for name, a, b_ in zip(out._fields, outc, out):
        if name != "index":
            _close(a, b_, dtype, f"{name} with LayerNorm")
    args = (gs.to(dtype), go.to(acc), gl.to(acc), x, p, labels, out.index, out.weighted, 0.1, w, b, out.stats)
    g_cpu = torch.ops.protoseg.proto_train_backward(*args)
    g_dev = torch.ops.protoseg.proto_train_backward(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    for name, a, b_ in zip(("grad_x", "grad_weight", "grad_bias"), g_dev, g_cpu):
        _close(a, b_, dtype, f"proto_train {name} with LayerNorm")
    g_cpu = torch.ops.protoseg.proto_similarity_backward(gs.to(dtype), x, p, i)
    g_dev = torch.ops.protoseg.proto_similarity_backward(gs.to(dtype).cuda(), x.cuda(), p.cuda(), i.cuda())
    _close(g_dev, g_cpu, dtype, "proto_similarity grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 777, 1 << 20])
def test_contrast_loss_parity(dtype, n):
    d, k, m = (64, 19, 10) if n > 4096 else (128, 7, 4)
    x, p, labels = _problem(n, d, k, m, dtype, seed=2)
    target = torch.where(labels >= 0, labels * m, torch.full_like(labels, 255))
    xr = x.clone().requires_grad_()
    (ppc, ppd), (ppc_c, ppd_c) = _both(lambda a, b, t: ops.proto_contrast_loss(a, b, t, 0.1, 255), xr, p, target)
    _close(ppc_c, ppc.detach(), dtype, "ppc")
    _close(ppd_c, ppd.detach(), dtype, "ppd")
    if n:
        g_cpu = torch.autograd.grad(ppc + 0.5 * ppd, xr)[0]
        xc = x.cuda().requires_grad_()
        a, b = ops.proto_contrast_loss(xc, p.cuda(), target.cuda(), 0.1, 255)
        g_dev = torch.autograd.grad(a + 0.5 * b, xc)[0]
        _close(g_dev, g_cpu, dtype, "grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 5000, 1 << 20])
def test_sinkhorn_parity_and_determinism(dtype, n):
    k, m = 150, 10
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(n, m, generator=g).to(dtype)
    labels = torch.randint(-1, k - 1, (n,), generator=g)  # the last class stays empty
    q, a = ops.sinkhorn(scores, labels, k, 3, 0.05)
    qc, ac = ops.sinkhorn(scores.cuda(), labels.cuda(), k, 3, 0.05)
    torch.testing.assert_close(qc.cpu(), q, rtol=1e-5, atol=1e-6)
    assert (ac.cpu() == a).float().mean() > 0.999 if n else ac.numel() == 0
    qc2, ac2 = ops.sinkhorn(scores.cuda(), labels.cuda(), k, 3, 0.05)
    assert torch.equal(qc, qc2) and torch.equal(ac, ac2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 5000, 1 << 20])
def test_sinkhorn_steps_parity(dtype, n):
    """The distributed caller's steps composed on the GPU: bitwise the GPU's single-call sinkhorn
    (same kernels, same reduction order), and the CPU's result to rounding."""
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(n, 10, generator=g).to(dtype)
    labels = torch.randint(-1, 19, (n,), generator=g)
    q, a = ops.sinkhorn_reduced(scores.cuda(), labels.cuda(), 19, 3, 0.05)
    q1, a1 = ops.sinkhorn(scores.cuda(), labels.cuda(), 19, 3, 0.05)
    assert torch.equal(q, q1) and torch.equal(a, a1)
    cq, ca = ops.sinkhorn(scores, labels, 19, 3, 0.05)
    torch.testing.assert_close(q.cpu(), cq, rtol=1e-6, atol=1e-7)
    assert torch.equal(a.cpu(), ca)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 3000, 1 << 20])
def test_scatter_mean_parity_and_determinism(dtype, n):
    d, s = 64, 190
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=g).to(dtype)
    index = torch.randint(-1, s - 1, (n,), generator=g)
    xr = x.clone().requires_grad_()
    mean, count = ops.scatter_mean(xr, index, s)
    xc = x.cuda().requires_grad_()
    mean_c, count_c = ops.scatter_mean(xc, index.cuda(), s)
    assert torch.equal(count_c.cpu(), count)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(mean_c.detach().cpu(), mean.detach()), "same summation order as the CPU kernel"
    _close(mean_c.detach(), mean.detach(), dtype, "mean")
    mean_c2, _ = ops.scatter_mean(x.cuda(), index.cuda(), s)
    assert torch.equal(mean_c.detach(), mean_c2)
    if n:
        gm = torch.randn(s, d, generator=g).to(dtype)
        (g_cpu,) = torch.autograd.grad(mean, xr, gm)
        (g_dev,) = torch.autograd.grad(mean_c, xc, gm.cuda())
        _close(g_dev, g_cpu, dtype, "grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 3000, 1 << 20])
def test_layer_norm_normalize_parity(dtype, n):
    g = torch.Generator().manual_seed(5)
    inputs = [(torch.randn(n, 720, generator=g) * 3 + 1).to(dtype), (1 + 0.3 * torch.randn(720, generator=g)).to(dtype),
              (0.3 * torch.randn(720, generator=g)).to(dtype)]
    grad = torch.randn(n, 720, generator=g).to(dtype)
    cpu = [t.clone().requires_grad_() for t in inputs]
    dev = [t.cuda().requires_grad_() for t in inputs]
    out_cpu, out_dev = ops.layer_norm_normalize(*cpu), ops.layer_norm_normalize(*dev)
    _close(out_dev.detach(), out_cpu.detach(), dtype, "out")
    if n:
        g_cpu = torch.autograd.grad(out_cpu, cpu, grad)
        g_dev = torch.autograd.grad(out_dev, dev, grad.cuda())
        for name, a, c in zip(("grad_x", "grad_weight", "grad_bias"), g_dev, g_cpu):
            _close(a, c, dtype, name)


@pytest.mark.slow
def test_64bit_indexing():
    """N * D > 2^31 elements: the last rows are right (int32 offsets would wrap)."""
    free, _ = torch.cuda.mem_get_info()
    n, d, k, m = 3_000_000, 720, 19, 10
    if free < 20 * 2**30:
        pytest.skip("needs about 20 GB of free device memory")
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    p = torch.randn(k, m, d, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    s, i = ops.proto_similarity(x, p)
    tail = slice(n - 500, n)
    s_cpu, _ = ops.proto_similarity(x[tail].cpu(), p.cpu())
    _close(s[tail], s_cpu, torch.bfloat16, "scores of the last rows")
    g = torch.ops.protoseg.proto_similarity_backward(torch.ones_like(s), x, p, i)
    g_cpu = torch.ops.protoseg.proto_similarity_backward(torch.ones_like(s_cpu), x[tail].cpu(), p.cpu(), i[tail].cpu())
    _close(g[tail], g_cpu, torch.bfloat16, "grad_x of the last rows")
    index = torch.arange(n, device="cuda") % 7
    mean, count = ops.scatter_mean(x, index, 7)
    grad = torch.ops.protoseg.scatter_mean_backward(mean, index, count)
    _close(grad[tail], mean[index[tail]].cpu() / count[index[tail]].cpu()[:, None].to(torch.bfloat16),
           torch.bfloat16, "scatter_mean_backward of the last rows")


def test_bad_input_raises_on_device():
    x, p, labels = _problem(1000, 16, 3, 2, torch.float32)
    labels[999] = 3
    with pytest.raises(RuntimeError, match=r"labels\[999\] = 3 is out of range"):
        ops.proto_train(x.cuda(), p.cuda(), labels.cuda(), 0.1)
    with pytest.raises(RuntimeError, match="same device"):
        ops.proto_similarity(x.cuda(), p)
    # x on the CPU, the prototypes on the GPU: dispatch picks the CUDA kernel, whose checks run
    # before it takes the device (csrc/cuda/cuda_exec.cuh), so the argument is named.
    with pytest.raises(RuntimeError, match=r"prototypes must be on the same device as x \(got cuda:0 and cpu\)"):
        ops.proto_similarity(x, p.cuda())
    # the device is still usable afterwards (no sticky error)
    ops.proto_similarity(x.cuda(), p.cuda())
    torch.cuda.synchronize()
