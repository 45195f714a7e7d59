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
ever sorted: they are picked by one comparison pass (scanned eight flags at a time) and sorted
together, so the cost is far below a full sort when positives rank well. Passes over score rows
run in blocks of a few MB through reused buffers, so no call allocates (and page-faults) a
temporary as large as the score matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ._checks import check_finite, rows_per_chunk

_NEG_INF = float("-inf")
_POS_INF = float("inf")
_BYTES_PER_RANKED_ELEMENT = 64  # picked entries: positions, columns, values, sort orders, padded layout
_MAX_COUNTED_POSITIVES = 32  # rows with more positives are sorted rather than counted
_MAX_TOPK_DEPTH = 1024  # deeper rows with few positives are counted rather than sorted
_BYTES_PER_ELEMENT_COUNTED = 8
_BLOCK_BYTES = 8 * 1024**2  # rows of a pass are processed in blocks of about this size
NO_RANK = torch.iinfo(torch.int64).max
"""First-positive rank of a query without positives (never <= any k)."""  # values, indices, masks and counters per top-k element


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
    if need_max_neg or need_first_rank:
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


def ranked_rows(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    depth: torch.Tensor,
    thresholds: torch.Tensor,
    memory_budget: int,
    workspace: Workspace,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(rows, values, is_pos)``: each row's items scoring ``>= thresholds[row]``, sorted.

    ``depth[row]`` must be the number of such items (rows of depth 0 are skipped). ``rows``
    indexes the chunk; ``values`` / ``is_pos`` are ``(r, K)`` with ``K >= depth[row]``: the row's
    ``depth`` best scores in descending order, then ``-inf`` padding (never positive). Rows are
    grouped by the next power of two of their depth, so padding stays below half of each group.
    The items are picked by comparing with the threshold (no sort over the gallery); groups of
    rows are sized so the picked items fit ``memory_budget``. The order of tied items inside
    ``values`` is unspecified (callers only use tie-invariant quantities).
    """
    active = torch.nonzero(depth > 0).squeeze(1)
    if active.numel() == 0:
        return
    entries_per_group = max(1, memory_budget // _BYTES_PER_RANKED_ELEMENT)
    active_depth = depth.index_select(0, active)
    group_of_row = torch.div(torch.cumsum(active_depth, 0) - active_depth, entries_per_group, rounding_mode="floor")
    for group in torch.unique_consecutive(group_of_row).tolist():
        rows = active[group_of_row == group]
        yield from _ranked_group(scores, label_index, query_labels, rows, depth.index_select(0, rows),
                                 thresholds.index_select(0, rows), workspace)


def _nonzero_ge(block: torch.Tensor, thresholds: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """``(n, 2)`` (row, column) of the entries of ``block (r, G)`` that are ``>= thresholds (r,)``.

    Same as ``torch.nonzero(block >= thresholds[:, None])``, in the same order, but the flags are
    first scanned eight at a time (as 64-bit words), so only the words holding a picked entry are
    looked at one by one: much faster when few entries are picked.
    """
    rows, cols = block.shape
    width = -(-cols // 8) * 8
    padded = workspace.buffer(rows, width, torch.bool, block.device)
    if width > cols:
        padded[:, cols:] = False
    torch.ge(block, thresholds.unsqueeze(1), out=padded[:, :cols])
    words = torch.nonzero(padded.view(torch.int64))
    flags = padded.view(rows, width // 8, 8)[words[:, 0], words[:, 1]]
    within = torch.nonzero(flags)
    word = words.index_select(0, within[:, 0])
    return torch.stack([word[:, 0], word[:, 1] * 8 + within[:, 1]], dim=1)


def _ranked_group(
    scores: torch.Tensor,
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    rows: torch.Tensor,
    depth: torch.Tensor,
    thresholds: torch.Tensor,
    workspace: Workspace,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`ranked_rows` for one group of rows (sorted chunk row indices, all of depth > 0)."""
    num_gallery = scores.shape[1]
    # 1. Pick (row position, gallery column) of every item at or above its row's threshold.
    step = workspace.block_rows(num_gallery)
    positions, columns = [], []
    for start in range(0, rows.numel(), step):
        block_rows = rows[start : start + step]
        first, last = int(block_rows[0]), int(block_rows[-1])
        contiguous = last - first + 1 == block_rows.numel()
        block = scores[first : last + 1] if contiguous else scores.index_select(0, block_rows)
        picked = _nonzero_ge(block, thresholds[start : start + step], workspace)
        positions.append(picked[:, 0] + start)
        columns.append(picked[:, 1])
    position, column = torch.cat(positions), torch.cat(columns)
    value = scores[rows.index_select(0, position), column]
    # 2. Sort by row, then by descending score: one stable sort on the score, one on the row.
    order = torch.sort(value, descending=True, stable=True).indices
    order = order.index_select(0, torch.sort(position.index_select(0, order), stable=True).indices)
    position, column, value = position[order], column[order], value[order]
    query_of_entry = query_labels.index_select(0, rows).index_select(0, position)
    entry_is_pos = label_index.gallery_labels.index_select(0, column) == query_of_entry.to(label_index.gallery_labels.dtype)
    offsets = torch.cumsum(depth, 0) - depth
    rank_in_row = torch.arange(position.numel(), device=position.device) - offsets.index_select(0, position)
    # 3. Lay rows out padded to the next power of two of their depth, one group per size.
    sizes = torch.clamp(2 ** torch.ceil(torch.log2(depth.double())).long(), min=1, max=num_gallery)
    for size in torch.unique(sizes).tolist():
        in_size = sizes == size
        members = torch.nonzero(in_size).squeeze(1)
        slot = torch.full((rows.numel(),), -1, dtype=torch.long, device=rows.device)
        slot[members] = torch.arange(members.numel(), device=rows.device)
        entry = torch.nonzero(in_size.index_select(0, position)).squeeze(1)
        target = slot.index_select(0, position.index_select(0, entry)) * size + rank_in_row.index_select(0, entry)
        values = torch.full((members.numel() * size,), _NEG_INF, dtype=scores.dtype, device=scores.device)
        values[target] = value.index_select(0, entry)
        is_pos = torch.zeros((members.numel() * size,), dtype=torch.bool, device=scores.device)
        is_pos[target] = entry_is_pos.index_select(0, entry)
        yield rows.index_select(0, members), values.view(-1, size), is_pos.view(-1, size)


def positives_from_ranked(
    values: torch.Tensor, is_pos: torch.Tensor, num_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-positive counts from rows sorted to their depth.

    Returns ``(valid, pos_ge, cnt_ge)``, each ``(r, P)`` with the row's positives in order of
    decreasing score: ``cnt_ge`` = items scoring ``>=`` the positive, ``pos_ge`` = positives
    among them. Tied positives get equal counts, so the layout does not depend on tie order.
    """
    cnt_all = torch.searchsorted(values.neg().contiguous(), values.neg().contiguous(), right=True)
    cum_pos = torch.cumsum(is_pos, dim=1)
    pos_all = cum_pos.gather(1, cnt_all - 1)
    width = max(1, int(num_pos.max()))
    slot = torch.where(is_pos, cum_pos - 1, width)  # non-positives go to a spill column
    shape = (values.shape[0], width + 1)
    cnt_ge = torch.zeros(shape, dtype=torch.long, device=values.device).scatter_(1, slot, cnt_all)
    pos_ge = torch.zeros(shape, dtype=torch.long, device=values.device).scatter_(1, slot, pos_all)
    slots = torch.arange(width, device=values.device)
    valid = slots.unsqueeze(0) < num_pos.unsqueeze(1)
    return valid, pos_ge[:, :width], cnt_ge[:, :width]


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
    label_index: LabelIndex,
    query_labels: torch.Tensor,
    ks: Sequence[int] = (),
    memory_budget: int = 256 * 1024**2,
    ranks: bool = True,
    curves: bool = False,
    need_max_neg: bool = True,
    need_first_rank: bool = True,
    workspace: Workspace | None = None,
) -> dict[str, object]:
    """All per-query statistics for one chunk of query rows ``scores (c, G)``.

    With ``ranks=False`` only :func:`extreme_stats` is computed (no sorting at all).
    With ``curves=True`` the PR curves of :func:`curves_from_ranked` are added (lists in row order).
    """
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
    if curves:
        empty_thr = scores.new_zeros((0,))
        precisions: list[torch.Tensor] = [torch.ones(1, dtype=torch.float64)] * num_rows
        recalls: list[torch.Tensor] = [torch.zeros(1, dtype=torch.float64)] * num_rows
        thresholds: list[torch.Tensor] = [empty_thr] * num_rows
        max_f1, p_at, r_at = nan.clone(), nan.clone(), nan.clone()
        t_at = torch.full((num_rows,), float("nan"), dtype=scores.dtype, device=scores.device)
    def store(rows: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        ap[rows] = stats["ap"]
        r_precision[rows] = stats["r_precision"]
        map_at_r[rows] = stats["map_at_r"]
        recall_hits[rows] = stats["recall_hits"]

    if not curves:
        # Rows whose positives rank so deep that a full sort would be needed, but that have few
        # positives: count instead of sorting (one pass per positive).
        num_gallery = scores.shape[1]
        deep = (depth > 0) & (num_pos <= _MAX_COUNTED_POSITIVES)  # type: ignore[operator]
        deep &= (depth > _MAX_TOPK_DEPTH) | (4 * depth > num_gallery)
        deep_rows = torch.nonzero(deep).squeeze(1)
        if deep_rows.numel():
            depth = depth.masked_fill(deep, 0)
            pos_index, pos_valid, _ = label_index.positives(query_labels)
            if 2 * deep_rows.numel() >= num_rows:
                # Mostly deep: count on the chunk itself (no row copy), keep the deep rows.
                valid, pos_ge, cnt_ge = positives_by_counting(
                    scores, scores.gather(1, pos_index), pos_valid, workspace
                )
                stats = ranked_stats(valid, pos_ge, cnt_ge, num_pos, ks)  # type: ignore[arg-type]
                store(deep_rows, {key: value[deep_rows] for key, value in stats.items()})
            else:
                for rows in deep_rows.split(max(1, memory_budget // (_BYTES_PER_ELEMENT_COUNTED * num_gallery))):
                    row_scores = scores.index_select(0, rows)
                    row_pos_scores = row_scores.gather(1, pos_index.index_select(0, rows))
                    valid, pos_ge, cnt_ge = positives_by_counting(
                        row_scores, row_pos_scores, pos_valid.index_select(0, rows), workspace
                    )
                    row_num_pos = num_pos.index_select(0, rows)  # type: ignore[union-attr]
                    store(rows, ranked_stats(valid, pos_ge, cnt_ge, row_num_pos, ks))
    for rows, values, is_pos in ranked_rows(scores, label_index, query_labels, depth, min_pos, memory_budget, workspace):
        row_num_pos = num_pos.index_select(0, rows)  # type: ignore[union-attr]
        valid, pos_ge, cnt_ge = positives_from_ranked(values, is_pos, row_num_pos)
        store(rows, ranked_stats(valid, pos_ge, cnt_ge, row_num_pos, ks))
        if curves:
            curve = curves_from_ranked(values, is_pos, depth.index_select(0, rows), row_num_pos)
            for position, row in enumerate(rows.tolist()):
                precisions[row] = curve["precisions"][position]  # type: ignore[index]
                recalls[row] = curve["recalls"][position]  # type: ignore[index]
                thresholds[row] = curve["thresholds"][position]  # type: ignore[index]
            max_f1[rows] = curve["max_f1"]  # type: ignore[assignment]
            p_at[rows] = curve["p_at_max_f1"]  # type: ignore[assignment]
            r_at[rows] = curve["r_at_max_f1"]  # type: ignore[assignment]
            t_at[rows] = curve["t_at_max_f1"]  # type: ignore[assignment]
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
    need_max_neg: bool = True,
    need_first_rank: bool = True,
) -> dict[str, object]:
    """:func:`chunk_stats` over row chunks of a full ``(Q, G)`` score matrix."""
    chunk = rows_per_chunk(scores.shape[1], memory_budget)
    label_index = LabelIndex(gallery_labels)
    workspace = Workspace()
    parts = [
        chunk_stats(
            scores[start : start + chunk], label_index, query_labels[start : start + chunk],
            ks, memory_budget, ranks, curves, need_max_neg, need_first_rank, workspace,
        )
        for start in range(0, scores.shape[0], chunk)
    ]
    return merge_chunks(parts)
