"""Chunked ranking statistics shared by every retrieval metric (private).

Every metric in :mod:`recognite.eval` is derived from the per-query statistics computed here, over
chunks of query rows, so the full-matrix functions and the streaming path give identical numbers.

Tie rule (pessimistic ranks). Items with equal scores are ordered *negatives first*. The rank of
the ``m``-th best positive of a query is therefore ``m + #{negatives with score >= its score}``.
This makes every rank-based metric independent of the gallery order. Average precision uses the
threshold view instead (items tied in score are retrieved together, one PR point per distinct
score), which is exactly scikit-learn's ``average_precision_score`` and the area under the PR curve
returned by :func:`recognite.eval.pr_metrics`.

Only the items scoring at least as high as a query's lowest-scoring positive ("depth" items) are
ever sorted, with ``torch.topk`` on buckets of queries of similar depth, so the cost is far below a
full sort when positives rank well.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ._checks import check_finite

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_BYTES_PER_RANKED_ELEMENT = 64
NO_RANK = torch.iinfo(torch.int64).max
"""First-positive rank of a query without positives (never <= any k)."""  # values, indices, masks and counters per top-k element


def positives_mask(gallery_labels: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """``(c, G)`` boolean mask: gallery item has the query's label."""
    return gallery_labels.unsqueeze(0) == query_labels.unsqueeze(1)


