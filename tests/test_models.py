import os

import pytest
import timm
import torch

from protoseg.config import Config
from protoseg.models.backbones import Backbone, WeightsError
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
    with pytest.raises(WeightsError, match="model.backbone_checkpoint .*nothere.pth does not exist"):
        Backbone("resnet18", checkpoint=str(tmp_path / "nothere.pth"))


def _offline(monkeypatch, tmp_path):
    """No network (an endpoint whose name cannot resolve) and empty Hugging Face / torch caches."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "https://protoseg-no-network.invalid")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_pretrained_without_network_fails_at_once_naming_the_weights(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(WeightsError) as error:
        Backbone("resnet18", pretrained=True)
    message = str(error.value)
    assert "\n" not in message
    for part in ("resnet18", "timm/resnet18.a1_in1k", "protoseg-no-network.invalid cannot be reached",
                 "model.backbone_checkpoint", "timm's cache", "model.pretrained=false"):
        assert part in message, part
    # weights already in the Hugging Face cache are used without the network
    torch.manual_seed(2)
    reference = timm.create_model("resnet18")
    snapshot = tmp_path / "hf" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    from safetensors.torch import save_file
    save_file(reference.state_dict(), snapshot / "model.safetensors")
    backbone = Backbone("resnet18", pretrained=True)
    assert torch.equal(backbone.body.conv1.weight, reference.conv1.weight)


@pytest.mark.slow
def test_train_on_a_paper_config_without_network_fails_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_ENDPOINT": "https://protoseg-no-network.invalid", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": "", "https_proxy": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(root, "tools", "train.py"),
                             os.path.join(root, "configs", "cityscapes_hrnet48_protoseg.yaml"),
                             f"output_dir={tmp_path / 'run'}"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: model.pretrained: the ImageNet weights of hrnet_w48 "
                                    "(timm/hrnet_w48.ms_in1k on the Hugging Face Hub)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="model.backbone 'vgg16'"):
        Backbone("vgg16")
    with pytest.raises(ValueError, match="model.decoder must be one of"):
        _build("resnet18", "deeplabv3plus")
    with pytest.raises(ValueError, match="model.classifier"):
        _build("resnet18", "fcn", "linear")


class ContrastProjectionHead(torch.nn.Module):
    """tfzhou/ProtoSeg lib/models/modules/contrast.py's ProjectionHead, transcribed: the head the
    released HRNet_W48_Proto runs (its second import shadows the first). `proj` and `mlp2` are
    the same module there."""

    def __init__(self, dim_in, proj_dim):
        super().__init__()
        nn = torch.nn
        self.proj = self.mlp2 = nn.Sequential(nn.Conv2d(dim_in, dim_in, 1), nn.ReLU(inplace=True),
                                              nn.Conv2d(dim_in, proj_dim, 1))

    def forward(self, x):
        return torch.nn.functional.normalize(self.proj(x), p=2, dim=-1)


def test_released_projection_is_contrast_py_head_in_float64():
    torch.manual_seed(0)
    ours = ProjectionHead(8, 4, "released").double()
    released = ContrastProjectionHead(8, 4).double()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
    released.proj.load_state_dict(ours.mlp.state_dict())
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    y = ours(x)
    assert torch.equal(y, released(x))
    assert torch.allclose(y.norm(dim=-1), torch.ones(2, 4, 3, dtype=torch.float64))  # unit along W, not C
    default = ProjectionHead(8, 4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules())
    assert not torch.allclose(default(x.float()).norm(dim=-1), torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="model.projection must be one of"):
        ProjectionHead(8, 4, "legacy")


def test_segmentor_trains_with_the_released_projection():
    model = _build("hrnet_w18_small", "hrnet", projection="released")
    assert model.projection.kind == "released"
    _check(model)


@pytest.mark.parametrize("align_corners", [True, False])
def test_align_corners_reaches_every_resize(align_corners):
    model = _build("hrnet_w18_small", "hrnet", "softmax", align_corners=align_corners).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(images)
        size = features[0].shape[-2:]
        resized = [torch.nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=align_corners)
                   if f.shape[-2:] != size else f for f in features]
        head = model.decoder
        low = model.classifier(head.dropout(head.fuse(torch.cat(resized, dim=1))))
        expected = torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear",
                                                   align_corners=align_corners)
        assert torch.allclose(model(images)["logits"], expected, atol=1e-5)
    # 16 -> 64 with align_corners=True samples output pixel 21 at exactly 21 * 15 / 63 = 5 (the
    # grid's corners aligned); with False at (21 + 0.5) / 4 - 0.5 = 4.875, between two pixels.
    assert torch.allclose(expected[..., 21, 21], low[..., 5, 5]) == align_corners


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


MIT_WIDTHS = {"mit_b0": (32, 64, 160, 256), "mit_b1": (64, 128, 320, 512)}


def _mit_original_state_dict(widths, depths, generator):
    """Random tensors named and shaped as in SegFormer's ImageNet mit_b*.pth files (NVlabs/SegFormer
    mmseg/models/backbones/mix_transformer.py): patch_embed1..4, block1..4, norm1..4 and the
    classification head, MLP ratio 4, reduction ratios 8, 4, 2, 1."""
    shapes = {}
    previous = 3
    for i, (c, depth, sr) in enumerate(zip(widths, depths, (8, 4, 2, 1)), start=1):
        k = 7 if i == 1 else 3
        shapes[f"patch_embed{i}.proj.weight"] = (c, previous, k, k)
        shapes[f"patch_embed{i}.proj.bias"] = (c,)
        shapes[f"patch_embed{i}.norm.weight"] = shapes[f"patch_embed{i}.norm.bias"] = (c,)
        for j in range(depth):
            b = f"block{i}.{j}."
            tensors = [("norm1", (c,)), ("attn.q", (c, c)), ("attn.kv", (2 * c, c)), ("attn.proj", (c, c)),
                       ("norm2", (c,)), ("mlp.fc1", (4 * c, c)), ("mlp.dwconv.dwconv", (4 * c, 1, 3, 3)),
                       ("mlp.fc2", (c, 4 * c))]
            if sr > 1:
                tensors += [("attn.sr", (c, c, sr, sr)), ("attn.norm", (c,))]
            for name, shape in tensors:
                shapes[b + name + ".weight"] = shape
                shapes[b + name + ".bias"] = (shape[0],)
        shapes[f"norm{i}.weight"] = shapes[f"norm{i}.bias"] = (c,)
        previous = c
    shapes["head.weight"], shapes["head.bias"] = (1000, widths[-1]), (1000,)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _timm_feature_name(original: str) -> str:
    """Where a SegFormer tensor belongs in protoseg's MiT (timm PVT-v2, features_only): written
    out by hand from the two structures, independently of timm's own key filter."""
    parts = original.split(".")
    head = parts[0]
    if head.startswith("patch_embed"):
        i = int(head[-1])
        return ".".join(["patch_embed" if i == 1 else f"stages_{i - 1}.downsample"] + parts[1:])
    if head.startswith("block"):
        rest = ".".join(parts[2:]).replace("dwconv.dwconv", "dwconv")
        return f"stages_{int(head[-1]) - 1}.blocks.{parts[1]}.{rest}"
    assert head.startswith("norm")
    return f"stages_{int(head[-1]) - 1}.norm.{parts[1]}"


