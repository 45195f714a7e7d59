"""Query expansion and database-side augmentation: re-ranking by neighbourhood averaging.

Both replace an embedding by the re-normalized weighted mean of itself and its ``k`` nearest
gallery neighbours, each neighbour weighted by its cosine similarity to the power ``alpha``
(negative similarities count as 0); the embedding itself has weight 1 (alpha-QE and alpha-DBA of
Radenovic et al., TPAMI 2019; alpha=0 is the plain average, "AQE" / "DBA"):

* :func:`database_augmentation` (DBA) does it for every gallery item against the rest of the
  gallery (once, at enrolment);
* :func:`query_expansion` (QE) does it for queries against the (augmented) gallery; searching
  again with the expanded queries gives the re-ranked answer.

Neighbours come from the chunked exact search of the gallery, so memory is set by
``chunk_size``, never by ``Q x G``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recognite.gallery._search import exact_topk
from recognite.utils.validate import check_int, check_number

__all__ = ["database_augmentation", "query_expansion"]

_DEFAULT_CHUNK = 16 * 1024**2  # scores per block product


def _expand(points: torch.Tensor, matrix: torch.Tensor, k: int, alpha: float, skip_self: bool,
            chunk_size: int) -> torch.Tensor:
    neighbours = min(k + int(skip_self), matrix.shape[0])
    scores, indices = exact_topk(points, matrix, neighbours, chunk_size)
    if skip_self:  # each gallery item finds itself first (ties aside): drop exactly that entry
        rows = torch.arange(points.shape[0], device=points.device).unsqueeze(1)
        is_self = indices == rows
        has_self = is_self.any(dim=1, keepdim=True)
        drop = torch.where(has_self, is_self.int().argmax(dim=1, keepdim=True), torch.full_like(rows, neighbours - 1))
        keep = torch.ones_like(indices, dtype=torch.bool).scatter_(1, drop, False)
        scores = scores[keep].reshape(points.shape[0], neighbours - 1)
        indices = indices[keep].reshape(points.shape[0], neighbours - 1)
    weights = scores.clamp(min=0.0) ** alpha if alpha else torch.ones_like(scores)
    mixed = points + (weights.unsqueeze(2) * matrix[indices]).sum(dim=1)
    return F.normalize(mixed, dim=1)


def query_expansion(queries: torch.Tensor, gallery: torch.Tensor, k: int = 1, alpha: float = 3.0,
                    chunk_size: int = _DEFAULT_CHUNK) -> torch.Tensor:
    """Expanded queries: each the normalized ``q + sum_j max(s_j, 0)**alpha g_j`` over its ``k``
    best gallery items ``g_j`` (scores ``s_j``); search again with them.

    Args:
        queries: ``(Q, D)`` query embeddings (any norm; unit-normalized first).
        gallery: ``(G, D)`` gallery embeddings (idem).
        k: neighbours averaged in (1-``G``).
        alpha: weight exponent (0 = plain average).
        chunk_size: scores computed per block product (memory bound).

    Returns:
        ``(Q, D)`` unit-norm expanded queries.
    """
    check_int(k, "k", minimum=1)
    check_number(alpha, "alpha", minimum=0.0)
    return _expand(F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1), k, alpha, False,
                   chunk_size)


def database_augmentation(gallery: torch.Tensor, k: int = 1, alpha: float = 3.0,
                          chunk_size: int = _DEFAULT_CHUNK) -> torch.Tensor:
    """Augmented gallery: each item the normalized ``g + sum_j max(s_j, 0)**alpha g_j`` over its
    ``k`` nearest *other* gallery items (itself excluded).

    With one reference per label the neighbours are other labels' references, which blurs the
    labels apart rather than together: measure before using it on 1-shot galleries.

    Returns:
        ``(G, D)`` unit-norm augmented gallery embeddings.
    """
    check_int(k, "k", minimum=1)
    check_number(alpha, "alpha", minimum=0.0)
    unit = F.normalize(gallery.float(), dim=1)
    if unit.shape[0] < 2:
        return unit
    return _expand(unit, unit, min(k, unit.shape[0] - 1), alpha, True, chunk_size)
