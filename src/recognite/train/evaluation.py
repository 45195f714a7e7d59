"""Validation during training: embeddings of the gallery and query splits, metrics, threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from recognite.eval import embed_loader, evaluate_embeddings
from recognite.eval.open_set import THRESHOLD_METHODS, calibrate_threshold
from recognite.eval.summary import nan_if_missing, summary_metrics
from recognite.train import _distributed as distributed
from recognite.train.config import TrainConfig
from recognite.utils import avg_ref_embs, collate_three_crops, embeddings_three_crops

__all__ = [
    "THRESHOLD_METHODS",
    "VALIDATION_KEYS",
    "ValidationResult",
    "best_positive_negative",
    "calibrate_threshold",
    "validate",
    "validation_metrics",
]

VALIDATION_KEYS = ("top1", "top5", "mAP", "MAP@R", "R-precision", "hard_pos_mean", "hard_neg_mean",
                   "threshold", "DIR", "FAR")
"""The columns of the validation metrics in ``metrics.csv`` (the last three need a threshold)."""


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
    metric: str = "cosine", chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the best score of a same-label and of an other-label gallery item.

    Kept for code written against 0.1.0; the statistics come from the bounded-memory engine
    (:func:`recognite.eval.evaluate_embeddings` ``['per_query']``).

    Returns:
        ``(max_pos (Q,), max_neg (Q,))`` float64; ``-inf`` where a query has no positive / negative.
    """
    result = evaluate_embeddings(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=(1,),
                                 chunk_size=chunk_size)
    stats = result["per_query"].cpu()
    return stats.max_pos.double(), stats.max_neg.double()


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
    """The summary metrics of ``recognite train`` for given embeddings (see :class:`ValidationResult`).

    One call of :func:`recognite.eval.summary.summary_metrics` (the bounded-memory engine): the
    same figures ``recognite evaluate`` and the report compute.
    """
    summary = summary_metrics(query_embs, query_labels, gallery_embs, gallery_labels, metric=metric, ks=(1, 5),
                              threshold_method=threshold_method, target_far=target_far)
    keys = VALIDATION_KEYS if summary.threshold is not None else VALIDATION_KEYS[:-3]
    return ValidationResult(metrics=nan_if_missing(summary.metrics, keys), threshold=summary.threshold)