@pytest.mark.parametrize("name", ["mit_b0", "mit_b1"])
def test_segformer_mit_weights_load_through_the_key_mapping(name, tmp_path):
    g = torch.Generator().manual_seed(0)
    original = _mit_original_state_dict(MIT_WIDTHS[name], (2, 2, 2, 2), g)
    path = tmp_path / f"{name}.pth"
    torch.save(original, path)
    loaded = Backbone(name, checkpoint=str(path)).body.state_dict()
    body = {k for k in original if not k.startswith("head.")}
    assert len(loaded) == len(body)  # every tensor of the backbone comes from the file
    for key in body:
        assert torch.equal(loaded[_timm_feature_name(key)], original[key]), key
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": original}, wrapped)  # the mmcv-style wrapper is accepted too
    assert torch.equal(Backbone(name, checkpoint=str(wrapped)).body.state_dict()["stages_3.norm.weight"],
                       original["norm4.weight"])
    original.pop("block2.1.attn.kv.weight")
    torch.save(original, path)
    with pytest.raises(WeightsError, match=rf"{path} \(SegFormer's MiT\): no tensor for stages_1.blocks.1.attn.kv.weight"):
        Backbone(name, checkpoint=str(path))
    with pytest.raises(ValueError, match="timm has no ImageNet weights for mit_b0"):
        Backbone("mit_b0", pretrained=True)


