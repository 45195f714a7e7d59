"""Open-set decisions: answer the best label, or :data:`UNKNOWN` below a score threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from recognite.utils.validate import check_threshold

#: The answer given for a query whose best score is below the threshold.
UNKNOWN = "unknown"


def open_set_predictions(
    top1_labels: Sequence[str], top1_scores: torch.Tensor, threshold: float | None
) -> list[str]:
    """Best label per query, replaced by :data:`UNKNOWN` when its score is below ``threshold``.

    A score equal to the threshold is accepted. A query without any candidate (empty label)
    is always unknown.

    Args:
        top1_labels: (Q,) best label of every query.
        top1_scores: (Q,) its score (cosine similarity, higher = more alike).
        threshold: acceptance threshold, or None to always answer the best label.

    Returns:
        (Q,) predictions.

    Example:
        >>> open_set_predictions(["cat", "dog", "owl"], torch.tensor([0.9, 0.4, 0.5]), 0.5)
        ['cat', 'unknown', 'owl']
    """
    threshold = check_threshold(threshold)
    scores = torch.as_tensor(top1_scores).flatten().tolist()
    if len(scores) != len(top1_labels):
        raise ValueError(
            f"top1_labels has {len(top1_labels)} entries but top1_scores has {len(scores)}."
        )
    return [
        UNKNOWN if (not label or (threshold is not None and score < threshold)) else label
        for label, score in zip(top1_labels, scores)
    ]


@dataclass
class RecognitionResult:
    """Answers of :meth:`GalleryIndex.recognize` for Q queries.

    Attributes:
        predictions: (Q,) best label, or ``UNKNOWN`` when its score is below ``threshold``.
        labels: (Q, <=k) best labels per query, best first (distinct labels).
        scores: (Q, k) their scores (cosine similarity), ``-inf`` in unfilled slots.
        threshold: the threshold used, or None (never unknown).
        reference_ids: (Q, <=k) id of the best-matching reference of each label, when the
            gallery has ids and aggregation is ``'all'``; otherwise None.
    """

    predictions: list[str]
    labels: list[list[str]]
    scores: torch.Tensor
    threshold: float | None
    reference_ids: list[list[str]] | None = None

    @property
    def accepted(self) -> torch.Tensor:
        """(Q,) bool: True where the prediction is a gallery label (not ``UNKNOWN``)."""
        return torch.tensor([p != UNKNOWN for p in self.predictions], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One query's answer as a plain dict (JSON-serializable)."""
        labels = self.labels[i]
        scores = self.scores[i, : len(labels)].tolist()
        record: dict[str, Any] = {
            "prediction": self.predictions[i],
            "score": scores[0] if scores else None,
            "top_k": [{"label": lab, "score": s} for lab, s in zip(labels, scores)],
        }
        if self.reference_ids is not None:
            for entry, ref_id in zip(record["top_k"], self.reference_ids[i]):
                entry["reference_id"] = ref_id
        return record

    def to_records(self) -> list[dict[str, Any]]:
        """All answers as a list of dicts: ``prediction``, ``score`` (top-1), ``top_k``."""
        return [self[i] for i in range(len(self))]
