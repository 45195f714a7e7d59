"""Every retrieval metric in one pass, with memory bounded by a chunk size (not by ``Q * G``).

:func:`evaluate_embeddings` scores chunks of queries against the whole gallery, reduces each chunk
to per-query statistics (counts and ranks of positives) and drops the chunk. Results are identical
to the full-matrix functions of :mod:`recognite.eval` (same statistics, same tie rules), which
:func:`evaluate_scores` applies to an existing score matrix. Peak memory is about
``gallery + memory_budget``: e.g. ``Q = 1000`` queries against ``G = 1,000,000`` gallery items of
``D = 128`` needs the 512 MB gallery plus a 256 MB budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ._checks import (
    DEFAULT_MEMORY_BUDGET,
    as_labels,
    check_k,
    check_ks,
    check_scores,
    rows_per_chunk,
)
from ._engine import LabelIndex, Workspace, chunk_stats, merge_chunks
from .ranking import cmc_from_first_ranks
from .scores import (
    SCORE_BLOCK_ROWS,
    EmbeddingsFn,
    _check_embeddings,
    _GalleryScorer,
    check_metric,
    embed_loader,
    resolve_device,
)

__all__ = ["PerQueryStats", "evaluate_embeddings", "evaluate_loaders", "evaluate_scores"]

logger = logging.getLogger(__name__)


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")


def _summarize(
    stats: dict[str, Any], ks: Sequence[int], num_gallery: int, cmc_max_rank: int | None
) -> dict[str, Any]:
    num_pos: torch.Tensor = stats["num_pos"]
    has_pos = num_pos > 0
    first_rank: torch.Tensor = stats["first_rank"]
    num_queries = first_rank.numel()
    recall_hits: torch.Tensor = stats["recall_hits"]
    recall_per_query = recall_hits.double() / num_pos.clamp(min=1).double().unsqueeze(1)
    length = num_gallery if cmc_max_rank is None else min(cmc_max_rank, num_gallery)
    return {
        "accuracy": float(torch.count_nonzero(first_rank <= 1)) / num_queries,
        "top_k_accuracy": {
            k: float(torch.count_nonzero(first_rank <= k)) / num_queries for k in ks
        },
        "recall_at_k": {k: _mean(recall_per_query[has_pos, i]) for i, k in enumerate(ks)},
        "cmc": cmc_from_first_ranks(first_rank, num_pos, length),
        "mAP": _mean(stats["ap"][has_pos]),
        "AP": stats["ap"],
        "map_at_r": _mean(stats["map_at_r"][has_pos]),
        "r_precision": _mean(stats["r_precision"][has_pos]),
        "hard_pos_mean": _mean(stats["min_pos"][has_pos]),
        "hard_neg_mean": _mean(stats["max_neg"][stats["num_neg"] > 0]),
        "num_queries": num_queries,
        "num_queries_with_positives": int(torch.count_nonzero(has_pos)),
        "per_query": PerQueryStats(**{key: stats[key] for key in PerQueryStats.KEYS}),
    }


@dataclass(eq=False)
class PerQueryStats:
    """Per-query statistics of the engine, ``(Q,)`` each (the inputs of :mod:`recognite.eval.open_set`).

    Attributes:
        num_pos: Number of gallery items with the query's label.
        num_neg: Number of other gallery items.
        max_pos: Best positive score (``-inf`` without positives).
        min_pos: Hardest (lowest) positive score (``+inf`` without positives).
        max_neg: Hardest (highest) negative score (``-inf`` without negatives).
        first_rank: Pessimistic rank of the best positive (``1 + #negatives >= it``).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("num_pos", "num_neg", "max_pos", "min_pos", "max_neg", "first_rank")

    num_pos: torch.Tensor
    num_neg: torch.Tensor
    max_pos: torch.Tensor
    min_pos: torch.Tensor
    max_neg: torch.Tensor
    first_rank: torch.Tensor

    def cpu(self) -> PerQueryStats:
        """The same statistics on the CPU."""
        return PerQueryStats(**{key: getattr(self, key).cpu() for key in self.KEYS})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerQueryStats):
            return NotImplemented
        return all(torch.equal(getattr(self, key), getattr(other, key)) for key in self.KEYS)


_RESULT_DOC = """
    Returns:
        Dict with ``accuracy`` (top-1, all queries), ``top_k_accuracy`` and ``recall_at_k``
        (``{k: float}`` for each ``k`` in ``ks``), ``cmc`` (``(min(cmc_max_rank, G),)`` float64),
        ``mAP``, ``AP`` (``(Q,)`` per query, ``nan`` without positives), ``map_at_r``,
        ``r_precision``, ``hard_pos_mean`` / ``hard_neg_mean`` (mean of
        :func:`~recognite.eval.hard_pos_neg_scores`), ``num_queries`` and
        ``num_queries_with_positives`` and ``per_query``, a :class:`PerQueryStats` (best and
        hardest positive, hardest negative, counts, first rank per query), the statistics that
        :mod:`recognite.eval.open_set` works from. Each value equals the matching full-matrix function
        (:func:`~recognite.eval.accuracy`, :func:`~recognite.eval.top_k_accuracy`,
        :func:`~recognite.eval.recall_at_k`, :func:`~recognite.eval.cmc`,
        :func:`~recognite.eval.pr_metrics` ``['mAP']``, :func:`~recognite.eval.map_at_r`,
        :func:`~recognite.eval.r_precision`).
"""


