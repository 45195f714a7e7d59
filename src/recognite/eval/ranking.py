"""Ranking a gallery per query, and the rank-based retrieval metrics.

Conventions (all functions): ``scores (Q, G)`` are similarities (higher = more alike),
``gallery_labels (G,)`` and ``query_labels (Q,)`` are integer tensors; argument order is always
``(scores, gallery_labels, query_labels)``. A *positive* is a gallery item with the query's label.

Ties.
    * :func:`sort_scores`, :func:`top_k` and :func:`knn` return a concrete order: descending score,
      ties broken by gallery order (the earlier gallery item first).
    * The metrics that compare with the query label (:func:`accuracy`, :func:`top_k_accuracy`,
      :func:`recall_at_k`, :func:`cmc`, :func:`map_at_r`, :func:`r_precision`) rank
      *pessimistically*: among tied items, negatives come first. A query is therefore only
      counted correct at rank 1 when its best positive scores strictly higher than every negative.
      These metrics never depend on the gallery order.

Queries without positives in the gallery: :func:`accuracy` and :func:`top_k_accuracy` average
over *all* queries and count such a query as a miss (no prediction can be right);
:func:`recall_at_k`, :func:`cmc`, :func:`map_at_r` and :func:`r_precision` average over the queries
that have at least one positive (``nan`` when none has). A gallery of one item is valid.
"""

from __future__ import annotations

import torch

from ._checks import check_k, check_scores, rows_per_chunk
from ._engine import matrix_stats

__all__ = [
    "accuracy",
    "cmc",
    "knn",
    "map_at_r",
    "r_precision",
    "recall_at_k",
    "sort_scores",
    "top_k",
    "top_k_accuracy",
]


def sort_scores(
    scores: torch.Tensor, gallery_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort every row of ``scores`` in descending order, carrying the gallery labels along.

    Ties keep the gallery order (stable sort).

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.

    Returns:
        ``(sorted_scores (Q, G), sorted_labels (Q, G))``.

    Raises:
        ValueError: when ``gallery_labels`` does not have ``G`` entries.

    Example:
        >>> s, l = sort_scores(torch.tensor([[0.25, 0.5, 0.25]]), torch.tensor([7, 8, 9]))
        >>> s.tolist(), l.tolist()
        ([[0.5, 0.25, 0.25]], [[8, 7, 9]])
    """
    scores, gallery_labels, _ = check_scores(scores, gallery_labels)
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return sorted_scores, gallery_labels[order]


def _stable_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk`` with ties broken by gallery order (exact, without a full sort when possible)."""
    num_gallery = scores.shape[1]
    if 4 * k >= num_gallery:
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    values, indices = torch.topk(scores, k, dim=1)
    # Reorder inside the k results: descending value, then ascending gallery index.
    indices, order = torch.sort(indices, dim=1)
    values = values.gather(1, order)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    indices = indices.gather(1, order)
    # Rows where the k-th value is tied with items left out may hold the wrong tied items.
    kth = values[:, -1:]
    tied_total = torch.count_nonzero(scores == kth, dim=1)
    tied_kept = torch.count_nonzero(values == kth, dim=1)
    redo = torch.nonzero(tied_total > tied_kept).squeeze(1)
    if redo.numel():
        exact_values, exact_indices = torch.sort(
            scores.index_select(0, redo), dim=1, descending=True, stable=True
        )
        values[redo] = exact_values[:, :k]
        indices[redo] = exact_indices[:, :k]
    return values, indices


def top_k(
    scores: torch.Tensor, gallery_labels: torch.Tensor, k: int, memory_budget: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scoring gallery items of every query.

    Ties are broken by gallery order (as in :func:`sort_scores`). When ``k > G`` all ``G`` items
    are returned.

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.
        k: number of items to return (positive).
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB).

    Returns:
        ``(top_scores (Q, min(k, G)), top_labels (Q, min(k, G)))``, best first.

    Example:
        >>> top_k(torch.tensor([[0.2, 0.9, 0.5]]), torch.tensor([1, 2, 3]), k=2)[1]
        tensor([[2, 3]])
    """
    scores, gallery_labels, _ = check_scores(scores, gallery_labels)
    k = min(check_k(k), scores.shape[1])
    chunk = rows_per_chunk(scores.shape[1], memory_budget)
    values, labels = [], []
    for part in scores.split(chunk):
        part_values, part_indices = _stable_top_k(part, k)
        values.append(part_values)
        labels.append(gallery_labels[part_indices])
    return torch.cat(values), torch.cat(labels)


def knn(
    scores: torch.Tensor, gallery_labels: torch.Tensor, k: int, memory_budget: int | None = None
) -> torch.Tensor:
    """k-nearest-neighbour label prediction: majority vote among the ``k`` best gallery items.

    A tie in the vote goes to the tied label whose best item ranks highest (so ``k=1`` is the
    top-1 label, and ties in score are broken by gallery order as in :func:`top_k`).

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.
        k: number of neighbours (``min(k, G)`` are used).
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB).

    Returns:
        ``(Q,)`` predicted labels.

    Example:
        >>> knn(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), torch.tensor([1, 2, 2, 1]), k=3)
        tensor([2])
    """
    _, labels = top_k(scores, gallery_labels, k, memory_budget)
    predictions = []
    step = max(1, (64 * 1024**2) // max(1, labels.shape[1] ** 2))
    for part in labels.split(step):
        votes = (part.unsqueeze(2) == part.unsqueeze(1)).sum(dim=2)
        winner = torch.argmax(votes, dim=1, keepdim=True)  # first maximum = best-ranked label
        predictions.append(part.gather(1, winner).squeeze(1))
    return torch.cat(predictions)


def _first_ranks(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    memory_budget: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pessimistic rank of each query's best positive (``G + 1`` without positives) and num_pos."""
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(
        scores, gallery_labels, query_labels, memory_budget=_budget(memory_budget), ranks=False,
        need_max_neg=False,
    )
    return stats["first_rank"], stats["num_pos"]  # type: ignore[return-value]


