"""Validation during training: embeddings of the gallery and query splits, metrics, threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from recognite.eval import embed_loader, evaluate_embeddings, pairwise_scores
from recognite.train import _distributed as distributed
from recognite.train.config import TrainConfig
from recognite.utils import avg_ref_embs, collate_three_crops, embeddings_three_crops

THRESHOLD_METHODS = ("f1", "far")


@dataclass
class ValidationResult:
    """Metrics of one validation pass.

    Attributes:
        metrics: Flat dict of floats (``top1``, ``top5``, ``mAP``, ``MAP@R``, ``R-precision``,
            ``hard_pos_mean``, ``hard_neg_mean``, ``threshold``, ``DIR``, ``FAR``).
        threshold: The calibrated open-set threshold (``None`` without positives and negatives).
    """

    metrics: dict[str, float]
    threshold: float | None


def best_positive_negative(
    query_embs: torch.Tensor, query_labels: torch.Tensor, gallery_embs: torch.Tensor, gallery_labels: torch.Tensor,
    metric: str = "cosine", chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the best score of a same-label and of an other-label gallery item.

    Returns:
        ``(max_pos (Q,), max_neg (Q,))``; ``-inf`` where a query has no positive / negative.
    """
    max_pos, max_neg = [], []
    for start in range(0, query_embs.shape[0], chunk_size):
        scores = pairwise_scores(query_embs[start:start + chunk_size], gallery_embs, metric).double()
        same = query_labels[start:start + chunk_size, None] == gallery_labels[None, :]
        max_pos.append(scores.masked_fill(~same, -math.inf).max(dim=1).values)
        max_neg.append(scores.masked_fill(same, -math.inf).max(dim=1).values)
    return torch.cat(max_pos), torch.cat(max_neg)


def calibrate_threshold(max_pos: torch.Tensor, max_neg: torch.Tensor, method: str = "f1",
                        target_far: float = 0.05) -> float | None:
    """Choose the open-set similarity threshold from validation queries.

    Every validation query is used twice: as a *known* query (its label is enrolled; it is
    correctly identified when ``max_pos > max_neg`` and accepted when its best score
    ``max(max_pos, max_neg) >= t``) and as an *unknown* query (its label is not enrolled, so its
    best score is ``max_neg``; accepting it is a false accept).

    Args:
        max_pos: ``(Q,)`` best same-label score per query.
        max_neg: ``(Q,)`` best other-label score per query.
        method: ``'f1'``: the threshold with the best F1 of "accepted and correct" (precision over
            all accepts, known and unknown; recall over known queries). ``'far'``: the lowest
            threshold whose false-accept rate on the unknown queries is ``<= target_far``.
        target_far: Target false-accept rate for ``method='far'``.

    Returns:
        The threshold (accept when score ``>= threshold``), or ``None`` when no query has both a
        positive and a negative.

    >>> max_pos = torch.tensor([0.9, 0.8, 0.3], dtype=torch.float64)
    >>> max_neg = torch.tensor([0.2, 0.5, 0.6], dtype=torch.float64)
    >>> calibrate_threshold(max_pos, max_neg, "f1")  # accepts the two correct queries only
    0.8
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {THRESHOLD_METHODS}, got {method!r}.")
    valid = torch.isfinite(max_pos) & torch.isfinite(max_neg)
    max_pos, max_neg = max_pos[valid].double(), max_neg[valid].double()
    if max_pos.numel() == 0:
        return None
    if method == "far":
        if not 0 < target_far < 1:
            raise ValueError(f"target_far must be in (0, 1), got {target_far}.")
        ordered = max_neg.sort(descending=True).values
        allowed = math.floor(target_far * ordered.numel() + 1e-9)
        if allowed >= ordered.numel():
            return float(ordered[-1])
        return float(torch.nextafter(ordered[allowed], torch.tensor(math.inf, dtype=torch.float64)))
    correct = max_pos > max_neg
    known_best = torch.maximum(max_pos, max_neg)
    candidates = torch.unique(torch.cat([known_best, max_neg]))  # ascending
    correct_scores = known_best[correct].sort().values
    known_scores = known_best.sort().values
    unknown_scores = max_neg.sort().values

    def at_least(sorted_values: torch.Tensor) -> torch.Tensor:  # count of values >= each candidate
        return sorted_values.numel() - torch.searchsorted(sorted_values, candidates, right=False)

    true_accepts = at_least(correct_scores).double()
    all_accepts = (at_least(known_scores) + at_least(unknown_scores)).double()
    precision = true_accepts / all_accepts.clamp(min=1)
    recall = true_accepts / max_pos.numel()
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return float(candidates[int(torch.argmax(f1))])


def _loader(dataset: Dataset, config: TrainConfig) -> DataLoader:
    return DataLoader(dataset, batch_size=config.val_batch_size, shuffle=False, num_workers=config.num_workers,
                      collate_fn=collate_three_crops if config.three_crop else None)


def _embed(model: nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device,
           info: distributed.DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ``dataset`` (this rank's shard when distributed) and gather every rank's rows in order."""
    fn = embeddings_three_crops if config.three_crop else None
    embeddings, labels = embed_loader(model, _loader(dataset, config), device, fn)
    if not info.enabled:
        return embeddings, labels
    indices = torch.tensor(dataset.indices if isinstance(dataset, Subset) else range(len(dataset)))
    embeddings = distributed.gather_rows(embeddings.to(device), info).cpu()
    labels = distributed.gather_rows(labels.to(device), info).cpu()
    order = torch.argsort(distributed.gather_rows(indices.to(device), info).cpu())
    return embeddings[order], labels[order]


