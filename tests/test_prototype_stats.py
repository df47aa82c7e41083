"""Prototype statistics (protoseg/engine/prototypes.py) on classifiers whose answer is known by
construction: collapsed prototypes, and prototypes on an orthogonal basis."""

import copy
import math

import pytest
import torch

from protoseg.engine.prototypes import format_statistics, usage_statistics
from protoseg.models import PrototypeClassifier
from protoseg.models.prototype import usage_counts


def _classifier(prototypes: torch.Tensor) -> PrototypeClassifier:
    k, m, d = prototypes.shape
    head = PrototypeClassifier(d, k, m).eval()
    head.prototypes.copy_(prototypes)
    return head


def _statistics(head: PrototypeClassifier, x: torch.Tensor, labels: torch.Tensor) -> dict:
    _, scores, nearest = head.similarity(x)
    pred = head.mask_norm(scores).argmax(dim=1)
    counts = usage_counts(nearest, pred, labels, head.num_prototypes)
    return usage_statistics(counts, head.prototypes, [f"c{k}" for k in range(head.num_classes)])


def _centred_basis(d: int) -> torch.Tensor:
    """d - 1 orthonormal vectors of R^d with zero mean. The classifier's feat_norm (LayerNorm,
    weight 1, bias 0) centres each pixel, which leaves a zero-mean pixel's direction unchanged:
    pixels built from these vectors reach the cosines by their construction."""
    q, _ = torch.linalg.qr(torch.eye(d, dtype=torch.float64) - 1.0 / d)
    return q[:, : d - 1].t().float()


def test_identical_prototypes_report_entropy_0_all_but_one_dead_and_cosine_1():
    basis = _centred_basis(8)  # 7 orthonormal directions
    m = 4
    prototypes = torch.stack([basis[0].expand(m, -1), basis[1:1 + m]])  # class 0: M copies of one vector
    head = _classifier(prototypes)
    gen = torch.Generator().manual_seed(0)
    # pixels of class 0 near its prototype, of class 1 near each of its prototypes in turn
    x0 = basis[0] + 0.05 * torch.randn(40, 7, generator=gen) @ basis
    x1 = basis[1:1 + m].repeat(10, 1) + 0.05 * torch.randn(40, 7, generator=gen) @ basis
    stats = _statistics(head, torch.cat([x0, x1]), torch.tensor([0] * 40 + [1] * 40))
    c0 = stats["classes"]["c0"]
    assert c0["pixels"] == 40  # every pixel is classified correctly
    assert c0["shares"] == [1.0, 0.0, 0.0, 0.0]  # the tie goes to prototype 0
    assert c0["entropy"] == 0.0 and c0["dead"] == m - 1
    assert c0["cosine"] == pytest.approx(1.0, abs=1e-6)
    # the other class is spread evenly over orthogonal prototypes
    c1 = stats["classes"]["c1"]
    assert c1["shares"] == [0.25] * 4 and c1["entropy"] == pytest.approx(1.0) and c1["dead"] == 0
    assert c1["cosine"] == pytest.approx(0.0, abs=1e-6)
    assert stats["entropy"] == pytest.approx(0.5) and stats["entropy_min"] == 0.0
    assert stats["entropy_min_class"] == "c0" and (stats["dead"], stats["prototypes"]) == (3, 8)
    assert stats["cosine"] == pytest.approx(0.5, abs=1e-6)
    assert format_statistics(stats) == ("prototypes: usage entropy 0.50 (min 0.00, class c0), dead 3/8, "
                                        "intra-class cosine 0.50")


def test_orthogonal_prototypes_with_evenly_spread_pixels_report_entropy_1_and_cosine_0():
    k, m = 3, 3
    basis = _centred_basis(k * m + 1)
    prototypes = basis.view(k, m, -1)
    head = _classifier(prototypes)
    gen = torch.Generator().manual_seed(1)
    x = basis.repeat(5, 1) + 0.05 * torch.randn(5 * k * m, k * m, generator=gen) @ basis
    labels = torch.arange(k * m).repeat(5) // m
    stats = _statistics(head, x, labels)
    for name in ("c0", "c1", "c2"):
        c = stats["classes"][name]
        assert c["pixels"] == 15 and c["shares"] == pytest.approx([1 / 3] * 3)
        assert c["entropy"] == pytest.approx(1.0) and c["dead"] == 0
        assert c["cosine"] == pytest.approx(0.0, abs=1e-6)
    assert stats["entropy"] == pytest.approx(1.0) and (stats["dead"], stats["prototypes"]) == (0, 9)


def test_ignored_wrong_and_unlabelled_pixels_are_not_counted():
    nearest = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]])
    pred = torch.tensor([0, 1, 1, 0])
    labels = torch.tensor([0, 0, 1, -1])  # right, wrong, right, ignored
    assert usage_counts(nearest, pred, labels, 2).tolist() == [[0, 1], [0, 1]]
    stats = usage_statistics(torch.tensor([[0, 0], [3, 1]]), torch.randn(2, 2, 4), ["a", "b"])
    assert math.isnan(stats["classes"]["a"]["entropy"]) and stats["classes"]["a"]["dead"] is None
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert stats["entropy"] == pytest.approx(expected) and stats["prototypes"] == 2
    with pytest.raises(ValueError, match=r"prototypes must be \[K, M, D\] = \[2, 2, D\]"):
        usage_statistics(torch.zeros(2, 2), torch.randn(2, 3, 4), ["a", "b"])


def test_a_training_step_records_its_batch_usage_in_both_implementations():
    torch.manual_seed(0)
    fused = PrototypeClassifier(16, 4, 3).train()
    reference = copy.deepcopy(fused)
    reference.impl = "reference"
    before = copy.deepcopy(fused).eval()
    x = torch.randn(256, 16)
    target = torch.randint(0, 4, (256,))
    target[:10] = 255
    fused(x, target)
    reference(x, target)
    # by hand, pixel by pixel, with the prototypes the step started from
    with torch.no_grad():
        _, scores, nearest = before.similarity(x)
        pred = before.mask_norm(scores).argmax(dim=1)
    expected = torch.zeros(4, 3, dtype=torch.int64)
    for n in range(256):
        y = int(target[n])
        if y != 255 and int(pred[n]) == y:
            expected[y, int(nearest[n, y])] += 1
    assert expected.sum() > 0
    assert torch.equal(fused.usage, expected) and torch.equal(reference.usage, expected)