def _budget(memory_budget: int | None) -> int:
    rows_per_chunk(1, memory_budget)  # validates
    return memory_budget if memory_budget is not None else 256 * 1024**2


def accuracy(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    memory_budget: int | None = None,
) -> float:
    """Top-1 accuracy: fraction of queries whose best-scoring gallery item has their label.

    Pessimistic ties: a query counts as correct only if its best positive scores strictly higher
    than every negative. Averaged over all ``Q`` queries; a query without positives is a miss.

    Example:
        >>> scores = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.3]])
        >>> accuracy(scores, torch.tensor([1, 2]), torch.tensor([1, 1, 2]))
        0.6666666666666666
    """
    return top_k_accuracy(scores, gallery_labels, query_labels, 1, memory_budget)


def top_k_accuracy(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    memory_budget: int | None = None,
) -> float:
    """Fraction of queries with a positive among their ``k`` best-ranked gallery items.

    Ranks are pessimistic (tied negatives first): a hit needs fewer than ``k`` negatives scoring
    ``>=`` the query's best positive. Averaged over all ``Q`` queries; a query without positives is
    a miss. ``top_k_accuracy(..., k=1) == accuracy(...)``.

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.8, 0.9]])
        >>> top_k_accuracy(scores, torch.tensor([1, 2, 3]), torch.tensor([2, 1]), k=2)
        0.5
    """
    k = check_k(k)
    first_rank, _ = _first_ranks(scores, gallery_labels, query_labels, memory_budget)
    return float(torch.count_nonzero(first_rank <= k)) / first_rank.numel()


def cmc(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    max_rank: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Cumulative matching characteristic: ``cmc[r - 1]`` = fraction of queries whose best positive
    has (pessimistic) rank ``<= r``.

    Averaged over queries with at least one positive (all ``nan`` when none has).

    Args:
        max_rank: length of the curve (default and maximum: ``G``).

    Returns:
        ``(min(max_rank, G),)`` float64 curve, non-decreasing.

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.8, 0.9]])
        >>> cmc(scores, torch.tensor([1, 2, 3]), torch.tensor([2, 1])).tolist()
        [0.0, 0.5, 1.0]
    """
    first_rank, num_pos = _first_ranks(scores, gallery_labels, query_labels, memory_budget)
    num_gallery = scores.shape[1]
    length = num_gallery if max_rank is None else min(check_k(max_rank, "max_rank"), num_gallery)
    return cmc_from_first_ranks(first_rank, num_pos, length)


def cmc_from_first_ranks(first_rank: torch.Tensor, num_pos: torch.Tensor, length: int) -> torch.Tensor:
    """CMC curve of ``length`` from pessimistic first-positive ranks (private helper, shared)."""
    valid = first_rank[num_pos > 0]
    if valid.numel() == 0:
        return torch.full((length,), float("nan"), dtype=torch.float64)
    counts = torch.bincount(valid.clamp(max=length + 1).cpu(), minlength=length + 2)[1 : length + 1]
    return torch.cumsum(counts, dim=0).double() / valid.numel()


def _masked_mean(values: torch.Tensor, num_pos: torch.Tensor) -> float:
    valid = values[num_pos > 0]
    return float(valid.mean()) if valid.numel() else float("nan")


def recall_at_k(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    memory_budget: int | None = None,
) -> float:
    """Mean fraction of each query's positives found among its ``k`` best-ranked items.

    This is the information-retrieval recall@k: ``#positives with rank <= k / #positives``,
    averaged over queries with at least one positive. (The metric-learning "Recall@K" - at least
    one positive in the top ``k`` - is :func:`top_k_accuracy` / :func:`cmc`.) Pessimistic ranks.

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
        >>> recall_at_k(scores, torch.tensor([1, 2, 1, 1]), torch.tensor([1]), k=3)
        0.6666666666666666
    """
    k = check_k(k)
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(scores, gallery_labels, query_labels, (k,), _budget(memory_budget))
    num_pos = stats["num_pos"]
    per_query = stats["recall_hits"][:, 0].double() / num_pos.clamp(min=1).double()  # type: ignore[index]
    return _masked_mean(per_query, num_pos)  # type: ignore[arg-type]


def r_precision(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    memory_budget: int | None = None,
) -> float:
    """R-precision: fraction of the ``R`` best-ranked items that are positive, ``R = #positives``.

    Pessimistic ranks; averaged over queries with at least one positive.

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
        >>> r_precision(scores, torch.tensor([1, 2, 1, 3]), torch.tensor([1]))
        0.5
    """
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(scores, gallery_labels, query_labels, (), _budget(memory_budget))
    return _masked_mean(stats["r_precision"], stats["num_pos"])  # type: ignore[arg-type]


def map_at_r(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    memory_budget: int | None = None,
) -> float:
    """MAP@R (Musgrave et al., 2020): ``1/R * sum_{i<=R} P(i) * rel(i)``, ``R = #positives``.

    ``P(i)`` is the precision of the first ``i`` items and ``rel(i)`` whether item ``i`` is a
    positive. Pessimistic ranks; averaged over queries with at least one positive.

    Example:
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
        >>> map_at_r(scores, torch.tensor([1, 2, 1, 3]), torch.tensor([1]))
        0.5
    """
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(scores, gallery_labels, query_labels, (), _budget(memory_budget))
    return _masked_mean(stats["map_at_r"], stats["num_pos"])  # type: ignore[arg-type]
