"""The open-set score and its metrics: AUROC, AP and FPR@95 on a case computed by hand, the
pixels that take part, and the score the Predictor returns for both classifiers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import protoseg
from protoseg import ops
from protoseg.data.transforms import normalize_image
from protoseg.engine.anomaly import AnomalyEvaluator, anomaly_metrics
from protoseg.engine.evaluator import SegEvaluator


def test_metrics_match_a_hand_computed_case():
    unknown_scores = [0.9, 0.8, 0.4, 0.7]
    known_scores = [0.1, 0.2, 0.85, 0.3, 0.5, 0.6]
    score = np.array(unknown_scores + known_scores)
    unknown = np.array([True] * 4 + [False] * 6)
    r = anomaly_metrics(score, unknown)
    # AUROC: the share of (unknown, known) pairs ordered right: 6 + 5 + 3 + 5 of 24
    assert r["AUROC"] == pytest.approx(19 / 24)
    # ranked by score: U K U U K K U K K K -> precision at each unknown 1/1, 2/3, 3/4, 4/7
    assert r["AP"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 7) / 4)
    # 95% of the unknown pixels needs all 4: threshold 0.4, above which 3 of the 6 known lie
    assert r["FPR@95"] == pytest.approx(3 / 6)
    assert (r["unknown_pixels"], r["known_pixels"]) == (4, 6)
    # a perfect score, and ties: a known pixel tied with the lowest unknown one counts as flagged
    assert anomaly_metrics(np.array([2.0, 3.0, 1.0, 0.0]), np.array([1, 1, 0, 0], bool))["FPR@95"] == 0.0
    tied = anomaly_metrics(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0], bool))
    assert tied["FPR@95"] == pytest.approx(0.5) and tied["AUROC"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="need unknown and known pixels"):
        anomaly_metrics(np.ones(3), np.zeros(3, bool))


def test_the_evaluator_scores_unknown_against_known_pixels_only():
    label = torch.tensor([[[0, 1, 254, 255], [2, 254, 9, 1]]])  # 9: neither a class nor unknown
    score = torch.tensor([[[0.1, 0.2, 0.9, 5.0], [0.3, 0.8, 5.0, 0.4]]])
    evaluator = AnomalyEvaluator(num_classes=3, unknown_index=254)
    evaluator.process(score, label)
    r = evaluator.evaluate()
    assert (r["unknown_pixels"], r["known_pixels"]) == (2, 4) and r["AUROC"] == 1.0 and r["FPR@95"] == 0.0
    capped = AnomalyEvaluator(num_classes=3, unknown_index=254, max_pixels_per_image=3)
    capped.process(score, label)
    assert len(capped.scores[0]) == 3
    with pytest.raises(ValueError, match="unknown_index"):
        AnomalyEvaluator(num_classes=3, unknown_index=-1)
    # the segmentation metrics leave unknown pixels out, like ignored ones
    seg = SegEvaluator(3, ignore_index=255, unknown_index=254)
    seg.process(torch.zeros_like(label), label.masked_fill(label == 9, 0))
    assert int(seg.cm.sum()) == 5


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predictor_returns_one_minus_the_largest_cosine_to_any_prototype(tiny_checkpoint):
    predictor = protoseg.Predictor.from_checkpoint(tiny_checkpoint(), device="cpu")
    rgb = _image(32, 32)
    classes, score = predictor.predict(rgb, return_score=True)
    assert score.shape == (32, 32) and score.dtype == np.float32
    np.testing.assert_array_equal(classes, predictor.predict(rgb))
    # by hand: the unit embeddings of the projection head against every prototype
    model, cfg = predictor.model, predictor.cfg
    x = normalize_image(rgb, np.asarray(cfg.data.mean, np.float32),
                        np.asarray(cfg.data.std, np.float32))[None]
    with torch.no_grad():
        e = model.projection(model.decoder(model.backbone(x)))
        b, d, h, w = e.shape
        pixels = model.classifier.feat_norm(e.permute(0, 2, 3, 1).reshape(-1, d))
        cosine, _ = ops.reference.proto_similarity(pixels, model.classifier.prototypes)
        best = cosine.amax(dim=1).view(1, 1, h, w)
    up = F.interpolate(best, size=(32, 32), mode="bilinear", align_corners=model.align_corners)
    expected = 1 - up[0, 0]
    np.testing.assert_allclose(score, expected.numpy(), atol=1e-5)
    # with several views the score is averaged like the probabilities; it stays in [0, 2]
    flipped = protoseg.Predictor.from_checkpoint(tiny_checkpoint(), device="cpu", flip=True)
    _, probs, score = flipped.predict(rgb, return_probs=True, return_score=True)
    assert probs.shape == (11, 32, 32) and score.shape == (32, 32) and 0 <= score.min() <= score.max() <= 2


def test_softmax_score_is_one_minus_the_largest_probability(tiny_checkpoint):
    predictor = protoseg.Predictor.from_checkpoint(tiny_checkpoint("model.classifier=softmax"), device="cpu",
                                                   scales=[1.0, 0.75])
    classes, probs, score = predictor.predict(_image(40, 48), return_probs=True, return_score=True)
    np.testing.assert_allclose(score, 1 - probs.max(0), atol=1e-6)
    np.testing.assert_array_equal(classes, probs.argmax(0))
