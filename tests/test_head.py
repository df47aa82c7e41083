"""PrototypeHead: its logits against the method written out by hand, its training API (loss()
after the forward, or set_labels() before it) against the classifier called directly, misuse
errors, the label downsampling, float32 under bf16 autocast, torch.compile, and two gloo processes."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from protoseg import PrototypeHead
from protoseg.models.head import downsample_labels

K, M, C = 4, 3, 8


def make_head(seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    return PrototypeHead(C, K, M, **{"proj_dim": 6, "momentum": 0.9, **kwargs}).to(dtype).train()


def batch(seed=1, b=2, h=8, w=8, stride=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, C, h, w, generator=g, dtype=dtype)
    labels = torch.randint(0, K, (b, h * stride, w * stride), generator=g)
    labels[:, :stride] = 255
    return features, labels


def oracle_logits(head, features, dtype=torch.float64):
    """mask_norm(max_m cos(LayerNorm(e), p_km)) on the maps, in plain PyTorch (float64: the
    oracle), without protoseg ops."""
    c, norm = head.classifier, head.classifier.mask_norm
    e = head.projection(features).to(dtype).movedim(1, -1)
    e = F.layer_norm(e, (c.dim,), c.feat_norm.weight.to(dtype), c.feat_norm.bias.to(dtype), c.feat_norm.eps)
    cos = torch.einsum("bhwd,kmd->bhwkm", F.normalize(e, dim=-1), F.normalize(c.prototypes.to(dtype), dim=-1))
    return F.layer_norm(cos.amax(-1), (K,), norm.weight.to(dtype), norm.bias.to(dtype), norm.eps).movedim(-1, 1)


@pytest.mark.parametrize("projection", ["default", "released", "none"])
def test_eval_logits_are_the_method_by_hand(projection):
    head = make_head(projection=projection, proj_dim=None if projection == "none" else 6).eval()
    features, _ = batch()
    with torch.no_grad():
        logits = head(features)
    assert logits.shape == (2, K, 8, 8) and logits.dtype == torch.float64
    torch.testing.assert_close(logits, oracle_logits(head, features), rtol=1e-10, atol=1e-10)


def test_labels_downsample_by_nearest_neighbour():
    labels = torch.randint(0, 255, (2, 37, 50))
    # nearest: source index floor(i * in / out), written out
    rows, cols = (torch.arange(9) * 37 / 9).floor().long(), (torch.arange(13) * 50 / 13).floor().long()
    assert torch.equal(downsample_labels(labels, (9, 13)), labels[:, rows][:, :, cols])
    assert torch.equal(downsample_labels(labels[:, :32, :48], (8, 12)), labels[:, :32:4, :48:4])


def _run(head, features, labels, prepared):
    features = features.clone().requires_grad_()
    if prepared:
        head.set_labels(labels)
    logits = head(features)
    ppc, ppd = head.loss() if prepared else head.loss(labels)
    (logits.logsumexp(dim=1).mean() + ppc + ppd).backward()
    return logits.detach(), ppc.detach(), ppd.detach(), features.grad, head.classifier.prototypes.clone()


@pytest.mark.parametrize("prepared", [False, True], ids=["loss_after_forward", "set_labels_before"])
def test_training_matches_the_classifier_called_directly(prepared):
    head, features, labels = make_head(), *batch()
    direct = copy.deepcopy(head)
    for step in range(2):  # the second step starts from moved prototypes
        features, labels = batch(seed=step + 1)
        before = head.classifier.prototypes.clone()
        logits, ppc, ppd, grad, prototypes = _run(head, features, labels, prepared)
        x = features.clone().requires_grad_()
        e = direct.projection(x)
        rows = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        d_logits, d_ppc, d_ppd = direct.classifier(rows, labels[:, ::4, ::4].reshape(-1))
        d_logits = d_logits.view(2, 8, 8, K).permute(0, 3, 1, 2)
        (d_logits.logsumexp(dim=1).mean() + d_ppc + d_ppd).backward()
        assert torch.equal(ppc, d_ppc) and torch.equal(ppd, d_ppd), step
        assert torch.equal(prototypes, direct.classifier.prototypes), step
        assert not torch.equal(prototypes, before), "the step moved no prototype"
        torch.testing.assert_close(logits, d_logits.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-12)
        for (name, p), q in zip(head.named_parameters(), direct.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_misuse_raises_one_line_naming_the_problem():
    head = make_head()
    features, labels = batch()
    with pytest.raises(RuntimeError, match="needs a training-mode forward first"):
        head.loss(labels)
    with pytest.raises(ValueError, match=r"expects features \[B, 8, H, W\]"):
        head(features[:, :5])
    head(features)
    with pytest.raises(ValueError, match="needs labels"):
        head.loss()
    for bad in (labels[0], labels[:1], labels[:, :4, :4], labels.float()):
        with pytest.raises(ValueError, match=r"labels must be integer \[B, H, W\] with B = 2"):
            head.loss(bad)
    head.loss(labels)  # the rejected calls left the forward's embeddings in place
    with pytest.raises(RuntimeError, match="already called for this forward"):
        head.loss(labels)
    head.set_labels(labels)
    head(features)
    with pytest.raises(ValueError, match="call loss\\(\\) without labels"):
        head.loss(labels)
    head.loss()
    with pytest.raises(RuntimeError, match="already called"):
        head.loss()
    with pytest.raises(ValueError, match="projection='none' keeps the 8 feature channels"):
        PrototypeHead(C, K, M, proj_dim=6, projection="none")


def test_eval_forward_leaves_nothing_for_loss():
    head = make_head().eval()
    features, labels = batch()
    head(features)
    with pytest.raises(RuntimeError, match="training-mode forward"):
        head.loss(labels)


def test_under_bf16_autocast_the_head_computes_in_float32():
    # The projection and classifier leave autocast (protoseg/models/head.py): logits, losses and
    # the prototype update are float32's to the bit, wherever loss() runs.
    features, labels = batch(dtype=torch.float32)
    heads = [make_head(dtype=torch.float32) for _ in range(4)]
    results = []
    for i, head in enumerate(heads):  # 3: no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=i != 3):
            if i == 2:
                head.set_labels(labels)
            logits = head(features)
            if i in (1, 3):
                results.append((logits, *head.loss(labels)))
        if i == 0:  # loss() outside the autocast region
            results.append((logits, *head.loss(labels)))
        if i == 2:
            results.append((logits, *head.loss()))
    exact = results[3]
    assert exact[0].dtype == torch.float32 and torch.isfinite(exact[1]) and torch.isfinite(exact[2])
    for i, (logits, ppc, ppd) in enumerate(results[:3]):
        assert torch.equal(ppc, exact[1]) and torch.equal(ppd, exact[2]), i
        assert torch.equal(heads[i].classifier.prototypes, heads[3].classifier.prototypes), i
        if i < 2:  # the inference pass, as without autocast (set_labels' fused pass: the same logits to rounding)
            assert torch.equal(logits, exact[0]), i
    torch.testing.assert_close(results[2][0], exact[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("prepared", [False, True], ids=["loss_after_forward", "set_labels_before"])
def test_compiled_step_matches_eager(prepared):
    """fullgraph=True: the head's state between forward and loss() traces without a graph break.
    aot_eager traces forward and backward as Inductor would, without its code generation, which
    tests/test_compile.py covers for the same classifier."""
    torch._dynamo.reset()

    def step(head, features, labels):
        if prepared:
            head.set_labels(labels)
        logits = head(features)
        ppc, ppd = head.loss() if prepared else head.loss(labels)
        target = labels[:, ::4, ::4].clamp(max=K - 1)
        return F.cross_entropy(logits, target) + 0.01 * ppc + 0.001 * ppd, ppc, ppd

    eager = make_head(dtype=torch.float32)
    compiled = copy.deepcopy(eager)
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):
        features, labels = batch(seed=seed, dtype=torch.float32)
        out_e, out_c = step(eager, features, labels), compiled_step(compiled, features, labels)
        out_e[0].backward()
        out_c[0].backward()
        for a, b in zip(out_e, out_c):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.classifier.prototypes, eager.classifier.prototypes, rtol=0, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


# ---- two processes over gloo ------------------------------------------------------------------


class Host(torch.nn.Module):
    """A stand-in host: a strided conv, then its classifier (a PrototypeHead without BatchNorm,
    whose per-rank statistics would differ from the single process's)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, C, 3, stride=4, padding=1)
        self.classifier = PrototypeHead(C, K, M, proj_dim=6, projection="released", momentum=0.9)

    def forward(self, images):
        return F.interpolate(self.classifier(self.stem(images)), size=images.shape[-2:], mode="bilinear")


def _train(model, head, images, labels, steps=2):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        logits = model(images)
        ppc, ppd = head.loss(labels)
        loss = F.cross_entropy(logits, labels) + 0.01 * ppc + 0.001 * ppd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _global_batch():
    g = torch.Generator().manual_seed(5)
    # no ignored pixels: every rank's loss is a mean over as many pixels, so DDP's average of the
    # ranks' gradients is the gradient of the global batch's mean
    return torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, K, (4, 32, 32), generator=g)


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Host().double().train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, labels = _global_batch()
    half = images.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    _train(ddp, model.classifier, images[sl], labels[sl])
    torch.save(model.state_dict(), f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_over_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(f"{tmp}/rank{r}.pt") for r in range(2))
    key = "classifier.classifier.prototypes"
    assert torch.equal(r0[key], r1[key]), "ranks disagree on the prototypes"
    torch.manual_seed(0)
    single = Host().double().train()
    before = single.classifier.classifier.prototypes.clone()
    _train(single, single.classifier, *_global_batch())
    assert not torch.equal(single.classifier.classifier.prototypes, before)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(r0[name], value, rtol=1e-10, atol=1e-12, msg=name)
