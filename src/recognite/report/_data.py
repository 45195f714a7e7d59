"""The numbers behind a report: per-query statistics, curves and tables, in bounded memory (private).

Everything here works on embeddings: queries are scored against the gallery in chunks of rows,
each chunk is reduced to per-query statistics and dropped, so memory does not grow with ``Q * G``
beyond one chunk. The pooled precision-recall curve needs every positive score first, so the
scores are computed in two passes (a matrix product each; cheap next to computing embeddings).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recognite.eval import evaluate_embeddings, pairwise_scores, pr_metrics
from recognite.eval import open_set_rates as open_set_rates_of_stats
from recognite.eval.scores import check_metric
from recognite.utils.validate import check_int

RECALL_GRID = np.linspace(0.0, 1.0, 101)
"""Recall levels at which per-query PR curves are interpolated before they are averaged."""

_DEFAULT_BUDGET = 64 * 1024**2


@dataclass
class ReportData:
    """Per-query statistics, curves and score samples of one validation split.

    ``Q`` queries, ``G`` gallery items, ``K = min(top_k, G)``. Scores are similarities (higher =
    more alike). A *positive* is a gallery item with the query's label.

    Attributes:
        metric: The similarity used (``'cosine'``, ``'inner'``, ``'euclid'``, ``'sq_euclid'``).
        query_labels: ``(Q,)`` int64 labels of the queries.
        gallery_labels: ``(G,)`` int64 labels of the gallery items.
        num_pos: ``(Q,)`` number of positives of each query.
        ap: ``(Q,)`` average precision of each query (``nan`` without positives), as
            :func:`recognite.eval.pr_metrics` computes it.
        first_rank: ``(Q,)`` pessimistic rank of the best positive (``1`` = top-1 correct; among
            tied items negatives come first), ``G + 1`` without positives.
        best_pos: ``(Q,)`` highest positive score (``nan`` without positives).
        hard_pos: ``(Q,)`` lowest positive score, the *hardest positive* (``nan`` without).
        hard_neg: ``(Q,)`` highest negative score, the *hardest negative* (``nan`` without).
        best_pos_index: ``(Q,)`` gallery index of the best positive (``-1`` without positives).
        top_indices: ``(Q, K)`` gallery indices of the ``K`` best items, best first (ties in
            gallery order).
        top_scores: ``(Q, K)`` their scores.
        pooled_recall: ``(U + 1,)`` recall of the PR curve of all query-gallery pairs pooled, one
            point per distinct positive score by increasing threshold, then the end point 0.
        pooled_precision: ``(U + 1,)`` its precision (end point 1).
        pooled_thresholds: ``(U,)`` its thresholds (ascending).
        pooled_ap: Average precision of the pooled curve (equals scikit-learn's
            ``average_precision_score`` on the flattened scores).
        mean_precision: ``(len(RECALL_GRID),)`` mean over queries with positives of the
            interpolated precision (the best precision at recall ``>= r``) at each recall level.
        cmc: ``(min(cmc_max_rank, G),)`` fraction of queries whose best positive has rank ``<= r``.
        chance_cmc: The expected CMC of a random ranking of the gallery (same queries).
        pos_pair_scores: Scores of positive pairs (all of them, or a uniform sample of
            ``max_pairs``).
        neg_pair_scores: A uniform sample of the negative pairs' scores (all when few).
        num_pos_pairs: Number of positive pairs in total.
        num_neg_pairs: Number of negative pairs in total.
    """

    metric: str
    query_labels: torch.Tensor
    gallery_labels: torch.Tensor
    num_pos: torch.Tensor
    ap: torch.Tensor
    first_rank: torch.Tensor
    best_pos: torch.Tensor
    hard_pos: torch.Tensor
    hard_neg: torch.Tensor
    best_pos_index: torch.Tensor
    top_indices: torch.Tensor
    top_scores: torch.Tensor
    pooled_recall: np.ndarray
    pooled_precision: np.ndarray
    pooled_thresholds: np.ndarray
    pooled_ap: float
    mean_precision: np.ndarray
    cmc: np.ndarray
    chance_cmc: np.ndarray
    pos_pair_scores: np.ndarray
    neg_pair_scores: np.ndarray
    num_pos_pairs: int
    num_neg_pairs: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_pos(self) -> torch.Tensor:
        """``(Q,)`` bool: the query has at least one positive."""
        return self.num_pos > 0

    @property
    def mean_ap(self) -> float:
        """Mean AP over queries with positives (``nan`` if none)."""
        valid = self.ap[self.has_pos]
        return float(valid.mean()) if valid.numel() else math.nan


def _rows_per_chunk(num_gallery: int, budget: int) -> int:
    # scores (4 B) + sort indices (8 B) + masks and masked copies (~12 B) per element
    return max(1, budget // (24 * max(1, num_gallery)))


def _interpolated_precision(precisions: torch.Tensor, recalls: torch.Tensor) -> np.ndarray:
    """Best precision at recall ``>= r`` for every ``r`` of :data:`RECALL_GRID` (one query).

    ``recalls`` is descending and ends with the artificial point ``(recall 0, precision 1)`` (the
    layout of :func:`recognite.eval.pr_metrics`); that point is left out, so a query with one
    positive at rank ``k`` has the flat curve ``1 / k``.
    """
    precision = precisions.numpy()[:-1]
    recall_ascending = recalls.numpy()[:-1][::-1]
    running_max = np.maximum.accumulate(precision)  # over the prefix of recall >= r
    count = recall_ascending.size - np.searchsorted(recall_ascending, RECALL_GRID - 1e-12, side="left")
    out = np.zeros_like(RECALL_GRID)
    has = count > 0
    out[has] = running_max[count[has] - 1]
    return out


def _check_inputs(
    query_embs: torch.Tensor, query_labels: torch.Tensor, gallery_embs: torch.Tensor, gallery_labels: torch.Tensor,
    sizes: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    for name, value in sizes.items():
        check_int(value, name, minimum=1)
    query_labels = torch.as_tensor(query_labels).reshape(-1).long().cpu()
    gallery_labels = torch.as_tensor(gallery_labels).reshape(-1).long().cpu()
    query_embs, gallery_embs = query_embs.detach().cpu(), gallery_embs.detach().cpu()
    if query_embs.shape[0] != query_labels.numel() or gallery_embs.shape[0] != gallery_labels.numel():
        raise ValueError(
            f"embeddings and labels differ in length: {query_embs.shape[0]} query embeddings for "
            f"{query_labels.numel()} labels, {gallery_embs.shape[0]} gallery embeddings for "
            f"{gallery_labels.numel()} labels."
        )
    if query_labels.numel() == 0 or gallery_labels.numel() == 0:
        raise ValueError(
            f"need at least one query and one gallery item, got Q={query_labels.numel()}, G={gallery_labels.numel()}."
        )
    min_label = int(min(query_labels.min(), gallery_labels.min()))
    if min_label < 0:
        raise ValueError(f"labels must be >= 0, got {min_label}.")
    return query_embs, query_labels, gallery_embs, gallery_labels


class _ChunkParts:
    """What the report keeps of each chunk of scores besides the engine's per-query statistics."""

    def __init__(self, k: int, neg_rate: float, seed: int) -> None:
        self.k = k
        self.neg_rate = neg_rate
        self.generator = torch.Generator().manual_seed(seed)
        self.best_index: list[torch.Tensor] = []
        self.top_index: list[torch.Tensor] = []
        self.top_score: list[torch.Tensor] = []
        self.positives: list[torch.Tensor] = []
        self.negatives: list[torch.Tensor] = []
        self.precision_sum = np.zeros_like(RECALL_GRID)
        self.curves = 0

    def add(self, scores: torch.Tensor, labels: torch.Tensor, gallery_labels: torch.Tensor) -> None:
        same = labels[:, None] == gallery_labels[None, :]
        has_pos = same.any(dim=1)
        best_index = scores.masked_fill(~same, -math.inf).argmax(dim=1)
        self.best_index.append(torch.where(has_pos, best_index, torch.full_like(best_index, -1)))
        order = torch.sort(scores, dim=1, descending=True, stable=True)
        self.top_index.append(order.indices[:, : self.k].clone())
        self.top_score.append(order.values[:, : self.k].double())
        del order
        pr = pr_metrics(scores.double(), gallery_labels, labels)  # float64 curves for the mean curve
        for q in torch.nonzero(has_pos).flatten().tolist():
            self.precision_sum += _interpolated_precision(pr["Precisions"][q], pr["Recalls"][q])
            self.curves += 1
        self.positives.append(scores[same].double())
        negatives = ~same
        if self.neg_rate < 1.0:
            negatives &= torch.rand(scores.shape, generator=self.generator) < self.neg_rate
        self.negatives.append(scores[negatives].double())


