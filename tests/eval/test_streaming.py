"""The bounded-memory path equals the full-matrix functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from recognite.eval import (
    METRICS,
    accuracy,
    cmc,
    evaluate_embeddings,
    evaluate_loaders,
    evaluate_scores,
    hard_pos_neg_scores,
    map_at_r,
    pairwise_scores,
    pr_metrics,
    r_precision,
    recall_at_k,
    top_k_accuracy,
)


def _problem(seed: int, num_queries: int = 19, num_gallery: int = 41, dim: int = 4):
    gen = torch.Generator().manual_seed(seed)
    # Small integer embeddings: exact float arithmetic and many exactly tied scores.
    query = torch.randint(-2, 3, (num_queries, dim), generator=gen).float()
    gallery = torch.randint(-2, 3, (num_gallery, dim), generator=gen).float()
    gallery[3] = 0.0  # a zero vector
    gallery_labels = torch.randint(0, 7, (num_gallery,), generator=gen)
    query_labels = torch.randint(0, 9, (num_queries,), generator=gen)  # 7, 8: no positives
    return query, query_labels, gallery, gallery_labels


def _full_matrix_results(scores, gallery_labels, query_labels, ks):
    pr = pr_metrics(scores.double(), gallery_labels, query_labels)  # float64 in, float64 out
    hard = hard_pos_neg_scores(scores, gallery_labels, query_labels)
    return {
        "accuracy": accuracy(scores, gallery_labels, query_labels),
        "top_k_accuracy": {k: top_k_accuracy(scores, gallery_labels, query_labels, k) for k in ks},
        "recall_at_k": {k: recall_at_k(scores, gallery_labels, query_labels, k) for k in ks},
        "cmc": cmc(scores, gallery_labels, query_labels),
        "mAP": pr["mAP"].item(),
        "AP": pr["AP"],
        "map_at_r": map_at_r(scores, gallery_labels, query_labels),
        "r_precision": r_precision(scores, gallery_labels, query_labels),
        "hard_pos_mean": float(hard["HardPosScores"].double().mean()),
        "hard_neg_mean": float(hard["HardNegScores"].double().mean()),
    }


def _assert_same(streamed, full):
    for key, value in full.items():
        got = streamed[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(torch.nan_to_num(got, nan=-1.0), torch.nan_to_num(value, nan=-1.0)), key
        else:
            assert got == value, key


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_streaming_equals_full_matrix(metric, chunk_size):
    query, query_labels, gallery, gallery_labels = _problem(seed=11)
    ks = (1, 2, 5)
    streamed = evaluate_embeddings(
        query, query_labels, gallery, gallery_labels, metric=metric, ks=ks, chunk_size=chunk_size
    )
    scores = pairwise_scores(query, gallery, metric)
    _assert_same(streamed, _full_matrix_results(scores, gallery_labels, query_labels, ks))
    assert streamed["num_queries"] == 19
    assert streamed["num_queries_with_positives"] == int(
        sum(bool((gallery_labels == label).any()) for label in query_labels)
    )


def test_evaluate_scores_equals_functions_and_reference(reference):
    query, query_labels, gallery, gallery_labels = _problem(seed=5, num_queries=30, num_gallery=60)
    scores = pairwise_scores(query, gallery, "inner")
    ks = (1, 2, 3)
    out = evaluate_scores(scores, gallery_labels, query_labels, ks=ks, memory_budget=4000)
    _assert_same(out, _full_matrix_results(scores, gallery_labels, query_labels, ks))
    expected = reference(scores.numpy(), gallery_labels.numpy(), query_labels.numpy(), ks)
    assert out["mAP"] == pytest.approx(expected["mAP"])
    assert out["map_at_r"] == pytest.approx(expected["map_at_r"])
    assert out["cmc"].tolist() == pytest.approx(expected["cmc"])


def test_streaming_equals_reference_on_a_larger_gallery(reference):
    gen = torch.Generator().manual_seed(8)
    centres = torch.randint(-3, 4, (120, 6), generator=gen).float()
    gallery_labels = torch.arange(120).repeat_interleave(3)
    gallery = centres[gallery_labels] + torch.randint(-1, 2, (360, 6), generator=gen).float()
    query_labels = torch.randint(0, 130, (40,), generator=gen)
    query = centres[query_labels.clamp(max=119)] + torch.randint(-1, 2, (40, 6), generator=gen).float()
    out = evaluate_embeddings(query, query_labels, gallery, gallery_labels, metric="sq_euclid",
                              ks=(1, 2, 3), chunk_size=16)
    scores = pairwise_scores(query, gallery, "sq_euclid")
    expected = reference(scores.numpy(), gallery_labels.numpy(), query_labels.numpy(), (1, 2, 3))
    assert out["mAP"] == pytest.approx(expected["mAP"])
    assert out["map_at_r"] == pytest.approx(expected["map_at_r"])
    assert out["r_precision"] == pytest.approx(expected["r_precision"])
    assert out["cmc"].tolist() == pytest.approx(expected["cmc"])
    for k in (1, 2, 3):
        assert out["recall_at_k"][k] == pytest.approx(expected["recall_at_k"][k])
        assert out["top_k_accuracy"][k] == pytest.approx(expected["top_k_accuracy"][k])


def test_memory_budget_sets_chunks_and_cmc_length(caplog):
    query, query_labels, gallery, gallery_labels = _problem(seed=2, num_queries=150)
    with caplog.at_level("DEBUG", logger="recognite.eval.streaming"):
        small = evaluate_embeddings(query, query_labels, gallery, gallery_labels, memory_budget=700,
                                    cmc_max_rank=5)
    # 700 bytes would fit one row at 16 bytes per score; on the CPU chunks keep the 64 rows that a
    # shorter product is padded to anyway: 64 + 64 + 22
    assert "evaluated 150 queries in 3 chunks" in caplog.text
    large = evaluate_embeddings(query, query_labels, gallery, gallery_labels, cmc_max_rank=5)
    assert small["cmc"].shape == (5,)
    _assert_same(small, {k: v for k, v in large.items() if k != "top_k_accuracy"})
    scores = pairwise_scores(query, gallery, "cosine")
    _assert_same(small, {k: v for k, v in _full_matrix_results(scores, gallery_labels, query_labels, (1,)).items()
                         if k not in ("top_k_accuracy", "recall_at_k", "cmc")})


def test_evaluate_loaders_matches_embeddings():
    query, query_labels, gallery, gallery_labels = _problem(seed=3)
    model = nn.Linear(4, 3)
    out = evaluate_loaders(
        model, [(gallery[:20], gallery_labels[:20]), (gallery[20:], gallery_labels[20:])],
        [(query, query_labels)], metric="euclid", device="cpu", chunk_size=3,
    )
    with torch.no_grad():
        expected = evaluate_embeddings(model(query), query_labels, model(gallery), gallery_labels,
                                       metric="euclid")
    assert out["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert out["accuracy"] == expected["accuracy"]


def test_streaming_errors():
    query, query_labels, gallery, gallery_labels = _problem(seed=1)
    with pytest.raises(ValueError, match="query_labels has 18 entries"):
        evaluate_embeddings(query, query_labels[:-1], gallery, gallery_labels)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_embeddings(query, query_labels, gallery, gallery_labels, chunk_size=0)
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate_embeddings(query, query_labels, gallery, gallery_labels, metric="l2")
    with pytest.raises(ValueError, match="ks"):
        evaluate_embeddings(query, query_labels, gallery, gallery_labels, ks=())


@pytest.mark.parametrize("metric", METRICS)
def test_faiss_top_k_metrics_match_torch(metric):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(4)
    # Continuous embeddings: no ties, so FAISS order equals the pessimistic order.
    query, gallery = torch.randn(25, 8, generator=gen), torch.randn(70, 8, generator=gen)
    gallery_labels = torch.randint(0, 10, (70,), generator=gen)
    query_labels = torch.randint(0, 12, (25,), generator=gen)
    ks = (1, 3, 10)
    exact = evaluate_embeddings(query, query_labels, gallery, gallery_labels, metric, ks)
    fast = evaluate_embeddings(query, query_labels, gallery, gallery_labels, metric, ks,
                               chunk_size=7, use_faiss=True)
    assert fast["accuracy"] == exact["accuracy"]
    assert fast["top_k_accuracy"] == exact["top_k_accuracy"]
    for k in ks:
        assert fast["recall_at_k"][k] == pytest.approx(exact["recall_at_k"][k])
    torch.testing.assert_close(fast["cmc"], exact["cmc"][:10])
    assert "mAP" not in fast


def test_faiss_missing_gives_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    query, query_labels, gallery, gallery_labels = _problem(seed=1)
    with pytest.raises(ImportError, match=r"pip install 'recognite\[faiss\]'"):
        evaluate_embeddings(query, query_labels, gallery, gallery_labels, use_faiss=True)


def test_nan_when_no_query_has_positives():
    out = evaluate_embeddings(torch.ones(2, 3), torch.tensor([8, 9]), torch.ones(4, 3),
                              torch.tensor([0, 1, 2, 3]))
    assert out["accuracy"] == 0.0
    assert math.isnan(out["mAP"]) and math.isnan(out["map_at_r"])
    assert np.isnan(out["cmc"].numpy()).all()


def test_gallery_views_at_a_column_pooled_size_equal_the_best_view_matrix():
    """Galleries of 2 * 4096 items or more have each chunk's product split by columns, for every view."""
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(9000, 2, 16, generator=gen)
    gallery_labels = torch.randint(0, 900, (9000,), generator=gen)
    query, query_labels = torch.randn(70, 16, generator=gen), torch.randint(0, 900, (70,), generator=gen)
    best = torch.maximum(pairwise_scores(query, views[:, 0].contiguous(), "cosine"),
                         pairwise_scores(query, views[:, 1].contiguous(), "cosine"))
    expected = evaluate_scores(best, gallery_labels, query_labels, ks=(1, 5))
    got = evaluate_embeddings(query, query_labels, views, gallery_labels, ks=(1, 5))
    assert got["mAP"] == expected["mAP"] and got["accuracy"] == expected["accuracy"]
    assert torch.equal(got["per_query"].max_pos, expected["per_query"].max_pos)
    assert torch.equal(got["per_query"].max_neg, expected["per_query"].max_neg)
