"""PR curves, AP and hardest scores: hand-computed cases and scikit-learn as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve

from recognite.eval import hard_pos_neg_scores, pr_metrics

GALLERY_LABELS = torch.tensor([2, 1, 1, 3, 1])
QUERY_LABELS = torch.tensor([1, 3, 7])
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.9, 0.1, 0.3],
        [0.2, 0.4, 0.4, 0.4, 0.0],
        [0.6, 0.1, 0.2, 0.3, 0.7],
    ]
)

EXPECTED_KEYS = {"Precisions", "Recalls", "Thresholds", "AP", "mAP", "P@maxF1", "R@maxF1", "T@maxF1", "maxF1"}


def test_pr_metrics_hand_computed():
    out = pr_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS)
    assert set(out) == EXPECTED_KEYS
    # Query 0: thresholds 0.9 (1 of 2 retrieved positive), 0.5 (2 of 3), 0.3 (3 of 4).
    assert out["Thresholds"][0].tolist() == pytest.approx([0.3, 0.5, 0.9])
    assert out["Precisions"][0].tolist() == pytest.approx([3 / 4, 2 / 3, 1 / 2, 1.0])
    assert out["Recalls"][0].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    # Query 1: the positive ties with two negatives at 0.4.
    assert out["Thresholds"][1].tolist() == pytest.approx([0.4])
    assert out["Precisions"][1].tolist() == pytest.approx([1 / 3, 1.0])
    assert out["Recalls"][1].tolist() == pytest.approx([1.0, 0.0])
    # Query 2 has no positive: degenerate curve, nan AP / F1, left out of mAP.
    assert out["Precisions"][2].tolist() == [1.0]
    assert out["Recalls"][2].tolist() == [0.0]
    assert out["Thresholds"][2].numel() == 0
    ap = out["AP"].tolist()
    assert ap[0] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert ap[1] == pytest.approx(1 / 3)
    assert math.isnan(ap[2])
    assert out["mAP"] == pytest.approx((23 / 36 + 1 / 3) / 2)
    assert out["maxF1"][:2].tolist() == pytest.approx([6 / 7, 0.5])
    assert out["P@maxF1"][:2].tolist() == pytest.approx([3 / 4, 1 / 3])
    assert out["R@maxF1"][:2].tolist() == pytest.approx([1.0, 1.0])
    assert out["T@maxF1"][:2].tolist() == pytest.approx([0.3, 0.4])
    assert all(math.isnan(out[key][2]) for key in ("maxF1", "P@maxF1", "R@maxF1", "T@maxF1"))


def test_max_f1_tie_picks_highest_threshold():
    # F1 at 0.9: P=1, R=1/2 -> 2/3; at 0.7: P=2/4, R=1 -> 2/3. Equal: keep the higher threshold.
    scores = torch.tensor([[0.9, 0.8, 0.75, 0.7]])
    out = pr_metrics(scores, torch.tensor([1, 2, 3, 1]), torch.tensor([1]))
    assert out["maxF1"].tolist() == pytest.approx([2 / 3])
    assert out["T@maxF1"].tolist() == pytest.approx([0.9])


@pytest.mark.parametrize(("ties", "num_gallery"), [(False, 57), (True, 57), (False, 400), (True, 400)])
def test_pr_curves_and_ap_match_sklearn(ties, num_gallery):
    # G=400 exercises the shared top-k over the whole chunk; G=57 the per-bucket sorts.
    rng = np.random.default_rng(7 + ties + num_gallery)
    num_queries = 31
    scores = rng.normal(size=(num_queries, num_gallery)).astype(np.float32)
    if ties:
        scores = np.round(scores * 2) / 2
    gallery_labels = rng.integers(0, 9 if num_gallery < 100 else 150, size=num_gallery)
    query_labels = rng.integers(0, 10 if num_gallery < 100 else 160, size=num_queries)
    if num_gallery >= 100:  # make most positives rank high, so most rows are shallow
        for q in range(num_queries):
            scores[q, gallery_labels == query_labels[q]] += 2.0
    out = pr_metrics(torch.from_numpy(scores).double(), torch.from_numpy(gallery_labels),
                     torch.from_numpy(query_labels), memory_budget=3000)  # float64 in, float64 out
    aps = []
    for q in range(num_queries):
        y_true = gallery_labels == query_labels[q]
        if not y_true.any():
            assert math.isnan(out["AP"][q])
            continue
        expected_ap = average_precision_score(y_true, scores[q])
        aps.append(expected_ap)
        assert out["AP"][q].item() == pytest.approx(expected_ap, abs=1e-12)
        precision, recall, thresholds = precision_recall_curve(y_true, scores[q])
        # Our curves stop at the highest threshold that reaches full recall (lower thresholds
        # add no information); current scikit-learn lists every threshold down to the lowest.
        start = np.nonzero(recall == 1.0)[0].max()
        precision, recall, thresholds = precision[start:], recall[start:], thresholds[start:]
        np.testing.assert_allclose(out["Precisions"][q].numpy(), precision, rtol=1e-12)
        np.testing.assert_allclose(out["Recalls"][q].numpy(), recall, rtol=1e-12)
        np.testing.assert_array_equal(out["Thresholds"][q].numpy(), thresholds)
        # AP is the step integral of the returned curve.
        area = -np.sum(np.diff(out["Recalls"][q].numpy()) * out["Precisions"][q].numpy()[:-1])
        assert out["AP"][q].item() == pytest.approx(area, abs=1e-12)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
        assert out["maxF1"][q].item() == pytest.approx(f1[:-1].max(), abs=1e-12)
    assert out["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)


def test_pr_metrics_bad_shapes():
    with pytest.raises(ValueError, match="gallery_labels has 3 entries"):
        pr_metrics(SCORES, GALLERY_LABELS[:3], QUERY_LABELS)


def test_hard_pos_neg_scores_hand():
    out = hard_pos_neg_scores(SCORES, GALLERY_LABELS, QUERY_LABELS)
    assert set(out) == {"HardPosScores", "HardNegScores"}
    assert torch.equal(out["HardPosScores"], torch.tensor([0.3, 0.4]))  # query 2: no positive
    assert torch.equal(out["HardNegScores"], torch.tensor([0.9, 0.4, 0.7]))
    # A query whose label covers the whole gallery has no negative.
    only_pos = hard_pos_neg_scores(torch.tensor([[0.2, 0.6]]), torch.tensor([5, 5]), torch.tensor([5]))
    assert torch.equal(only_pos["HardPosScores"], torch.tensor([0.2]))
    assert only_pos["HardNegScores"].numel() == 0


def test_float32_in_float32_out_like_the_earlier_release():
    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.normal(size=(7, 20)).astype(np.float32))
    gallery_labels = torch.from_numpy(rng.integers(0, 4, size=20))
    query_labels = torch.from_numpy(rng.integers(0, 5, size=7))
    single = pr_metrics(scores, gallery_labels, query_labels)
    double = pr_metrics(scores.double(), gallery_labels, query_labels)
    assert single["mAP"].dtype == torch.float32 and single["mAP"].dim() == 0
    assert double["mAP"].dtype == torch.float64
    for key in ("AP", "P@maxF1", "R@maxF1", "maxF1"):
        assert single[key].dtype == torch.float32
        assert torch.equal(single[key], double[key].float(), ) or torch.allclose(
            single[key], double[key].float(), equal_nan=True, rtol=0, atol=0), key
    assert all(p.dtype == torch.float32 for p in single["Precisions"] + single["Recalls"])
    assert single["mAP"].item() == pytest.approx(double["mAP"].item(), rel=1e-6)
