"""Score matrices: the four metrics against explicit formulas, loaders, model state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recognite.eval import METRICS, embed_loader, pairwise_scores, score_matrix
from recognite.utils import avg_ref_embs

# Unequal norms on purpose, and a zero vector in the gallery.
QUERIES = torch.tensor([[3.0, 0.0, 4.0], [0.1, 0.2, -0.3], [-2.0, 5.0, 1.0]])
GALLERY = torch.tensor(
    [[1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 7.0]]
)


def _reference(query: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    out = np.zeros((len(query), len(gallery)))
    for i, q in enumerate(query):
        for j, g in enumerate(gallery):
            if metric == "inner":
                out[i, j] = q @ g
            elif metric == "cosine":
                denom = np.linalg.norm(q) * np.linalg.norm(g)
                out[i, j] = 0.0 if denom == 0 else q @ g / denom
            elif metric == "euclid":
                out[i, j] = -np.linalg.norm(q - g)
            else:
                out[i, j] = -np.sum((q - g) ** 2)
    return out


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_scores_match_explicit_formula(metric):
    expected = _reference(QUERIES.double().numpy(), GALLERY.double().numpy(), metric)
    got = pairwise_scores(QUERIES, GALLERY, metric)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # Chunked computation (one query per chunk) gives the same numbers.
    np.testing.assert_allclose(
        pairwise_scores(QUERIES, GALLERY, metric, memory_budget=1).numpy(), got.numpy(), rtol=1e-6
    )


def test_cosine_is_scale_invariant_per_vector():
    scales_q = torch.tensor([[0.01], [7.0], [123.0]])
    scales_g = torch.tensor([[2.0], [0.5], [33.0], [1.0], [1e-3]])
    a = pairwise_scores(QUERIES, GALLERY, "cosine")
    b = pairwise_scores(QUERIES * scales_q, GALLERY * scales_g, "cosine")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_metric_suggests():
    with pytest.raises(ValueError, match="Did you mean: cosine"):
        pairwise_scores(QUERIES, GALLERY, "cosin")
    with pytest.raises(ValueError, match="dimension"):
        pairwise_scores(QUERIES[:, :2], GALLERY, "inner")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.linear(x)))


def _loader(images: torch.Tensor, labels: torch.Tensor, batch: int):
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(images), batch)]


@pytest.mark.parametrize("metric", METRICS)
def test_score_matrix_uses_eval_mode_and_restores_it(metric):
    gen = torch.Generator().manual_seed(0)
    model = _Net()
    model.train()
    model.norm.eval()  # a frozen submodule must stay frozen afterwards
    gal_images, query_images = torch.randn(7, 4, generator=gen), torch.randn(5, 4, generator=gen)
    gal_labels, query_labels = torch.tensor([0, 1, 1, 2, 3, 3, 3]), torch.tensor([1, 3, 0, 9, 2])
    scores, got_gal, got_query = score_matrix(
        model, _loader(gal_images, gal_labels, 3), _loader(query_images, query_labels, 2),
        metric=metric, device="cpu",
    )
    assert model.training and model.linear.training and not model.norm.training
    model.eval()
    with torch.no_grad():
        expected = pairwise_scores(model(query_images), model(gal_images), metric)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(got_gal, gal_labels) and torch.equal(got_query, query_labels)
    assert not scores.requires_grad


def test_score_matrix_agg_gal_fn_and_get_embeddings_fn():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    gal = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    calls = []

    def embed(m, images):
        calls.append(images.shape[0])
        return m(images) * 10

    scores, gal_labels, query_labels = score_matrix(
        model, [(gal, torch.tensor([5, 5, 2]))], [(torch.tensor([[1.0, 1.0]]), [5])],
        metric="inner", device="cpu", agg_gal_fn=avg_ref_embs, get_embeddings_fn=embed,
    )
    # Gallery embeddings (x10): [10,0], [30,40], [0,80] -> label 2: [0,80]; label 5: [20,20].
    assert gal_labels.tolist() == [2, 5]
    assert query_labels.tolist() == [5]
    assert scores.tolist() == [[1600.0, 600.0]]  # query embedding [10, 20]
    assert calls == [3, 1]


def test_embed_loader_errors():
    with pytest.raises(ValueError, match="no batches"):
        embed_loader(nn.Identity(), [], device="cpu")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        embed_loader(lambda x: x, [(torch.zeros(1, 2), [0])], device="cpu")
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        embed_loader(nn.Identity(), [(torch.zeros(1, 2, 2), [0])], device="cpu")


@pytest.mark.parametrize("metric", METRICS)
def test_batched_scores_match_pairwise(metric):
    from recognite.eval.scores import batched_pairwise_scores

    gen = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 6, 5, generator=gen) * 3
    batched = batched_pairwise_scores(queries, gallery, metric)
    for b in range(3):
        torch.testing.assert_close(batched[b], pairwise_scores(queries[b], gallery[b], metric))


def test_one_device_resolver_accepts_auto_everywhere():
    from recognite.utils.device import resolve_device

    model = nn.Linear(3, 2)
    embeddings, labels = embed_loader(model, [(QUERIES, torch.tensor([0, 1, 2]))], device="auto")
    assert embeddings.shape == (3, 2) and labels.tolist() == [0, 1, 2]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize("dim", [3, 64, 300])
def test_a_query_scores_the_same_bits_in_any_chunk(dim):
    """Short chunks are zero-padded to 64 rows and longer ones run as one product: either way a
    query's scores equal its row of the full product bit for bit."""
    from recognite.eval.scores import _GalleryScorer

    gen = torch.Generator().manual_seed(dim)
    queries, gallery = torch.randn(300, dim, generator=gen), torch.randn(2001, dim, generator=gen)
    for metric in ("inner", "cosine"):
        scorer = _GalleryScorer(gallery, metric)
        full = scorer(queries)
        for start, size in ((7, 1), (0, 5), (10, 63), (3, 64), (100, 130)):
            assert torch.equal(scorer(queries[start:start + size]), full[start:start + size]), (metric, size)


