"""Exact search against a brute-force reference, label-level top-k, chunking, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recognite.gallery import GalleryIndex, _search
from recognite.gallery._search import exact_topk, first_distinct


def _fixture(seed=0, num_refs=37, dim=7, num_queries=13):
    """Uneven label sizes (1..8 refs), unequal norms, exact duplicate directions across labels."""
    rng = np.random.default_rng(seed)
    refs = rng.normal(size=(num_refs, dim)) * rng.uniform(0.1, 10.0, size=(num_refs, 1))
    sizes = [8, 1, 5, 1, 3, 2, 6, 1, 4, 2, 4]
    assert sum(sizes) == num_refs
    labels = [f"L{j}" for j, n in enumerate(sizes) for _ in range(n)]
    order = rng.permutation(num_refs)  # interleave labels
    refs, labels = refs[order], [labels[i] for i in order]
    # tie: reference 3 of another label points exactly the same way as reference 0 (x4 is exact)
    j = next(i for i, lab in enumerate(labels) if lab != labels[0])
    refs[j] = 4.0 * refs[0]
    queries = rng.normal(size=(num_queries, dim)) * rng.uniform(0.5, 3.0, size=(num_queries, 1))
    queries[0] = refs[0] * 0.25  # top-2 labels tie exactly
    return refs.astype(np.float32), labels, queries.astype(np.float32)


@pytest.mark.parametrize("aggregation", ["all", "mean"])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
@pytest.mark.parametrize("k", [1, 3, 11, 20])
def test_search_equals_brute_force(aggregation, chunk_size, k, reference):
    refs, labels, queries = _fixture()
    gallery = GalleryIndex(aggregation=aggregation)
    gallery.add(torch.from_numpy(refs[:20]), labels[:20])
    gallery.add(refs[20:], labels[20:])  # numpy input, second batch
    result = gallery.search(torch.from_numpy(queries), k=k, chunk_size=chunk_size)
    ref_scores, ref_labels = reference.label_scores(queries, refs, labels, aggregation)
    assert gallery.labels == ref_labels
    reference.assert_matches_reference(result, ref_scores, ref_labels, k)
    codes = result.label_codes.tolist()
    assert [[gallery.labels[c] for c in row] for row in codes] == result.labels


def test_tied_query_returns_both_tied_labels():
    refs, labels, queries = _fixture()
    gallery = GalleryIndex()
    gallery.add(refs, labels)
    result = gallery.search(queries[:1], k=2)
    j = next(i for i, lab in enumerate(labels) if lab != labels[0])
    assert set(result.labels[0]) == {labels[0], labels[j]}
    assert result.scores[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_all_aggregation_reports_best_reference_of_each_label(reference):
    refs, labels, queries = _fixture()
    gallery = GalleryIndex()
    gallery.add(refs, labels, ids=[f"img{i}.jpg" for i in range(len(labels))])
    result = gallery.search(queries, k=4)
    q, r = reference.normalize(queries), reference.normalize(refs)
    for qi in range(len(queries)):
        for lab, idx, ref_id, s in zip(result.labels[qi], result.reference_indices[qi].tolist(),
                                       result.reference_ids[qi], result.scores[qi].tolist()):
            assert labels[idx] == lab
            assert ref_id == f"img{idx}.jpg"
            assert q[qi] @ r[idx] == pytest.approx(s, abs=1e-5)


def test_label_topk_is_over_labels_not_references():
    # label "crowd" has 6 references around the query; raw top-3 would be all "crowd"
    base = torch.tensor([1.0, 0.0, 0.0])
    crowd = torch.stack([base + 0.01 * i * torch.tensor([0.0, 1.0, 0.0]) for i in range(6)])
    refs = torch.cat([crowd, torch.tensor([[0.5, 1.0, 0.0], [0.2, 0.0, 1.0], [-1.0, 0.0, 0.0]])])
    labels = ["crowd"] * 6 + ["b", "c", "d"]
    gallery = GalleryIndex()
    gallery.add(refs, labels)
    query = torch.tensor([[1.0, 0.0, 0.0]])
    assert gallery.search_references(query, k=3).labels == [["crowd"] * 3]
    result = gallery.search(query, k=3)
    assert result.labels == [["crowd", "b", "c"]]
    assert result.scores[0].tolist() == pytest.approx([1.0, 0.5 / 1.25**0.5, 0.2 / 1.04**0.5], abs=1e-6)


def test_candidate_cap_retry_path(monkeypatch, reference):
    """With the first candidate list capped below what is needed, rows are searched again."""
    monkeypatch.setattr(_search, "_MAX_FIRST_CANDIDATES", 2)
    refs, labels, queries = _fixture(seed=3)
    gallery = GalleryIndex()
    gallery.add(refs, labels)
    result = gallery.search(queries, k=6, chunk_size=4)
    ref_scores, ref_labels = reference.label_scores(queries, refs, labels)
    reference.assert_matches_reference(result, ref_scores, ref_labels, 6)


def test_mean_aggregation_by_hand():
    refs = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 3.0]])
    query = torch.tensor([[1.0, 0.0, 1.0]])
    mean = GalleryIndex(aggregation="mean")
    mean.add(refs, ["a", "a", "b"])
    res = mean.search(query, k=2)
    # prototype a = normalize((1,0,0)+(0,1,0)) = (1,1,0)/sqrt2 -> score 1/2; b = (0,0,1) -> 1/sqrt2
    assert res.labels == [["b", "a"]]
    assert res.scores[0].tolist() == pytest.approx([2**-0.5, 0.5], abs=1e-6)
    assert res.reference_indices.tolist() == [[-1, -1]]
    full = GalleryIndex(aggregation="all")
    full.add(refs, ["a", "a", "b"])
    res_all = full.search(query, k=2)  # a's best reference (1,0,0) also scores 1/sqrt2: a tie
    assert res_all.scores[0].tolist() == pytest.approx([2**-0.5, 2**-0.5], abs=1e-6)
    assert set(res_all.labels[0]) == {"a", "b"}


def test_search_references_equals_brute_force(reference):
    refs, labels, queries = _fixture(seed=1)
    for aggregation in ("all", "mean"):
        gallery = GalleryIndex(aggregation=aggregation)
        gallery.add(refs, labels)
        res = gallery.search_references(queries, k=5, chunk_size=3)
        full = reference.normalize(queries) @ reference.normalize(refs).T
        expected = -np.sort(-full, axis=1)[:, :5]
        np.testing.assert_allclose(res.scores.numpy(), expected, atol=1e-5)
        got = full[np.arange(len(queries))[:, None], res.reference_indices.numpy()]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert res.labels == [[labels[i] for i in row] for row in res.reference_indices.tolist()]


def test_single_vector_query_and_k_capped():
    gallery = GalleryIndex()
    gallery.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["x", "y"])
    res = gallery.search(torch.tensor([3.0, 1.0]), k=10)
    assert res.labels == [["x", "y"]]
    assert res.scores.shape == (1, 2)


def test_exact_topk_memory_is_bounded_by_chunk_size(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(1000, 8, generator=gen)
    queries = torch.randn(50, 8, generator=gen)
    seen = []
    real_topk = torch.topk

    def spy(x, *args, **kwargs):
        seen.append(x.numel())
        return real_topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    scores, idx = exact_topk(queries, matrix, 4, chunk_size=200)
    monkeypatch.undo()
    assert max(seen) <= 200 + 50 * 8  # a block of scores, or the merge of two top-4 lists
    full = queries @ matrix.T
    np.testing.assert_allclose(scores.numpy(), torch.topk(full, 4).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(torch.gather(full, 1, idx).numpy(), scores.numpy(), atol=1e-5)


def test_first_distinct_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.1, -1.0, float("-inf"), float("-inf")]])
    indices = torch.tensor([[4, 0, 3, 1, 2], [2, 0, 1, -1, -1]])
    row_codes = torch.tensor([1, 2, 0, 1, 1])  # rows 0, 3 and 4 share code 1
    s, i, c, found = first_distinct(scores, indices, row_codes, 3)
    assert c.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert i.tolist() == [[4, 1, 2], [2, 0, 1]]
    assert s.flatten().tolist() == pytest.approx([0.9, 0.6, 0.5, 0.9, 0.1, -1.0])
    assert found.tolist() == [3, 3]
    s, i, c, found = first_distinct(scores[1:, :2], indices[1:, :2], row_codes, 3)
    assert c.tolist() == [[0, 1, -1]] and found.tolist() == [2] and s[0, 2] == float("-inf")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_gives_cpu_answers(reference):
    refs, labels, queries = _fixture(seed=2)
    gallery = GalleryIndex(device="cuda")
    gallery.add(refs, labels)
    result = gallery.search(queries, k=4, chunk_size=16)
    assert result.scores.device.type == "cpu"
    ref_scores, ref_labels = reference.label_scores(queries, refs, labels)
    reference.assert_matches_reference(result, ref_scores, ref_labels, 4)
