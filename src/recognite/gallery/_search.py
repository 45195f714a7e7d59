"""Exact top-k search by chunked matrix products, and label-level de-duplication.

Private plumbing for :mod:`recognite.gallery`; users call :class:`GalleryIndex.search`.
"""

from __future__ import annotations

from typing import Callable

import torch

#: Largest number of query rows scored together in one matrix product.
_MAX_QUERY_BLOCK = 1024

#: Cap on the first number of raw neighbours fetched per query when collapsing to labels;
#: rows that still lack ``k`` distinct labels are searched again with four times as many.
_MAX_FIRST_CANDIDATES = 1024

RawSearchFn = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


def exact_topk(
    queries: torch.Tensor, matrix: torch.Tensor, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products between queries and matrix rows, computed block by block.

    At most about ``chunk_size`` scores (plus ``2 k`` per query row of the block) are held at
    once, so memory does not grow with ``Q x N``.

    Args:
        queries: (Q, D) float tensor on the same device as ``matrix``.
        matrix: (N, D) float tensor.
        k: number of neighbours, ``1 <= k <= N``.
        chunk_size: largest number of query x row scores computed in one product.

    Returns:
        ``(scores, indices)``, both (Q, k): scores in descending order per row and the row
        indices of ``matrix`` they belong to (int64).
    """
    num_queries, num_rows = queries.shape[0], matrix.shape[0]
    query_block = max(1, min(num_queries, _MAX_QUERY_BLOCK, chunk_size))
    row_block = max(1, chunk_size // query_block)
    out_scores = torch.empty(num_queries, k, dtype=matrix.dtype, device=matrix.device)
    out_indices = torch.empty(num_queries, k, dtype=torch.long, device=matrix.device)
    for q_start in range(0, num_queries, query_block):
        q_chunk = queries[q_start : q_start + query_block]
        best_scores: torch.Tensor | None = None
        best_indices: torch.Tensor | None = None
        for r_start in range(0, num_rows, row_block):
            rows = matrix[r_start : r_start + row_block]
            scores = q_chunk @ rows.T  # (Qc, Gc)
            top_scores, top_idx = torch.topk(scores, min(k, rows.shape[0]), dim=1)
            top_idx += r_start
            del scores
            if best_scores is None:
                best_scores, best_indices = top_scores, top_idx
                continue
            cat_scores = torch.cat([best_scores, top_scores], dim=1)
            cat_idx = torch.cat([best_indices, top_idx], dim=1)
            best_scores, pos = torch.topk(cat_scores, min(k, cat_scores.shape[1]), dim=1)
            best_indices = torch.gather(cat_idx, 1, pos)
        out_scores[q_start : q_start + query_block] = best_scores
        out_indices[q_start : q_start + query_block] = best_indices
    return out_scores, out_indices


def first_distinct(
    scores: torch.Tensor, indices: torch.Tensor, row_codes: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per query, the first occurrence of each label in a best-first neighbour list.

    Because the neighbour list is sorted best-first, the first occurrence of a label holds that
    label's best score, and the first ``j`` distinct labels of the list are the ``j`` best labels
    overall (whatever the list length).

    Args:
        scores: (Q, M) raw neighbour scores, descending per row.
        indices: (Q, M) row indices of the neighbours, ``-1`` for an empty slot.
        row_codes: (N,) int64 label code of every row.
        k: number of distinct labels wanted.

    Returns:
        ``(scores, indices, codes, found)``: (Q, k) best score, row index and label code of the
        first ``k`` distinct labels (``-inf`` / ``-1`` / ``-1`` in unfilled slots) and (Q,) the
        number of distinct labels found.
    """
    num_queries, width = scores.shape
    valid = indices >= 0
    codes = torch.where(valid, row_codes[indices.clamp_min(0)], torch.full_like(indices, -1))
    # Stable sort by code keeps best-first order within one label: the group head is its best.
    sorted_codes, order = torch.sort(codes, dim=1, stable=True)
    head = torch.ones_like(sorted_codes, dtype=torch.bool)
    head[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    is_first = torch.zeros_like(head)
    is_first.scatter_(1, order, head)
    is_first &= valid
    rank = torch.cumsum(is_first.long(), dim=1)
    keep = is_first & (rank <= k)
    found = keep.sum(dim=1)
    positions = torch.arange(width, device=scores.device).expand(num_queries, width)
    sort_key = torch.where(keep, positions, torch.full_like(positions, width))
    take = torch.sort(sort_key, dim=1).values[:, :k]
    filled = take < width
    take = take.clamp_max(width - 1)
    out_scores = torch.where(
        filled, torch.gather(scores, 1, take), torch.full_like(take, float("-inf"), dtype=scores.dtype)
    )
    out_indices = torch.where(filled, torch.gather(indices, 1, take), torch.full_like(take, -1))
    out_codes = torch.where(filled, torch.gather(codes, 1, take), torch.full_like(take, -1))
    if out_scores.shape[1] < k:  # fewer candidates than k: pad
        pad = k - out_scores.shape[1]
        out_scores = torch.nn.functional.pad(out_scores, (0, pad), value=float("-inf"))
        out_indices = torch.nn.functional.pad(out_indices, (0, pad), value=-1)
        out_codes = torch.nn.functional.pad(out_codes, (0, pad), value=-1)
    return out_scores, out_indices, out_codes, found


def label_topk(
    queries: torch.Tensor,
    raw_search: RawSearchFn,
    row_codes: torch.Tensor,
    num_rows: int,
    k: int,
    max_rows_per_label: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` labels per query, each scored by its best row, from any raw neighbour search.

    Fetches ``m = (k - 1) * max_rows_per_label + 1`` raw neighbours (enough to hold ``k``
    distinct labels, capped at ``_MAX_FIRST_CANDIDATES``); queries that still lack ``k``
    distinct labels are searched again with four times as many, up to all rows.

    Args:
        queries: (Q, D) query embeddings.
        raw_search: ``fn(queries, m) -> (scores, indices)``, (Q', m) best-first neighbours.
        row_codes: (N,) int64 label code of every searchable row.
        num_rows: N.
        k: labels wanted per query (at most the number of labels).
        max_rows_per_label: largest number of rows that share one label.

    Returns:
        ``(scores, indices, codes)``, each (Q, k); see :func:`first_distinct`.
    """
    needed = (k - 1) * max_rows_per_label + 1
    m = min(num_rows, needed, max(k, _MAX_FIRST_CANDIDATES))
    raw_scores, raw_indices = raw_search(queries, m)
    scores, indices, codes, found = first_distinct(raw_scores, raw_indices, row_codes, k)
    while m < min(num_rows, needed):
        missing = torch.nonzero(found < k).flatten()
        if missing.numel() == 0:
            break
        m = min(num_rows, needed, 4 * m)
        raw_scores, raw_indices = raw_search(queries[missing.to(queries.device)], m)
        s, i, c, f = first_distinct(raw_scores, raw_indices, row_codes, k)
        scores[missing], indices[missing], codes[missing], found[missing] = s, i, c, f
    return scores, indices, codes
