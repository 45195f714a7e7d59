"""Open-set recognition: accept a query's best match only above a similarity threshold.

This module is the one home of open-set rates and threshold calibration; training validation,
``recognite evaluate``, ``recognite calibrate``-style code, the report and the gallery all use it.

Everything is computed from two per-query statistics, as the bounded-memory engine returns them
(:func:`~recognite.eval.evaluate_embeddings` ``['per_query']``): ``max_pos``, the best score of a
gallery item with the query's label (``-inf`` when the gallery has none), and ``max_neg``, the
best score of an item with another label (``-inf`` when none). With threshold ``t`` a query is
*accepted* when its best score ``max(max_pos, max_neg)`` is ``>= t``.

The convention, for every path that reports open-set rates:

- **Genuine trials** are the queries with at least one positive. A genuine query is *identified*
  when its best positive scores strictly higher than every negative (the pessimistic tie rule of
  :mod:`recognite.eval.ranking`). ``DIR`` (detection and identification rate) = identified and
  accepted / genuine trials; ``known_accept_rate`` = accepted / genuine trials.
- **Impostor trials** are the queries with at least one negative, each scored as if its own label
  were not enrolled: its best score is then ``max_neg``. ``FAR`` = impostors accepted / impostor
  trials. For a query whose label is not in the gallery nothing is withheld; for a query whose
  label is enrolled this is the leave-its-label-out trial that makes a closed validation split
  (every query label enrolled) measure false accepts at all.
- A rate whose set of trials is empty is ``nan``.

:func:`open_set_metrics` and :func:`threshold_at_far` (on a score matrix) take
``withhold_known``: ``True`` applies the convention above; ``False`` (their default, as in
0.1.0) counts as impostors only the queries that are not *known* (label absent from the gallery,
or ``known=False``).
"""

from __future__ import annotations

import math

import torch

from recognite.utils.validate import check_choice, check_number

from ._checks import check_scores
from ._engine import matrix_stats
from .ranking import _budget

__all__ = [
    "THRESHOLD_METHODS",
    "calibrate_threshold",
    "open_set_metrics",
    "open_set_rates",
    "threshold_at_far",
]

THRESHOLD_METHODS = ("f1", "far")
"""How :func:`calibrate_threshold` picks a threshold."""


def _fraction(mask: torch.Tensor, among: torch.Tensor) -> float:
    total = int(torch.count_nonzero(among))
    return float(torch.count_nonzero(mask & among)) / total if total else float("nan")