def _nan_where(values: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    return values.double().masked_fill(absent, math.nan)


def compute_report_data(
    query_embs: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_embs: torch.Tensor,
    gallery_labels: torch.Tensor,
    metric: str = "cosine",
    top_k: int = 5,
    cmc_max_rank: int = 20,
    max_pairs: int = 200_000,
    seed: int = 0,
    memory_budget: int | None = None,
) -> ReportData:
    """Compute everything a report shows from query and gallery embeddings.

    The per-query statistics (AP, first rank, best / hardest positive, hardest negative) come
    from the bounded-memory engine (:func:`recognite.eval.evaluate_embeddings`), the same numbers
    training validation and ``recognite evaluate`` use; the chunked pass here adds what only the
    report shows (top-k items, interpolated PR curves, pair-score samples, the pooled curve).

    Args:
        query_embs: ``(Q, D)`` query embeddings.
        query_labels: ``(Q,)`` integer labels.
        gallery_embs: ``(G, D)`` gallery embeddings.
        gallery_labels: ``(G,)`` integer labels.
        metric: Similarity, see :func:`recognite.eval.pairwise_scores`.
        top_k: How many best gallery items to keep per query.
        cmc_max_rank: Length of the CMC curve (at most ``G``).
        max_pairs: At most this many positive and this many negative pair scores are kept for the
            all-pairs histogram (a uniform random sample when there are more).
        seed: Seed of that sample (a local generator; global RNGs are untouched).
        memory_budget: Bytes of temporary memory per chunk of queries (default 64 MiB).

    Returns:
        A :class:`ReportData`.
    """
    metric = check_metric(metric)
    query_embs, query_labels, gallery_embs, gallery_labels = _check_inputs(
        query_embs, query_labels, gallery_embs, gallery_labels,
        {"top_k": top_k, "cmc_max_rank": cmc_max_rank, "max_pairs": max_pairs},
    )
    num_queries, num_gallery = query_labels.numel(), gallery_labels.numel()
    budget = memory_budget if memory_budget is not None else _DEFAULT_BUDGET
    chunk = _rows_per_chunk(num_gallery, budget)
    length = min(cmc_max_rank, num_gallery)
    engine = evaluate_embeddings(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=(1,),
                                 memory_budget=budget, cmc_max_rank=length)
    stats = engine["per_query"].cpu()
    num_pos = stats.num_pos
    no_pos, no_neg = num_pos == 0, stats.num_neg == 0
    num_pos_pairs = int(num_pos.sum())
    num_neg_pairs = num_queries * num_gallery - num_pos_pairs
    parts = _ChunkParts(min(top_k, num_gallery), min(1.0, max_pairs / max(1, num_neg_pairs)), seed)
    for start in range(0, num_queries, chunk):
        scores = pairwise_scores(query_embs[start:start + chunk], gallery_embs, metric)
        parts.add(scores, query_labels[start:start + chunk], gallery_labels)
    positives = torch.cat(parts.positives)
    pooled_recall, pooled_precision, pooled_thresholds, pooled_ap = _pooled_pr(
        positives, query_embs, query_labels, gallery_embs, gallery_labels, metric, chunk)
    if positives.numel() > max_pairs:
        positives = positives[torch.randperm(positives.numel(), generator=parts.generator)[:max_pairs]]
    first_rank = stats.first_rank.masked_fill(no_pos, num_gallery + 1)
    cmc = engine["cmc"].cpu().numpy()
    return ReportData(
        metric=metric, query_labels=query_labels, gallery_labels=gallery_labels, num_pos=num_pos,
        ap=engine["AP"].cpu().double(), first_rank=first_rank,
        best_pos=_nan_where(stats.max_pos, no_pos), hard_pos=_nan_where(stats.min_pos, no_pos),
        hard_neg=_nan_where(stats.max_neg, no_neg), best_pos_index=torch.cat(parts.best_index),
        top_indices=torch.cat(parts.top_index), top_scores=torch.cat(parts.top_score),
        pooled_recall=pooled_recall, pooled_precision=pooled_precision, pooled_thresholds=pooled_thresholds,
        pooled_ap=pooled_ap,
        mean_precision=parts.precision_sum / parts.curves if parts.curves else np.full_like(RECALL_GRID, math.nan),
        cmc=cmc, chance_cmc=_chance_cmc(num_pos, num_gallery, length), pos_pair_scores=positives.numpy(),
        neg_pair_scores=torch.cat(parts.negatives).numpy(), num_pos_pairs=num_pos_pairs, num_neg_pairs=num_neg_pairs,
    )


def _chance_cmc(num_pos: torch.Tensor, num_gallery: int, length: int) -> np.ndarray:
    """Expected CMC of a uniformly random gallery order: a query with ``p`` positives among ``G``
    items has one in the first ``r`` with probability ``1 - prod_{i<r} (G - p - i) / (G - i)``."""
    valid = num_pos[num_pos > 0].numpy()
    if valid.size == 0:
        return np.full(length, math.nan)
    out = np.zeros(length)
    for p, count in zip(*np.unique(valid, return_counts=True)):
        i = np.arange(length)
        miss = np.cumprod(np.clip(num_gallery - p - i, 0, None) / (num_gallery - i))
        out += count * (1.0 - miss)
    return out / valid.size


def _pooled_pr(
    positives: torch.Tensor, query_embs: torch.Tensor, query_labels: torch.Tensor, gallery_embs: torch.Tensor,
    gallery_labels: torch.Tensor, metric: str, chunk: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Exact PR curve of all pairs pooled: one point per distinct positive score.

    Second pass over the scores: every negative is counted into the interval between consecutive
    positive thresholds, so ``#negatives >= t`` is known for each threshold ``t``.
    """
    if positives.numel() == 0:
        return np.array([0.0]), np.array([1.0]), np.array([]), math.nan
    thresholds = torch.unique(positives)  # ascending
    positives_sorted = positives.sort().values
    neg_counts = torch.zeros(thresholds.numel() + 1, dtype=torch.int64)
    for start in range(0, query_labels.numel(), chunk):
        scores = pairwise_scores(query_embs[start:start + chunk], gallery_embs, metric).double()
        same = query_labels[start:start + chunk, None] == gallery_labels[None, :]
        # number of thresholds <= each negative score: it counts for thresholds[: index]
        index = torch.searchsorted(thresholds, scores[~same], right=True)
        neg_counts += torch.bincount(index, minlength=thresholds.numel() + 1)
    neg_at_least = torch.flip(torch.cumsum(torch.flip(neg_counts, [0]), 0), [0])[1:]
    pos_at_least = positives_sorted.numel() - torch.searchsorted(positives_sorted, thresholds, right=False)
    precision = pos_at_least.double() / (pos_at_least + neg_at_least).double()
    recall = pos_at_least.double() / positives_sorted.numel()
    next_recall = torch.cat([recall[1:], recall.new_zeros(1)])
    pooled_ap = float(((recall - next_recall) * precision).sum())
    return (
        torch.cat([recall, recall.new_zeros(1)]).numpy(),
        torch.cat([precision, precision.new_ones(1)]).numpy(),
        thresholds.numpy(),
        pooled_ap,
    )


def worst_queries(data: ReportData, num: int, max_per_label: int | None = 1) -> list[int]:
    """Indices of the ``num`` worst queries, worst first.

    Worst = lowest average precision; among equal AP, the lowest margin ``best positive score -
    hardest negative score`` (the most confidently wrong first). With ``max_per_label``, at most
    that many queries of one label are taken first (so one bad label does not fill the list), then
    the list is filled with the next worst queries. Queries without positives are skipped (no
    retrieval of them can be right).
    """
    if num <= 0:
        return []
    valid = torch.nonzero(data.has_pos).flatten().tolist()
    margin = torch.nan_to_num(data.best_pos - data.hard_neg, nan=math.inf)
    valid.sort(key=lambda q: (float(data.ap[q]), float(margin[q]), q))
    if max_per_label is None:
        return valid[:num]
    chosen: list[int] = []
    per_label: Counter[int] = Counter()
    for q in valid:
        label = int(data.query_labels[q])
        if per_label[label] < max_per_label:
            chosen.append(q)
            per_label[label] += 1
            if len(chosen) == num:
                break
    if len(chosen) < num:
        taken = set(chosen)
        chosen += [q for q in valid if q not in taken][: num - len(chosen)]
        chosen.sort(key=valid.index)
    return chosen


def confused_pairs(data: ReportData, limit: int = 15) -> list[dict[str, Any]]:
    """The most frequent (query label, wrong top-1 label) pairs.

    Counts the queries whose top-1 gallery item (ties in gallery order) has another label.

    Returns:
        Up to ``limit`` dicts with ``query_label``, ``predicted_label`` (ints), ``count``,
        ``fraction`` (of that label's queries) and ``mean_score`` (of the wrong top-1 items),
        by decreasing count (then label order).
    """
    predicted = data.gallery_labels[data.top_indices[:, 0]]
    wrong = torch.nonzero(predicted != data.query_labels).flatten().tolist()
    counts: Counter[tuple[int, int]] = Counter()
    score_sums: dict[tuple[int, int], float] = {}
    for q in wrong:
        key = (int(data.query_labels[q]), int(predicted[q]))
        counts[key] += 1
        score_sums[key] = score_sums.get(key, 0.0) + float(data.top_scores[q, 0])
    per_label = Counter(data.query_labels.tolist())
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [
        {"query_label": a, "predicted_label": b, "count": n, "fraction": n / per_label[a],
         "mean_score": score_sums[(a, b)] / n}
        for (a, b), n in ordered
    ]


def per_label_table(data: ReportData) -> list[dict[str, Any]]:
    """One row per query label: ``label``, ``num_queries``, ``num_gallery``, ``mAP`` (mean AP of
    its queries), ``top1`` (fraction with a positive at pessimistic rank 1), ``mean_best_pos`` and
    ``mean_hard_neg``; sorted by label."""
    rows = []
    gallery_count = Counter(data.gallery_labels.tolist())
    for label in sorted(set(data.query_labels.tolist())):
        mask = data.query_labels == label
        has_pos = mask & data.has_pos
        rows.append({
            "label": label,
            "num_queries": int(mask.sum()),
            "num_gallery": gallery_count.get(label, 0),
            "mAP": float(data.ap[has_pos].mean()) if has_pos.any() else math.nan,
            "top1": float((data.first_rank[mask] == 1).double().mean()),
            "mean_best_pos": float(data.best_pos[has_pos].mean()) if has_pos.any() else math.nan,
            "mean_hard_neg": float(torch.nanmean(data.hard_neg[mask])) if mask.any() else math.nan,
        })
    return rows


def open_set_rates(data: ReportData, threshold: float) -> dict[str, float]:
    """Open-set rates at ``threshold``: :func:`recognite.eval.open_set_rates` on the report's
    per-query statistics (DIR over queries with a positive, FAR over queries with a negative, each
    with its own label withheld), the same convention as ``recognite train`` and ``evaluate``."""
    return open_set_rates_of_stats(data.best_pos, data.hard_neg, threshold)


def pooled_operating_point(data: ReportData, threshold: float) -> tuple[float, float] | None:
    """``(recall, precision)`` of the pooled PR curve at the lowest curve threshold ``>= threshold``."""
    if data.pooled_thresholds.size == 0:
        return None
    index = int(np.searchsorted(data.pooled_thresholds, threshold, side="left"))
    if index >= data.pooled_thresholds.size:
        return None
    return float(data.pooled_recall[index]), float(data.pooled_precision[index])
