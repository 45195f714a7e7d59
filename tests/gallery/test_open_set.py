"""Open-set decisions: known queries get their label, unknown-label queries get 'unknown'."""

from __future__ import annotations

import pytest
import torch

from recognite.gallery import UNKNOWN, GalleryIndex, open_set_predictions


def _constructed_case(seed=0, dim=16, num_known=5):
    """Known labels live in the first 8 dimensions, unknown-label queries in the last 8."""
    gen = torch.Generator().manual_seed(seed)
    refs = torch.zeros(2 * num_known, dim)
    refs[:, :8] = torch.randn(2 * num_known, 8, generator=gen)
    refs[num_known:, :8] = refs[:num_known, :8] + 0.05 * torch.randn(num_known, 8, generator=gen)
    refs *= torch.linspace(0.5, 3.0, 2 * num_known).unsqueeze(1)  # unequal norms
    labels = [f"k{i}" for i in range(num_known)] * 2
    known = refs[:num_known] + 0.05 * torch.randn(num_known, dim, generator=gen)
    unknown = torch.zeros(4, dim)
    unknown[:, 8:] = torch.randn(4, 8, generator=gen)
    unknown[:, :8] = 0.02 * torch.randn(4, 8, generator=gen)  # almost orthogonal to the gallery
    return refs, labels, known, unknown


@pytest.mark.parametrize("aggregation", ["all", "mean"])
def test_threshold_rejects_unknown_label_queries(aggregation):
    refs, labels, known, unknown = _constructed_case()
    gallery = GalleryIndex(aggregation=aggregation)
    gallery.add(refs, labels, ids=[f"r{i}" for i in range(len(labels))])
    queries = torch.cat([known, unknown])
    result = gallery.recognize(queries, k=3, threshold=0.5)
    expected_known = [f"k{i}" for i in range(len(known))]
    assert result.predictions == expected_known + [UNKNOWN] * len(unknown)
    assert result.accepted.tolist() == [True] * len(known) + [False] * len(unknown)
    assert bool((result.scores[: len(known), 0] > 0.9).all())
    assert bool((result.scores[len(known) :, 0].abs() < 0.2).all())
    # the top-k lists are still there for rejected queries
    assert all(len(row) == 3 for row in result.labels)
    no_threshold = gallery.recognize(queries, k=3)
    assert UNKNOWN not in no_threshold.predictions
    assert no_threshold.predictions == [row[0] for row in no_threshold.labels]


def test_records_are_plain_dicts():
    gallery = GalleryIndex()
    gallery.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["cat", "dog"], ids=["c.jpg", "d.jpg"])
    result = gallery.recognize(torch.tensor([[1.0, 1.0], [3.0, -4.0]]), k=2, threshold=0.7)
    records = result.to_records()
    assert records[0]["prediction"] in ("cat", "dog") and records[0]["score"] == pytest.approx(2**-0.5)
    assert records[1] == {
        "prediction": UNKNOWN,  # best score 3/5 = 0.6 < 0.7
        "score": pytest.approx(0.6),
        "top_k": [
            {"label": "cat", "score": pytest.approx(0.6), "reference_id": "c.jpg"},
            {"label": "dog", "score": pytest.approx(-0.8), "reference_id": "d.jpg"},
        ],
    }
    assert len(result) == 2


def test_score_equal_to_threshold_is_accepted():
    assert open_set_predictions(["a", "b", ""], torch.tensor([0.5, 0.49999, 0.9]), 0.5) == ["a", UNKNOWN, UNKNOWN]
    assert open_set_predictions(["a"], torch.tensor([-0.9]), None) == ["a"]


@pytest.mark.parametrize("threshold, error", [(float("nan"), ValueError), ("0.5", TypeError), (True, TypeError)])
def test_bad_threshold(threshold, error):
    gallery = GalleryIndex()
    gallery.add(torch.eye(2), ["a", "b"])
    with pytest.raises(error, match="threshold"):
        gallery.recognize(torch.eye(2), threshold=threshold)


def test_infinite_thresholds_accept_or_reject_everything():
    gallery = GalleryIndex()
    gallery.add(torch.eye(3), ["a", "b", "c"])
    queries = torch.tensor([[1.0, 0.1, 0.0], [-1.0, -1.0, -1.0]])
    assert gallery.recognize(queries, k=1, threshold=float("-inf")).predictions == ["a", "a"]
    assert gallery.recognize(queries, k=1, threshold=float("inf")).predictions == [UNKNOWN, UNKNOWN]


def test_threshold_calibrated_with_eval_at_target_far():
    eval_open_set = pytest.importorskip("recognite.eval.open_set")
    refs, labels, known, unknown = _constructed_case(seed=1)
    gallery = GalleryIndex()
    gallery.add(refs, labels)
    # validation: the known queries (codes of their labels) and unknown ones (label -1)
    val_queries = torch.cat([known, unknown])
    val_scores = torch.nn.functional.normalize(val_queries, dim=1) @ gallery.embeddings.T
    val_labels = torch.tensor(list(range(len(known))) + [-1] * len(unknown))
    threshold = eval_open_set.threshold_at_far(val_scores, gallery.label_codes, val_labels, 0.0)
    result = gallery.recognize(val_queries, k=2, threshold=threshold)
    assert result.predictions[len(known):] == [UNKNOWN] * len(unknown)  # FAR 0 on validation
    assert result.predictions[: len(known)] == [f"k{i}" for i in range(len(known))]
