"""The summary metrics of a validation split: one function behind train, evaluate and the report.

:func:`summary_metrics` runs the bounded-memory engine once (:func:`evaluate_embeddings`) and
derives from its per-query statistics the retrieval figures, the calibrated open-set threshold
and the open-set rates (:mod:`recognite.eval.open_set`). Memory is the embeddings plus the
engine's budget, whatever ``Q * G``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recognite.utils.validate import check_threshold

from .open_set import calibrate_threshold, open_set_rates
from .streaming import PerQueryStats, evaluate_embeddings

__all__ = ["SummaryResult", "summary_metrics"]


@dataclass
class SummaryResult:
    """Summary of one validation split.

    Attributes:
        metrics: Flat dict: ``top1``, ``top{k}`` and ``recall@{k}`` for each ``k`` of ``ks``
            (``top{k}`` for ``k > 1``), ``mAP``, ``MAP@R``, ``R-precision``, ``hard_pos_mean``,
            ``hard_neg_mean`` and, when there is a threshold, ``threshold``, ``DIR`` and ``FAR``
            (the convention of :mod:`recognite.eval.open_set`).
        threshold: The threshold used for the rates (given or calibrated), or ``None``.
        per_query: The engine's per-query statistics.
    """

    metrics: dict[str, float]
    threshold: float | None
    per_query: PerQueryStats


def summary_metrics(
    query_embs: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_embs: torch.Tensor,
    gallery_labels: torch.Tensor,
    metric: str = "cosine",
    ks: Sequence[int] = (1, 5),
    threshold: float | None = None,
    calibrate: bool = True,
    threshold_method: str = "f1",
    target_far: float = 0.05,
    memory_budget: int | None = None,
    device: str | torch.device | None = None,
    rerank: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SummaryResult:
    """Retrieval metrics, open-set threshold and rates of query embeddings against a gallery.

    Args:
        query_embs: ``(Q, D)`` query embeddings.
        query_labels: ``(Q,)`` integer labels.
        gallery_embs: ``(G, D)`` gallery embeddings, or ``(G, V, D)`` (each item scored by its
            best view, see :func:`evaluate_embeddings`).
        gallery_labels: ``(G,)`` integer labels.
        metric: Similarity (see :func:`~recognite.eval.pairwise_scores`).
        ks: ``k`` values of top-k accuracy and recall@k (those above ``G`` are left out).
        threshold: Rates at this threshold; ``None``: calibrate one when ``calibrate``.
        calibrate: Calibrate a threshold (``threshold_method``, ``target_far``) when none is given.
        threshold_method: ``'f1'`` or ``'far'`` (see :func:`~recognite.eval.open_set.calibrate_threshold`).
        target_far: Target false-accept rate of ``'far'``.
        memory_budget: Working memory of the engine in bytes (default 256 MiB).
        device: Where to score (default: the gallery's device).
        rerank: Re-ranking of every block of scores (see :func:`evaluate_embeddings`); the
            threshold and rates then apply to the re-ranked scores.

    Returns:
        A :class:`SummaryResult`.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> q = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> r = summary_metrics(q, torch.tensor([0, 1, 1]), g, torch.tensor([0, 1]), ks=(1,))
        >>> r.metrics["top1"], r.metrics["DIR"], r.metrics["FAR"]
        (0.6666666666666666, 0.6666666666666666, 0.0)
    """
    threshold = check_threshold(threshold)
    num_gallery = int(gallery_embs.shape[0]) if isinstance(gallery_embs, torch.Tensor) else 0
    ks = tuple(k for k in ks if k <= num_gallery) or (1,)
    result = evaluate_embeddings(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=ks,
                                 memory_budget=memory_budget, device=device, rerank=rerank)
    per_query = result["per_query"].cpu()
    metrics: dict[str, Any] = {"top1": result["accuracy"]}
    metrics.update({f"top{k}": result["top_k_accuracy"][k] for k in ks if k > 1})
    metrics.update({f"recall@{k}": result["recall_at_k"][k] for k in ks})
    metrics.update({
        "mAP": result["mAP"], "MAP@R": result["map_at_r"], "R-precision": result["r_precision"],
        "hard_pos_mean": result["hard_pos_mean"], "hard_neg_mean": result["hard_neg_mean"],
    })
    max_pos, max_neg = per_query.max_pos, per_query.max_neg
    if threshold is None and calibrate:
        threshold = calibrate_threshold(max_pos, max_neg, threshold_method, target_far)
    if threshold is not None:
        rates = open_set_rates(max_pos, max_neg, threshold)
        metrics.update(threshold=threshold, DIR=rates["DIR"], FAR=rates["FAR"])
    return SummaryResult(metrics={k: float(v) for k, v in metrics.items()}, threshold=threshold,
                         per_query=per_query)


def nan_if_missing(metrics: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    """``metrics`` restricted to ``keys``, with ``nan`` for the keys it lacks."""
    return {key: float(metrics.get(key, math.nan)) for key in keys}