def test_a_short_chunk_is_padded_within_the_callers_buffer():
    """A chunk of fewer than 64 queries computes its padded product in the caller's buffer (no
    temporary as large as the product) and keeps the bits of the full product."""
    from recognite.eval.scores import SCORE_BLOCK_ROWS, _GalleryScorer

    gen = torch.Generator().manual_seed(4)
    queries, gallery = torch.randn(200, 12, generator=gen), torch.randn(333, 12, generator=gen)
    for metric in METRICS:
        scorer = _GalleryScorer(gallery, metric)
        full = scorer(queries)
        buffer = torch.full((SCORE_BLOCK_ROWS + 3, 333), float("nan"))
        for start, size in ((7, 1), (10, 63), (3, 64), (0, 67)):
            got = scorer(queries[start:start + size], out=buffer)
            assert got.shape == (size, 333) and got.data_ptr() == buffer.data_ptr(), (metric, size)
            assert torch.equal(got, full[start:start + size]), (metric, size)


@pytest.mark.parametrize("dim", [3, 64, 300])
def test_a_chunk_product_pooled_by_columns_keeps_the_bits(dim):
    """A CPU chunk's product split into blocks of 4096-8191 gallery columns (work items of a pool)
    equals the product in one piece bit for bit, for long and short (padded) chunks."""
    from recognite.eval.scores import (
        PRODUCT_BLOCK_COLUMNS,
        SCORE_BLOCK_ROWS,
        _GalleryScorer,
    )

    gen = torch.Generator().manual_seed(dim)
    num_gallery = 3 * PRODUCT_BLOCK_COLUMNS + 1234
    queries, gallery = torch.randn(80, dim, generator=gen), torch.randn(num_gallery, dim, generator=gen)
    for metric in METRICS:
        scorer = _GalleryScorer(gallery, metric)
        for size in (80, 5):
            buffer = torch.full((max(size, SCORE_BLOCK_ROWS), num_gallery), float("nan"))
            got = scorer.pooled(queries[:size], buffer, workers=2)
            assert got.data_ptr() == buffer.data_ptr()
            assert torch.equal(got, scorer(queries[:size])), (metric, size)
            assert torch.equal(got, pairwise_scores(queries, gallery, metric)[:size]), (metric, size)


@pytest.mark.parametrize("metric", ["inner", "cosine", "sq_euclid"])
def test_pooled_cpu_product_equals_the_product_row_block_by_row_block(metric):
    from recognite.eval.scores import PRODUCT_BLOCK_ROWS, _GalleryScorer

    gen = torch.Generator().manual_seed(11)
    queries = torch.randn(2 * PRODUCT_BLOCK_ROWS + 77, 24, generator=gen)  # pooled: several blocks and a short tail
    gallery = torch.randn(301, 24, generator=gen)
    scorer = _GalleryScorer(gallery, metric)
    expected = torch.cat([scorer(part) for part in queries.split(100)])
    threads = torch.get_num_threads()
    assert torch.equal(pairwise_scores(queries, gallery, metric), expected)
    assert torch.get_num_threads() == threads  # the pool reads the caller's setting, never changes it
