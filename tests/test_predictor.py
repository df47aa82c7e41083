"""protoseg.Predictor: a checkpoint alone is enough to segment paths and arrays of any size."""

import cv2
import numpy as np
import pytest
import torch

import protoseg
from protoseg.config import ConfigError
from protoseg.data.datasets import SampleError
from protoseg.engine.predict import predict
from protoseg.data.transforms import normalize_image


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_a_path_and_the_same_image_as_an_array_give_the_same_map(tiny_checkpoint, tmp_path):
    predictor = protoseg.Predictor.from_checkpoint(tiny_checkpoint(), device="cpu")
    rgb = _image(45, 70)  # not a multiple of the network's stride 32: padded inside
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    from_array = predictor.predict(rgb)
    assert from_array.shape == (45, 70) and from_array.dtype == np.int64
    np.testing.assert_array_equal(predictor.predict(str(path)), from_array)
    np.testing.assert_array_equal(predictor.predict(path), from_array)
    # the evaluation pipeline's normalisation and prediction, by hand
    cfg = predictor.cfg
    x = normalize_image(rgb, np.asarray(cfg.data.mean, np.float32), np.asarray(cfg.data.std, np.float32))
    by_hand = predict(predictor.model, x[None], cfg.test).argmax(1)[0].numpy()
    np.testing.assert_array_equal(by_hand, from_array)


def test_lists_are_batched_and_probabilities_match_the_map(tiny_checkpoint, tmp_path):
    predictor = protoseg.Predictor.from_checkpoint(tiny_checkpoint(), device="cpu")
    images = [_image(32, 48, 1), _image(40, 40, 2), _image(32, 48, 3)]
    one_by_one = [predictor.predict(image) for image in images]
    for batched, single in zip(predictor.predict(images), one_by_one):
        np.testing.assert_array_equal(batched, single)
    classes, probs = predictor.predict(images[1], return_probs=True)
    assert probs.shape == (11, 40, 40) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), classes)
    assert predictor.predict([]) == []
    assert len(predictor.class_names) == 11 and predictor.class_names[0] == "background"


def test_test_options_override_the_stored_protocol(tiny_checkpoint):
    path = tiny_checkpoint()
    predictor = protoseg.Predictor.from_checkpoint(path, device="cpu", mode="slide", crop_size=[32, 32],
                                                   stride=[16, 16], scales=[0.75, 1.0], flip=True)
    assert (predictor.cfg.test.mode, predictor.cfg.test.flip) == ("slide", True)
    classes, probs = predictor.predict(_image(50, 61), return_probs=True)
    assert classes.shape == (50, 61) and probs.shape == (11, 50, 61)
    np.testing.assert_allclose(probs.sum(0), 1, rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown key.*test.windows"):
        protoseg.Predictor.from_checkpoint(path, windows=3)
    with pytest.raises(ValueError, match="test.crop_size"):
        protoseg.Predictor.from_checkpoint(path, mode="slide")


def test_bad_images_are_errors_that_name_them(tiny_checkpoint, tmp_path):
    predictor = protoseg.Predictor.from_checkpoint(tiny_checkpoint(), device="cpu")
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8 RGB array \(got uint8 \[4, 4\]\)"):
        predictor.predict(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="got float32"):
        predictor.predict(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="got Tensor"):
        predictor.predict(torch.zeros(4, 4, 3))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(SampleError, match="broken.png"):
        predictor.predict([_image(8, 8), str(broken)])


def test_a_checkpoint_without_a_config_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="weights.pth holds no config"):
        protoseg.Predictor.from_checkpoint(str(path))