def validate(model: nn.Module, ds_gallery: Dataset, ds_query: Dataset, config: TrainConfig,
             device: torch.device, info: distributed.DistInfo) -> ValidationResult:
    """Embed gallery and queries, then compute the retrieval metrics and the open-set threshold."""
    gallery_embs, gallery_labels = _embed(model, ds_gallery, config, device, info)
    query_embs, query_labels = _embed(model, ds_query, config, device, info)
    if config.avg_refs:
        gallery_embs, gallery_labels = avg_ref_embs(gallery_embs, gallery_labels)
    return validation_metrics(query_embs, query_labels, gallery_embs, gallery_labels, config.metric,
                              config.threshold_method, config.target_far)


def validation_metrics(query_embs: torch.Tensor, query_labels: torch.Tensor, gallery_embs: torch.Tensor,
                       gallery_labels: torch.Tensor, metric: str = "cosine", threshold_method: str = "f1",
                       target_far: float = 0.05) -> ValidationResult:
    """The summary metrics of ``recognite train`` for given embeddings (see :class:`ValidationResult`)."""
    ks = (1, 5) if gallery_embs.shape[0] >= 5 else (1,)
    result = evaluate_embeddings(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=ks)
    max_pos, max_neg = best_positive_negative(query_embs, query_labels, gallery_embs, gallery_labels, metric)
    threshold = calibrate_threshold(max_pos, max_neg, threshold_method, target_far)
    metrics: dict[str, Any] = {
        "top1": result["accuracy"],
        "top5": result["top_k_accuracy"].get(5, float("nan")),
        "mAP": result["mAP"],
        "MAP@R": result["map_at_r"],
        "R-precision": result["r_precision"],
        "hard_pos_mean": result["hard_pos_mean"],
        "hard_neg_mean": result["hard_neg_mean"],
    }
    if threshold is not None:
        valid = torch.isfinite(max_pos) & torch.isfinite(max_neg)
        mp, mn = max_pos[valid], max_neg[valid]
        metrics["threshold"] = threshold
        metrics["DIR"] = float(((mp > mn) & (torch.maximum(mp, mn) >= threshold)).double().mean())
        metrics["FAR"] = float((mn >= threshold).double().mean())
    return ValidationResult(metrics={k: float(v) for k, v in metrics.items()}, threshold=threshold)
