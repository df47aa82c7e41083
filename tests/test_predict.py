"""protoseg/engine/predict.py: whole image, sliding window, multi-scale and flip, against
hand-computed windows and models whose outputs are known in closed form."""

import numpy as np
import pytest
import torch
from torch import nn

from protoseg.config import TestConfig, load_config
from protoseg.engine.predict import check_test_config, predict, window_starts
from protoseg.models.segmentor import build_model


class PositionModel(nn.Module):
    """logits = [row within the input, column within the input, the image's first channel]:
    depends only on where a pixel sits in the window it is predicted in (and on its colour).
    Records the batch size and spatial size of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        b, _, h, w = x.shape
        self.calls.append((b, h, w))
        rows = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        cols = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return {"logits": torch.cat([rows, cols, x[:, :1]], dim=1)}


class Pointwise(nn.Module):
    """A 1x1 convolution: flip-equivariant, scale-equivariant on constant images."""

    def __init__(self, k=5, divisor=1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)
        self.divisor = divisor

    def forward(self, x):
        assert x.shape[-2] % self.divisor == 0 and x.shape[-1] % self.divisor == 0, x.shape
        return {"logits": self.conv(x)}


def slide(crop, stride, window_batch=4, **kw):
    return TestConfig(mode="slide", crop_size=list(crop), stride=list(stride), window_batch=window_batch,
                      **kw)


def test_window_starts_by_hand():
    assert window_starts(7, 4, 2) == [0, 2, 3]  # 4 would end at 8 > 7: moved back to 3
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(64, 48, 32) == [0, 16]
    assert window_starts(1024, 512, 341) == [0, 341, 512]


@pytest.mark.parametrize("window_batch", [1, 3, 100])
def test_slide_stitching_of_a_position_only_model(window_batch):
    image = torch.rand(2, 3, 7, 10)
    model = PositionModel()
    out = predict(model, image, slide((4, 4), (2, 3), window_batch))
    # windows by hand: rows start at 0, 2, 3; columns at 0, 3, 6; every pixel averages
    # (its position inside each window that covers it)
    rows, cols = [0, 2, 3], [0, 3, 6]
    expected = np.zeros((2, 7, 10))
    for y in range(7):
        for x in range(10):
            inside = [(y - y0, x - x0) for y0 in rows for x0 in cols if y0 <= y < y0 + 4 and x0 <= x < x0 + 4]
            expected[0, y, x] = np.mean([r for r, _ in inside])
            expected[1, y, x] = np.mean([c for _, c in inside])
    for b in range(2):
        np.testing.assert_allclose(out[b, :2].numpy(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 2], image[:, 0], rtol=0, atol=1e-6)  # each window cut at its place
    assert len(model.calls) == -(-2 * 9 // window_batch)
    assert max(b for b, _, _ in model.calls) <= window_batch
    assert {(h, w) for _, h, w in model.calls} == {(4, 4)}


def test_slide_pads_an_image_smaller_than_a_window():
    image = torch.rand(1, 3, 3, 5)
    model = PositionModel()
    out = predict(model, image, slide((4, 8), (2, 4)))
    assert model.calls == [(1, 4, 8)] and out.shape == (1, 3, 3, 5)
    torch.testing.assert_close(out[0, 0], torch.arange(3.0).view(3, 1).expand(3, 5))
    torch.testing.assert_close(out[0, 2], image[0, 0])


def test_one_window_per_image_is_bitwise_the_whole_image(tiny_config):
    cfg = load_config(tiny_config())
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(3, 3, 64, 64)
    whole = predict(model, images, TestConfig())
    with torch.no_grad():
        assert torch.equal(whole, model(images)["logits"])  # the default is the plain forward pass
    assert torch.equal(predict(model, images, slide((64, 64), (64, 64), window_batch=3)), whole)


def test_inputs_are_padded_to_the_network_stride():
    model = Pointwise(divisor=8)
    model.backbone = nn.Module()
    model.backbone.reductions = [4, 8]  # what protoseg's Backbone exposes
    image = torch.rand(2, 3, 37, 53)
    out = predict(model, image, TestConfig())
    with torch.no_grad():
        torch.testing.assert_close(out, model.conv(image), rtol=0, atol=1e-6)
    out = predict(model, image, slide((20, 20), (10, 10)))  # windows padded too
    with torch.no_grad():
        torch.testing.assert_close(out, model.conv(image), rtol=0, atol=1e-6)


def test_flip_averaging_of_a_flip_equivariant_model_changes_nothing():
    model = Pointwise()
    image = torch.rand(2, 3, 9, 14)
    plain = predict(model, image, TestConfig()).softmax(dim=1)
    flipped = predict(model, image, TestConfig(flip=True))
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)
    # a model that is not flip-equivariant: the mean of its two views, mirrored back
    position = PositionModel()
    logits = position(image)["logits"]
    mirrored = position(image.flip(-1))["logits"].flip(-1)
    expected = (logits.softmax(1) + mirrored.softmax(1)) / 2
    torch.testing.assert_close(predict(position, image, TestConfig(flip=True)), expected)
    assert not torch.allclose(expected, logits.softmax(1))


def test_multi_scale_averages_probabilities_at_the_image_size():
    model = Pointwise()
    image = torch.rand(1, 3, 37, 53)
    single = predict(model, image, TestConfig()).softmax(dim=1)
    twice = predict(model, image, TestConfig(scales=[1.0, 1.0]))
    torch.testing.assert_close(twice, single, rtol=0, atol=1e-7)
    out = predict(model, image, TestConfig(scales=[0.5, 0.75, 1.25], flip=True))
    assert out.shape == (1, 5, 37, 53)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 37, 53))
    # a constant image stays constant under bilinear resizing: every scale predicts the same
    constant = torch.full((1, 3, 37, 53), 0.3)
    torch.testing.assert_close(predict(model, constant, TestConfig(scales=[0.5, 0.75, 2.0])),
                               predict(model, constant, TestConfig()).softmax(1), rtol=0, atol=1e-6)
    # windows are laid out on each resized image: at 0.5 it is 19x27 (rows 0, 3; columns 0, 8,
    # 11: 6 windows), at 1.0 37x53 (rows 0, 8, 16, 21; columns 0, 8, 16, 24, 32, 37: 24)
    position = PositionModel()
    predict(position, image, slide((16, 16), (8, 8), window_batch=64, scales=[0.5, 1.0]))
    assert position.calls == [(6, 16, 16), (24, 16, 16)]


@pytest.mark.parametrize("change, message", [
    ({"mode": "tiles"}, "test.mode must be whole or slide"),
    ({"mode": "slide"}, "test.crop_size"),
    ({"mode": "slide", "crop_size": [32, 32]}, "test.stride"),
    ({"mode": "slide", "crop_size": [32, 32], "stride": [48, 16]}, "larger than test.crop_size"),
    ({"scales": []}, "test.scales"),
    ({"scales": [1.0, -0.5]}, "test.scales"),
    ({"window_batch": 0}, "test.window_batch"),
])
def test_bad_test_settings_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        check_test_config(TestConfig(**change))