def test_mit_b0_matches_segformer_structure_and_runs_any_size():
    backbone = Backbone("mit_b0")
    assert backbone.channels == [32, 64, 160, 256] and backbone.reductions == [4, 8, 16, 32]
    body = backbone.body
    assert [len(getattr(body, f"stages_{i}").blocks) for i in range(4)] == [2, 2, 2, 2]
    block = body.stages_0.blocks[0]
    assert block.mlp.fc1.out_features == 4 * 32 and block.attn.num_heads == 1
    assert block.attn.sr.stride == (8, 8)
    assert block.norm1.eps == 1e-6 and body.stages_0.norm.eps == 1e-6 and body.patch_embed.norm.eps == 1e-5
    assert body.stages_3.blocks[0].attn.sr is None and body.stages_2.blocks[0].attn.num_heads == 5
    # SegFormer's stochastic depth: 0 to 0.1 linearly over all 8 blocks.
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for i in range(4) for b in getattr(body, f"stages_{i}").blocks]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])
    out = backbone(torch.randn(1, 3, 72, 40))
    assert [tuple(f.shape[1:]) for f in out] == [(32, 18, 10), (64, 9, 5), (160, 5, 3), (256, 3, 2)]


@pytest.mark.slow
def test_mit_b5_matches_segformer_widths_depths_and_size():
    from protoseg.models.backbones import count_parameters

    backbone = Backbone("mit_b5")
    assert backbone.channels == [64, 128, 320, 512]
    assert [len(getattr(backbone.body, f"stages_{i}").blocks) for i in range(4)] == [3, 6, 40, 3]
    # SegFormer (Xie et al. 2021), Table 1 / 7: MiT-B5 encoder 81.4M parameters (without the head).
    assert count_parameters(backbone) == pytest.approx(81.4e6, rel=0.005)


