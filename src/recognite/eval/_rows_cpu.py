"""The engine's per-query statistics on the CPU: NumPy passes over blocks of rows (private).

:func:`recognite.eval._engine.chunk_stats` runs here for CPU score chunks. The statistics, tie
rules and arithmetic are those of the device engine in ``_engine.py`` (see its module docstring),
bit for bit; only the execution differs:

* A chunk is cut into blocks of a few MB of scores. Each block is one work item, reduced by
  single-threaded NumPy operations on whole blocks (which release the GIL), and the items are taken
  by ``torch.get_num_threads()`` worker threads as each finishes its previous one. On a busy
  machine the thread that shares a core with another process simply takes fewer blocks, where a
  statically split OpenMP operation would wait for its half. The caller's thread count is read,
  never changed; with one thread the blocks run in the calling thread.
* Work on small per-row arrays (the positives of each query, AP from the per-positive counts) runs
  once per chunk in the calling thread, not once per block: every NumPy call in a worker has to
  take the GIL back, and under two threads each such hand-off costs more than a small operation.
* Every temporary is the size of a block or of a cached part of it, so the passes run in the CPU
  cache and nothing as large as the chunk is allocated.
* The items scoring at least a row's lowest positive are sorted by one NumPy sort of 64-bit keys
  ``row << 32 | rank`` per block, where ``rank`` is the score's bit pattern mapped to an unsigned
  integer in float order (float32), or its rank among the block's distinct scores (other dtypes).
  With curves, each row also gets an end key (``rank`` = all ones, above every finite score), so
  the sorted keys are already in the layout of the curves (each row's points, then its end point).
  Positives are located in the sorted keys by binary search, so the counts of items and of
  positives scoring ``>=`` any score need no per-item flags.
"""

from __future__ import annotations

import math
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
_TEMPORARY_PER_SCORE_BYTE = 12  # a block's temporaries (flags, picked items, keys, curves)
_CACHE_BYTES = 1024**2  # the part of a block that every pass reads while it is in the cache
_ROW_SHIFT = 32  # keys: row << 32 | 32-bit rank of the score
_SCORE_BITS = (1 << _ROW_SHIFT) - 1  # also the rank of a row's end key (above every finite score)
_SORT_COST = 16  # a picked item costs about as much as this many compared scores (sort, gather)
_COUNT_COLUMNS = int(np.iinfo(np.int16).max)  # row counts are int16 sums over at most this many columns
_FLOAT32_SIGN = np.int32(-(2**31))
_FLOAT32_MAGNITUDE = np.int32(2**31 - 1)