def _as_stats(max_pos: torch.Tensor, max_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    max_pos = torch.as_tensor(max_pos).reshape(-1).double()
    max_neg = torch.as_tensor(max_neg).reshape(-1).double()
    if max_pos.shape != max_neg.shape:
        raise ValueError(f"max_pos and max_neg must have the same length, got {max_pos.numel()} and {max_neg.numel()}.")
    # Statistics reported as nan where absent (e.g. the report's) mean the same as -inf here.
    return max_pos.masked_fill(max_pos.isnan(), -math.inf), max_neg.masked_fill(max_neg.isnan(), -math.inf)


def _trials(
    max_pos: torch.Tensor, max_neg: torch.Tensor, known: torch.Tensor | None, withhold_known: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(best, identified, genuine, impostor, impostor_best)`` per query."""
    has_pos = torch.isfinite(max_pos)
    has_neg = torch.isfinite(max_neg)
    genuine = has_pos if known is None else known
    identified = has_pos & (max_pos > max_neg)
    best = torch.maximum(max_pos, max_neg)
    if withhold_known:
        impostor, impostor_best = has_neg, max_neg
    else:
        impostor, impostor_best = ~genuine, best
    return best, identified, genuine, impostor, impostor_best


def _rates(best: torch.Tensor, identified: torch.Tensor, genuine: torch.Tensor, impostor: torch.Tensor,
           impostor_best: torch.Tensor, threshold: float) -> dict[str, float]:
    accepted = best >= threshold
    far = _fraction(impostor_best >= threshold, impostor)
    return {
        "DIR": _fraction(accepted & identified, genuine),
        "known_accept_rate": _fraction(accepted, genuine),
        "FAR": far,
        "unknown_reject_rate": 1.0 - far,
        "num_known": int(torch.count_nonzero(genuine)),
        "num_unknown": int(torch.count_nonzero(impostor)),
        "threshold": threshold,
    }


def _check_rate_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, got nan")
    return threshold


def open_set_rates(max_pos: torch.Tensor, max_neg: torch.Tensor, threshold: float) -> dict[str, float]:
    """Open-set rates at ``threshold`` under the module's convention (label withheld for FAR).

    Args:
        max_pos: ``(Q,)`` best positive score per query (``-inf`` or ``nan`` without one).
        max_neg: ``(Q,)`` best negative score per query (``-inf`` or ``nan`` without one).
        threshold: accept a query when its best score is ``>= threshold``.

    Returns:
        ``{'DIR', 'known_accept_rate', 'FAR', 'unknown_reject_rate', 'num_known',
        'num_unknown', 'threshold'}``; ``num_known`` counts the genuine trials, ``num_unknown``
        the impostor trials.

    Example:
        >>> max_pos = torch.tensor([0.9, 0.4, -math.inf])
        >>> max_neg = torch.tensor([0.2, 0.7, 0.6])
        >>> r = open_set_rates(max_pos, max_neg, 0.5)
        >>> r['DIR'], r['FAR'], r['num_known'], r['num_unknown']
        (0.5, 0.6666666666666666, 2, 3)
    """
    threshold = _check_rate_threshold(threshold)
    max_pos, max_neg = _as_stats(max_pos, max_neg)
    return _rates(*_trials(max_pos, max_neg, None, True), threshold)


def _threshold_for_far(impostor_best: torch.Tensor, target_far: float) -> float:
    """The lowest threshold whose FAR over ``impostor_best`` is ``<= target_far`` (``-inf``: all)."""
    num_impostors = impostor_best.numel()
    allowed = math.floor(target_far * num_impostors + 1e-9)
    if allowed >= num_impostors:
        return float("-inf")
    ordered = torch.sort(impostor_best, descending=True).values
    boundary = ordered[allowed : allowed + 1]
    return float(torch.nextafter(boundary, torch.full_like(boundary, float("inf")))[0])


def _threshold_for_f1(best: torch.Tensor, identified: torch.Tensor, genuine: torch.Tensor,
                      impostor_best: torch.Tensor) -> float:
    """The candidate threshold with the best F1 of "accepted and identified"."""
    known_best = best[genuine]
    correct_scores = known_best[identified[genuine]].sort().values
    known_scores = known_best.sort().values
    unknown_scores = impostor_best.sort().values
    candidates = torch.unique(torch.cat([known_best, impostor_best]))  # ascending

    def at_least(sorted_values: torch.Tensor) -> torch.Tensor:  # count of values >= each candidate
        return sorted_values.numel() - torch.searchsorted(sorted_values, candidates, right=False)

    true_accepts = at_least(correct_scores).double()
    all_accepts = (at_least(known_scores) + at_least(unknown_scores)).double()
    precision = true_accepts / all_accepts.clamp(min=1)
    recall = true_accepts / known_best.numel()
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return float(candidates[int(torch.argmax(f1))])


def calibrate_threshold(max_pos: torch.Tensor, max_neg: torch.Tensor, method: str = "f1",
                        target_far: float = 0.05) -> float | None:
    """Choose the open-set similarity threshold from validation queries (module convention).

    Every genuine trial (a query with a positive) is a *known* query: correct when identified,
    accepted when its best score ``>= t``. Every impostor trial (a query with a negative, its own
    label withheld) is an *unknown* query with best score ``max_neg``: accepting it is a false
    accept.

    Args:
        max_pos: ``(Q,)`` best same-label score per query (``-inf``/``nan`` without one).
        max_neg: ``(Q,)`` best other-label score per query (``-inf``/``nan`` without one).
        method: ``'f1'``: the threshold with the best F1 of "accepted and correct" (precision over
            all accepts, known and unknown; recall over known queries). ``'far'``: the lowest
            threshold whose false-accept rate on the impostor trials is ``<= target_far``
            (``-inf`` when every impostor may be accepted).
        target_far: Target false-accept rate for ``method='far'``, in ``[0, 1]``.

    Returns:
        The threshold (accept when score ``>= threshold``), or ``None`` when there is no genuine
        trial (``'f1'``) or no impostor trial (``'far'``).

    >>> max_pos = torch.tensor([0.9, 0.8, 0.3], dtype=torch.float64)
    >>> max_neg = torch.tensor([0.2, 0.5, 0.6], dtype=torch.float64)
    >>> calibrate_threshold(max_pos, max_neg, "f1")  # accepts the two correct queries only
    0.8
    """
    check_choice(method, "method", THRESHOLD_METHODS)
    max_pos, max_neg = _as_stats(max_pos, max_neg)
    best, identified, genuine, impostor, impostor_best = _trials(max_pos, max_neg, None, True)
    if method == "far":
        target_far = check_number(target_far, "target_far", 0.0, 1.0)
        if not bool(impostor.any()):
            return None
        return _threshold_for_far(impostor_best[impostor], target_far)
    if not bool(genuine.any()):
        return None
    return _threshold_for_f1(best, identified, genuine, impostor_best[impostor])


def _matrix_trials(
    scores: torch.Tensor, gallery_labels: torch.Tensor, query_labels: torch.Tensor,
    known: torch.Tensor | None, memory_budget: int | None, withhold_known: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(
        scores, gallery_labels, query_labels, memory_budget=_budget(memory_budget), ranks=False,
        need_first_rank=False,
    )
    max_pos, max_neg = _as_stats(stats["max_pos"], stats["max_neg"])  # type: ignore[arg-type]
    if known is not None:
        if not isinstance(known, torch.Tensor) or known.dtype != torch.bool:
            raise TypeError(f"known must be a boolean tensor of shape (Q,), got {known!r}")
        if known.shape != (scores.shape[0],):
            raise ValueError(f"known must have shape ({scores.shape[0]},), got {tuple(known.shape)}")
        known = known.cpu()
    return _trials(max_pos.cpu(), max_neg.cpu(), known, withhold_known)


def open_set_metrics(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    threshold: float,
    known: torch.Tensor | None = None,
    memory_budget: int | None = None,
    withhold_known: bool = False,
) -> dict[str, float]:
    """Open-set rates at one similarity threshold, from a score matrix.

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.
        query_labels: ``(Q,)`` integer labels.
        threshold: accept a query when its best score is ``>= threshold``.
        known: optional ``(Q,)`` bool, which queries belong to a gallery class; default: the query's
            label occurs in ``gallery_labels``.
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB).
        withhold_known: impostor trials as in the module convention (every query with a negative,
            its own label withheld), as ``recognite train`` and ``recognite evaluate`` report them;
            default ``False``: only the queries that are not known.

    Returns:
        ``{'DIR', 'known_accept_rate', 'FAR', 'unknown_reject_rate', 'num_known', 'num_unknown',
        'threshold'}``. ``DIR`` (detection and identification rate) is the fraction of known
        queries accepted *and* correctly identified; ``FAR`` is the fraction of impostor trials
        accepted; ``unknown_reject_rate = 1 - FAR``. Rates are ``nan`` when their set is empty.

    Example:
        >>> scores = torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.7, 0.1], [0.4, 0.3]])
        >>> m = open_set_metrics(scores, torch.tensor([1, 2]), torch.tensor([1, 1, 5, 6]), 0.5)
        >>> m['DIR'], m['known_accept_rate'], m['FAR']
        (0.5, 1.0, 0.5)
    """
    threshold = _check_rate_threshold(threshold)
    trials = _matrix_trials(scores, gallery_labels, query_labels, known, memory_budget, withhold_known)
    return _rates(*trials, threshold)


def threshold_at_far(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    target_far: float,
    known: torch.Tensor | None = None,
    memory_budget: int | None = None,
    withhold_known: bool = False,
) -> float:
    """The lowest threshold whose false-accept rate on the impostor trials is ``<= target_far``.

    With ``n`` impostor trials at most ``m = floor(target_far * n)`` may be accepted; the result
    is the smallest value (in float64) strictly above the ``(m + 1)``-th highest impostor best
    score, so ties never push the rate above the target. Returns ``-inf`` when ``m >= n`` (every
    query may be accepted). :func:`calibrate_threshold` (``method='far'``) uses the same rule.
    Use :func:`open_set_metrics` at the returned threshold to read the DIR it buys.

    Raises:
        ValueError: ``target_far`` outside ``[0, 1]`` or no impostor trials.

    Example:
        >>> scores = torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.7, 0.1], [0.4, 0.3]])
        >>> t = threshold_at_far(scores, torch.tensor([1, 2]), torch.tensor([1, 1, 5, 6]), 0.5)
        >>> t > 0.4, t < 0.41
        (True, True)
    """
    target_far = float(target_far)
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"target_far must be in [0, 1], got {target_far}")
    _, _, _, impostor, impostor_best = _matrix_trials(
        scores, gallery_labels, query_labels, known, memory_budget, withhold_known
    )
    if not bool(impostor.any()):
        raise ValueError(
            "threshold_at_far needs unknown queries (labels absent from the gallery, or known=False)"
        )
    threshold = _threshold_for_far(impostor_best[impostor], target_far)
    if math.isfinite(threshold):
        # The smallest value of the scores' dtype above the boundary (float32 scores compare as
        # float32 in the gallery search).
        boundary = torch.tensor(threshold, dtype=torch.float64)
        as_scores = boundary.to(scores.dtype)
        if as_scores.double() < boundary:
            as_scores = torch.nextafter(as_scores, torch.tensor(math.inf, dtype=scores.dtype))
        threshold = float(as_scores)
    return threshold