def extreme_stats(scores: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query counts and extreme scores of positives and negatives (one chunk).

    Returns ``num_pos``, ``num_neg`` (int64), ``max_pos`` / ``max_neg`` (``-inf`` when absent),
    ``min_pos`` (``+inf`` when absent) and ``first_rank``: the pessimistic rank of the best
    positive (``1 + #negatives scoring >= the best positive``; :data:`NO_RANK` when there is none).
    """
    check_finite(scores)
    num_gallery = scores.shape[1]
    num_pos = torch.count_nonzero(pos, dim=1)
    masked = scores.masked_fill(~pos, _NEG_INF)
    max_pos = masked.amax(dim=1)
    masked = scores.masked_fill(~pos, _POS_INF)
    min_pos = masked.amin(dim=1)
    masked = scores.masked_fill(pos, _NEG_INF)
    max_neg = masked.amax(dim=1)
    negs_ahead = torch.count_nonzero(masked >= max_pos.unsqueeze(1), dim=1)
    del masked
    first_rank = torch.where(num_pos > 0, negs_ahead + 1, torch.full_like(negs_ahead, NO_RANK))
    return {
        "num_pos": num_pos,
        "num_neg": num_gallery - num_pos,
        "max_pos": max_pos,
        "min_pos": min_pos,
        "max_neg": max_neg,
        "first_rank": first_rank,
    }


def ranked_rows(
    scores: torch.Tensor, pos: torch.Tensor, depth: torch.Tensor, memory_budget: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, values, is_pos)`` with each row's scores sorted descending to its depth.

    ``rows`` indexes the chunk; ``values`` / ``is_pos`` are ``(r, K)`` with ``K >= depth[row]``.
    Rows of depth 0 (no positives) are skipped. Rows are bucketed by the next power of two of
    their depth so that ``topk`` never sorts far beyond what a row needs; the order of tied items
    inside ``values`` is unspecified (callers only use tie-invariant quantities).
    """
    num_gallery = scores.shape[1]
    active = torch.nonzero(depth > 0).squeeze(1)
    if active.numel() == 0:
        return
    exponents = torch.ceil(torch.log2(depth[active].double())).long()
    sizes = torch.clamp(2**exponents, min=min(64, num_gallery), max=num_gallery)
    for size in torch.unique(sizes).tolist():
        bucket = active[sizes == size]
        rows_per_step = max(1, memory_budget // (_BYTES_PER_RANKED_ELEMENT * size))
        for rows in bucket.split(rows_per_step):
            row_scores = scores.index_select(0, rows)
            if 4 * size >= num_gallery:
                values, indices = torch.sort(row_scores, dim=1, descending=True)
                values, indices = values[:, :size], indices[:, :size]
            else:
                values, indices = torch.topk(row_scores, size, dim=1, largest=True, sorted=True)
            is_pos = pos.index_select(0, rows).gather(1, indices)
            yield rows, values, is_pos


def ranked_stats(
    values: torch.Tensor, is_pos: torch.Tensor, num_pos: torch.Tensor, ks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """AP, MAP@R, R-precision and recall@k counts from rows sorted to their depth."""
    cnt_ge = torch.searchsorted(values.neg().contiguous(), values.neg().contiguous(), right=True)
    cum_pos = torch.cumsum(is_pos, dim=1)
    pos_ge = cum_pos.gather(1, cnt_ge - 1)
    neg_ge = cnt_ge - pos_ge
    num_pos_f = num_pos.double()
    precision_at_threshold = pos_ge.double() / cnt_ge.double()
    ap = torch.where(is_pos, precision_at_threshold, 0.0).sum(dim=1) / num_pos_f
    rank = cum_pos + neg_ge  # pessimistic rank, meaningful at positive positions
    in_top_r = is_pos & (rank <= num_pos.unsqueeze(1))
    r_precision = torch.count_nonzero(in_top_r, dim=1).double() / num_pos_f
    map_at_r = (
        torch.where(in_top_r, cum_pos.double() / rank.double(), 0.0).sum(dim=1) / num_pos_f
    )
    hits = [torch.count_nonzero(is_pos & (rank <= k), dim=1) for k in ks]
    recall_hits = torch.stack(hits, dim=1) if hits else num_pos.new_zeros((len(num_pos), 0))
    return {"ap": ap, "r_precision": r_precision, "map_at_r": map_at_r, "recall_hits": recall_hits}


def curves_from_ranked(
    values: torch.Tensor, is_pos: torch.Tensor, depth: torch.Tensor, num_pos: torch.Tensor
) -> dict[str, object]:
    """Per-row PR curves in scikit-learn's ``precision_recall_curve`` layout, plus max-F1 points.

    For each row: one point per distinct score down to the first threshold that reaches full
    recall, listed by increasing threshold, then the end point ``(precision 1, recall 0)`` that has
    no threshold.
    """
    num_rows, size = values.shape
    positions = torch.arange(size, device=values.device)
    within = positions.unsqueeze(0) < depth.unsqueeze(1)
    next_differs = torch.ones_like(within)
    next_differs[:, :-1] = values[:, 1:] != values[:, :-1]
    keep = next_differs & within
    true_pos = torch.cumsum(is_pos, dim=1).double()
    precision = true_pos / (positions + 1).double().unsqueeze(0)
    recall = true_pos / num_pos.double().unsqueeze(1)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / torch.where(denom > 0, denom, 1.0), 0.0)
    f1 = torch.where(keep, f1, -1.0)
    best_f1, best = f1.max(dim=1)  # first maximum: the highest threshold among equal F1
    best = best.unsqueeze(1)
    counts = torch.count_nonzero(keep, dim=1)
    keep_rev = keep.flip(1)
    end_mask = torch.ones((num_rows, 1), dtype=torch.bool, device=values.device)
    curve_mask = torch.cat([keep_rev, end_mask], dim=1)
    ones = torch.ones((num_rows, 1), dtype=torch.float64, device=values.device)
    zeros = torch.zeros((num_rows, 1), dtype=torch.float64, device=values.device)
    curve_counts = (counts + 1).tolist()
    precisions = torch.cat([precision.flip(1), ones], dim=1)[curve_mask].split(curve_counts)
    recalls = torch.cat([recall.flip(1), zeros], dim=1)[curve_mask].split(curve_counts)
    thresholds = values.flip(1)[keep_rev].split(counts.tolist())
    return {
        "precisions": precisions,
        "recalls": recalls,
        "thresholds": thresholds,
        "max_f1": best_f1,
        "p_at_max_f1": precision.gather(1, best).squeeze(1),
        "r_at_max_f1": recall.gather(1, best).squeeze(1),
        "t_at_max_f1": values.gather(1, best).squeeze(1),
    }


def chunk_stats(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (),
    memory_budget: int = 256 * 1024**2,
    ranks: bool = True,
    curves: bool = False,
) -> dict[str, object]:
    """All per-query statistics for one chunk of query rows ``scores (c, G)``.

    With ``ranks=False`` only :func:`extreme_stats` is computed (cheap: no sorting at all).
    With ``curves=True`` the PR curves of :func:`curves_from_ranked` are added (lists in row order).
    """
    pos = positives_mask(gallery_labels, query_labels)
    out: dict[str, object] = dict(extreme_stats(scores, pos))
    if not ranks:
        return out
    num_rows = scores.shape[0]
    num_pos = out["num_pos"]
    min_pos = out["min_pos"]
    depth = torch.count_nonzero(scores >= min_pos.unsqueeze(1), dim=1)
    nan = torch.full((num_rows,), float("nan"), dtype=torch.float64, device=scores.device)
    ap, r_precision, map_at_r = nan.clone(), nan.clone(), nan.clone()
    recall_hits = torch.zeros((num_rows, len(ks)), dtype=torch.long, device=scores.device)
    if curves:
        empty_thr = scores.new_zeros((0,))
        precisions: list[torch.Tensor] = [torch.ones(1, dtype=torch.float64)] * num_rows
        recalls: list[torch.Tensor] = [torch.zeros(1, dtype=torch.float64)] * num_rows
        thresholds: list[torch.Tensor] = [empty_thr] * num_rows
        max_f1, p_at, r_at = nan.clone(), nan.clone(), nan.clone()
        t_at = torch.full((num_rows,), float("nan"), dtype=scores.dtype, device=scores.device)
    for rows, values, is_pos in ranked_rows(scores, pos, depth, memory_budget):
        row_num_pos = num_pos.index_select(0, rows)
        stats = ranked_stats(values, is_pos, row_num_pos, ks)
        ap[rows] = stats["ap"]
        r_precision[rows] = stats["r_precision"]
        map_at_r[rows] = stats["map_at_r"]
        recall_hits[rows] = stats["recall_hits"]
        if curves:
            curve = curves_from_ranked(values, is_pos, depth.index_select(0, rows), row_num_pos)
            for position, row in enumerate(rows.tolist()):
                precisions[row] = curve["precisions"][position]
                recalls[row] = curve["recalls"][position]
                thresholds[row] = curve["thresholds"][position]
            max_f1[rows] = curve["max_f1"]
            p_at[rows] = curve["p_at_max_f1"]
            r_at[rows] = curve["r_at_max_f1"]
            t_at[rows] = curve["t_at_max_f1"]
    out.update(ap=ap, r_precision=r_precision, map_at_r=map_at_r, recall_hits=recall_hits)
    if curves:
        out.update(
            precisions=precisions, recalls=recalls, thresholds=thresholds,
            max_f1=max_f1, p_at_max_f1=p_at, r_at_max_f1=r_at, t_at_max_f1=t_at,
        )
    return out


def merge_chunks(parts: list[dict[str, object]]) -> dict[str, object]:
    """Concatenate per-chunk statistics (tensors along dim 0, lists by extension)."""
    merged: dict[str, object] = {}
    for key, first in parts[0].items():
        if isinstance(first, torch.Tensor):
            merged[key] = torch.cat([part[key] for part in parts])  # type: ignore[misc]
        else:
            merged[key] = [item for part in parts for item in part[key]]  # type: ignore[union-attr]
    return merged


def matrix_stats(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (),
    memory_budget: int = 256 * 1024**2,
    ranks: bool = True,
    curves: bool = False,
) -> dict[str, object]:
    """:func:`chunk_stats` over row chunks of a full ``(Q, G)`` score matrix."""
    from ._checks import rows_per_chunk

    chunk = rows_per_chunk(scores.shape[1], memory_budget)
    parts = [
        chunk_stats(
            scores[start : start + chunk], gallery_labels, query_labels[start : start + chunk],
            ks, memory_budget, ranks, curves,
        )
        for start in range(0, scores.shape[0], chunk)
    ]
    return merge_chunks(parts)