class RowInputs:
    """One chunk's NumPy views, its queries' positives and the settings of the pass.

    Shared read-only by the workers. The positives of every row are found once for the chunk:
    ``pos_index (c, P)`` gallery indices, ``valid (c, P)`` (``P`` = the chunk's largest positive
    count; padding slots repeat a row's first positive, or point at item 0 when it has none),
    ``pos_scores (c, P)``, ``max_pos`` / ``min_pos (c,)`` (``-inf`` / ``inf`` without positives).
    """

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
        self.ks = tuple(ks)
        self.ranks = ranks
        self.curves = curves
        self.need_max_neg = need_max_neg
        self.need_first_rank = need_first_rank
        self.curve_dtype = curve_dtype
        self.fast_keys = scores.dtype == np.float32
        self._local = threading.local()
        labels = query_labels.astype(gallery_sorted_labels.dtype, copy=False)
        first = np.searchsorted(gallery_sorted_labels, labels, side="left")
        self.num_pos = np.searchsorted(gallery_sorted_labels, labels, side="right") - first
        width = max(1, int(self.num_pos.max()) if self.num_pos.size else 1)
        slots = np.arange(width)
        self.valid = slots[None, :] < self.num_pos[:, None]
        position = np.minimum(first[:, None] + np.where(self.valid, slots[None, :], 0), gallery_order.size - 1)
        self.pos_index = np.where(self.num_pos[:, None] > 0, gallery_order[position], 0)
        self.pos_scores = np.take_along_axis(scores, self.pos_index, 1)
        self.max_pos = np.where(self.valid, self.pos_scores, -np.inf).max(axis=1)
        self.min_pos = np.where(self.valid, self.pos_scores, np.inf).min(axis=1)
        # what a copy of a row gets at its positives' places to leave only its negatives
        self.negative_fill = np.where(self.num_pos[:, None] > 0, -np.inf, self.pos_scores).astype(scores.dtype)

    def buffer(self, name: str, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """A ``shape`` view of this thread's reused buffer ``name`` (grown when too small)."""
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


def _float32_order(bits: np.ndarray) -> np.ndarray:
    """In place: int32 float bit patterns <-> int32 in float order (the map is its own inverse)."""
    magnitude = bits >> 31  # -1 for negative floats: their magnitude bits are flipped
    magnitude &= _FLOAT32_MAGNITUDE
    bits ^= magnitude
    return bits


def _float32_ranks(values: np.ndarray) -> np.ndarray:
    """uint32 in the float order of the float32 ``values`` (``-0.0`` as ``0.0``)."""
    bits = (values + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into 0.0: one key per value
    _float32_order(bits)
    bits ^= _FLOAT32_SIGN  # signed order -> unsigned order
    return bits.view(np.uint32)


def _float32_from_ranks(keys: np.ndarray) -> np.ndarray:
    """The float32 scores of the ranks in the low 32 bits of int64 ``keys``."""
    bits = keys.astype(np.uint32).view(np.int32)  # the low 32 bits
    bits ^= _FLOAT32_SIGN
    return _float32_order(bits).view(np.float32)


def _row_counts(flags: np.ndarray) -> np.ndarray:
    """``(r,)`` int64: true entries per row of an ``(r, G)`` bool array.

    int16 sums of at most 32767 columns at a time: one GIL-free call per column range, several
    times faster than ``count_nonzero(axis=1)``, which sums bytes as 64-bit integers.
    """
    counts = np.zeros(flags.shape[0], dtype=np.int64)
    for low in range(0, flags.shape[1], _COUNT_COLUMNS):
        counts += np.add.reduce(flags[:, low : low + _COUNT_COLUMNS].view(np.int8), axis=1, dtype=np.int16)
    return counts


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
    """The per-block statistics of the rows ``start:stop`` of the chunk (one work item).

    ``above (r,)``: items scoring ``>=`` the best positive; ``row_max_neg (r,)``; ``cnt_ge`` /
    ``pos_ge (r, P)``: items and positives scoring ``>=`` each positive (slot 0 = the best); the
    curves of :func:`_curves`. Finished per chunk by :func:`cpu_chunk_stats`.
    """
    block = np.ascontiguousarray(inputs.scores[start:stop])
    num_rows, num_gallery = block.shape
    rows = slice(start, stop)
    out: dict[str, np.ndarray] = {}
    # Every pass over the scores, a part of the block at a time while that part is in the CPU cache:
    # the finiteness check, the best-positive count, the negatives' maximum, the depth flags.
    step = block_rows(num_gallery, block.itemsize, _CACHE_BYTES)
    flags = inputs.buffer("flags", block.shape, np.dtype(bool)) if inputs.ranks else None  # items >= the lowest positive
    if inputs.need_first_rank:
        above_best = inputs.buffer("above_best", (min(step, num_rows), num_gallery), np.dtype(bool))
        above = out["above"] = np.empty(num_rows, dtype=np.int64)
    if inputs.need_max_neg:
        negatives = inputs.buffer("negatives", (min(step, num_rows), num_gallery), block.dtype)
        max_neg = out["row_max_neg"] = np.empty(num_rows, dtype=block.dtype)
    for low in range(0, num_rows, step):
        high = min(low + step, num_rows)
        part = block[low:high]
        if not (math.isfinite(part.max()) and math.isfinite(part.min())):  # max and min propagate NaN
            raise ValueError(NON_FINITE_MESSAGE)
        if inputs.need_first_rank:
            flags_part = np.greater_equal(part, inputs.max_pos[start + low : start + high, None],
                                          out=above_best[: high - low])
            above[low:high] = _row_counts(flags_part)
        if inputs.need_max_neg:
            copy = negatives[: high - low]
            np.copyto(copy, part)
            np.put_along_axis(copy, inputs.pos_index[start + low : start + high],
                              inputs.negative_fill[start + low : start + high], 1)
            np.max(copy, axis=1, out=max_neg[low:high])
        if flags is not None:
            np.greater_equal(part, inputs.min_pos[start + low : start + high, None], out=flags[low:high])
    if not inputs.ranks:
        return out
    num_pos = inputs.num_pos[rows]
    valid = inputs.valid[rows]
    pos_scores = inputs.pos_scores[rows]
    if not inputs.curves:
        depth = _row_counts(flags)
        width = max(1, int(num_pos.max()))
        if width * block.size < _SORT_COST * int(depth.sum()):  # deep rows, few positives: count
            out.update(_counted(block, pos_scores, valid, width))
            return out
    out.update(_sorted(inputs, block, flags, num_pos, valid, pos_scores))
    return out


def _counted(block: np.ndarray, pos_scores: np.ndarray, valid: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """Per-positive counts by one counting pass per positive slot (rows too deep to sort cheaply)."""
    ordered = -np.sort(-np.where(valid, pos_scores, -np.inf), axis=1)  # decreasing; padding last
    cnt_ge = np.zeros(ordered.shape, dtype=np.int64)
    flags = np.empty(block.shape, dtype=bool)
    for slot in range(width):
        cnt_ge[:, slot] = _row_counts(np.greater_equal(block, ordered[:, slot : slot + 1], out=flags))
    pos_ge = np.count_nonzero(valid[:, None, :] & (ordered[:, None, :] >= ordered[:, :, None]), axis=2)
    return {"cnt_ge": cnt_ge, "pos_ge": pos_ge}


def _sorted(
    inputs: RowInputs,
    block: np.ndarray,
    flags: np.ndarray,
    num_pos: np.ndarray,
    valid: np.ndarray,
    pos_scores: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-positive counts (and curves) from one sort of the block's picked items."""
    num_rows, num_gallery = block.shape
    picked = np.flatnonzero(flags)
    num_picked = picked.size
    values = block.reshape(-1).take(picked)
    keys = np.empty(num_picked + (num_rows if inputs.curves else 0), dtype=np.int64)
    np.floor_divide(picked, num_gallery, out=picked)  # the row of each item
    np.left_shift(picked, _ROW_SHIFT, out=keys[:num_picked])
    pos_values = pos_scores[valid]  # row after row
    pos_keys = np.repeat(np.arange(num_rows, dtype=np.int64), num_pos) << _ROW_SHIFT
    if inputs.fast_keys:
        keys[:num_picked] |= _float32_ranks(values)
        pos_keys |= _float32_ranks(pos_values)
        distinct = None
    else:  # rank among the block's distinct scores (np.unique: -0.0 == 0.0)
        distinct, rank = np.unique(values, return_inverse=True)
        keys[:num_picked] |= rank.reshape(-1)
        pos_keys |= np.searchsorted(distinct, pos_values)
    if inputs.curves:  # each row's end point, after its highest score
        keys[num_picked:] = (np.arange(num_rows, dtype=np.int64) << _ROW_SHIFT) | _SCORE_BITS
    keys.sort()
    pos_keys.sort()  # by row, then by increasing score
    row_end = np.searchsorted(keys, np.arange(1, num_rows + 1, dtype=np.int64) << _ROW_SHIFT)
    items_end = row_end - 1 if inputs.curves else row_end  # without the end keys
    pos_row_end = np.cumsum(num_pos)
    pos_at = np.searchsorted(keys, pos_keys, side="left")  # where each positive's tie group starts
    # items and positives scoring >= each positive; slot 0 = the row's best positive
    pos_row = pos_keys >> _ROW_SHIFT
    slot = pos_row_end[pos_row] - 1 - np.arange(pos_keys.size)
    cnt_ge = np.zeros(valid.shape, dtype=np.int64)
    pos_ge = np.zeros(valid.shape, dtype=np.int64)
    cnt_ge[pos_row, slot] = items_end[pos_row] - pos_at
    pos_ge[pos_row, slot] = pos_row_end[pos_row] - np.searchsorted(pos_keys, pos_keys, side="left")
    out = {"cnt_ge": cnt_ge, "pos_ge": pos_ge}
    if inputs.curves:
        out.update(_curves(keys, pos_at, row_end, pos_row_end, num_pos, distinct, block.dtype, inputs.curve_dtype))
    return out


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
    ``keys``: sorted, each row's items followed by its end key; ``row_end``: where each row ends
    (after its end key); ``pos_at``: each positive's position in ``keys`` (the start of its tie
    group).
    """
    num_rows = num_pos.size
    new_point = np.empty(keys.size, dtype=bool)  # the first key of each tie group is a point
    new_point[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new_point[1:])
    kept = np.flatnonzero(new_point)
    no_ties = kept.size == keys.size
    point_keys = keys if no_ties else keys.take(kept)
    point_row = point_keys >> _ROW_SHIFT
    point_end = row_end if no_ties else np.searchsorted(kept, row_end)
    end_at = point_end - 1  # each row's end point
    # positives placed before each key (all earlier rows, and this row's lower scores)
    below = np.zeros(keys.size + 1, dtype=np.float64)
    np.add.at(below, pos_at + 1, 1.0)
    np.cumsum(below, out=below)
    true_pos = pos_row_end.astype(np.float64).take(point_row)
    true_pos -= below[:-1] if no_ties else below.take(kept)
    retrieved = (row_end - 1).astype(np.float64).take(point_row)  # items from each point up
    retrieved -= kept
    row_num_pos = num_pos.astype(np.float64).take(point_row)
    curve_precisions = np.empty(kept.size, dtype=curve_dtype)  # float64 values rounded once
    curve_recalls = np.empty(kept.size, dtype=curve_dtype)
    with np.errstate(invalid="ignore", divide="ignore"):  # end points: 0 / 0, replaced below
        np.divide(true_pos, retrieved, out=curve_precisions)
        np.divide(true_pos, row_num_pos, out=curve_recalls)
        row_num_pos += retrieved
        f1 = np.divide(true_pos, row_num_pos, out=row_num_pos)
        f1 *= 2.0  # = 2 TP / (retrieved + P) = 2PR / (P + R), rounded once (doubling is exact)
    curve_precisions[end_at] = 1.0
    curve_recalls[end_at] = 0.0
    f1[end_at] = 0.0  # (0 / 0 in rows without positives)
    counts = np.diff(point_end, prepend=0) - 1  # points per row, without the end point
    is_score = np.ones(kept.size, dtype=bool)
    is_score[end_at] = False
    score_keys = point_keys[is_score]
    thresholds = _float32_from_ranks(score_keys) if distinct is None else distinct[score_keys & _SCORE_BITS]
    # max-F1: an end point (F1 0) never beats a row's points (F1 > 0 at the lowest positive)
    rows_with_points = np.flatnonzero(counts)
    best = {key: np.full(num_rows, np.nan) for key in ("max_f1", "p_at_max_f1", "r_at_max_f1")}
    t_best = np.full(num_rows, np.nan, dtype=dtype)
    if rows_with_points.size:
        best_f1 = best["max_f1"]
        best_f1[rows_with_points] = np.maximum.reduceat(f1, (point_end - counts - 1)[rows_with_points])
        candidates = np.flatnonzero(f1 == best_f1.take(point_row))  # nan (no points) equals nothing
        candidate_row = point_row.take(candidates)
        last = np.ones(candidates.size, dtype=bool)  # the highest threshold among a row's equal F1
        np.not_equal(candidate_row[1:], candidate_row[:-1], out=last[:-1])
        point = candidates[last]
        best["p_at_max_f1"][rows_with_points] = true_pos[point] / retrieved[point]
        best["r_at_max_f1"][rows_with_points] = true_pos[point] / num_pos[rows_with_points].astype(np.float64)
        best_keys = point_keys[point]
        t_best[rows_with_points] = _float32_from_ranks(best_keys) if distinct is None else distinct[best_keys & _SCORE_BITS]
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
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    num_pos = inputs.num_pos
    stats: dict[str, np.ndarray] = {"num_pos": num_pos, "num_neg": wide.shape[1] - num_pos,
                                    "max_pos": inputs.max_pos, "min_pos": inputs.min_pos}
    if need_max_neg:
        stats["max_neg"] = merged.pop("row_max_neg")  # -inf where every item is a positive
    if need_first_rank:
        # 1 + the negatives scoring >= the best positive = 1 + all such items - the tied positives.
        ties = np.count_nonzero(inputs.valid & (inputs.pos_scores >= inputs.max_pos[:, None]), axis=1)
        stats["first_rank"] = np.where(num_pos > 0, 1 + merged.pop("above") - ties, NO_RANK)
    if ranks:
        stats.update(_ranked_stats(inputs.valid, merged.pop("pos_ge"), merged.pop("cnt_ge"), num_pos, ks))
    stats.update(merged)  # the curves
    out: dict[str, torch.Tensor] = {}
    for key, value in stats.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if key in ("max_pos", "min_pos", "max_neg", "curve_thresholds", "t_at_max_f1"):
            tensor = tensor.to(dtype)
        out[key] = tensor
    return out
