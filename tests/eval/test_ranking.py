"""Rankings and rank-based metrics: hand-computed cases (non-square, ties) and a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recognite.eval import (
    accuracy,
    cmc,
    knn,
    map_at_r,
    r_precision,
    recall_at_k,
    sort_scores,
    top_k,
    top_k_accuracy,
)

# Q=3 queries, G=5 gallery items. Query 0 has its best positive tied with a negative at 0.9;
# query 1's only positive ties with two negatives at 0.4; query 2 (label 7) has no positive.
GALLERY_LABELS = torch.tensor([2, 1, 1, 3, 1])
QUERY_LABELS = torch.tensor([1, 3, 7])
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.9, 0.1, 0.3],
        [0.2, 0.4, 0.4, 0.4, 0.0],
        [0.6, 0.1, 0.2, 0.3, 0.7],
    ]
)


def test_sort_scores_stable_descending():
    sorted_scores, sorted_labels = sort_scores(SCORES, GALLERY_LABELS)
    assert sorted_labels.tolist() == [[2, 1, 1, 1, 3], [1, 1, 3, 2, 1], [1, 2, 3, 1, 1]]
    assert torch.equal(sorted_scores, SCORES.sort(dim=1, descending=True).values)


def test_sort_scores_shape_mismatch():
    with pytest.raises(ValueError, match="gallery_labels has 4 entries"):
        sort_scores(SCORES, GALLERY_LABELS[:4])


def test_top_k_and_knn_hand():
    values, labels = top_k(SCORES, GALLERY_LABELS, 2)
    assert labels.tolist() == [[2, 1], [1, 1], [1, 2]]
    assert torch.equal(values, torch.tensor([[0.9, 0.9], [0.4, 0.4], [0.7, 0.6]]))
    assert knn(SCORES, GALLERY_LABELS, 1).tolist() == [2, 1, 1]
    assert knn(SCORES, GALLERY_LABELS, 3).tolist() == [1, 1, 1]
    # k larger than the gallery: all items.
    assert top_k(SCORES, GALLERY_LABELS, 9)[1].shape == (3, 5)


def test_knn_vote_tie_goes_to_best_ranked_label():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1]])
    labels = torch.tensor([4, 5, 5, 4, 6])
    # k=4: labels 4,5,5,4 -> tie 2:2, label 4 ranks first.
    assert knn(scores, labels, 4).tolist() == [4]
    assert knn(scores, labels, 3).tolist() == [5]


def test_top_k_ties_broken_by_gallery_order_in_topk_path():
    # G much larger than k so the topk (not full sort) path runs; many ties at the k-th value.
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (40, 64), generator=gen).float()
    labels = torch.arange(64)
    values, top_labels = top_k(scores, labels, 5)
    expected_values, expected_order = torch.sort(scores, dim=1, descending=True, stable=True)
    assert torch.equal(values, expected_values[:, :5])
    assert torch.equal(top_labels, expected_order[:, :5])


def test_hand_metrics_pessimistic_ties():
    assert accuracy(SCORES, GALLERY_LABELS, QUERY_LABELS) == 0.0
    assert top_k_accuracy(SCORES, GALLERY_LABELS, QUERY_LABELS, 2) == pytest.approx(1 / 3)
    assert top_k_accuracy(SCORES, GALLERY_LABELS, QUERY_LABELS, 3) == pytest.approx(2 / 3)
    assert top_k_accuracy(SCORES, GALLERY_LABELS, QUERY_LABELS, 5) == pytest.approx(2 / 3)
    assert cmc(SCORES, GALLERY_LABELS, QUERY_LABELS).tolist() == pytest.approx([0, 0.5, 1, 1, 1])
    assert cmc(SCORES, GALLERY_LABELS, QUERY_LABELS, max_rank=2).tolist() == pytest.approx([0, 0.5])
    # recall@k: query 0 positives at pessimistic ranks 2, 3, 4; query 1 at rank 3.
    assert recall_at_k(SCORES, GALLERY_LABELS, QUERY_LABELS, 1) == 0.0
    assert recall_at_k(SCORES, GALLERY_LABELS, QUERY_LABELS, 2) == pytest.approx((1 / 3 + 0) / 2)
    assert recall_at_k(SCORES, GALLERY_LABELS, QUERY_LABELS, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert r_precision(SCORES, GALLERY_LABELS, QUERY_LABELS) == pytest.approx((2 / 3 + 0) / 2)
    assert map_at_r(SCORES, GALLERY_LABELS, QUERY_LABELS) == pytest.approx((7 / 18 + 0) / 2)


def test_accuracy_strict_tie_and_clear_win():
    gallery = torch.tensor([1, 2])
    tied = torch.tensor([[0.5, 0.5]])
    assert accuracy(tied, gallery, torch.tensor([1])) == 0.0
    assert accuracy(tied, gallery, torch.tensor([2])) == 0.0
    assert accuracy(torch.tensor([[0.5, 0.49]]), gallery, torch.tensor([1])) == 1.0
    # Two positives tied at the top are still a hit.
    assert accuracy(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([1, 1, 2]), torch.tensor([1])) == 1.0


def test_single_item_gallery():
    scores = torch.tensor([[0.3], [0.8], [0.1]])
    gallery = torch.tensor([4])
    queries = torch.tensor([4, 4, 5])
    assert accuracy(scores, gallery, queries) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, gallery, queries, 5) == pytest.approx(2 / 3)
    assert cmc(scores, gallery, queries).tolist() == [1.0]
    assert map_at_r(scores, gallery, queries) == 1.0
    assert knn(scores, gallery, 3).tolist() == [4, 4, 4]


def test_no_query_has_positives_gives_nan():
    scores = torch.tensor([[0.3, 0.2]])
    assert math.isnan(map_at_r(scores, torch.tensor([1, 2]), torch.tensor([3])))
    assert math.isnan(recall_at_k(scores, torch.tensor([1, 2]), torch.tensor([3]), 1))
    assert torch.isnan(cmc(scores, torch.tensor([1, 2]), torch.tensor([3]))).all()
    assert accuracy(scores, torch.tensor([1, 2]), torch.tensor([3])) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_reference_with_many_ties(seed, reference):
    rng = np.random.default_rng(seed)
    num_queries, num_gallery = 23, 37
    scores = rng.integers(0, 6, size=(num_queries, num_gallery)).astype(np.float32)
    gallery_labels = rng.integers(0, 6, size=num_gallery)
    query_labels = rng.integers(0, 8, size=num_queries)  # labels 6, 7 have no positives
    expected = reference(scores, gallery_labels, query_labels, ks=(1, 2, 3))
    args = (torch.from_numpy(scores), torch.from_numpy(gallery_labels), torch.from_numpy(query_labels))
    for k in (1, 2, 3):
        assert top_k_accuracy(*args, k) == pytest.approx(expected["top_k_accuracy"][k])
        assert recall_at_k(*args, k) == pytest.approx(expected["recall_at_k"][k])
    assert accuracy(*args) == pytest.approx(expected["top_k_accuracy"][1])
    assert cmc(*args).tolist() == pytest.approx(expected["cmc"])
    assert map_at_r(*args) == pytest.approx(expected["map_at_r"])
    assert r_precision(*args) == pytest.approx(expected["r_precision"])
    # Tiny memory budget: many chunks and top-k buckets, same numbers.
    assert map_at_r(*args, memory_budget=2000) == pytest.approx(expected["map_at_r"])
    assert cmc(*args, memory_budget=500).tolist() == pytest.approx(expected["cmc"])


def test_metrics_do_not_depend_on_gallery_order():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (15, 30), generator=gen).float()
    gallery_labels = torch.randint(0, 5, (30,), generator=gen)
    query_labels = torch.randint(0, 5, (15,), generator=gen)
    perm = torch.randperm(30, generator=gen)
    for fn in (accuracy, map_at_r, r_precision):
        assert fn(scores, gallery_labels, query_labels) == fn(
            scores[:, perm], gallery_labels[perm], query_labels
        )
    assert torch.equal(
        cmc(scores, gallery_labels, query_labels), cmc(scores[:, perm], gallery_labels[perm], query_labels)
    )


def test_bad_inputs():
    with pytest.raises(TypeError, match="gallery_labels must be an integer tensor"):
        accuracy(SCORES, GALLERY_LABELS.float(), QUERY_LABELS)
    with pytest.raises(ValueError, match="query_labels has 2 entries"):
        accuracy(SCORES, GALLERY_LABELS, QUERY_LABELS[:2])
    with pytest.raises(ValueError, match="finite"):
        accuracy(torch.tensor([[float("nan"), 0.0]]), torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        top_k_accuracy(SCORES, GALLERY_LABELS, QUERY_LABELS, 0)
    with pytest.raises(ValueError, match=r"shape \(Q, G\)"):
        accuracy(SCORES[0], GALLERY_LABELS, QUERY_LABELS)
    with pytest.raises(ValueError, match="at least one query"):
        accuracy(torch.zeros(0, 5), GALLERY_LABELS, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_budget"):
        map_at_r(SCORES, GALLERY_LABELS, QUERY_LABELS, memory_budget=0)
