"""replace_classifier in torchvision, transformers and segmentation_models_pytorch models, built
offline with random weights: training steps through the host's own forward and loss, the eval
output against the original model's, a state_dict round trip, the head's logits against
PrototypeClassifier on the same embeddings, and the refusals. One example script runs too."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from protoseg.integrations import prototype_head, replace_classifier

K = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchvision_model(aux_loss=False):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K, aux_loss=aux_loss)


def segformer_model():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_labels=K, hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=32,
                             depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1])
    return SegformerForSemanticSegmentation(config)


def upernet_model():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, num_labels=K, hidden_size=16,
                                                        auxiliary_in_channels=24))


def smp_model():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=K)


def cross_entropy(logits, labels):
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=255)


# name: (build, eval forward -> logits, training forward -> the host's own loss)
HOSTS = {
    "torchvision": (torchvision_model, lambda m, x: m(x)["out"], lambda m, x, y: cross_entropy(m(x)["out"], y)),
    "transformers": (segformer_model, lambda m, x: m(pixel_values=x).logits,
                     lambda m, x, y: m(pixel_values=x, labels=y).loss),
    "upernet": (upernet_model, lambda m, x: m(pixel_values=x).logits,
                lambda m, x, y: m(pixel_values=x, labels=y).loss),
    "smp": (smp_model, lambda m, x: m(x), lambda m, x, y: cross_entropy(m(x), y)),
}


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (2, 64, 64), generator=g)
    labels[:, :4] = 255
    return torch.randn(2, 3, 64, 64, generator=g), labels


def built(host, seed=0):
    torch.manual_seed(seed)
    model = HOSTS[host][0]()
    return replace_classifier(model, num_prototypes=3, proj_dim=16, momentum=0.9)


# several seconds each: the first forwards of torchvision's DeepLabV3 take seconds on the CPU
# (oneDNN), importing transformers' Segformer about 5 s
@pytest.mark.slow
@pytest.mark.parametrize("host", HOSTS)
def test_host_trains_and_keeps_its_outputs(host, tmp_path):
    build, infer, host_loss = HOSTS[host]
    images, labels = data()
    torch.manual_seed(0)
    original = build().eval()
    with torch.no_grad():
        expected = infer(original, images)
    model = replace_classifier(original, num_prototypes=3, proj_dim=16, momentum=0.9)
    head = prototype_head(model)
    seen = {}
    head.register_forward_hook(lambda module, args, out: seen.update(features=args[0], logits=out))
    with torch.no_grad():
        got = infer(model, images)
        # the head's logits: PrototypeClassifier on the pixel rows of its embeddings
        e = head.projection(seen["features"])
        b, d, h, w = e.shape
        rows = head.classifier(e.permute(0, 2, 3, 1).reshape(b * h * w, d))
    assert torch.equal(seen["logits"], rows.reshape(b, h, w, K).permute(0, 3, 1, 2))
    assert got.shape == expected.shape and got.dtype == expected.dtype

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        images, labels = data(step + 1)
        before = head.classifier.prototypes.clone()
        loss = host_loss(model, images, labels)
        ppc, ppd = head.loss(labels)
        assert torch.isfinite(ppc) and torch.isfinite(ppd) and ppc > 0 and ppd > 0
        optimizer.zero_grad()
        (loss + 0.01 * ppc + 0.001 * ppd).backward()
        optimizer.step()
        assert not torch.equal(head.classifier.prototypes, before), f"step {step} moved no prototype"
        assert head.projection.mlp[0].weight.grad.abs().sum() > 0

    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = built(host, seed=1).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    with torch.no_grad():
        assert torch.equal(infer(fresh, images), infer(model, images))


def test_aux_classifier_stays_softmax():
    torch.manual_seed(0)
    model = replace_classifier(torchvision_model(aux_loss=True))
    assert type(model.classifier[4]).__name__ == "PrototypeHead"
    assert isinstance(model.aux_classifier[4], torch.nn.Conv2d)


def test_refusals_name_the_model():
    import segmentation_models_pytorch as smp
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    with pytest.raises(TypeError, match="does not know torch.nn.modules.conv.Conv2d"):
        replace_classifier(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="LRASPP: it sums two classifiers"):
        replace_classifier(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K))
    with pytest.raises(ValueError, match="activation=None"):
        replace_classifier(smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                                    classes=K, activation="sigmoid"))
    model = built("smp")
    with pytest.raises(ValueError, match="Unet's classifier is already a PrototypeHead"):
        replace_classifier(model)
    with pytest.raises(ValueError, match="holds 0 PrototypeHeads"):
        prototype_head(smp_model())


@pytest.mark.slow
def test_example_trains_a_few_iterations(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # for its `common` module
    path = os.path.join(ROOT, "examples", "smp_unet.py")
    spec = importlib.util.spec_from_file_location("smp_unet_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # the ProtoSeg path; --softmax runs the host's loop without the head's three lines
    miou = example.main(["--iterations", "2", "--data", str(tmp_path / "data"), "--scenes", "8", "--val-scenes", "4"])
    assert 0.0 <= miou <= 1.0
