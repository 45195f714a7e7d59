"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with bounded memory, one query at a time.

Zhong et al. re-rank with the Jaccard distance of *k-reciprocal neighbour sets*: ``g`` is a
k-reciprocal neighbour of ``p`` when each is among the other's ``k`` nearest. Their code builds
the ``(Q + G)^2`` distance matrix of queries and gallery together, so one query's answer depends
on the other queries and memory grows with ``(Q + G)^2`` (torchreid #455: > 25 GB). Here every
query is re-ranked against the gallery alone, so ``recognize`` on one image gives the same answer
as in a batch, and memory is set by the chunk of scores being re-ranked:

* **Gallery side** (:class:`KReciprocalGallery`, computed once per gallery, at enrolment): each
  gallery item's ``k1 + 1`` nearest gallery items (itself included), its reciprocal sets at ``k1``
  and ``round(k1 / 2)``, the expanded set ``R*`` (a half-size reciprocal set of a member joins
  when more than 2/3 of it is already in), the weights ``V_g[j] = exp(-d(g, j))`` over ``R*``
  normalized to sum 1, and their local expansion ``mean`` of ``V`` over the ``k2`` nearest.
* **Query side** (:meth:`KReciprocalGallery.rerank_scores`): the same for the query in the
  universe {query} + gallery, where a gallery item ``g`` counts the query among its ``k1 + 1``
  nearest when it scores at least ``g``'s ``(k1 + 1)``-th gallery neighbour; the gallery items'
  own sets stay those of the gallery (the query only looks).

The distance is ``d = 1 - s`` for cosine similarity ``s`` (the squared Euclidean distance of unit
vectors, halved; Zhong et al. divide by each column's maximum instead, which couples queries).
The final distance of query ``q`` and item ``g`` is ``(1 - lambda) d_J(q, g) + lambda d(q, g)``
with ``d_J = 1 - m / (2 - m)``, ``m = sum_j min(V_q[j], V_g[j])``. It is computed for the
``top_n`` most similar items; the others count as sharing no neighbours (``d_J = 1``), which keeps
them below every candidate in their original order. Re-ranked *scores* are ``1 - distance``
(so ``lambda * s`` outside the candidates): higher is better, as everywhere in recognite.

With one reference per label a reference's reciprocal neighbours are other labels' references,
so the sets say little about the label; :func:`warn_if_degenerate` says so.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from recognite.gallery._search import exact_topk
from recognite.utils.reranking import KReciprocal
from recognite.utils.validate import check_int

__all__ = ["KReciprocal", "KReciprocalGallery", "warn_if_degenerate"]

logger = logging.getLogger(__name__)

_DEFAULT_CHUNK = 16 * 1024**2  # scores (or gathered entries) per block


def warn_if_degenerate(labels: torch.Tensor) -> bool:
    """Log a warning (and return True) when no label has more than one gallery item.

    Args:
        labels: ``(G,)`` integer label of every gallery item.
    """
    if labels.numel() and int(torch.bincount(labels - labels.min()).max()) <= 1:
        logger.warning(
            "k-reciprocal re-ranking on a gallery with one reference per label: each reference's "
            "reciprocal neighbours are other labels' references, so the re-ranking has no same-label "
            "neighbourhood to use (it can lower accuracy). Measure it before using it here.")
        return True
    return False


def _reciprocal(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(B, w)``: whether ``rows[b]`` is among the neighbours of its ``j``-th neighbour."""
    neighbours = table[rows]  # (B, w)
    return (table[neighbours] == rows[:, None, None]).any(dim=2)


def _accepted(members: torch.Tensor, member_mask: torch.Tensor, half_table: torch.Tensor,
              half_mask: torch.Tensor, sentinel: int) -> torch.Tensor:
    """The expanded set R*: ``members`` (``(B, w)``, valid where ``member_mask``) plus each
    member's half-size reciprocal set when more than 2/3 of it is among the members.

    Returns:
        ``(B, M)`` item indices, ``sentinel`` in unused slots, sorted, without repeats.
    """
    safe = members.clamp_max(half_table.shape[0] - 1)
    cand = half_table[safe]  # (B, w, h)
    cand_mask = half_mask[safe] & member_mask.unsqueeze(2)
    inside = ((cand.unsqueeze(3) == members[:, None, None, :]) & member_mask[:, None, None, :]).any(dim=3)
    count = (inside & cand_mask).sum(dim=2)
    size = cand_mask.sum(dim=2)
    accept = member_mask & (3 * count > 2 * size)  # |R(x, h) & R| > 2/3 |R(x, h)|, exactly
    take = cand_mask & accept.unsqueeze(2)
    flat = torch.cat([torch.where(member_mask, members, sentinel),
                      torch.where(take, cand, sentinel).flatten(1)], dim=1)
    flat = torch.sort(flat, dim=1).values
    repeat = torch.zeros_like(flat, dtype=torch.bool)
    repeat[:, 1:] = flat[:, 1:] == flat[:, :-1]
    return torch.sort(torch.where(repeat, sentinel, flat), dim=1).values


def _pack(row_of: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_rows: int,
          sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries sorted by row -> ``(num_rows, M)`` padded index / value arrays."""
    counts = torch.bincount(row_of, minlength=num_rows)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(row_of.numel(), device=row_of.device) - starts[row_of]
    idx = torch.full((num_rows, width), sentinel, dtype=torch.long, device=row_of.device)
    val = torch.zeros(num_rows, width, dtype=values.dtype, device=row_of.device)
    idx[row_of, position] = cols
    val[row_of, position] = values
    return idx, val


def _merge_rows(idx: torch.Tensor, val: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the values of repeated indices within each row of ``(B, L)`` sparse rows."""
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
    keys = (rows * (sentinel + 1) + idx).flatten()
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    sums = torch.zeros(unique.numel(), dtype=val.dtype, device=val.device).index_add_(0, inverse, val.flatten())
    cols = unique % (sentinel + 1)
    keep = cols != sentinel
    return _pack(unique[keep] // (sentinel + 1), cols[keep], sums[keep], idx.shape[0], sentinel)


def _pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]], sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p[0].shape[1] for p in parts)
    idx = torch.cat([F.pad(i, (0, width - i.shape[1]), value=sentinel) for i, _ in parts])
    val = torch.cat([F.pad(v, (0, width - v.shape[1]), value=0.0) for _, v in parts])
    return idx, val


class KReciprocalGallery:
    """The gallery side of k-reciprocal re-ranking, computed once for a gallery.

    Memory: ``G`` rows of at most ``(k1 + 1)(round(k1/2) + 2)`` sparse weights (before and after
    the local expansion), plus blocks of about ``chunk_size`` entries while it is computed.

    Args:
        gallery: ``(G, D)`` gallery embeddings (any norm; unit-normalized first).
        settings: the :class:`KReciprocal` parameters.
        chunk_size: scores (or gathered entries) per block.
    """

    def __init__(self, gallery: torch.Tensor, settings: KReciprocal | None = None,
                 chunk_size: int = _DEFAULT_CHUNK) -> None:
        self.settings = settings or KReciprocal()
        check_int(chunk_size, "chunk_size", minimum=1)
        if not isinstance(gallery, torch.Tensor) or gallery.dim() != 2 or gallery.shape[0] == 0:
            raise ValueError(f"gallery must be a non-empty (G, D) tensor, got {getattr(gallery, 'shape', gallery)!r}")
        unit = F.normalize(gallery.float(), dim=1)
        num = unit.shape[0]
        self.num_items = num
        self.chunk_size = chunk_size
        k1, k2 = self.settings.k1, self.settings.k2
        width, half = min(k1 + 1, num), min(round(k1 / 2) + 1, num)
        table_scores, table = exact_topk(unit, unit, width, chunk_size)
        # (G,) score a query must reach to be among an item's k1 + 1 nearest (always, when G <= k1)
        self.entry_score = (table_scores[:, k1] if num > k1
                            else torch.full((num,), float("-inf"), device=unit.device))
        self.half_table = table[:, :half]
        members_width = width * (half + 1)  # the most members of an expanded set
        block = max(1, min(num, chunk_size // max(1, width * width * half),
                           chunk_size // max(1, members_width * unit.shape[1])))
        self.half_mask = torch.cat([_reciprocal(self.half_table, rows)
                                    for rows in torch.arange(num, device=unit.device).split(block)])
        plain = []
        for rows in torch.arange(num, device=unit.device).split(block):
            mutual = _reciprocal(table, rows)
            members = _accepted(table[rows], mutual, self.half_table, self.half_mask, num)
            valid = members < num
            # only the similarities to the members: (B, M) from (B, M, D) gathered rows
            sims = torch.einsum("bd,bmd->bm", unit[rows], unit[members.clamp_max(num - 1)])
            weights = torch.where(valid, torch.exp(sims - 1.0), 0.0)
            plain.append((members, weights / weights.sum(dim=1, keepdim=True)))
        self.plain_idx, self.plain_val = _pad_cat(plain, num)  # V: (G, M), members sorted, padding last
        used = max(1, int((self.plain_idx < num).sum(dim=1).max()))
        self.plain_idx, self.plain_val = self.plain_idx[:, :used].contiguous(), self.plain_val[:, :used].contiguous()
        if k2 == 1:
            self.idx, self.val = self.plain_idx, self.plain_val
        else:  # local query expansion: the mean of V over each item's k2 nearest
            near = table[:, : min(k2, num)]
            expanded = []
            for rows in torch.arange(num, device=unit.device).split(block):
                idx = self.plain_idx[near[rows]].flatten(1)
                val = self.plain_val[near[rows]].flatten(1) / near.shape[1]
                expanded.append(_merge_rows(idx, val, num))
            self.idx, self.val = _pad_cat(expanded, num)
        self.table = table
        logger.debug("k-reciprocal gallery side: %d items, %d / %d weights per item", num,
                     self.plain_idx.shape[1], self.idx.shape[1])

    def rerank_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Re-rank a block of queries, given their cosine similarities to the gallery.

        Args:
            scores: ``(B, G)`` cosine similarities of ``B`` (unit) queries to the gallery items;
                overwritten with the re-ranked scores.

        Returns:
            ``scores``: ``1 - final distance`` for each query's ``top_n`` candidates and
            ``lambda * s`` elsewhere (see the module docstring).
        """
        if scores.dim() != 2 or scores.shape[1] != self.num_items:
            raise ValueError(f"scores must have shape (B, {self.num_items}), got {tuple(scores.shape)}")
        num, (k1, k2, lam, top_n) = self.num_items, (self.settings.k1, self.settings.k2,
                                                     self.settings.lambda_value, self.settings.top_n)
        # entries held per query: V_q on the gallery, the candidates' weights, the set expansion
        per_query = num + min(top_n, num) * self.idx.shape[1] + min(k1, num) ** 2 * self.half_table.shape[1]
        step = max(1, self.chunk_size // per_query)
        for start in range(0, scores.shape[0], step):
            self._rerank_block(scores[start : start + step], num, k1, k2, lam, top_n)
        return scores

    def _rerank_block(self, scores: torch.Tensor, num: int, k1: int, k2: int, lam: float, top_n: int) -> None:
        rows = scores.shape[0]
        near_scores, near = torch.topk(scores, min(k1, num), dim=1)  # the query is its own first
        mutual = near_scores >= self.entry_score[near]
        members = _accepted(near, mutual, self.half_table, self.half_mask, num)
        valid = members < num
        weights = torch.where(valid, torch.exp(scores.gather(1, members.clamp_max(num - 1)) - 1.0), 0.0)
        total = 1.0 + weights.sum(dim=1, keepdim=True)  # the query itself: exp(-0) = 1
        averaged = 1 + min(k2 - 1, num)
        dense = torch.zeros(rows, num + 1, dtype=torch.float32, device=scores.device)  # V_q on the gallery
        dense.scatter_add_(1, members, weights / total / averaged)
        if averaged > 1:  # local expansion: + V of the query's k2 - 1 nearest gallery items
            nearest = near[:, : averaged - 1]
            dense.scatter_add_(1, self.plain_idx[nearest].flatten(1),
                               self.plain_val[nearest].flatten(1) / averaged)
        dense[:, num] = 0.0
        cand_scores, cand = torch.topk(scores, min(top_n, num), dim=1)
        cand_idx = self.idx[cand]  # (B, N, M)
        shared = torch.minimum(dense.gather(1, cand_idx.flatten(1)).view_as(cand_idx), self.val[cand]).sum(dim=2)
        jaccard = 1.0 - shared / (2.0 - shared)
        final = (1.0 - lam) * jaccard + lam * (1.0 - cand_scores)
        scores.mul_(lam).scatter_(1, cand, (1.0 - final).to(scores.dtype))
