"""Argument validation shared by the evaluation functions (private)."""

from __future__ import annotations

from typing import Any

import torch

from recognite.utils.validate import check_int

DEFAULT_MEMORY_BUDGET = 256 * 1024**2
"""Default working-memory budget (bytes) for chunked evaluation."""

# Rough number of bytes of temporary memory per score-matrix element in the chunked engine
# (the score chunk itself, a boolean mask, one masked copy and a comparison result).
_BYTES_PER_ELEMENT = 16


def as_labels(labels: Any, name: str) -> torch.Tensor:
    """Return ``labels`` as a 1-D integer tensor or raise a clear error."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be a 1-D integer tensor, got {type(labels).__name__}"
            ) from err
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    return labels


def check_scores(
    scores: Any, gallery_labels: Any, query_labels: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate ``scores (Q, G)`` against the label tensors; return them on one device."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape (Q, G), got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (Q, G), got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        if scores.dtype.is_complex or scores.dtype == torch.bool:
            raise TypeError(f"scores must be a real-valued tensor, got dtype {scores.dtype}")
        scores = scores.double()  # integer scores (as the earlier release accepts): exact in float64
    num_queries, num_gallery = scores.shape
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(
            f"scores must have at least one query and one gallery item, got shape "
            f"{tuple(scores.shape)}"
        )
    gallery_labels = as_labels(gallery_labels, "gallery_labels").to(scores.device)
    if gallery_labels.numel() != num_gallery:
        raise ValueError(
            f"gallery_labels has {gallery_labels.numel()} entries but scores has {num_gallery} "
            f"columns (shape {tuple(scores.shape)}); they must match"
        )
    if query_labels is not None:
        query_labels = as_labels(query_labels, "query_labels").to(scores.device)
        if query_labels.numel() != num_queries:
            raise ValueError(
                f"query_labels has {query_labels.numel()} entries but scores has {num_queries} "
                f"rows (shape {tuple(scores.shape)}); they must match"
            )
    return scores, gallery_labels, query_labels


NON_FINITE_MESSAGE = "scores must be finite; found NaN or infinite values (check the embeddings)"


def check_finite(scores_chunk: torch.Tensor) -> None:
    """Raise ``ValueError`` if a score chunk holds NaN or infinite values."""
    total = scores_chunk.sum()  # one read; finite for any finite chunk unless it overflows
    if bool(torch.isfinite(total)):
        return
    if not bool(torch.isfinite(scores_chunk).all()):
        raise ValueError(NON_FINITE_MESSAGE)


def check_k(k: Any, name: str = "k") -> int:
    """Validate a positive integer ``k``."""
    return check_int(k, name, minimum=1, message=f"{name} must be a positive integer, got {k!r}")


def check_ks(ks: Any) -> tuple[int, ...]:
    """Validate a non-empty sequence of positive integers."""
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError as err:
        raise ValueError(f"ks must be a sequence of positive integers, got {ks!r}") from err
    if not ks:
        raise ValueError("ks must contain at least one positive integer, got an empty sequence")
    for k in ks:
        check_k(k, "each entry of ks")
    return ks


def rows_per_chunk(num_columns: int, memory_budget: int | None, name: str = "memory_budget") -> int:
    """Number of score rows whose temporary working memory fits ``memory_budget`` bytes."""
    if memory_budget is None:
        memory_budget = DEFAULT_MEMORY_BUDGET
    check_int(memory_budget, name, minimum=1, message=f"{name} must be a positive number of bytes, got {memory_budget!r}")
    return max(1, memory_budget // (_BYTES_PER_ELEMENT * max(1, num_columns)))
