"""The engine's per-query statistics on the CPU: NumPy passes over blocks of rows (private).

:func:`recognite.eval._engine.chunk_stats` runs here for CPU score chunks. The statistics, tie
rules and arithmetic are those of the device engine in ``_engine.py`` (see its module docstring),
bit for bit; only the execution differs:

* A chunk is cut into blocks of a few MB of scores. Each block is one work item, reduced to its
  rows' statistics by single-threaded NumPy operations (which release the GIL), and the items are
  taken by ``torch.get_num_threads()`` worker threads as each finishes its previous one. On a busy
  machine the thread that shares a core with another process simply takes fewer blocks, where a
  statically split OpenMP operation would wait for its half. The caller's thread count is read,
  never changed; with one thread the blocks run in the calling thread.
* Every temporary is the size of a block, so the passes run in the CPU cache and nothing as large
  as the chunk is allocated.
* The items scoring at least a row's lowest positive are sorted by one NumPy sort of 64-bit keys
  ``row << 32 | rank`` per block, where ``rank`` is the score's bit pattern mapped to an unsigned
  integer in float order (float32), or its rank among the block's distinct scores (other dtypes).
  Positives are found through the label index and located in the sorted keys by binary search, so
  the counts of items and of positives scoring ``>=`` any score need no per-item flags.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ._checks import NON_FINITE_MESSAGE

T = TypeVar("T")

NO_RANK = int(np.iinfo(np.int64).max)
"""First-positive rank of a query without positives (never <= any k)."""

_BLOCK_BYTES = 8 * 1024**2  # scores per work item (a block of rows; larger blocks pass the GIL less often)
_TEMPORARY_PER_SCORE_BYTE = 12  # a block's temporaries (flags, copies, picked items, keys, curves)
_CACHE_BYTES = 1024**2  # the part of a block that every pass reads while it is in the cache
_ROW_SHIFT = 32  # keys: row << 32 | 32-bit rank of the score
_SCORE_BITS = (1 << _ROW_SHIFT) - 1
_SORT_COST = 16  # a picked item costs about as much as this many compared scores (sort, gather)


class RowInputs:
    """One chunk's NumPy views and the settings of the pass (shared read-only by the workers)."""

    def __init__(
        self,
        scores: np.ndarray,
        gallery_sorted_labels: np.ndarray,
        gallery_order: np.ndarray,
        query_labels: np.ndarray,
        ks: Sequence[int],
        ranks: bool,
        curves: bool,
        need_max_neg: bool,
        need_first_rank: bool,
        curve_dtype: type = np.float64,
    ) -> None:
        self.scores = scores
        self.sorted_labels = gallery_sorted_labels
        self.order = gallery_order
        self.query_labels = query_labels.astype(gallery_sorted_labels.dtype, copy=False)
        self.ks = tuple(ks)
        self.ranks = ranks
        self.curves = curves
        self.need_max_neg = need_max_neg
        self.need_first_rank = need_first_rank
        self.curve_dtype = curve_dtype
        self.fast_keys = scores.dtype == np.float32
        self._local = threading.local()

    def buffer(self, name: str, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """A ``shape`` view of this thread's reused buffer ``name`` (blocks never exceed the first)."""
        buffers = self._local.__dict__
        buf = buffers.get(name)
        if buf is None or buf.size < shape[0] * shape[1]:
            buf = buffers[name] = np.empty(shape[0] * shape[1], dtype=dtype)
        return buf[: shape[0] * shape[1]].reshape(shape)


def block_rows(num_cols: int, itemsize: int, block_bytes: int = _BLOCK_BYTES) -> int:
    """Rows per work item for rows of ``num_cols`` scores of ``itemsize`` bytes (at least 1)."""
    return max(1, block_bytes // (itemsize * max(1, num_cols)))


def run_blocks(work: Callable[[int, int], T], num_rows: int, rows: int, workers: int) -> list[T]:
    """``work(start, stop)`` for consecutive blocks of ``rows`` rows; the results in block order.

    With ``workers > 1`` the blocks are work items of a pool of that many threads, each taking the
    next block as soon as it is free (dynamic distribution).
    """
    starts = range(0, num_rows, rows)
    if workers <= 1 or len(starts) == 1:
        return [work(start, min(start + rows, num_rows)) for start in starts]
    with ThreadPoolExecutor(max_workers=min(workers, len(starts)), thread_name_prefix="recognite-eval") as pool:
        return list(pool.map(lambda start: work(start, min(start + rows, num_rows)), starts))


def _float32_ranks(values: np.ndarray) -> np.ndarray:
    """int64 in ``[0, 2**32)``, in the float order of the float32 ``values`` (``-0.0`` as ``0.0``)."""
    bits = (values + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into 0.0: one key per value
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64) + 2**31


def _float32_from_ranks(ranks: np.ndarray) -> np.ndarray:
    bits = (ranks - 2**31).astype(np.int32)
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).view(np.float32)


def _row_counts(flags: np.ndarray) -> np.ndarray:
    """``(r,)`` int64: true entries per row of a contiguous ``(r, G)`` bool array.

    One flat ``count_nonzero`` per row: several times faster than ``count_nonzero(axis=1)``, which
    sums bytes as integers.
    """
    return np.fromiter((np.count_nonzero(row) for row in flags), dtype=np.int64, count=flags.shape[0])


def _row_sum(values: np.ndarray, num_pos: np.ndarray) -> np.ndarray:
    """Sum of the first ``num_pos`` entries of each row, strictly left to right (as the device engine)."""
    return np.take_along_axis(np.cumsum(values, axis=1), np.maximum(num_pos - 1, 0)[:, None], 1)[:, 0]


def _ranked_stats(
    valid: np.ndarray, pos_ge: np.ndarray, cnt_ge: np.ndarray, num_pos: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """AP, MAP@R, R-precision and recall@k counts from per-positive counts ``(r, P)``.

    The formulas of ``_engine.ranked_stats`` in the same float64 operation order; rows without
    positives get ``nan`` (0 / 0).
    """
    neg_ge = cnt_ge - pos_ge
    num_pos_f = num_pos.astype(np.float64)
    order = np.arange(1, valid.shape[1] + 1)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_at_threshold = pos_ge.astype(np.float64) / np.maximum(cnt_ge, 1).astype(np.float64)
        ap = _row_sum(np.where(valid, precision_at_threshold, 0.0), num_pos) / num_pos_f
        rank = order + neg_ge
        in_top_r = valid & (rank <= num_pos[:, None])
        r_precision = np.count_nonzero(in_top_r, axis=1).astype(np.float64) / num_pos_f
        map_at_r = _row_sum(np.where(in_top_r, order.astype(np.float64) / rank.astype(np.float64), 0.0),
                            num_pos) / num_pos_f
    hits = np.zeros((valid.shape[0], len(ks)), dtype=np.int64)
    for column, k in enumerate(ks):
        hits[:, column] = np.count_nonzero(valid & (rank <= k), axis=1)
    return {"ap": ap, "r_precision": r_precision, "map_at_r": map_at_r, "recall_hits": hits}


def block_stats(inputs: RowInputs, start: int, stop: int) -> dict[str, np.ndarray]:
    """Every requested statistic of the rows ``start:stop`` of the chunk (one work item)."""
    block = np.ascontiguousarray(inputs.scores[start:stop])
    num_rows, num_gallery = block.shape
    # Positives through the label index: (r, P) gallery indices, padding marked invalid.
    labels = inputs.query_labels[start:stop]
    first = np.searchsorted(inputs.sorted_labels, labels, side="left")
    num_pos = np.searchsorted(inputs.sorted_labels, labels, side="right") - first
    width = max(1, int(num_pos.max()))
    slots = np.arange(width)
    valid = slots[None, :] < num_pos[:, None]
    position = np.minimum(first[:, None] + np.where(valid, slots[None, :], 0), inputs.order.size - 1)
    pos_index = np.where(num_pos[:, None] > 0, inputs.order[position], 0)
    pos_scores = np.take_along_axis(block, pos_index, 1)
    max_pos = np.where(valid, pos_scores, -np.inf).max(axis=1)
    min_pos = np.where(valid, pos_scores, np.inf).min(axis=1)
    out = {"num_pos": num_pos, "num_neg": num_gallery - num_pos, "max_pos": max_pos, "min_pos": min_pos}
    # Every pass over the scores, a part of the block at a time while that part is in the CPU cache:
    # the finiteness check, the copy for the negatives, the two comparisons.
    flags = inputs.buffer("flags", block.shape, np.dtype(bool)) if inputs.ranks else None  # items >= the lowest positive
    above_best = inputs.buffer("above_best", block.shape, np.dtype(bool)) if inputs.need_first_rank else None
    negatives = inputs.buffer("negatives", block.shape, block.dtype) if inputs.need_max_neg else None
    above = np.zeros(num_rows, dtype=np.int64)
    step = block_rows(num_gallery, block.itemsize, _CACHE_BYTES)
    for low in range(0, num_rows, step):
        high = min(low + step, num_rows)
        part = block[low:high]
        with np.errstate(over="ignore", invalid="ignore"):  # a sum of large finite scores may overflow
            total = part.sum()
        if not np.isfinite(total) and not np.isfinite(part).all():  # one read when finite
            raise ValueError(NON_FINITE_MESSAGE)
        if negatives is not None:
            np.copyto(negatives[low:high], part)
        if above_best is not None:
            above[low:high] = _row_counts(np.greater_equal(part, max_pos[low:high, None], out=above_best[low:high]))
        if flags is not None:
            np.greater_equal(part, min_pos[low:high, None], out=flags[low:high])
    if negatives is not None:
        np.put_along_axis(negatives, pos_index, np.where(num_pos[:, None] > 0, -np.inf, pos_scores), 1)
        out["max_neg"] = np.where(num_gallery - num_pos > 0, negatives.max(axis=1), -np.inf).astype(block.dtype)
    if inputs.need_first_rank:
        # 1 + the negatives scoring >= the best positive = 1 + all such items - the tied positives.
        ties = np.count_nonzero(valid & (pos_scores >= max_pos[:, None]), axis=1)
        out["first_rank"] = np.where(num_pos > 0, 1 + above - ties, NO_RANK)
    if not inputs.ranks:
        return out
    if not inputs.curves:
        depth = _row_counts(flags)
        if width * block.size < _SORT_COST * int(depth.sum()):  # deep rows, few positives: count
            out.update(_counted(block, pos_scores, valid, num_pos, inputs.ks))
            return out
    picked = np.flatnonzero(flags)
    values = block.reshape(-1).take(picked)
    row_of = picked // num_gallery
    pos_values = pos_scores[valid]  # row after row
    pos_row = np.repeat(np.arange(num_rows), num_pos)
    if inputs.fast_keys:
        keys = (row_of << _ROW_SHIFT) | _float32_ranks(values)
        pos_keys = (pos_row << _ROW_SHIFT) | _float32_ranks(pos_values)
        distinct = None
    else:  # rank among the block's distinct scores (np.unique: -0.0 == 0.0)
        distinct, rank = np.unique(values, return_inverse=True)
        keys = (row_of << _ROW_SHIFT) | rank.reshape(-1)
        pos_keys = (pos_row << _ROW_SHIFT) | np.searchsorted(distinct, pos_values)
    keys.sort()
    pos_keys.sort()  # by row, then by increasing score
    row_end = np.searchsorted(keys, np.arange(1, num_rows + 1, dtype=np.int64) << _ROW_SHIFT)
    pos_row_end = np.cumsum(num_pos)
    pos_at = np.searchsorted(keys, pos_keys, side="left")  # where each positive's tie group starts
    out.update(_sorted_positives(pos_keys, pos_at, row_end, pos_row_end, num_pos, width, inputs.ks))
    if inputs.curves:
        out.update(_curves(keys, pos_at, row_end, pos_row_end, num_pos, distinct, block.dtype, inputs.curve_dtype))
    return out


def _counted(
    block: np.ndarray, pos_scores: np.ndarray, valid: np.ndarray, num_pos: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-positive counts by one counting pass per positive slot (rows too deep to sort cheaply)."""
    ordered = -np.sort(-np.where(valid, pos_scores, -np.inf), axis=1)  # decreasing; padding last
    cnt_ge = np.empty(ordered.shape, dtype=np.int64)
    for slot in range(ordered.shape[1]):
        cnt_ge[:, slot] = _row_counts(block >= ordered[:, slot : slot + 1])
    pos_ge = np.count_nonzero(valid[:, None, :] & (ordered[:, None, :] >= ordered[:, :, None]), axis=2)
    return _ranked_stats(valid, pos_ge, cnt_ge, num_pos, ks)


def _sorted_positives(
    pos_keys: np.ndarray,
    pos_at: np.ndarray,
    row_end: np.ndarray,
    pos_row_end: np.ndarray,
    num_pos: np.ndarray,
    width: int,
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Per-positive counts from the sorted keys: items and positives scoring ``>=`` each positive."""
    pos_row = pos_keys >> _ROW_SHIFT
    cnt = row_end[pos_row] - pos_at
    pos_cnt = pos_row_end[pos_row] - np.searchsorted(pos_keys, pos_keys, side="left")
    # slot 0 = the row's best positive: positions count down from the row's end
    slot = pos_row_end[pos_row] - 1 - np.arange(pos_keys.size)
    shape = (num_pos.size, width)
    cnt_ge = np.zeros(shape, dtype=np.int64)
    pos_ge = np.zeros(shape, dtype=np.int64)
    cnt_ge[pos_row, slot] = cnt
    pos_ge[pos_row, slot] = pos_cnt
    valid = np.arange(width)[None, :] < num_pos[:, None]
    return _ranked_stats(valid, pos_ge, cnt_ge, num_pos, ks)


def _curves(
    keys: np.ndarray,
    pos_at: np.ndarray,
    row_end: np.ndarray,
    pos_row_end: np.ndarray,
    num_pos: np.ndarray,
    distinct: np.ndarray | None,
    dtype: np.dtype,
    curve_dtype: type,
) -> dict[str, np.ndarray]:
    """PR points of the block's rows with their end points, and each row's max-F1 point.

    The layout and values of ``_engine.curves_from_ranked`` followed by ``_engine._chunk_curves``.
    ``pos_at``: each positive's position in ``keys`` (the start of its tie group).
    """
    num_rows = num_pos.size
    new_point = np.empty(keys.size, dtype=bool)
    new_point[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new_point[1:])
    kept = np.flatnonzero(new_point)
    no_ties = kept.size == keys.size
    point_keys = keys if no_ties else keys[kept]
    point_end = row_end if no_ties else np.searchsorted(kept, row_end)
    counts = np.diff(point_end, prepend=0)  # points per row
    # positives placed before each item (all earlier rows, and this row's lower scores)
    below = np.zeros(keys.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(pos_at, minlength=keys.size)[: keys.size], out=below[1:])
    true_pos = (np.repeat(pos_row_end, counts) - (below[:-1] if no_ties else below[kept])).astype(np.float64)
    retrieved = (np.repeat(row_end, counts) - kept).astype(np.float64)
    row_num_pos = np.repeat(num_pos.astype(np.float64), counts)
    precision = true_pos / retrieved
    recall = true_pos / row_num_pos
    f1 = 2 * true_pos / (retrieved + row_num_pos)  # = 2PR / (P + R), rounded once
    thresholds = _float32_from_ranks(point_keys & _SCORE_BITS) if distinct is None else distinct[point_keys & _SCORE_BITS]
    rows_with_points = np.flatnonzero(counts)
    nan = np.full(num_rows, np.nan)
    best = {key: nan.copy() for key in ("max_f1", "p_at_max_f1", "r_at_max_f1")}
    t_best = np.full(num_rows, np.nan, dtype=dtype)
    if kept.size:
        best_f1 = np.maximum.reduceat(f1, (point_end - counts)[rows_with_points])
        candidates = np.flatnonzero(f1 == np.repeat(best_f1, counts[rows_with_points]))
        candidate_row = np.searchsorted(point_end, candidates, side="right")
        last = np.ones(candidates.size, dtype=bool)  # the highest threshold among a row's equal F1
        np.not_equal(candidate_row[1:], candidate_row[:-1], out=last[:-1])
        point = candidates[last]
        best["max_f1"][rows_with_points] = best_f1
        best["p_at_max_f1"][rows_with_points] = precision[point]
        best["r_at_max_f1"][rows_with_points] = recall[point]
        t_best[rows_with_points] = thresholds[point]
    at = np.arange(kept.size) + np.repeat(np.arange(num_rows), counts)  # each earlier row adds its end point
    curve_precisions = np.ones(kept.size + num_rows, dtype=curve_dtype)  # float64 values rounded once
    curve_recalls = np.zeros(kept.size + num_rows, dtype=curve_dtype)
    curve_precisions[at] = precision
    curve_recalls[at] = recall
    return {"curve_precisions": curve_precisions, "curve_recalls": curve_recalls,
            "curve_thresholds": thresholds.astype(dtype, copy=False), "curve_counts": counts,
            **best, "t_at_max_f1": t_best}


def cpu_chunk_stats(
    scores: torch.Tensor,
    gallery_sorted_labels: torch.Tensor,
    gallery_order: torch.Tensor,
    query_labels: torch.Tensor,
    ks: Sequence[int],
    ranks: bool,
    curves: bool,
    need_max_neg: bool,
    need_first_rank: bool,
    block_bytes: int = _BLOCK_BYTES,
    workers: int | None = None,
    curve_dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
) -> dict[str, torch.Tensor]:
    """``_engine.chunk_stats`` for a CPU chunk ``scores (c, G)``: the same keys, dtypes and values.

    float16 / bfloat16 scores are widened to float32 (exactly) and the score-valued results
    narrowed back. ``workers`` defaults to ``torch.get_num_threads()`` (the caller's setting).
    Curve precisions and recalls are float32 when ``curve_dtype`` is float32 (rounded once from
    float64), else float64. With ``memory_budget``, blocks are made small enough that the workers'
    temporaries together stay within it (about :data:`_TEMPORARY_PER_SCORE_BYTE` bytes per byte of
    a block's scores, when every item is picked).
    """
    dtype = scores.dtype
    wide = scores if dtype in (torch.float32, torch.float64) else scores.float()
    inputs = RowInputs(
        wide.numpy(), gallery_sorted_labels.numpy(), gallery_order.numpy(), query_labels.numpy(),
        ks, ranks, curves, need_max_neg, need_first_rank,
        np.float32 if curve_dtype == torch.float32 else np.float64,
    )
    workers = torch.get_num_threads() if workers is None else workers
    if memory_budget is not None:
        block_bytes = min(block_bytes, memory_budget // (max(1, workers) * _TEMPORARY_PER_SCORE_BYTE))
    rows = block_rows(wide.shape[1], wide.element_size(), block_bytes)
    parts = run_blocks(lambda start, stop: block_stats(inputs, start, stop), wide.shape[0], rows, workers)
    out: dict[str, torch.Tensor] = {}
    for key in parts[0]:
        merged = torch.from_numpy(np.concatenate([part[key] for part in parts]))
        if key in ("max_pos", "min_pos", "max_neg", "curve_thresholds", "t_at_max_f1"):
            merged = merged.to(dtype)
        out[key] = merged
    return out
