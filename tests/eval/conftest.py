"""Slow, obviously-correct reference implementations for the eval tests (loops per query)."""

from __future__ import annotations

import math

import numpy as np
import pytest


def pessimistic_order(row: np.ndarray, is_pos: np.ndarray) -> np.ndarray:
    """Gallery indices sorted by descending score, negatives before positives among ties."""
    keys = sorted(range(len(row)), key=lambda g: (-row[g], 1 if is_pos[g] else 0, g))
    return np.array(keys)


def reference_metrics(scores: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray,
                      ks=(1, 2, 3)) -> dict:
    num_queries, num_gallery = scores.shape
    first_ranks, recalls = [], {k: [] for k in ks}
    map_r, r_prec, aps = [], [], []
    hits = {k: 0 for k in ks}
    for q in range(num_queries):
        is_pos = gallery_labels == query_labels[q]
        num_pos = int(is_pos.sum())
        order = pessimistic_order(scores[q], is_pos)
        rel = is_pos[order]
        if num_pos == 0:
            continue
        ranks = np.nonzero(rel)[0] + 1
        first = int(ranks[0])
        first_ranks.append(first)
        for k in ks:
            hits[k] += first <= k
            recalls[k].append(float((ranks <= k).sum()) / num_pos)
        top_r = rel[:num_pos]
        r_prec.append(top_r.sum() / num_pos)
        map_r.append(sum((rel[: i + 1].sum() / (i + 1)) for i in range(num_pos) if rel[i]) / num_pos)
        # Threshold AP: precision at each positive's score, ties retrieved together.
        ap = 0.0
        for g in np.nonzero(is_pos)[0]:
            retrieved = scores[q] >= scores[q, g]
            ap += (retrieved & is_pos).sum() / retrieved.sum()
        aps.append(ap / num_pos)
    cmc = [sum(r <= rank for r in first_ranks) / len(first_ranks) for rank in range(1, num_gallery + 1)]
    return {
        "top_k_accuracy": {k: hits[k] / num_queries for k in ks},
        "recall_at_k": {k: float(np.mean(recalls[k])) if recalls[k] else math.nan for k in ks},
        "cmc": cmc,
        "map_at_r": float(np.mean(map_r)),
        "r_precision": float(np.mean(r_prec)),
        "mAP": float(np.mean(aps)),
    }


@pytest.fixture
def reference():
    """The reference metric implementation (a fixture, since tests use importlib mode)."""
    return reference_metrics
