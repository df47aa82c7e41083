"""PrototypeClassifier: fused ops vs the released-code transcription, the update rule by hand,
ignore handling, options, and exact multi-process prototype learning over gloo."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from protoseg import ops
from protoseg.models import PrototypeClassifier
from protoseg.models.prototype import global_sinkhorn


def make(k=5, m=4, d=16, n=600, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    model = PrototypeClassifier(d, k, m, **kwargs).to(dtype).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    target = torch.randint(0, k, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.15] = 255
    return model, x, target


def step(model, x, target):
    x = x.detach().requires_grad_()
    logits, ppc, ppd = model(x, target)
    (logits.logsumexp(dim=1).mean() + ppc + ppd).backward()
    return logits.detach(), ppc.detach(), ppd.detach(), x.grad


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_fused_matches_released_transcription(temperature):
    fused, x, target = make(temperature=temperature, momentum=0.9)
    reference = copy.deepcopy(fused)
    reference.impl = "reference"
    before = fused.prototypes.clone()
    for _ in range(3):  # several steps: the updated prototypes feed the next step
        a, b = step(fused, x, target), step(reference, x, target)
        for name, u, v in zip(("logits", "ppc", "ppd", "grad"), a, b):
            torch.testing.assert_close(u, v, msg=f"{name} differs")
        torch.testing.assert_close(fused.prototypes, reference.prototypes)
    assert (fused.prototypes - before).abs().max() > 1e-3, "the prototypes never moved"


def test_eval_returns_mask_norm_of_similarity():
    model, x, target = make()
    model.eval()
    logits = model(x, target)
    scores, _ = ops.reference.proto_similarity(model.feat_norm(x), model.prototypes)
    torch.testing.assert_close(logits, model.mask_norm(scores))
    reference = copy.deepcopy(model)
    reference.impl = "reference"
    torch.testing.assert_close(reference(x), logits)


def test_update_rule_by_hand():
    """K=2, M=1, gamma=0.5: p_k <- normalize(0.5 p_k + 0.5 normalize(sum of the class's
    correctly classified unit embeddings)); a class with no correct pixel keeps its prototype."""
    torch.manual_seed(0)
    model = PrototypeClassifier(3, 2, 1, momentum=0.5).double().train()
    with torch.no_grad():
        model.prototypes.copy_(torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], dtype=torch.float64))
    # Pixels near prototype 0 labelled 0 (correct), one pixel near prototype 0 labelled 1 (wrong).
    x = torch.tensor([[2.0, 0.1, 0.3], [1.0, -0.2, 0.1], [3.0, 0.0, -0.5], [1.0, 0.1, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1])
    e = F.normalize(model.feat_norm(x), dim=-1).detach()
    logits, _, _ = model(x, target)
    assert logits.argmax(dim=1).tolist() == [0, 0, 0, 0]
    f = F.normalize(e[:3].sum(dim=0), dim=0)
    expected0 = F.normalize(0.5 * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.5 * f, dim=0)
    torch.testing.assert_close(model.prototypes[0, 0], expected0)
    torch.testing.assert_close(model.prototypes[1, 0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_losses_by_hand():
    """ppc and ppd from the definitions: CE over all K*M cosines / tau against y*M + argmax_m Q."""
    model, x, target = make(temperature=0.1)
    protos = model.prototypes.clone()
    logits, ppc, ppd = model(x, target)
    e = F.normalize(model.feat_norm(x), dim=-1).detach()
    cos = e @ protos.reshape(-1, protos.shape[-1]).t()
    valid = target != 255
    labels = torch.where(valid, target, -1)
    own = cos.view(len(x), 5, 4)[torch.arange(len(x)), labels.clamp(min=0)]
    _, assignment = ops.reference.sinkhorn(own, labels, 5, 3, 0.05)
    t = labels * 4 + assignment
    torch.testing.assert_close(ppc, F.cross_entropy(cos[valid] / 0.1, t[valid]))
    torch.testing.assert_close(ppd, (1 - cos[valid].gather(1, t[valid, None])).pow(2).mean())


def test_all_ignored_gives_zero_losses_and_no_update():
    model, x, _ = make()
    before = model.prototypes.clone()
    target = torch.full((x.shape[0],), 255)
    logits, ppc, ppd, grad = step(model, x, target)
    assert ppc.item() == 0 and ppd.item() == 0
    assert torch.isfinite(grad).all()
    assert torch.equal(model.prototypes, before)


def test_non_finite_embeddings_leave_the_prototypes_untouched():
    model, x, target = make()
    before = model.prototypes.clone()
    x = x.clone()
    x[::3] = float("nan")
    model(x, target)
    assert torch.isfinite(model.prototypes).all()
    assert not torch.equal(model.prototypes, before), "the finite pixels still update"


def test_gumbel_update_differs_from_argmax_but_targets_do_not():
    argmax_model, x, target = make(momentum=0.5)
    gumbel_model = copy.deepcopy(argmax_model)
    gumbel_model.update_assignment = "gumbel"
    a, b = step(argmax_model, x, target), step(gumbel_model, x, target)
    torch.testing.assert_close(a[1], b[1])  # same contrast targets, same ppc
    assert not torch.allclose(argmax_model.prototypes, gumbel_model.prototypes)


def test_bad_arguments_name_themselves():
    model, x, target = make()
    with pytest.raises(ValueError, match="impl"):
        PrototypeClassifier(16, 5, impl="fast")
    with pytest.raises(ValueError, match="ignore_index 255 is a class index"):
        PrototypeClassifier(16, 300)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :3], target)
    with pytest.raises(ValueError, match="target must be"):
        model(x, target[:5])
    bad = target.clone()
    bad[7] = 9
    with pytest.raises(RuntimeError, match=r"labels\[7\] = 9"):
        model(x, bad)


def test_float32_fused_close_to_float64():
    model64, x, target = make()
    model32 = copy.deepcopy(model64).float()
    a = step(model64, x, target)
    b = step(model32, x.float(), target)
    torch.testing.assert_close(b[0].double(), a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b[1].double(), a[1], rtol=1e-4, atol=1e-4)


# ---- two processes over gloo ------------------------------------------------------------------


def _worker(rank, world, init_file, x, target, result_dir, sinkhorn_scope, update_scope):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = PrototypeClassifier(
        16, 5, 4, momentum=0.9, sinkhorn_scope=sinkhorn_scope, update_scope=update_scope
    ).to(x.dtype).train()
    half = x.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    for _ in range(2):
        model(x[sl], target[sl])
    own = torch.randn(x.shape[0], 4, dtype=x.dtype, generator=torch.Generator().manual_seed(3))[sl]
    labels = target[sl].where(target[sl] != 255, -1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        q, assignment = global_sinkhorn(own, labels, 5, 3, 0.05)
    events = [(e.name, _tensor_shapes(e.input_shapes), _inside_protoseg_op(e)) for e in prof.events()]
    torch.save({"prototypes": model.prototypes, "q": q, "assignment": assignment, "events": events},
               f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _tensor_shapes(input_shapes):
    """The shapes of an event's tensor inputs (tensor lists flattened)."""
    out = []
    for shape in input_shapes:
        if shape and isinstance(shape[0], list):
            out.extend(s for s in shape if s)
        elif shape:
            out.append(list(shape))
    return out


