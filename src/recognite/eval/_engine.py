"""Chunked ranking statistics shared by every retrieval metric (private).

Every metric in :mod:`recognite.eval` is derived from the per-query statistics computed here, over
chunks of query rows, so the full-matrix functions and the streaming path give identical numbers.

Two executions of the same statistics: CPU chunks go to :mod:`recognite.eval._rows_cpu` (NumPy
passes over blocks of rows, taken by a pool of ``torch.get_num_threads()`` threads, so a thread
sharing its core with another process takes fewer blocks instead of holding up a statically split
operation); other devices run the torch operations of this module. Both give the same bits
(``tests/eval/test_engine.py`` compares them on CPU with ``backend="torch"``).

Tie rule (pessimistic ranks). Items with equal scores are ordered *negatives first*. The rank of
the ``m``-th best positive of a query is therefore ``m + #{negatives with score >= its score}``.
This makes every rank-based metric independent of the gallery order. Average precision uses the
threshold view instead (items tied in score are retrieved together, one PR point per distinct
score), which is exactly scikit-learn's ``average_precision_score`` and the area under the PR curve
returned by :func:`recognite.eval.pr_metrics`.

Only the items scoring at least as high as a query's lowest-scoring positive ("depth" items) are
ever sorted: they are picked by one comparison pass and sorted together, by one radix sort of
(row, score) keys per group of rows, so the cost is far below a full sort when positives rank
well, and the number of operations does not grow with the number of queries (few, large
operations). Passes over score rows
run in blocks of a few MB through reused buffers, so no call allocates (and page-faults) a
temporary as large as the score matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ._checks import check_finite, rows_per_chunk
from ._rows_cpu import NO_RANK, cpu_chunk_stats

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_BYTES_PER_RANKED_ELEMENT = 96  # picked items: rows, columns, values, sort keys and orders, curve points
_MAX_COUNTED_POSITIVES = 32  # rows with more positives are sorted rather than counted
_MAX_TOPK_DEPTH = 1024  # deeper rows with few positives are counted rather than sorted
_BYTES_PER_ELEMENT_COUNTED = 8
_BLOCK_BYTES = 8 * 1024**2  # rows of a pass are processed in blocks of about this size


class LabelIndex:
    """The gallery grouped by label, so a query's positives are found without a ``(Q, G)`` mask."""

    def __init__(self, gallery_labels: torch.Tensor) -> None:
        self.gallery_labels = gallery_labels
        self.sorted_labels, self.order = torch.sort(gallery_labels, stable=True)

    def positives(self, query_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index (c, P), valid (c, P), num_pos (c,))``: gallery indices of each query's positives.

        ``P`` is the largest positive count in the chunk; padding slots repeat a row's first
        positive (or point at item 0 when the row has none) and are marked invalid.
        """
        query_labels = query_labels.to(self.sorted_labels.dtype)
        first = torch.searchsorted(self.sorted_labels, query_labels, right=False)
        last = torch.searchsorted(self.sorted_labels, query_labels, right=True)
        num_pos = last - first
        width = max(1, int(num_pos.max()) if num_pos.numel() else 1)
        slots = torch.arange(width, device=query_labels.device)
        valid = slots.unsqueeze(0) < num_pos.unsqueeze(1)
        position = torch.where(valid, first.unsqueeze(1) + slots, first.unsqueeze(1))
        position = position.clamp(max=self.order.numel() - 1)
        index = torch.where(num_pos.unsqueeze(1) > 0, self.order[position], 0)
        return index, valid, num_pos


class Workspace:
    """Small reusable buffers for passes over score rows, in blocks of rows.

    Chunks of a score matrix are hundreds of MB; a temporary of that size is freshly page-faulted
    on every call, which costs more than the arithmetic. Passes therefore walk the rows in blocks
    of at most ``block_bytes`` and reuse one buffer, which also stays in the CPU cache.
    """

    def __init__(self, block_bytes: int = _BLOCK_BYTES) -> None:
        self.block_bytes = block_bytes
        self._buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def block_rows(self, num_cols: int) -> int:
        """Rows per block for rows of ``num_cols`` elements (at least 1)."""
        return max(1, self.block_bytes // (8 * max(1, num_cols)))

    def buffer(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``(rows, cols)`` view of a reused buffer (``rows <= block_rows(cols)``)."""
        key = (cols, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self._buffers[key] = torch.empty((max(rows, self.block_rows(cols)), cols), dtype=dtype, device=device)
        return buf[:rows]

    def count_ge(self, values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """``(r,)`` int64: number of entries of each row of ``values (r, G)`` that are ``>= threshold``.

        The comparison writes 0/1 into a reused floating buffer that is then summed: far faster
        than reducing booleans, and exact (float32 holds every integer below 2**24; float64 is
        used for wider rows).
        """
        rows, cols = values.shape
        dtype = torch.float32 if cols < 2**24 else torch.float64
        thresholds = thresholds.to(values.dtype)
        counts = torch.empty(rows, dtype=torch.long, device=values.device)
        step = self.block_rows(cols)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            flags = torch.ge(values[start:stop], thresholds[start:stop].unsqueeze(1),
                             out=self.buffer(stop - start, cols, dtype, values.device))
            counts[start:stop] = flags.sum(dim=1)
        return counts


def extreme_stats(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    need_max_neg: bool = True,
    need_first_rank: bool = True,
    workspace: Workspace | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query counts and extreme scores of positives and negatives (one chunk).

    Returns ``num_pos``, ``num_neg`` (int64), ``max_pos`` (``-inf`` when absent), ``min_pos``
    (``+inf`` when absent) and, when asked, ``max_neg`` (``-inf`` when absent) and ``first_rank``:
    the pessimistic rank of the best positive (``1 + #negatives scoring >= the best positive``;
    :data:`NO_RANK` without one). Never builds a ``(c, G)`` label mask: positives are gathered
    through the label index, negatives are the chunk with its positives overwritten by ``-inf``.
    """
    check_finite(scores)
    workspace = workspace if workspace is not None else Workspace()
    num_gallery = scores.shape[1]
    pos_index, pos_valid, num_pos = label_index.positives(query_labels)
    pos_scores = scores.gather(1, pos_index)
    max_pos = pos_scores.masked_fill(~pos_valid, _NEG_INF).amax(dim=1)
    min_pos = pos_scores.masked_fill(~pos_valid, _POS_INF).amin(dim=1)
    out = {
        "num_pos": num_pos,
        "num_neg": num_gallery - num_pos,
        "max_pos": max_pos,
        "min_pos": min_pos,
    }
    if need_first_rank and not need_max_neg:
        # One counting pass: the best positive's rank is 1 + the negatives scoring >= it.
        ties = torch.count_nonzero(pos_valid & (pos_scores >= max_pos.unsqueeze(1)), dim=1)
        first_rank = 1 + workspace.count_ge(scores, max_pos) - ties
        out["first_rank"] = torch.where(num_pos > 0, first_rank, torch.full_like(first_rank, NO_RANK))
    elif need_max_neg or need_first_rank:
        # Padding slots point at a row's first positive (or item 0 when it has none): writing
        # -inf in rows with positives and the unchanged score otherwise keeps every write consistent.
        fill = torch.where(num_pos.unsqueeze(1) > 0, torch.full_like(pos_scores, _NEG_INF), pos_scores)
        max_neg = torch.empty_like(max_pos)
        first_rank = torch.ones_like(num_pos)
        step = workspace.block_rows(num_gallery)
        for start in range(0, scores.shape[0], step):
            stop = min(start + step, scores.shape[0])
            negatives = workspace.buffer(stop - start, num_gallery, scores.dtype, scores.device)
            negatives.copy_(scores[start:stop])
            negatives.scatter_(1, pos_index[start:stop], fill[start:stop])
            block_max_neg = negatives.amax(dim=1)
            max_neg[start:stop] = block_max_neg
            if need_first_rank:
                block_max_pos = max_pos[start:stop]
                behind = torch.nonzero((num_pos[start:stop] > 0) & (block_max_neg >= block_max_pos)).squeeze(1)
                if behind.numel():
                    first_rank[start + behind] = 1 + torch.count_nonzero(
                        negatives.index_select(0, behind) >= block_max_pos.index_select(0, behind).unsqueeze(1), dim=1
                    )
        max_neg = torch.where(out["num_neg"] > 0, max_neg, _NEG_INF)
        out["max_neg"] = max_neg
        if need_first_rank:
            out["first_rank"] = torch.where(num_pos > 0, first_rank, torch.full_like(first_rank, NO_RANK))
    return out


class RankedGroup(NamedTuple):
    """The items of a group of rows that score at least their row's threshold, sorted, flat.

    Items are laid out row after row (rows in ascending order), each row's items by *increasing*
    score (the order of scikit-learn's curves); the order of tied items is unspecified (callers
    only use tie-invariant quantities).
    """

    rows: torch.Tensor  # (r,) chunk row indices, ascending
    start: torch.Tensor  # (r,) offset of each row's first item
    depth: torch.Tensor  # (r,) number of items of each row
    row_of: torch.Tensor  # (N,) position in ``rows`` of each item
    value: torch.Tensor  # (N,) scores
    is_pos: torch.Tensor  # (N,) bool: the item has the row's label
    first_of_tie: torch.Tensor  # (N,) bool: the previous item is in another row or scores lower


def ranked_rows(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    depth: torch.Tensor,
    thresholds: torch.Tensor,
    memory_budget: int,
    workspace: Workspace,
) -> Iterator[RankedGroup]:
    """Yield groups of rows with each row's items scoring ``>= thresholds[row]``, sorted.

    ``depth[row]`` must be the number of such items (rows of depth 0 are skipped). The items are
    picked by comparing with the threshold (no sort over the gallery) and sorted by one radix sort
    of (row, score) keys for the whole group, so the number of operations does not grow with the
    number of rows; groups are sized so the picked items fit ``memory_budget``.
    """
    active = torch.nonzero(depth > 0).squeeze(1)
    if active.numel() == 0:
        return
    entries_per_group = max(1, memory_budget // _BYTES_PER_RANKED_ELEMENT)
    active_depth = depth.index_select(0, active)
    group_of_row = torch.div(torch.cumsum(active_depth, 0) - active_depth, entries_per_group, rounding_mode="floor")
    for group in torch.unique_consecutive(group_of_row).tolist():
        rows = active[group_of_row == group]
        yield _ranked_group(scores, label_index, query_labels, rows, depth.index_select(0, rows),
                            thresholds.index_select(0, rows), workspace)


def flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """``(n,)`` int64 positions of the true entries of a contiguous bool tensor, read as flat.

    On the CPU this is NumPy's ``flatnonzero`` on the same memory: single-threaded (so it never
    waits on a descheduled thread) and faster than ``torch.nonzero`` on this project's CPU.
    """
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return torch.nonzero(flags.reshape(-1)).squeeze(1)


def _sort_within_rows(
    row_of: torch.Tensor, value: torch.Tensor, is_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, is_pos)`` of items sorted by increasing ``value`` within each row.

    ``row_of`` (the item's row) must be ascending; it is unchanged by the sort. float32 scores:
    one sort of 64-bit keys ``row << 33 | score bits << 1 | is_pos`` (the score's bits mapped so
    that integer order is float order), which torch runs as a radix sort; values and flags are
    read back from the sorted keys, with no gather. Other dtypes: a stable sort by score, then a
    stable sort by row.
    """
    if value.dtype == torch.float32 and (row_of.numel() == 0 or int(row_of[-1]) < 2**30):
        bits = value.view(torch.int32).to(torch.int64)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # in [0, 2**32), float order
        keys = torch.sort((row_of << 33) | (ordered << 1) | is_pos.to(torch.int64)).values
        bits = ((keys >> 1) & 0xFFFFFFFF) - 2**31
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return bits.to(torch.int32).view(torch.float32), (keys & 1).bool()
    order = torch.sort(value, stable=True).indices
    order = order.index_select(0, torch.sort(row_of.index_select(0, order), stable=True).indices)
    return value.index_select(0, order), is_pos.index_select(0, order)


def _ranked_group(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    rows: torch.Tensor,
    depth: torch.Tensor,
    thresholds: torch.Tensor,
    workspace: Workspace,
) -> RankedGroup:
    """:func:`ranked_rows` for one group of rows (sorted chunk row indices, all of depth > 0)."""
    num_gallery = scores.shape[1]
    # 1. Pick (row position, score, positive?) of every item at or above its row's threshold.
    step = workspace.block_rows(num_gallery)
    positions, columns, values = [], [], []
    for start in range(0, rows.numel(), step):
        block_rows = rows[start : start + step]
        first, last = int(block_rows[0]), int(block_rows[-1])
        contiguous = last - first + 1 == block_rows.numel()
        block = scores[first : last + 1] if contiguous else scores.index_select(0, block_rows)
        flags = workspace.buffer(block.shape[0], num_gallery, torch.bool, block.device)
        torch.ge(block, thresholds[start : start + step].unsqueeze(1), out=flags)
        picked = flat_nonzero(flags).to(block.device)
        positions.append(torch.div(picked, num_gallery, rounding_mode="floor") + start)
        columns.append(picked % num_gallery)
        values.append(block.reshape(-1).index_select(0, picked))
    row_of, column, value = torch.cat(positions), torch.cat(columns), torch.cat(values)
    query_of_item = query_labels.index_select(0, rows).index_select(0, row_of)
    is_pos = label_index.gallery_labels.index_select(0, column) == query_of_item.to(label_index.gallery_labels.dtype)
    # 2. Sort each row by score (rows are already in order and stay so).
    value, is_pos = _sort_within_rows(row_of, value, is_pos)
    first_of_tie = torch.ones_like(is_pos)
    first_of_tie[1:] = (value[1:] != value[:-1]) | (row_of[1:] != row_of[:-1])
    start = torch.cumsum(depth, 0) - depth
    return RankedGroup(rows, start, depth, row_of, value, is_pos, first_of_tie)


def positives_from_ranked(group: RankedGroup, num_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-positive counts of a ranked group.

    Returns ``(valid, pos_ge, cnt_ge)``, each ``(r, P)`` with the row's positives in order of
    decreasing score: ``cnt_ge`` = items scoring ``>=`` the positive, ``pos_ge`` = positives
    among them. Tied positives get equal counts, so the layout does not depend on tie order.
    """
    device = group.value.device
    pos_items = torch.nonzero(group.is_pos).squeeze(1)  # by row, then by increasing score
    pos_row = group.row_of.index_select(0, pos_items)
    tie_starts = torch.nonzero(group.first_of_tie).squeeze(1)
    tie_start = tie_starts.index_select(0, torch.searchsorted(tie_starts, pos_items, right=True) - 1)
    row_end = (group.start + group.depth).index_select(0, pos_row)
    first_pos = torch.searchsorted(pos_items, group.start).index_select(0, pos_row)  # row's first positive
    cnt = row_end - tie_start
    pos_cnt = num_pos.index_select(0, pos_row) - (torch.searchsorted(pos_items, tie_start) - first_pos)
    slot = num_pos.index_select(0, pos_row) - 1 - (torch.arange(pos_items.numel(), device=device) - first_pos)
    width = max(1, int(num_pos.max()))
    shape = (group.rows.numel(), width)
    cnt_ge = torch.zeros(shape, dtype=torch.long, device=device).index_put_((pos_row, slot), cnt)
    pos_ge = torch.zeros(shape, dtype=torch.long, device=device).index_put_((pos_row, slot), pos_cnt)
    valid = torch.arange(width, device=device).unsqueeze(0) < num_pos.unsqueeze(1)
    return valid, pos_ge, cnt_ge


def positives_by_counting(
    row_scores: torch.Tensor,
    pos_scores: torch.Tensor,
    pos_valid: torch.Tensor,
    workspace: Workspace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same result as :func:`positives_from_ranked`, by one counting pass per positive slot.

    Cheaper than sorting a row when its positives rank deep but are few.
    """
    ordered, _ = torch.sort(pos_scores.masked_fill(~pos_valid, _NEG_INF), dim=1, descending=True)
    valid = torch.sort(pos_valid.to(torch.int8), dim=1, descending=True).values.bool()
    cnt_ge = torch.stack(
        [workspace.count_ge(row_scores, ordered[:, slot]) for slot in range(ordered.shape[1])], dim=1
    )
    pos_ge = torch.count_nonzero(
        valid.unsqueeze(1) & (ordered.unsqueeze(1) >= ordered.unsqueeze(2)), dim=2
    )
    return valid, pos_ge, cnt_ge


def _row_sum(values: torch.Tensor, num_pos: torch.Tensor) -> torch.Tensor:
    """Sum of the first ``num_pos`` entries of each row, added strictly left to right.

    A sequential scan makes the result independent of how wide the padded layout is (a vectorized
    ``sum`` associates differently for different widths), so every code path gives the same bits.
    """
    return torch.cumsum(values, dim=1).gather(1, (num_pos - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


def ranked_stats(
    valid: torch.Tensor,
    pos_ge: torch.Tensor,
    cnt_ge: torch.Tensor,
    num_pos: torch.Tensor,
    ks: Sequence[int],
) -> dict[str, torch.Tensor]:
    """AP, MAP@R, R-precision and recall@k counts from per-positive counts ``(r, P)``."""
    neg_ge = cnt_ge - pos_ge
    num_pos_f = num_pos.double()
    order = torch.arange(1, valid.shape[1] + 1, device=valid.device).unsqueeze(0)  # m
    precision_at_threshold = pos_ge.double() / cnt_ge.clamp(min=1).double()
    ap = _row_sum(torch.where(valid, precision_at_threshold, 0.0), num_pos) / num_pos_f
    rank = order + neg_ge  # pessimistic rank of the m-th best positive
    in_top_r = valid & (rank <= num_pos.unsqueeze(1))
    r_precision = torch.count_nonzero(in_top_r, dim=1).double() / num_pos_f
    map_at_r = _row_sum(torch.where(in_top_r, order.double() / rank.double(), 0.0), num_pos) / num_pos_f
    hits = [torch.count_nonzero(valid & (rank <= k), dim=1) for k in ks]
    recall_hits = torch.stack(hits, dim=1) if hits else num_pos.new_zeros((len(num_pos), 0))
    return {"ap": ap, "r_precision": r_precision, "map_at_r": map_at_r, "recall_hits": recall_hits}


def curves_from_ranked(group: RankedGroup, num_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """PR points of a ranked group, plus each row's max-F1 point.

    One point per distinct score of a row, from its lowest positive (where recall reaches 1) up.
    Returns ``counts`` ``(r,)`` (points per row) and the points row after row, each row's by
    increasing threshold (scikit-learn's order): ``precisions`` / ``recalls`` (float64) and
    ``thresholds`` (the scores' dtype), plus ``max_f1``, ``p_at_max_f1``, ``r_at_max_f1``,
    ``t_at_max_f1`` ``(r,)`` (the highest threshold among equal F1).
    """
    num_rows = group.rows.numel()
    device = group.value.device
    num_items = group.value.numel()
    kept = torch.nonzero(group.first_of_tie).squeeze(1)  # one point per tie group, by row
    no_ties = kept.numel() == num_items  # the usual case: then every item is a point
    row = group.row_of if no_ties else group.row_of.index_select(0, kept)
    row_start = group.start.index_select(0, row)
    pos_before_item = torch.cumsum(group.is_pos, 0) - group.is_pos.long()  # positives earlier in the layout
    pos_before = pos_before_item if no_ties else pos_before_item.index_select(0, kept)
    pos_before_row = pos_before_item.index_select(0, group.start).index_select(0, row)
    row_num_pos = num_pos.index_select(0, row)
    # items / positives scoring >= the point: everything from the point to the row's end
    true_pos = (row_num_pos - (pos_before - pos_before_row)).double()
    retrieved = (group.depth.index_select(0, row) - (kept - row_start)).double()
    precision = true_pos / retrieved
    recall = true_pos / row_num_pos.double()
    f1 = 2 * true_pos / (retrieved + row_num_pos.double())  # = 2PR / (P + R), rounded once
    best_f1 = torch.full((num_rows,), -1.0, dtype=torch.float64, device=device)
    best_f1.scatter_reduce_(0, row, f1, "amax")
    point = torch.arange(kept.numel(), device=device)
    best = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    best.scatter_reduce_(0, row, torch.where(f1 == best_f1.index_select(0, row), point, -1), "amax")
    value = group.value if no_ties else group.value.index_select(0, kept)
    return {
        "counts": group.depth if no_ties else torch.bincount(row, minlength=num_rows),
        "precisions": precision,
        "recalls": recall,
        "thresholds": value,
        "max_f1": best_f1,
        "p_at_max_f1": precision.index_select(0, best),
        "r_at_max_f1": recall.index_select(0, best),
        "t_at_max_f1": value.index_select(0, best),
    }


def _chunk_curves(num_rows: int, parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The PR curves of every row of a chunk, flat, from the curves of its ranked groups.

    Each row's points (by increasing threshold) are followed by the end point ``precision 1,
    recall 0``, which has no threshold; rows without points get only the end point.
    """
    counts = torch.zeros(num_rows, dtype=torch.long, device=device)
    nan = torch.full((num_rows,), float("nan"), dtype=torch.float64, device=device)
    best = {key: nan.clone() for key in ("max_f1", "p_at_max_f1", "r_at_max_f1")}
    best["t_at_max_f1"] = torch.full((num_rows,), float("nan"), dtype=dtype, device=device)
    for rows, curve in parts:
        counts[rows] = curve["counts"]
        for key in best:
            best[key][rows] = curve[key].to(best[key].dtype)
    flat = {key: torch.cat([curve[key] for _, curve in parts]) if parts else torch.zeros(0, dtype=torch.float64)
            for key in ("precisions", "recalls")}
    thresholds = torch.cat([curve["thresholds"] for _, curve in parts]) if parts else torch.zeros(0, dtype=dtype)
    row_of_point = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    at = torch.arange(row_of_point.numel(), device=device) + row_of_point  # one end point per earlier row
    out = {}
    for key, end_value in (("precisions", 1.0), ("recalls", 0.0)):
        curve = torch.full((row_of_point.numel() + num_rows,), end_value, dtype=torch.float64, device=device)
        out[f"curve_{key}"] = curve.index_copy_(0, at, flat[key].to(device))
    out.update(curve_thresholds=thresholds.to(dtype), curve_counts=counts, **best)
    return out


def chunk_stats(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (),
    memory_budget: int = 256 * 1024**2,
    ranks: bool = True,
    curves: bool = False,
    need_max_neg: bool = True,
    need_first_rank: bool = True,
    workspace: Workspace | None = None,
    backend: str = "auto",
    curve_dtype: torch.dtype = torch.float64,
) -> dict[str, object]:
    """All per-query statistics for one chunk of query rows ``scores (c, G)``.

    CPU chunks run in :mod:`recognite.eval._rows_cpu` (NumPy blocks as work items of a thread
    pool; identical results), other devices with the torch operations below. ``backend="torch"``
    forces the torch operations (tests compare the two).

    With ``ranks=False`` only :func:`extreme_stats` is computed (no sorting at all).
    With ``curves=True`` every row's PR curve is added, flat (see :func:`_chunk_curves`):
    ``curve_counts`` ``(c,)`` points per row (without the end point), ``curve_precisions`` /
    ``curve_recalls`` ``(sum(curve_counts) + c,)``, ``curve_thresholds`` ``(sum(curve_counts),)``,
    and the max-F1 fields. Curve precisions and recalls are computed in float64 and returned in
    ``curve_dtype`` (rounded once).
    """
    if backend == "auto" and scores.device.type == "cpu":
        stats = cpu_chunk_stats(scores, label_index.sorted_labels, label_index.order, query_labels, ks,
                                ranks, curves, need_max_neg, need_first_rank, curve_dtype=curve_dtype,
                                memory_budget=memory_budget)
        return _curves_in(stats, curve_dtype)
    workspace = workspace if workspace is not None else Workspace()
    out: dict[str, object] = dict(
        extreme_stats(scores, label_index, query_labels, need_max_neg, need_first_rank, workspace)
    )
    if not ranks:
        return out
    num_rows = scores.shape[0]
    num_pos = out["num_pos"]
    min_pos = out["min_pos"]
    depth = workspace.count_ge(scores, min_pos)  # type: ignore[arg-type]
    nan = torch.full((num_rows,), float("nan"), dtype=torch.float64, device=scores.device)
    ap, r_precision, map_at_r = nan.clone(), nan.clone(), nan.clone()
    recall_hits = torch.zeros((num_rows, len(ks)), dtype=torch.long, device=scores.device)
    curve_parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def store(rows: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        ap[rows] = stats["ap"]
        r_precision[rows] = stats["r_precision"]
        map_at_r[rows] = stats["map_at_r"]
        recall_hits[rows] = stats["recall_hits"]

    if not curves:
        depth = _count_deep_rows(scores, label_index, query_labels, ks, memory_budget, num_pos, depth,  # type: ignore[arg-type]
                                 workspace, store)
    for group in ranked_rows(scores, label_index, query_labels, depth, min_pos, memory_budget, workspace):  # type: ignore[arg-type]
        row_num_pos = num_pos.index_select(0, group.rows)  # type: ignore[union-attr]
        valid, pos_ge, cnt_ge = positives_from_ranked(group, row_num_pos)
        store(group.rows, ranked_stats(valid, pos_ge, cnt_ge, row_num_pos, ks))
        if curves:
            curve_parts.append((group.rows, curves_from_ranked(group, row_num_pos)))
    out.update(ap=ap, r_precision=r_precision, map_at_r=map_at_r, recall_hits=recall_hits)
    if curves:
        out.update(_chunk_curves(num_rows, curve_parts, scores.dtype, scores.device))
    return _curves_in(out, curve_dtype)


def _curves_in(stats: dict, curve_dtype: torch.dtype) -> dict[str, object]:
    """``stats`` with the curve precisions and recalls (when present) in ``curve_dtype``."""
    for key in ("curve_precisions", "curve_recalls"):
        if key in stats:
            stats[key] = stats[key].to(curve_dtype)
    return stats


def _count_deep_rows(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    ks: Sequence[int],
    memory_budget: int,
    num_pos: torch.Tensor,
    depth: torch.Tensor,
    workspace: Workspace,
    store: Callable[[torch.Tensor, dict[str, torch.Tensor]], None],
) -> torch.Tensor:
    """Stats of the rows whose positives rank so deep that a sort would be long, but that have few
    positives: counted instead of sorted (one pass per positive). Returns ``depth`` with those
    rows set to 0, so the ranked path skips them.
    """
    num_rows, num_gallery = scores.shape
    deep = (depth > 0) & (num_pos <= _MAX_COUNTED_POSITIVES)
    deep &= (depth > _MAX_TOPK_DEPTH) | (4 * depth > num_gallery)
    deep_rows = torch.nonzero(deep).squeeze(1)
    if deep_rows.numel() == 0:
        return depth
    pos_index, pos_valid, _ = label_index.positives(query_labels)
    if 2 * deep_rows.numel() >= num_rows:
        # Mostly deep: count on the chunk itself (no row copy), keep the deep rows.
        valid, pos_ge, cnt_ge = positives_by_counting(scores, scores.gather(1, pos_index), pos_valid, workspace)
        stats = ranked_stats(valid, pos_ge, cnt_ge, num_pos, ks)
        store(deep_rows, {key: value[deep_rows] for key, value in stats.items()})
    else:
        for rows in deep_rows.split(max(1, memory_budget // (_BYTES_PER_ELEMENT_COUNTED * num_gallery))):
            row_scores = scores.index_select(0, rows)
            row_pos_scores = row_scores.gather(1, pos_index.index_select(0, rows))
            valid, pos_ge, cnt_ge = positives_by_counting(
                row_scores, row_pos_scores, pos_valid.index_select(0, rows), workspace
            )
            store(rows, ranked_stats(valid, pos_ge, cnt_ge, num_pos.index_select(0, rows), ks))
    return depth.masked_fill(deep, 0)


def merge_chunks(parts: list[dict[str, object]]) -> dict[str, object]:
    """Concatenate per-chunk statistics along dim 0 (flat curves stay in row order)."""
    if len(parts) == 1:
        return parts[0]
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
    need_max_neg: bool = True,
    need_first_rank: bool = True,
    curve_dtype: torch.dtype = torch.float64,
) -> dict[str, object]:
    """:func:`chunk_stats` over row chunks of a full ``(Q, G)`` score matrix.

    On the CPU the whole matrix is one chunk: its passes already run in blocks of a few MB.
    """
    chunk = scores.shape[0] if scores.device.type == "cpu" else rows_per_chunk(scores.shape[1], memory_budget)
    label_index = LabelIndex(gallery_labels)
    workspace = Workspace()
    parts = [
        chunk_stats(
            scores[start : start + chunk], label_index, query_labels[start : start + chunk],
            ks, memory_budget, ranks, curves, need_max_neg, need_first_rank, workspace, curve_dtype=curve_dtype,
        )
        for start in range(0, scores.shape[0], chunk)
    ]
    return merge_chunks(parts)
