"""The open-set scores and their metrics: every score and AUROC, AP and FPR@95 on cases computed
by hand, the von Mises-Fisher fit against scipy, the pixels that take part, the test protocol's
treatment of the scores, and bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import protoseg
from protoseg import ops
from protoseg.data.transforms import normalize_image
from protoseg.config import TestConfig
from protoseg.engine import anomaly
from protoseg.engine.anomaly import (LOGIT_SCORES, PROTOTYPE_SCORES, SCORES, AnomalyEvaluator, anomaly_metrics,
                                     fit_path, load_fit, logit_scores, offered_scores, prototype_scores,
                                     vmf_concentration, vmf_log_normalizer)
from protoseg.engine.checkpoint import atomic_save
from protoseg.engine.evaluator import SegEvaluator
from protoseg.engine.predict import predict
from protoseg.engine.prototypes import fit_vmf, val_usage


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
    evaluator = AnomalyEvaluator(num_classes=3, unknown_index=254, names=["msp", "energy"])
    evaluator.process(torch.stack([score, -score], dim=1), label)
    r = evaluator.evaluate()
    assert list(r) == ["msp", "energy"]
    assert (r["msp"]["unknown_pixels"], r["msp"]["known_pixels"]) == (2, 4)
    assert r["msp"]["AUROC"] == 1.0 and r["msp"]["FPR@95"] == 0.0 and r["energy"]["AUROC"] == 0.0
    capped = AnomalyEvaluator(num_classes=3, unknown_index=254, max_pixels_per_image=3)
    capped.process(score[:, None], label)
    assert capped.scores[0].shape == (1, 3)
    with pytest.raises(ValueError, match=r"scores must be \[B, 1, H, W\]"):
        capped.process(score, label)
    with pytest.raises(ValueError, match="unknown_index"):
        AnomalyEvaluator(num_classes=3, unknown_index=-1)
    # the segmentation metrics leave unknown pixels out, like ignored ones
    seg = SegEvaluator(3, ignore_index=255, unknown_index=254)
    seg.process(torch.zeros_like(label), label.masked_fill(label == 9, 0))
    assert int(seg.cm.sum()) == 5


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predictor_cosine_score_is_one_minus_the_largest_cosine_to_any_prototype(tiny_checkpoint):
    predictor = protoseg.Predictor.from_checkpoint(tiny_checkpoint(), device="cpu")
    rgb = _image(32, 32)
    classes, score = predictor.predict(rgb, return_score="cosine")
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
    # the model's own open-set output (what an export returns) is the same score
    with torch.no_grad():
        np.testing.assert_allclose(model(x)["open_set_score"][0, 0], score, atol=1e-5)


@pytest.mark.parametrize("classifier", ["prototype", "softmax"])
def test_several_views_average_each_views_score(tiny_checkpoint, classifier):
    """Each scale's (and flip's) forward pass gives its own score map, resized to the image; the
    protocol's score is their mean, as for the logits' probabilities. The default score is msp."""
    path = tiny_checkpoint(f"model.classifier={classifier}")
    rgb = _image(40, 48)
    scales = [protoseg.Predictor.from_checkpoint(path, device="cpu", scales=[s]).predict(rgb, return_score=True)[1]
              for s in (1.0, 0.75)]
    flipped = rgb[:, ::-1].copy()
    views = scales + [protoseg.Predictor.from_checkpoint(path, device="cpu", scales=[s]).predict(
        flipped, return_score=True)[1][:, ::-1] for s in (1.0, 0.75)]
    classes, probs, score = protoseg.Predictor.from_checkpoint(path, device="cpu", scales=[1.0, 0.75], flip=True
                                                               ).predict(rgb, return_probs=True, return_score=True)
    np.testing.assert_allclose(score, np.mean(views, axis=0), atol=1e-6)
    np.testing.assert_array_equal(classes, probs.argmax(0))
    single = protoseg.Predictor.from_checkpoint(path, device="cpu")
    _, probs, score = single.predict(rgb, return_probs=True, return_score=True)
    np.testing.assert_allclose(score, 1 - probs.max(0), atol=1e-6)  # one view: msp of its probabilities


def test_logit_scores_match_a_hand_computed_case():
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0]])[None, :, None, :]  # [B=1, K=2, 1, 2 pixels]
    msp, max_logit, energy = (s[0, 0] for s in logit_scores(logits, LOGIT_SCORES))
    e = math.e
    torch.testing.assert_close(msp, torch.tensor([1 - e ** 2 / (e ** 2 + 1), 0.5]))
    torch.testing.assert_close(max_logit, torch.tensor([-2.0, -1.0]))
    torch.testing.assert_close(energy, torch.tensor([-math.log(e ** 2 + 1), -math.log(2 * e)]))


def test_prototype_scores_match_a_hand_computed_case():
    # K = 2 classes of M = 2 prototypes in D = 2; pixel a = (1, 0), pixel b = (0.6, 0.8)
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])
    embedding = torch.tensor([[1.0, 0.6], [0.0, 0.8]])[None, :, None, :]  # [1, D, 1, 2]
    kappa = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    log_norm = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    cosine, energy, vmf = (s[0, 0] for s in prototype_scores(
        embedding, prototypes, 0.5, PROTOTYPE_SCORES, {"kappa": kappa, "log_norm": log_norm}))
    torch.testing.assert_close(cosine, torch.tensor([0.0, 1 - 0.8]))
    # cosines a: (1, 0, -1, 0), b: (0.6, 0.8, -0.6, -0.8); temperature 0.5
    ea = -math.log(math.exp(2) + 1 + math.exp(-2) + 1)
    eb = -math.log(math.exp(1.2) + math.exp(1.6) + math.exp(-1.2) + math.exp(-1.6))
    torch.testing.assert_close(energy, torch.tensor([ea, eb]))
    # log-likelihoods a: (-1 + 1, -2 + 0, -3 - 3, -4 + 0), b: (-1 + 0.6, -2 + 1.6, -3 - 1.8, -4 - 3.2)
    torch.testing.assert_close(vmf, torch.tensor([-0.0, 0.4]))


def test_prototype_scores_in_blocks_of_pixels_equal_the_whole_map(monkeypatch):
    """The scores are computed over blocks of pixels; blocks of 3 pixels (the last one short)
    give the reductions of the whole [B, K*M, H, W] cosine map."""
    g = torch.Generator().manual_seed(0)
    k, m, d = 5, 3, 8
    prototypes = F.normalize(torch.randn(k, m, d, generator=g), dim=-1)
    embedding = F.normalize(torch.randn(2, d, 4, 5, generator=g), dim=1)
    fit = {"kappa": torch.rand(k, m, generator=g) * 50, "log_norm": -torch.rand(k, m, generator=g) * 20}
    whole = torch.einsum("bdhw,kmd->bkmhw", embedding, prototypes).flatten(1, 2)
    expected = [1 - whole.amax(dim=1), -(whole / 0.1).logsumexp(dim=1),
                -(fit["log_norm"].reshape(1, -1, 1, 1) + fit["kappa"].reshape(1, -1, 1, 1) * whole).amax(dim=1)]
    monkeypatch.setattr(anomaly, "_SCORE_BLOCK", 3 * k * m)
    for got, want in zip(prototype_scores(embedding, prototypes, 0.1, PROTOTYPE_SCORES, fit), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dim", [3, 64, 256])
def test_vmf_log_normalizer_matches_scipy(dim):
    from scipy.stats import vonmises_fisher

    mu = np.eye(dim)[0]
    x = np.random.default_rng(0).normal(size=(5, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kappa in (0.5, 10.0, 300.0, 3000.0):
        expected = vonmises_fisher(mu, kappa).logpdf(x)
        ours = vmf_log_normalizer(kappa, dim) + kappa * x @ mu
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert np.isfinite(vmf_log_normalizer(1e-3, 720))  # where scipy's scaled Bessel function underflows


@pytest.mark.parametrize("dim,kappa", [(16, 20.0), (128, 200.0), (256, 60.0), (720, 1500.0)])
def test_vmf_concentration_recovers_the_sampling_concentration(dim, kappa):
    from scipy.stats import vonmises_fisher

    mu = np.eye(dim)[-1]
    samples = vonmises_fisher(mu, kappa).rvs(4000, random_state=np.random.default_rng(1))
    estimate = float(vmf_concentration((samples @ mu).mean(), dim))
    assert estimate == pytest.approx(kappa, rel=0.1)


def _tiny_model(tiny_config, *overrides):
    from protoseg.config import load_config
    from protoseg.models.segmentor import build_model

    torch.manual_seed(0)
    return build_model(load_config(tiny_config(), list(overrides))).eval()


def test_whole_image_one_scale_scores_are_the_models_own_maps(tiny_config):
    """Whole image, one scale, no flip: the protocol's score maps are those of the plain forward
    pass, computed here by hand from it; one window covering the image gives the same."""
    model = _tiny_model(tiny_config)
    images = torch.randn(2, 3, 32, 64)  # multiples of the stride: no padding
    fit = {"kappa": torch.rand(11, model.classifier.num_prototypes) * 50,
           "log_norm": -torch.rand(11, model.classifier.num_prototypes) * 10}
    whole = TestConfig()
    logits, maps = predict(model, images, whole, open_set=SCORES, fit=fit)
    with torch.no_grad():
        out = model(images)
        embedded = model.embed(images)
    torch.testing.assert_close(logits, out["logits"])
    p = F.normalize(model.classifier.prototypes, dim=-1).flatten(0, 1)  # [K*M, D]
    cosine = torch.einsum("bdhw,nd->bnhw", embedded["embedding"], p)
    vmf = -(fit["log_norm"].view(1, -1, 1, 1) + fit["kappa"].view(1, -1, 1, 1) * cosine).amax(1, keepdim=True)
    low = torch.cat([-(cosine / model.classifier.temperature).logsumexp(1, keepdim=True), vmf], dim=1)
    low = F.interpolate(low, size=(32, 64), mode="bilinear", align_corners=model.align_corners)
    expected = torch.stack([1 - out["logits"].softmax(1).amax(1), -out["logits"].amax(1),
                            -out["logits"].logsumexp(1), out["open_set_score"][:, 0], low[:, 0], low[:, 1]], dim=1)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    one_window = TestConfig(mode="slide", crop_size=[32, 64], stride=[32, 64])
    logits_w, maps_w = predict(model, images, one_window, open_set=SCORES, fit=fit)
    torch.testing.assert_close(maps_w, maps)
    torch.testing.assert_close(logits_w, logits)


def test_fit_counts_the_pixels_of_val_usage_and_round_trips(tiny_config, tmp_path):
    model = _tiny_model(tiny_config)
    images = torch.randn(3, 3, 32, 32)
    labels = model(images)["logits"].argmax(1)  # every pixel correct: every prototype can win
    labels[0, :4] = 255
    loader = [{"images": images, "labels": labels}]
    fit = fit_vmf(model, loader, torch.device("cpu"))
    counts = val_usage(model, loader, torch.device("cpu"))
    assert torch.equal(fit["count"], counts) and counts.sum() > 0
    used = counts > 0
    assert torch.isfinite(fit["kappa"][used]).all() and (fit["kappa"][used] > 0).all()
    assert torch.isneginf(fit["log_norm"][~used]).all()
    path = str(tmp_path / "a.vmf.pt")
    atomic_save(fit, path)
    torch.testing.assert_close(load_fit(path, model)["kappa"], fit["kappa"])
    other = _tiny_model(tiny_config, "train.seed=1")
    torch.manual_seed(1)
    other.classifier.prototypes.copy_(F.normalize(torch.randn_like(other.classifier.prototypes), dim=-1))
    with pytest.raises(ValueError, match="was made for other prototypes"):
        load_fit(path, other)
    with pytest.raises(ValueError, match=r"needs its fitted file .*missing.vmf.pt.*fit_open_set.py"):
        load_fit(str(tmp_path / "missing.vmf.pt"), model)
    (tmp_path / "bad.vmf.pt").write_bytes(b"not a fit")
    with pytest.raises(ValueError, match="cannot read the open-set fit .*bad.vmf.pt"):
        load_fit(str(tmp_path / "bad.vmf.pt"), model)
    assert fit_path(str(tmp_path / "iter_0000010.pth")) == str(tmp_path / "iter_0000010.vmf.pt")


def test_bad_score_names_are_one_clear_error(tiny_config):
    model, softmax = _tiny_model(tiny_config), _tiny_model(tiny_config, "model.classifier=softmax")
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown open-set score 'bogus'"):
        predict(model, images, TestConfig(), open_set=["bogus"])
    with pytest.raises(ValueError, match="open-set score cosine needs the prototype classifier"):
        predict(softmax, images, TestConfig(), open_set=["msp", "cosine"])
    with pytest.raises(ValueError, match="vmf needs its fit"):
        predict(model, images, TestConfig(), open_set=["vmf"])
    assert offered_scores(softmax) == LOGIT_SCORES and offered_scores(model) == SCORES
