"""torch.compile with the default backend (Inductor) and fullgraph=True trains: a training step
of the prototype classifier and of a small segmentor (forward, loss, backward, the in-place
prototype update) gives eager's logits, losses and gradients, and the same prototypes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from protoseg.models import PrototypeClassifier
from protoseg.models.backbones import Backbone
from protoseg.models.decoders import build_decoder
from protoseg.models.segmentor import Segmentor, compute_loss

pytestmark = pytest.mark.slow


# Forward and loss are compiled (the backward graph with them, by AOTAutograd); backward() is
# called on the result, as a training loop does.
def _classifier_forward(head, x, labels):
    logits, ppc, ppd = head(x, labels)
    loss = F.cross_entropy(logits, labels.clamp(min=0)) + 0.01 * ppc + 0.001 * ppd
    return loss, (logits, ppc, ppd)


def _segmentor_forward(model, images, labels):
    out = model(images, labels)
    loss, _ = compute_loss(out, labels)
    return loss, (out["logits"], out["ppc"], out["ppd"])


def _step(forward, *args):
    loss, outputs = forward(*args)
    loss.backward()
    return outputs


def _compare(eager_model, compiled_model, eager_out, compiled_out, atol=1e-5):
    """Inductor reorders floating-point work (conv + BatchNorm fusions, reductions), so values
    agree to rounding, not bitwise."""
    for name, a, b in zip(("logits", "ppc", "ppd"), eager_out, compiled_out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


def _prototypes(model):
    return next(b for n, b in model.named_buffers() if n.endswith("prototypes"))


def test_compiled_classifier_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = PrototypeClassifier(32, 5, 4, ignore_index=-1).train()
    compiled = copy.deepcopy(eager)
    compiled_forward = torch.compile(_classifier_forward, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for it in range(2):  # the second step starts from updated prototypes
        x = torch.randn(512, 32, generator=gen)
        labels = torch.randint(-1, 5, (512,), generator=gen)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        before = _prototypes(eager).clone()
        out_e = _step(_classifier_forward, eager, xe, labels)
        out_c = _step(compiled_forward, compiled, xc, labels)
        _compare(eager, compiled, out_e, out_c)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-3, atol=1e-6)
        assert not torch.equal(_prototypes(eager), before), "the step updated no prototype"
        differ = (_prototypes(eager) - _prototypes(compiled)).abs().max().item()
        assert differ <= 1e-6, f"step {it}: prototypes differ by {differ}"
        eager.zero_grad()
        compiled.zero_grad()


def test_compiled_segmentor_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    backbone = Backbone("resnet10t", output_stride=8)
    decoder = build_decoder("fcn", backbone.channels, 16, 0.0)
    eager = Segmentor(backbone, decoder, 4, classifier="prototype", proj_dim=16,
                      prototype_kwargs={"num_prototypes": 3}).train()
    compiled = copy.deepcopy(eager)
    before = _prototypes(eager).clone()
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    labels = torch.randint(0, 4, (2, 64, 64), generator=gen)
    labels[:, :8] = 255
    out_e = _step(_segmentor_forward, eager, images, labels)
    out_c = _step(torch.compile(_segmentor_forward, fullgraph=True), compiled, images, labels)
    _compare(eager, compiled, out_e, out_c, atol=2e-4)
    assert not torch.equal(_prototypes(eager), before), "the step updated no prototype"
    differ = (_prototypes(eager) - _prototypes(compiled)).abs().max().item()
    assert differ <= 1e-6, f"prototypes differ by {differ}"
