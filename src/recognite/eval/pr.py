"""Per-query precision-recall curves, average precision and hardest positive/negative scores.

Average precision follows the threshold view: items tied in score are retrieved together, there is
one PR point per distinct score, and ``AP = sum_n (R_n - R_{n-1}) * P_n``. This equals
scikit-learn's ``average_precision_score`` (ties included) and equals
``mean over positives p of #{positives >= s_p} / #{items >= s_p}``.
"""

from __future__ import annotations

import torch

from ._checks import check_scores
from ._engine import matrix_stats
from .ranking import _budget

__all__ = ["hard_pos_neg_scores", "pr_metrics"]


def pr_metrics(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    memory_budget: int | None = None,
) -> dict[str, object]:
    """Precision-recall curve, average precision and best-F1 operating point of every query.

    Each query's curve has the layout of scikit-learn's ``precision_recall_curve``: one point per
    distinct score, by increasing threshold (so recall descends), followed by the end point
    ``precision 1, recall 0`` that has no threshold (``len(Thresholds[q]) ==
    len(Precisions[q]) - 1``). The curve starts at the *highest* threshold that reaches full
    recall: lower thresholds only add points with recall 1 and falling precision (recent
    scikit-learn versions list those too; the points kept are identical). A query without positives in the gallery
    gets the curve ``Precisions=[1.]``, ``Recalls=[0.]``, ``Thresholds=[]`` and ``nan`` for its AP
    and its F1 fields; it is left out of ``mAP``.

    All curves come from one sort of the items scoring at least each query's lowest positive, per
    block of queries, never a loop of sorts.

    Args:
        scores: ``(Q, G)`` similarities.
        gallery_labels: ``(G,)`` integer labels.
        query_labels: ``(Q,)`` integer labels.
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB).

    Returns:
        Dict of tensors in the dtype of ``scores`` (float32 in, float32 out, as in the earlier
        release; integer scores give float64), computed in float64 (pass float64 scores for
        float64 results):
        ``Precisions`` / ``Recalls``: lists of ``Q`` tensors (``(n_q + 1,)``);
        ``Thresholds``: list of ``Q`` tensors (``(n_q,)``, ascending);
        ``AP``: ``(Q,)`` average precision (``nan`` without positives);
        ``mAP``: 0-dim tensor, mean AP over queries with positives (``nan`` if none);
        ``P@maxF1``, ``R@maxF1``, ``T@maxF1``, ``maxF1``: ``(Q,)`` precision, recall, threshold
        and value of the point with the highest F1 (highest threshold among equal F1).

    Example:
        >>> out = pr_metrics(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([1, 2, 1]),
        ...                  torch.tensor([1]))
        >>> [round(v, 4) for v in out['Precisions'][0].tolist()], out['Recalls'][0].tolist()
        ([0.6667, 0.5, 1.0, 1.0], [1.0, 0.5, 0.5, 0.0])
        >>> out['mAP'].dtype, round(float(out['mAP']), 4), [round(v, 4) for v in out['maxF1'].tolist()]
        (torch.float32, 0.8333, [0.8])
    """
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(
        scores, gallery_labels, query_labels, (), _budget(memory_budget), ranks=True, curves=True,
        need_max_neg=False, need_first_rank=False, curve_dtype=scores.dtype,
    )
    ap: torch.Tensor = stats["ap"]  # type: ignore[assignment]
    num_pos: torch.Tensor = stats["num_pos"]  # type: ignore[assignment]
    valid = ap[num_pos > 0]
    dtype = scores.dtype  # computed in float64, returned in the scores' dtype (as the earlier release)
    mean_ap = valid.mean() if valid.numel() else torch.tensor(float("nan"), dtype=torch.float64)
    counts: torch.Tensor = stats["curve_counts"]  # type: ignore[assignment]
    points = counts.tolist()
    with_end = (counts + 1).tolist()
    return {
        "Precisions": list(stats["curve_precisions"].to(dtype).split(with_end)),  # type: ignore[union-attr]
        "Recalls": list(stats["curve_recalls"].to(dtype).split(with_end)),  # type: ignore[union-attr]
        "Thresholds": list(stats["curve_thresholds"].split(points)),  # type: ignore[union-attr]
        "AP": ap.to(dtype),
        "mAP": mean_ap.to(dtype),
        "P@maxF1": stats["p_at_max_f1"].to(dtype),  # type: ignore[union-attr]
        "R@maxF1": stats["r_at_max_f1"].to(dtype),  # type: ignore[union-attr]
        "T@maxF1": stats["t_at_max_f1"],
        "maxF1": stats["max_f1"].to(dtype),  # type: ignore[union-attr]
    }


def hard_pos_neg_scores(
    scores: torch.Tensor,
    gallery_labels: torch.Tensor,
    query_labels: torch.Tensor,
    memory_budget: int | None = None,
) -> dict[str, torch.Tensor]:
    """Score of each query's hardest positive (lowest) and hardest negative (highest).

    Queries without positives are left out of ``HardPosScores``; queries without negatives are
    left out of ``HardNegScores`` (so the two tensors can differ in length). Query order is kept.

    Returns:
        ``{'HardPosScores': (Q_pos,), 'HardNegScores': (Q_neg,)}`` in the dtype of ``scores``.

    Example:
        >>> out = hard_pos_neg_scores(torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.4, 0.3]]),
        ...                           torch.tensor([1, 1, 2]), torch.tensor([1, 3]))
        >>> out['HardPosScores'].tolist(), out['HardNegScores'].tolist()
        ([0.20000000298023224], [0.699999988079071, 0.4000000059604645])
    """
    scores, gallery_labels, query_labels = check_scores(scores, gallery_labels, query_labels)
    stats = matrix_stats(
        scores, gallery_labels, query_labels, memory_budget=_budget(memory_budget), ranks=False,
        need_first_rank=False,
    )
    min_pos: torch.Tensor = stats["min_pos"]  # type: ignore[assignment]
    max_neg: torch.Tensor = stats["max_neg"]  # type: ignore[assignment]
    return {
        "HardPosScores": min_pos[stats["num_pos"] > 0],  # type: ignore[operator]
        "HardNegScores": max_neg[stats["num_neg"] > 0],  # type: ignore[operator]
    }
