"""Open-set recognition: accept a query's best match only above a similarity threshold.

A query is *known* when its label occurs in the gallery (or as given by ``known``), *unknown*
otherwise. With threshold ``t``, a query is *accepted* when its best gallery score is ``>= t``.
A known query is *correctly identified* when its best positive scores strictly higher than every
negative (the pessimistic tie rule of :mod:`recognite.eval.ranking`).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_scores
from ._engine import matrix_stats
from .ranking import _budget

__all__ = ["open_set_metrics", "threshold_at_far"]


def _best_scores(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    known: torch.Tensor | None,
    memory_budget: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(
        scores, gallery_labels, query_labels, memory_budget=_budget(memory_budget), ranks=False,
        need_first_rank=False,
    )
    max_pos: torch.Tensor = stats["max_pos"]  # type: ignore[assignment]
    max_neg: torch.Tensor = stats["max_neg"]  # type: ignore[assignment]
    num_pos: torch.Tensor = stats["num_pos"]  # type: ignore[assignment]
    best = torch.maximum(max_pos, max_neg)
    correct = (num_pos > 0) & (max_pos > max_neg)
    if known is None:
        known = num_pos > 0
    else:
        if not isinstance(known, torch.Tensor) or known.dtype != torch.bool:
            raise TypeError(f"known must be a boolean tensor of shape (Q,), got {known!r}")
        if known.shape != (scores.shape[0],):
            raise ValueError(
                f"known must have shape ({scores.shape[0]},), got {tuple(known.shape)}"
            )
        known = known.to(scores.device)
    return best, correct, known


def _fraction(mask: torch.Tensor, among: torch.Tensor) -> float:
    total = int(torch.count_nonzero(among))
    return float(torch.count_nonzero(mask & among)) / total if total else float("nan")


def open_set_metrics(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    threshold: float,
    known: torch.Tensor | None = None,
    memory_budget: int | None = None,
) -> dict[str, float]:
    """Open-set rates at one similarity threshold.

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.
        query_labels: ``(Q,)`` integer labels.
        threshold: accept a query when its best score is ``>= threshold``.
        known: optional ``(Q,)`` bool, which queries belong to a gallery class; default: the query's
            label occurs in ``gallery_labels``.
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB).

    Returns:
        ``{'DIR', 'known_accept_rate', 'FAR', 'unknown_reject_rate', 'num_known', 'num_unknown',
        'threshold'}``. ``DIR`` (detection and identification rate) is the fraction of known
        queries accepted *and* correctly identified; ``FAR`` is the fraction of unknown queries
        accepted; ``unknown_reject_rate = 1 - FAR``. Rates are ``nan`` when their set is empty.

    Example:
        >>> scores = torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.7, 0.1], [0.4, 0.3]])
        >>> m = open_set_metrics(scores, torch.tensor([1, 2]), torch.tensor([1, 1, 5, 6]), 0.5)
        >>> m['DIR'], m['known_accept_rate'], m['FAR']
        (0.5, 1.0, 0.5)
    """
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan")
    best, correct, known = _best_scores(scores, gallery_labels, query_labels, known, memory_budget)
    accepted = best >= threshold
    far = _fraction(accepted, ~known)
    return {
        "DIR": _fraction(accepted & correct, known),
        "known_accept_rate": _fraction(accepted, known),
        "FAR": far,
        "unknown_reject_rate": 1.0 - far,
        "num_known": int(torch.count_nonzero(known)),
        "num_unknown": int(torch.count_nonzero(~known)),
        "threshold": threshold,
    }


def threshold_at_far(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    target_far: float,
    known: torch.Tensor | None = None,
    memory_budget: int | None = None,
) -> float:
    """The lowest threshold whose false-accept rate on the unknown queries is ``<= target_far``.

    With ``n`` unknown queries at most ``m = floor(target_far * n)`` may be accepted; the result
    is the smallest value (in the dtype of ``scores``) strictly above the ``(m + 1)``-th highest
    unknown best score, so ties never push the rate above the target. Returns ``-inf`` when
    ``m >= n`` (every query may be accepted). Use :func:`open_set_metrics` at the returned
    threshold to read the DIR it buys.

    Raises:
        ValueError: ``target_far`` outside ``[0, 1]`` or no unknown queries.

    Example:
        >>> scores = torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.7, 0.1], [0.4, 0.3]])
        >>> t = threshold_at_far(scores, torch.tensor([1, 2]), torch.tensor([1, 1, 5, 6]), 0.5)
        >>> t > 0.4, t < 0.41
        (True, True)
    """
    target_far = float(target_far)
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"target_far must be in [0, 1], got {target_far}")
    best, _, known = _best_scores(scores, gallery_labels, query_labels, known, memory_budget)
    unknown_best = best[~known]
    num_unknown = unknown_best.numel()
    if num_unknown == 0:
        raise ValueError(
            "threshold_at_far needs unknown queries (labels absent from the gallery, or known=False)"
        )
    allowed = math.floor(target_far * num_unknown + 1e-9)
    if allowed >= num_unknown:
        return float("-inf")
    ordered = torch.sort(unknown_best, descending=True).values
    boundary = ordered[allowed : allowed + 1]
    return float(torch.nextafter(boundary, torch.full_like(boundary, float("inf")))[0])
