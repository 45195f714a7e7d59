"""Query expansion and database augmentation against a plain dense computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recognite.gallery.rerank import database_augmentation, query_expansion


def _dense(points, gallery, k, alpha, skip_self):
    points, gallery = F.normalize(points, dim=1), F.normalize(gallery, dim=1)
    out = []
    for i, p in enumerate(points):
        sims = gallery @ p
        order = sorted(range(len(gallery)), key=lambda j: -float(sims[j]))
        if skip_self:
            order = [j for j in order if j != i]
        total = p.clone()
        for j in order[:k]:
            total += max(float(sims[j]), 0.0) ** alpha * gallery[j] if alpha else gallery[j]
        out.append(F.normalize(total, dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("k, alpha", [(1, 0.0), (2, 3.0), (5, 1.0)])
def test_both_equal_the_dense_computation_in_any_chunking(k, alpha):
    gen = torch.Generator().manual_seed(k)
    gallery = torch.randn(9, 4, generator=gen)
    queries = torch.randn(6, 4, generator=gen) * 3
    expected_q = _dense(queries, gallery, k, alpha, False)
    expected_g = _dense(gallery, gallery, k, alpha, True)
    for chunk in (1, 7, 10**6):  # one score per product ... everything at once
        torch.testing.assert_close(query_expansion(queries, gallery, k, alpha, chunk_size=chunk), expected_q)
        torch.testing.assert_close(database_augmentation(gallery, k, alpha, chunk_size=chunk), expected_g)


def test_hand_computed_example():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[0.6, 0.8]])  # nearest: [0, 1] (0.8)
    # alpha 1: q + 0.8 * g1 = (0.6, 1.6) / |.|
    expected = torch.tensor([[0.6, 1.6]]) / (0.6**2 + 1.6**2) ** 0.5
    torch.testing.assert_close(query_expansion(query, gallery, k=1, alpha=1.0), expected)
    # DBA of orthogonal items adds nothing (weight 0**alpha = 0)
    torch.testing.assert_close(database_augmentation(gallery, k=1, alpha=3.0), gallery)
    with pytest.raises(ValueError, match="k"):
        query_expansion(query, gallery, k=0)


def test_recognize_with_query_expansion_equals_searching_the_expanded_queries():
    from recognite.gallery import GalleryIndex

    gen = torch.Generator().manual_seed(3)
    refs = torch.randn(12, 6, generator=gen)
    labels = [f"l{i % 5}" for i in range(12)]
    queries = torch.randn(4, 6, generator=gen)
    for aggregation in ("all", "mean"):
        gallery = GalleryIndex(aggregation=aggregation)
        gallery.add(refs, labels)
        rows = gallery._searchable()[0]
        got = gallery.recognize(queries, k=3, threshold=0.2, query_expansion=2)
        want = gallery.recognize(query_expansion(queries, rows, k=2), k=3, threshold=0.2)
        assert got.labels == want.labels and got.predictions == want.predictions
        torch.testing.assert_close(got.scores, want.scores)
        assert gallery.recognize(queries, k=3, query_expansion=0).labels == gallery.recognize(queries, k=3).labels