def evaluate_scores(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    cmc_max_rank: int | None = None,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """All retrieval metrics from an existing ``(Q, G)`` score matrix, in one chunked pass.

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.
        query_labels: ``(Q,)`` integer labels.
        ks: the ``k`` values of top-k accuracy and recall@k.
        cmc_max_rank: length of the CMC curve (default ``G``).
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB).
    """
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    ks = check_ks(ks)
    if cmc_max_rank is not None:
        check_k(cmc_max_rank, "cmc_max_rank")
    budget = memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET
    chunk = rows_per_chunk(scores.shape[1], budget)
    label_index = LabelIndex(gallery_labels)
    workspace = Workspace()
    parts = [
        chunk_stats(
            scores[start : start + chunk], label_index, query_labels[start : start + chunk],
            ks, budget, workspace=workspace,
        )
        for start in range(0, scores.shape[0], chunk)
    ]
    return _summarize(merge_chunks(parts), ks, scores.shape[1], cmc_max_rank)


evaluate_scores.__doc__ = (evaluate_scores.__doc__ or "") + _RESULT_DOC


def _chunk_scores(scorer: _GalleryScorer, queries: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A chunk's scores in the first rows of ``buffer``; on the CPU the product is split by gallery
    columns as work items of the caller's thread count (the same bits)."""
    if buffer.device.type == "cpu":
        return scorer.pooled(queries, buffer, torch.get_num_threads())
    return scorer(queries, out=buffer)


def evaluate_embeddings(
    query_embs: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_embs: torch.Tensor,
    gallery_labels: torch.Tensor,
    metric: str = "cosine",
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    cmc_max_rank: int | None = None,
    use_faiss: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    rerank: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """All retrieval metrics for query and gallery embeddings, with bounded memory.

    Queries are scored in chunks of ``chunk_size`` rows against the whole gallery; each
    ``(chunk_size, G)`` block is reduced to per-query statistics and freed. Exact: identical to
    the full-matrix functions on ``pairwise_scores(query_embs, gallery_embs, metric)``.

    Args:
        query_embs: ``(Q, D)`` query embeddings.
        query_labels: ``(Q,)`` integer labels.
        gallery_embs: ``(G, D)`` gallery embeddings, or ``(G, V, D)``: ``V`` embeddings per
            gallery item (enrolment views), each item scored by its best view.
        gallery_labels: ``(G,)`` integer labels.
        metric: ``'inner'``, ``'cosine'``, ``'euclid'`` or ``'sq_euclid'`` (see
            :func:`~recognite.eval.pairwise_scores`).
        ks: the ``k`` values of top-k accuracy and recall@k.
        chunk_size: queries per chunk; default: as many as fit ``memory_budget``.
        memory_budget: bytes of working memory per chunk (default 256 MiB); sets ``chunk_size``
            when that is not given (about 16 bytes per score; on the CPU at least 64 queries,
            whose product a shorter chunk computes anyway: the CPU engine's other temporaries
            do not grow with the chunk).
        cmc_max_rank: length of the CMC curve (default ``G``).
        use_faiss: find each chunk's top ``max(ks)`` items with FAISS (optional extra
            ``faiss-cpu``) instead of ``torch``; only the top-k metrics (``accuracy``,
            ``top_k_accuracy``, ``recall_at_k``, ``cmc`` up to ``max(ks)``) are returned then,
            and ties follow FAISS's order instead of the pessimistic rule.
        device: where to compute (default: the gallery's device).
        progress: show a tqdm progress bar over chunks.
        rerank: applied to every ``(chunk, G)`` block of scores before it is reduced (it may
            overwrite the block), e.g. the k-reciprocal re-ranking
            ``recognite.gallery.k_reciprocal.KReciprocalGallery(gallery_embs).rerank_scores``; the
            metrics are then those of the re-ranked scores, memory stays bounded by the chunk.
    """
    query_embs = _check_embeddings(query_embs, "query_embs")
    gallery_views = None
    if isinstance(gallery_embs, torch.Tensor) and gallery_embs.dim() == 3:  # (G, V, D): best view
        gallery_views = [_check_embeddings(gallery_embs[:, v].contiguous(), "gallery_embs")
                         for v in range(gallery_embs.shape[1])]
        if not gallery_views:
            raise ValueError("gallery_embs of shape (G, V, D) needs V >= 1 views")
        gallery_embs = gallery_views[0]
    gallery_embs = _check_embeddings(gallery_embs, "gallery_embs")
    query_labels = as_labels(query_labels, "query_labels")
    gallery_labels = as_labels(gallery_labels, "gallery_labels")
    if query_labels.numel() != query_embs.shape[0]:
        raise ValueError(
            f"query_labels has {query_labels.numel()} entries but query_embs has "
            f"{query_embs.shape[0]} rows"
        )
    if gallery_labels.numel() != gallery_embs.shape[0]:
        raise ValueError(
            f"gallery_labels has {gallery_labels.numel()} entries but gallery_embs has "
            f"{gallery_embs.shape[0]} rows"
        )
    if query_embs.shape[0] == 0 or gallery_embs.shape[0] == 0:
        raise ValueError(
            f"need at least one query and one gallery item, got Q={query_embs.shape[0]}, "
            f"G={gallery_embs.shape[0]}"
        )
    check_metric(metric)
    ks = check_ks(ks)
    if cmc_max_rank is not None:
        check_k(cmc_max_rank, "cmc_max_rank")
    budget = memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET
    num_gallery = gallery_embs.shape[0]
    device = torch.device(device) if device is not None else gallery_embs.device
    if chunk_size is None:
        chunk_size = rows_per_chunk(num_gallery, budget)
        if device.type == "cpu":
            # The CPU engine's temporaries are bounded per block, not per score; a chunk of fewer
            # than SCORE_BLOCK_ROWS queries would compute (and hold) that many rows' product anyway.
            chunk_size = max(chunk_size, SCORE_BLOCK_ROWS)
    else:
        chunk_size = check_k(chunk_size, "chunk_size")
    gallery_embs = gallery_embs.to(device)
    gallery_labels = gallery_labels.to(device)
    query_labels = query_labels.to(device)
    if rerank is not None and not callable(rerank):
        raise TypeError(f"rerank must be a function of a (chunk, G) score block, got {type(rerank).__name__}")
    if use_faiss:
        if rerank is not None or gallery_views is not None:
            raise ValueError("rerank and (G, V, D) gallery views need the exact scores of every chunk: "
                             "use them with use_faiss=False")
        from ._faiss import faiss_top_k_metrics

        return faiss_top_k_metrics(
            query_embs, query_labels, gallery_embs, gallery_labels, metric, ks, chunk_size
        )
    scorer = _GalleryScorer(gallery_embs, metric)
    view_scorers = [_GalleryScorer(view.to(device), metric) for view in (gallery_views or [])[1:]]
    label_index = LabelIndex(gallery_labels)
    workspace = Workspace()
    starts = range(0, query_embs.shape[0], chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="chunk")
    parts = []
    # reused by every chunk; a chunk shorter than SCORE_BLOCK_ROWS is padded within it
    buffer = torch.empty(
        (max(min(chunk_size, query_embs.shape[0]), SCORE_BLOCK_ROWS), num_gallery), dtype=gallery_embs.dtype,
        device=device,
    )
    view_buffer = torch.empty_like(buffer) if view_scorers else buffer  # the other views' scores
    for start in starts:
        chunk_queries = query_embs[start : start + chunk_size].to(device)
        scores = _chunk_scores(scorer, chunk_queries, buffer)
        for view_scorer in view_scorers:
            torch.maximum(scores, _chunk_scores(view_scorer, chunk_queries, view_buffer), out=scores)
        if rerank is not None:
            scores = rerank(scores)
        parts.append(
            chunk_stats(
                scores, label_index, query_labels[start : start + chunk_size], ks, budget,
                workspace=workspace,
            )
        )
        del scores
    logger.debug("evaluated %d queries in %d chunks", query_embs.shape[0], len(parts))
    return _summarize(merge_chunks(parts), ks, num_gallery, cmc_max_rank)


evaluate_embeddings.__doc__ = (evaluate_embeddings.__doc__ or "") + _RESULT_DOC


def evaluate_loaders(
    model: nn.Module,
    dl_gal: Iterable[Any],
    dl_quer: Iterable[Any],
    metric: str = "cosine",
    ks: Sequence[int] = (1, 5, 10),
    device: str | torch.device | None = None,
    agg_gal_fn: Any = None,
    get_embeddings_fn: EmbeddingsFn | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Embed a gallery and a query loader with ``model``, then :func:`evaluate_embeddings`.

    Arguments as in :func:`~recognite.eval.score_matrix`; extra keyword arguments go to
    :func:`evaluate_embeddings`. Only embeddings (``(Q + G) * D``) are held, never ``Q * G`` scores.
    """
    gallery_embs, gallery_labels = embed_loader(model, dl_gal, device, get_embeddings_fn)
    if agg_gal_fn is not None:
        gallery_embs, gallery_labels = agg_gal_fn(gallery_embs, gallery_labels)
    query_embs, query_labels = embed_loader(model, dl_quer, device, get_embeddings_fn)
    kwargs.setdefault("device", resolve_device(device))
    return evaluate_embeddings(
        query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=ks, **kwargs
    )
