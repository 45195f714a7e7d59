"""The report's statistics on hand-made embeddings (non-square, ties, unequal norms, a query without positives)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from recognite.eval import cmc, hard_pos_neg_scores, pairwise_scores, pr_metrics
from recognite.report import compute_report_data
from recognite.report._data import (
    RECALL_GRID,
    confused_pairs,
    open_set_rates,
    per_label_table,
    pooled_operating_point,
    worst_queries,
)

# inner-product scores; gallery items 0 and 2 are identical (ties), norms differ
GALLERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.5]])
GALLERY_LABELS = torch.tensor([0, 1, 1, 2, 0])
QUERIES = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 1.0], [0.5, 0.0], [0.2, 1.0]])
QUERY_LABELS = torch.tensor([1, 1, 0, 2, 3, 0])  # label 3 has no gallery item


@pytest.fixture(scope="module")
def data():
    return compute_report_data(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, metric="inner", top_k=3, cmc_max_rank=4)


def _scores():
    return pairwise_scores(QUERIES, GALLERY, "inner")


def test_per_query_statistics_match_brute_force(data):
    scores = _scores().tolist()
    for q, row in enumerate(scores):
        pos = [s for s, g in zip(row, GALLERY_LABELS.tolist()) if g == QUERY_LABELS[q]]
        neg = [s for s, g in zip(row, GALLERY_LABELS.tolist()) if g != QUERY_LABELS[q]]
        assert data.num_pos[q] == len(pos)
        if pos:
            assert data.best_pos[q] == pytest.approx(max(pos))
            assert data.hard_pos[q] == pytest.approx(min(pos))
            assert data.first_rank[q] == 1 + sum(s >= max(pos) for s in neg)  # ties count against
            assert row[int(data.best_pos_index[q])] == pytest.approx(max(pos))
        else:
            assert math.isnan(data.best_pos[q]) and math.isnan(data.hard_pos[q]) and math.isnan(data.ap[q])
            assert data.first_rank[q] == len(row) + 1 and data.best_pos_index[q] == -1
        assert data.hard_neg[q] == pytest.approx(max(neg))
        # top-3: descending, ties in gallery order
        expected = sorted(range(len(row)), key=lambda g: (-row[g], g))[:3]
        assert data.top_indices[q].tolist() == expected
        assert data.top_scores[q].tolist() == pytest.approx([row[g] for g in expected])
    # query 0: label 1, scores [1, 0, 1, 2, .5]: negatives 2 (g3) and 1 (g0, tied with the best positive g2)
    assert data.first_rank[0] == 3


def test_agrees_with_the_library_metrics(data):
    scores = _scores()
    pr = pr_metrics(scores.double(), GALLERY_LABELS, QUERY_LABELS)
    assert torch.allclose(data.ap, pr["AP"].double(), equal_nan=True)
    assert data.mean_ap == pytest.approx(pr["mAP"].item())
    assert data.cmc.tolist() == pytest.approx(cmc(scores, GALLERY_LABELS, QUERY_LABELS, max_rank=4).tolist())
    hard = hard_pos_neg_scores(scores, GALLERY_LABELS, QUERY_LABELS)
    assert data.hard_pos[data.has_pos].tolist() == pytest.approx(hard["HardPosScores"].tolist())
    assert data.hard_neg.tolist() == pytest.approx(hard["HardNegScores"].tolist())


def test_pooled_curve_equals_scikit_learn(data):
    scores = _scores()
    same = (QUERY_LABELS[:, None] == GALLERY_LABELS[None, :]).numpy().ravel()
    assert data.pooled_ap == pytest.approx(average_precision_score(same, scores.numpy().ravel()))
    assert data.num_pos_pairs == int(same.sum()) and data.num_neg_pairs == same.size - int(same.sum())
    # every point: precision and recall of "score >= threshold" over all pairs
    flat = scores.numpy().ravel()
    for recall, precision, threshold in zip(data.pooled_recall, data.pooled_precision, data.pooled_thresholds):
        accepted = flat >= threshold
        assert precision == pytest.approx((accepted & same).sum() / accepted.sum())
        assert recall == pytest.approx((accepted & same).sum() / same.sum())
    assert data.pooled_recall[-1] == 0 and data.pooled_precision[-1] == 1
    assert sorted(data.pos_pair_scores.tolist()) == pytest.approx(sorted(flat[same].tolist()))
    assert sorted(data.neg_pair_scores.tolist()) == pytest.approx(sorted(flat[~same].tolist()))


def test_mean_interpolated_precision_by_hand():
    # one query, gallery ranked: pos, neg, pos, neg -> points (R .5, P 1), (R 1, P 2/3)
    q = torch.tensor([[1.0]])
    g = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    out = compute_report_data(q, torch.tensor([0]), g, torch.tensor([0, 1, 0, 1]), metric="inner")
    expected = np.where(RECALL_GRID <= 0.5 + 1e-12, 1.0, 2.0 / 3.0)
    assert np.allclose(out.mean_precision, expected)
    # one positive at rank 4: a flat curve at 1/4 (the artificial end point is not used)
    out = compute_report_data(q, torch.tensor([1]), g, torch.tensor([0, 0, 0, 1]), metric="inner")
    assert np.allclose(out.mean_precision, 0.25)
    assert out.first_rank.tolist() == [4]


def test_chance_cmc_by_hand(data):
    # G = 5. Label 1 and 0 have 2 positives, label 2 has 1 (queries: 1, 1, 0, 2, 0; label 3 left out).
    def chance(p, r):
        miss = 1.0
        for i in range(r):
            miss *= (5 - p - i) / (5 - i)
        return 1 - miss

    expected = [(4 * chance(2, r) + chance(1, r)) / 5 for r in range(1, 5)]
    assert data.chance_cmc.tolist() == pytest.approx(expected)
    assert data.chance_cmc[0] == pytest.approx((4 * 2 / 5 + 1 / 5) / 5)


def test_chunking_and_sampling(data):
    small = compute_report_data(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, metric="inner", top_k=3,
                                cmc_max_rank=4, memory_budget=1)  # one query per chunk
    for name in ("ap", "first_rank", "best_pos", "hard_pos", "hard_neg", "top_indices", "top_scores"):
        assert torch.equal(torch.nan_to_num(getattr(small, name)), torch.nan_to_num(getattr(data, name))), name
    assert small.pooled_ap == data.pooled_ap and np.array_equal(small.mean_precision, data.mean_precision)
    rng = np.random.default_rng(0)
    q, g = torch.from_numpy(rng.normal(size=(40, 8))).float(), torch.from_numpy(rng.normal(size=(30, 8))).float()
    ql, gl = torch.from_numpy(rng.integers(0, 10, 40)), torch.from_numpy(rng.integers(0, 10, 30))
    full = compute_report_data(q, ql, g, gl, metric="cosine")
    sampled = compute_report_data(q, ql, g, gl, metric="cosine", max_pairs=50, seed=1)
    assert sampled.pooled_ap == pytest.approx(full.pooled_ap)  # the pooled curve is never sampled
    assert len(sampled.pos_pair_scores) == min(50, full.num_pos_pairs)
    assert 20 <= len(sampled.neg_pair_scores) <= 90  # ~50 of ~1100 negatives
    assert set(sampled.neg_pair_scores.tolist()) <= set(full.neg_pair_scores.tolist())


def test_worst_queries_one_per_label_first(data):
    # AP: q0 (label 1) 1/3 ... computed by the library; check the rule, not the numbers
    ap = data.ap.tolist()
    valid = [q for q in range(6) if not math.isnan(ap[q])]
    assert 4 not in worst_queries(data, 6)  # no positives: never listed
    assert worst_queries(data, 0) == [] and worst_queries(data, 0, max_per_label=None) == []
    margin = (data.best_pos - data.hard_neg).tolist()
    order = sorted(valid, key=lambda q: (ap[q], margin[q], q))
    assert worst_queries(data, 5, max_per_label=None) == order
    one_each = worst_queries(data, 3)
    labels = [int(QUERY_LABELS[q]) for q in one_each]
    assert len(set(labels)) == 3  # labels 0, 1, 2 once each
    assert one_each == sorted(one_each, key=order.index)
    assert sorted(worst_queries(data, 5)) == sorted(valid)  # filled up after one per label


def test_confusions_labels_and_open_set(data):
    # top-1 (ties in gallery order): q0 -> g3 (label 2), q1 -> g1 (1), q2 -> g3 (2), q3 -> g3 (2),
    # q4 -> g3 (2), q5 -> g1 (1); wrong: (1, 2), (0, 2), (3, 2), (0, 1)
    pairs = confused_pairs(data)
    as_tuples = [(p["query_label"], p["predicted_label"], p["count"]) for p in pairs]
    assert as_tuples == [(0, 1, 1), (0, 2, 1), (1, 2, 1), (3, 2, 1)]
    assert pairs[0]["fraction"] == pytest.approx(0.5) and pairs[0]["mean_score"] == pytest.approx(1.0)
    table = {row["label"]: row for row in per_label_table(data)}
    assert table[1]["num_queries"] == 2 and table[1]["num_gallery"] == 2
    assert table[1]["mAP"] == pytest.approx(float(data.ap[[0, 1]].mean()))
    assert table[0]["top1"] == pytest.approx(0.0) and table[1]["top1"] == pytest.approx(0.5)
    assert math.isnan(table[3]["mAP"]) and table[3]["num_gallery"] == 0
    # open set at threshold 1.5 (the one convention of recognite.eval.open_set): genuine trials are
    # the queries with a positive (q0, q1, q2, q3, q5), impostor trials those with a negative (all
    # six; q4's label is not enrolled). best_pos: 1, 2, 1, 6, -, 0.6 ; hard_neg: 2, 1, 2, 3, 1, 1
    rates = open_set_rates(data, 1.5)
    assert rates["DIR"] == pytest.approx(2 / 5)  # q1 (2 > 1, 2 >= 1.5) and q3 (6 > 3)
    assert rates["FAR"] == pytest.approx(3 / 6)  # hard_neg >= 1.5: q0, q2, q3
    recall, precision = pooled_operating_point(data, 1.5)
    flat = _scores().numpy().ravel()
    same = (QUERY_LABELS[:, None] == GALLERY_LABELS[None, :]).numpy().ravel()
    threshold = min(t for t in data.pooled_thresholds if t >= 1.5)
    accepted = flat >= threshold
    assert (recall, precision) == pytest.approx(((accepted & same).sum() / same.sum(), (accepted & same).sum() / accepted.sum()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
        compute_report_data(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, top_k=0)
    with pytest.raises(ValueError, match="differ in length"):
        compute_report_data(QUERIES, QUERY_LABELS[:3], GALLERY, GALLERY_LABELS)
    with pytest.raises(ValueError, match="metric"):
        compute_report_data(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, metric="manhattan")