def test_segformer_head_is_the_all_mlp_decoder():
    torch.manual_seed(0)
    head = _build("mit_b0", "segformer", "softmax").decoder.eval()
    features = [torch.randn(1, c, 16 // s, 16 // s) for c, s in zip((32, 64, 160, 256), (1, 2, 4, 8))]
    # SegFormer's decoder: a Linear per level over the channels, bilinear to stride 4, deepest first.
    levels = []
    for f, conv in zip(features, head.linears):
        x = torch.nn.functional.linear(f.flatten(2).transpose(1, 2), conv.weight.flatten(1), conv.bias)
        x = x.transpose(1, 2).reshape(1, -1, *f.shape[-2:])
        levels.append(torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True))
    with torch.no_grad():
        assert torch.allclose(head(features), head.fuse(torch.cat(levels[::-1], dim=1)), atol=1e-5)
    assert head.out_channels == 32 and isinstance(head.fuse[1], torch.nn.BatchNorm2d)


def _mit_stage_transcription(x, embed, blocks, norm, heads, sr):
    """One MiT stage as SegFormer's mix_transformer.py computes it, in plain PyTorch on the given
    modules' weights: overlapping patch embedding (conv, LayerNorm), then per block
    x + Attn(LN(x)) with the keys and values from a sr x sr strided conv and a LayerNorm, and
    x + fc2(GELU(dwconv3x3(fc1(LN(x))))), then the stage LayerNorm; [B, C, H, W] out."""
    F = torch.nn.functional
    x = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=embed.proj.stride, padding=embed.proj.padding)
    b, c, h, w = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), embed.norm.weight, embed.norm.bias, 1e-5)
    for blk in blocks:
        a = blk.attn
        y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q = F.linear(y, a.q.weight, a.q.bias).reshape(b, h * w, heads, c // heads).transpose(1, 2)
        kv = y
        if sr > 1:
            kv = F.conv2d(y.transpose(1, 2).reshape(b, c, h, w), a.sr.weight, a.sr.bias, stride=sr)
            kv = F.layer_norm(kv.flatten(2).transpose(1, 2), (c,), a.norm.weight, a.norm.bias, 1e-5)
        k, v = F.linear(kv, a.kv.weight, a.kv.bias).reshape(b, -1, 2, heads, c // heads).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, h * w, c), a.proj.weight, a.proj.bias)
        m = blk.mlp
        y = F.linear(F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6), m.fc1.weight, m.fc1.bias)
        y = F.conv2d(y.transpose(1, 2).reshape(b, -1, h, w), m.dwconv.weight, m.dwconv.bias, padding=1,
                     groups=y.shape[-1])
        x = x + F.linear(F.gelu(y.flatten(2).transpose(1, 2)), m.fc2.weight, m.fc2.bias)
    x = F.layer_norm(x, (c,), norm.weight, norm.bias, 1e-6)
    return x.transpose(1, 2).reshape(b, c, h, w)


def test_mit_b0_computes_segformer_mix_transformer_in_float64():
    torch.manual_seed(0)
    body = Backbone("mit_b0").body.double().eval()
    for module in body.modules():  # non-trivial norms, so a wrong epsilon or order would show
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        ours = body(x)
        expected = x
        for i, (heads, sr) in enumerate(zip((1, 2, 5, 8), (8, 4, 2, 1))):
            stage = getattr(body, f"stages_{i}")
            embed = body.patch_embed if i == 0 else stage.downsample
            expected = _mit_stage_transcription(expected, embed, stage.blocks, stage.norm, heads, sr)
            torch.testing.assert_close(ours[i], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k", [7, 19])  # below and above the 16 classes where the loss takes the rows
def test_cross_entropy_of_channels_last_logits_is_that_of_their_nchw_copy(weighted, k):
    # the prototype classifier's logits are a channels-last view
    from protoseg.models.segmentor import cross_entropy

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2 * 5 * 6, k, generator=g, dtype=torch.float64)
    logits = rows.view(2, 5, 6, k).permute(0, 3, 1, 2).requires_grad_()
    assert logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous()
    labels = torch.randint(0, k, (2, 5, 6), generator=g)
    labels[0, :2] = 255
    kwargs = {"ignore_index": 255, "weight": torch.rand(k, generator=g, dtype=torch.float64) if weighted else None}
    nchw = logits.detach().contiguous().requires_grad_()
    loss, expected = cross_entropy(logits, labels, **kwargs), torch.nn.functional.cross_entropy(nchw, labels, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward(), expected.backward()
    torch.testing.assert_close(logits.grad, nchw.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("channels_last", [False, True])
def test_build_model_gives_the_layout_of_train_channels_last(channels_last):
    # the trainer, the evaluator, Predictor and the benchmarks all build through build_model
    cfg = Config()
    cfg.model.backbone, cfg.model.decoder, cfg.model.pretrained = "resnet18", "fcn", False
    cfg.train.channels_last = channels_last
    convs = [m.weight for m in build_model(cfg).modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convs)
