"""Evaluation: similarity scores, rankings and retrieval / open-set / few-shot metrics.

Scores are similarities (higher = more alike) of shape ``(Q, G)``; arguments are always ordered
``(scores, gallery_labels, query_labels)``. See ``docs/evaluation.md`` for definitions, tie rules
and the bounded-memory path (:func:`evaluate_embeddings`).
"""

from .episodes import episode_accuracy
from .open_set import (
    calibrate_threshold,
    open_set_metrics,
    open_set_rates,
    threshold_at_far,
)
from .pr import hard_pos_neg_scores, pr_metrics
from .ranking import (
    accuracy,
    cmc,
    knn,
    map_at_r,
    r_precision,
    recall_at_k,
    sort_scores,
    top_k,
    top_k_accuracy,
)
from .scores import METRICS, embed_loader, pairwise_scores, score_matrix
from .streaming import evaluate_embeddings, evaluate_loaders, evaluate_scores
from .summary import SummaryResult, summary_metrics

__all__ = [
    "METRICS",
    "SummaryResult",
    "calibrate_threshold",
    "accuracy",
    "cmc",
    "embed_loader",
    "episode_accuracy",
    "evaluate_embeddings",
    "evaluate_loaders",
    "evaluate_scores",
    "hard_pos_neg_scores",
    "knn",
    "map_at_r",
    "open_set_metrics",
    "open_set_rates",
    "pairwise_scores",
    "pr_metrics",
    "r_precision",
    "recall_at_k",
    "score_matrix",
    "sort_scores",
    "summary_metrics",
    "threshold_at_far",
    "top_k",
    "top_k_accuracy",
]
