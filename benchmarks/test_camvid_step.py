"""One training step (forward, loss, backward) of the CamVid model of configs/camvid_effl0_*.yaml
(EfficientNet-Lite0, random weights) at its batch and crop, three comparisons in one process:

- memory format: NCHW (baseline) against channels-last (train.channels_last), lite decoder,
  softmax classifier; the loss and the gradients are checked to agree first;
- decoder: `lite` (baseline) against `segformer` (1x1 fuse) and `hrnet` (the paper's concat
  head: a dense 3x3 over all 496 backbone channels at stride 4), channels-last, softmax;
- classifier: softmax (baseline) against ProtoSeg, lite decoder, channels-last: what the
  prototype classifier costs in this config.

Sizes: PROTOSEG_BENCH_CAMVID="batch,crop" (default "8,320", the config's).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import ROUNDS, run

from protoseg.config import load_config
from protoseg.models.segmentor import build_model, compute_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, CROP = (int(v) for v in os.environ.get("PROTOSEG_BENCH_CAMVID", "8,320").split(","))


def _model(classifier="softmax", decoder="lite", channels_last=True):
    name = "protoseg" if classifier == "prototype" else "softmax"
    cfg = load_config(os.path.join(ROOT, "configs", f"camvid_effl0_{name}.yaml"),
                      ["model.backbone_checkpoint=''", f"model.decoder={decoder}",
                       f"train.channels_last={channels_last}"])
    torch.manual_seed(0)
    return build_model(cfg).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, CROP, CROP, generator=g), torch.randint(0, 12, (BATCH, CROP, CROP), generator=g)


def _step(model, images, labels):
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model(images, labels), labels, ignore_index=11)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_camvid_step_memory_format(benchmark, layout):
    images, labels = _batch()
    model = _model(channels_last=layout == "channels_last")
    if layout == "channels_last":  # the same step as in NCHW, to float rounding
        reference = _model(channels_last=False)
        model.eval(), reference.eval()  # dropout off, BN in eval: the two see the same function
        loss, expected = _step(model, images, labels), _step(reference, images, labels)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        model.train()
    run(benchmark, "camvid step: memory format", layout, lambda: _step(model, images, labels), baseline="nchw",
        rounds=ROUNDS)


@pytest.mark.parametrize("decoder", ["lite", "segformer", "hrnet"])
def test_camvid_step_decoder(benchmark, decoder):
    images, labels = _batch()
    model = _model(decoder=decoder)
    assert model(images)["logits"].shape == (BATCH, 11, CROP, CROP)
    run(benchmark, "camvid step: decoder", decoder, lambda: _step(model, images, labels), baseline="lite",
        rounds=ROUNDS)


@pytest.mark.parametrize("classifier", ["softmax", "prototype"])
def test_camvid_step_classifier(benchmark, classifier):
    images, labels = _batch()
    model = _model(classifier=classifier)
    assert torch.isfinite(_step(model, images, labels))
    run(benchmark, "camvid step: classifier", classifier, lambda: _step(model, images, labels),
        baseline="softmax", rounds=ROUNDS)