def _inside_protoseg_op(event):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("protoseg::"):
            return True
        parent = parent.cpu_parent
    return False


def _assert_sinkhorn_runs_in_protoseg_ops(events, n, k, m):
    """Every pixel-sized tensor is touched inside protoseg ops only; what runs between them are
    all-reduces of [K] and [K, M] tensors and bookkeeping on the [K + 1] offsets."""
    names = {name for name, _, _ in events}
    for op in ("sinkhorn_segments", "segment_reduce", "sinkhorn_exp", "sinkhorn_scale", "sinkhorn_step",
               "sinkhorn_finish"):
        assert f"protoseg::{op}" in names, f"{op} did not run: {sorted(names)}"
    reduces = [shapes for name, shapes, _ in events if "allreduce" in name]
    assert len(reduces) == 3 + 3, f"expected 6 all-reduces (max, count, total, 3 x rows): {sorted(names)}"
    assert all(shape in ([k], [k, m]) for shapes in reduces for shape in shapes), reduces
    assert n > k * m + 1  # a pixel-sized tensor is larger than any marginal
    outside = [(name, shapes) for name, shapes, inside in events if not inside and not name.startswith("protoseg::")]
    big = [(name, shapes) for name, shapes in outside if any(torch.Size(s).numel() > k * m + 1 for s in shapes)]
    assert not big, f"pixel-sized work outside protoseg ops: {big}"


@pytest.mark.slow
@pytest.mark.parametrize("scope, dtype", [("global", torch.float64), ("local", torch.float64),
                                          ("global", torch.float32)])
def test_two_process_prototypes_identical_and_equal_to_single_process(scope, dtype):
    _, x, target = make(n=800)
    x = x.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _worker, args=(2, os.path.join(tmp, "init"), x, target, tmp, scope, scope), nprocs=2, join=True
        )
        r0, r1 = (torch.load(f"{tmp}/rank{r}.pt") for r in range(2))
    assert torch.equal(r0["prototypes"], r1["prototypes"]), "ranks disagree on the prototypes"
    if scope == "local":
        return  # the released behaviour: equal across ranks, but not the single-process result
    for r in (r0, r1):
        _assert_sinkhorn_runs_in_protoseg_ops(r["events"], 400, 5, 4)
    torch.manual_seed(0)
    single = PrototypeClassifier(16, 5, 4, momentum=0.9).to(dtype).train()
    for _ in range(2):
        single(x, target)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(r0["prototypes"], single.prototypes, rtol=tol, atol=tol)
    own = torch.randn(x.shape[0], 4, dtype=dtype, generator=torch.Generator().manual_seed(3))
    q, assignment = ops.sinkhorn(own, target.where(target != 255, -1), 5, 3, 0.05)
    torch.testing.assert_close(torch.cat([r0["q"], r1["q"]]), q, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.cat([r0["assignment"], r1["assignment"]]), assignment)
