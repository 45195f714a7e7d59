"""Open-set rates and the threshold at a target false-accept rate."""

from __future__ import annotations

import math

import pytest
import torch

from recognite.eval import open_set_metrics, threshold_at_far

GALLERY_LABELS = torch.tensor([1, 2, 2])
# Queries 0-2 known (labels 1, 2, 1), queries 3-6 unknown (labels 8, 9, 8, 7).
QUERY_LABELS = torch.tensor([1, 2, 1, 8, 9, 8, 7])
SCORES = torch.tensor(
    [
        [0.9, 0.2, 0.1],  # known, correct, best 0.9
        [0.3, 0.6, 0.5],  # known, correct, best 0.6
        [0.4, 0.7, 0.0],  # known, wrong (negative 0.7 beats positive 0.4)
        [0.8, 0.1, 0.1],  # unknown, best 0.8
        [0.5, 0.5, 0.2],  # unknown, best 0.5
        [0.1, 0.5, 0.3],  # unknown, best 0.5 (tie with the previous one)
        [0.2, 0.3, 0.25],  # unknown, best 0.3
    ]
)


def test_open_set_metrics_hand():
    m = open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, threshold=0.55)
    assert m["num_known"] == 3 and m["num_unknown"] == 4
    assert m["known_accept_rate"] == pytest.approx(1.0)
    assert m["DIR"] == pytest.approx(2 / 3)
    assert m["FAR"] == pytest.approx(1 / 4)
    assert m["unknown_reject_rate"] == pytest.approx(3 / 4)
    # The threshold is inclusive: best score 0.5 is accepted at 0.5.
    assert open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, 0.5)["FAR"] == pytest.approx(3 / 4)
    m = open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, 0.65)
    assert m["DIR"] == pytest.approx(1 / 3) and m["known_accept_rate"] == pytest.approx(2 / 3)


def test_known_mask_overrides_labels():
    known = torch.tensor([True, True, True, True, False, False, False])
    m = open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, 0.55, known=known)
    assert m["num_known"] == 4
    assert m["DIR"] == pytest.approx(2 / 4)  # query 3 is accepted but has no correct label
    assert m["FAR"] == 0.0
    with pytest.raises(ValueError, match="known must have shape"):
        open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, 0.5, known=known[:3])


@pytest.mark.parametrize(
    ("target", "expected_far"), [(0.0, 0.0), (0.25, 0.25), (0.5, 0.25), (0.74, 0.25), (0.75, 0.75)]
)
def test_threshold_at_far_hand_with_ties(target, expected_far):
    threshold = threshold_at_far(SCORES, GALLERY_LABELS, QUERY_LABELS, target)
    far = open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, threshold)["FAR"]
    assert far == pytest.approx(expected_far)
    assert far <= target + 1e-12
    # Minimal: the next lower float32 threshold accepts more unknown queries than allowed.
    lower = torch.nextafter(torch.tensor(threshold), torch.tensor(-math.inf)).item()
    assert open_set_metrics(SCORES, GALLERY_LABELS, QUERY_LABELS, lower)["FAR"] > target


def test_threshold_at_far_edges():
    assert threshold_at_far(SCORES, GALLERY_LABELS, QUERY_LABELS, 1.0) == -math.inf
    with pytest.raises(ValueError, match=r"target_far must be in \[0, 1\]"):
        threshold_at_far(SCORES, GALLERY_LABELS, QUERY_LABELS, 1.5)
    with pytest.raises(ValueError, match="needs unknown queries"):
        threshold_at_far(SCORES[:3], GALLERY_LABELS, QUERY_LABELS[:3], 0.1)
    assert math.isnan(open_set_metrics(SCORES[:3], GALLERY_LABELS, QUERY_LABELS[:3], 0.5)["FAR"])
