import pytest
import timm
import torch

from protoseg.config import Config
from protoseg.models.backbones import Backbone
from protoseg.models.segmentor import ProjectionHead, backbone_parameters, build_model, compute_loss


def _build(backbone, decoder, classifier="prototype", **model):
    cfg = Config()
    cfg.model.backbone, cfg.model.decoder, cfg.model.classifier = backbone, decoder, classifier
    cfg.model.decoder_channels, cfg.model.proj_dim, cfg.model.num_prototypes = 32, 16, 3
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.data.num_classes, cfg.data.crop_size = 5, [64, 64]
    return build_model(cfg)


def _check(model, size=(64, 64)):
    torch.manual_seed(0)
    images = torch.randn(2, 3, *size)
    labels = torch.randint(0, 5, (2, *size))
    labels[:, :4] = 255
    model.train()
    out = model(images, labels)
    assert out["logits"].shape == (2, 5, *size)
    loss, terms = compute_loss(out, labels)
    assert torch.isfinite(loss)
    assert set(terms) == ({"seg", "ppc", "ppd"} if model.uses_prototypes else {"seg"})
    loss.backward()
    model.eval()
    with torch.no_grad():
        assert model(images)["logits"].shape == (2, 5, *size)


@pytest.mark.parametrize("classifier", ["prototype", "softmax"])
def test_hrnet_concat_head(classifier):
    model = _build("hrnet_w18_small", "hrnet", classifier)
    assert model.backbone.channels == [16, 32, 64, 128] and model.backbone.reductions == [4, 8, 16, 32]
    _check(model)


@pytest.mark.parametrize("decoder", ["fcn", "aspp"])
def test_resnet_heads_at_output_stride_8(decoder):
    model = _build("resnet18", decoder, output_stride=8)
    assert model.backbone.reductions == [4, 8, 8, 8]
    _check(model, size=(48, 40))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["swin_tiny_patch4_window7_224", "convnext_tiny"])
def test_upernet_on_transformer_and_convnext(backbone):
    model = _build(backbone, "upernet", "softmax" if backbone.startswith("convnext") else "prototype")
    assert model.backbone.reductions == [4, 8, 16, 32]
    _check(model)


@pytest.mark.slow
def test_hrnet_w48_has_720_channels_and_resnet50_stride_8():
    assert sum(Backbone("hrnet_w48").channels) == 720
    assert Backbone("resnet50", output_stride=8).reductions == [4, 8, 8, 8]


def test_local_backbone_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "resnet18.pth"
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", checkpoint=str(path))
    assert torch.equal(backbone.body.state_dict()["conv1.weight"], reference.conv1.weight)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        Backbone("resnet18", checkpoint=str(tmp_path / "nothere.pth"))


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="model.backbone 'vgg16'"):
        Backbone("vgg16")
    with pytest.raises(ValueError, match="model.decoder must be one of"):
        _build("resnet18", "segformer")
    with pytest.raises(ValueError, match="model.classifier"):
        _build("resnet18", "fcn", "linear")


def test_legacy_projection_normalises_along_width():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, 5)
    legacy, corrected = ProjectionHead(8, 4, legacy_width_norm=True), ProjectionHead(8, 4)
    corrected.load_state_dict(legacy.state_dict())
    y = legacy(x)
    assert torch.allclose(y.norm(dim=-1), torch.ones(2, 4, 3))  # unit norm along W, not C
    assert not torch.allclose(corrected(x).norm(dim=-1), torch.ones(2, 4, 3))


def test_backbone_parameters_split_for_the_lr_multiplier():
    model = _build("resnet18", "fcn", "softmax")
    backbone, rest = backbone_parameters(model)
    assert len(backbone) + len(rest) == len(list(model.parameters()))
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}


def test_prototypes_are_a_buffer_and_labels_are_downsampled_nearest():
    model = _build("hrnet_w18_small", "hrnet")
    assert "classifier.prototypes" in dict(model.named_buffers())
    assert "classifier.prototypes" not in dict(model.named_parameters())
    seen = {}
    original = model.classifier.forward

    def spy(x, target=None):
        seen["target"] = target
        return original(x, target)

    model.classifier.forward = spy
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 255
    model.train()
    model(torch.randn(1, 3, 64, 64), labels)
    target = seen["target"].view(16, 16)
    assert set(target[:, :8].unique().tolist()) == {0} and set(target[:, 8:].unique().tolist()) == {255}
