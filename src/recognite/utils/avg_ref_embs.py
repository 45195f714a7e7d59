"""Average the reference (gallery) embeddings of each label."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["avg_ref_embs"]


def avg_ref_embs(
    embeddings: torch.Tensor, labels: torch.Tensor, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean embedding per label, e.g. to turn a gallery of several references per class into one
    prototype per class (usable as ``agg_gal_fn`` of :func:`recognite.eval.score_matrix`).

    Args:
        embeddings: ``(N, D)`` embeddings.
        labels: ``(N,)`` integer labels.
        normalize: re-normalize each mean to unit L2 norm (default ``False``: the plain mean, as
            specified; with the ``cosine`` metric the norm does not matter).

    Returns:
        ``(mean_embeddings (L, D), unique_labels (L,))`` with ``unique_labels`` sorted ascending and
        ``mean_embeddings[i]`` the mean of the embeddings labelled ``unique_labels[i]``.

    Example:
        >>> embs = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
        >>> means, labels = avg_ref_embs(embs, torch.tensor([5, 5, 2]))
        >>> means.tolist(), labels.tolist()
        ([[0.0, 4.0], [2.0, 1.0]], [2, 5])
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a (N, D) tensor, got {shape}")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"embeddings must be floating point, got dtype {embeddings.dtype}")
    labels = torch.as_tensor(labels, device=embeddings.device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype}, shape {tuple(labels.shape)}")
    if labels.numel() != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries but embeddings has {embeddings.shape[0]} rows")
    if labels.numel() == 0:
        raise ValueError("avg_ref_embs needs at least one embedding")
    unique_labels, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    sums = torch.zeros(
        (unique_labels.numel(), embeddings.shape[1]), dtype=embeddings.dtype, device=embeddings.device
    )
    sums.index_add_(0, inverse, embeddings)
    means = sums / counts.unsqueeze(1).to(embeddings.dtype)
    if normalize:
        means = F.normalize(means, dim=1)
    return means, unique_labels
