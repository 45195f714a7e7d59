"""Shared fixtures of the gallery tests: independent brute-force references (float64)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def label_scores(queries, refs, ref_labels, aggregation="all"):
    """(Q, L) score of every label for every query, and the label list (first-seen order)."""
    labels = list(dict.fromkeys(ref_labels))
    q, r = normalize(queries), normalize(refs)
    out = np.empty((q.shape[0], len(labels)))
    for j, lab in enumerate(labels):
        rows = r[[i for i, x in enumerate(ref_labels) if x == lab]]
        if aggregation == "all":
            out[:, j] = (q @ rows.T).max(axis=1)
        else:
            proto = rows.mean(axis=0)
            out[:, j] = q @ (proto / np.linalg.norm(proto))
    return out, labels


def assert_matches_reference(result, ref_scores, ref_labels, k, atol=1e-5):
    """The result's labels are distinct, carry their true scores, and are a valid top-k
    (any order among scores equal within ``atol``)."""
    k_eff = min(k, len(ref_labels))
    assert result.scores.shape == (ref_scores.shape[0], k_eff)
    for qi in range(ref_scores.shape[0]):
        row = ref_scores[qi]
        expected_top = np.sort(row)[::-1][:k_eff]
        got_scores = result.scores[qi].double().numpy()
        np.testing.assert_allclose(got_scores, expected_top, atol=atol)
        got = result.labels[qi]
        assert len(got) == k_eff and len(set(got)) == k_eff, got
        for lab, s in zip(got, got_scores):
            assert abs(row[ref_labels.index(lab)] - s) <= atol, (qi, lab, s)
        # every label strictly better than the k-th best (beyond ties) must be present
        kth = expected_top[-1]
        must = {lab for lab, s in zip(ref_labels, row) if s > kth + atol}
        assert must <= set(got), (qi, must, got)


@pytest.fixture
def reference():
    """The brute-force helpers: ``normalize``, ``label_scores``, ``assert_matches_reference``."""
    return SimpleNamespace(
        normalize=normalize, label_scores=label_scores, assert_matches_reference=assert_matches_reference
    )
