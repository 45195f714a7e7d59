"""FAISS indexes for the gallery (optional dependency ``faiss-cpu``, imported lazily)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_FAISS_MISSING = (
    "The gallery backend {backend!r} needs the optional dependency faiss-cpu, which is not "
    "installed: pip install 'recognite[faiss]' (or use backend='torch')."
)


def import_faiss(backend: str) -> Any:
    """Import :mod:`faiss`, or raise an ImportError that names the extra to install."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(_FAISS_MISSING.format(backend=backend)) from err
    return faiss


def default_nlist(num_rows: int) -> int:
    """Number of IVF cells: about ``4 * sqrt(N)``, at least 1 and at most ``N``."""
    return max(1, min(num_rows, int(round(4 * math.sqrt(num_rows)))))


def build_flat(matrix: torch.Tensor) -> Any:
    """Exact inner-product index (``faiss.IndexFlatIP``) holding a copy of ``matrix`` (N, D)."""
    faiss = import_faiss("faiss-flat")
    data = np.ascontiguousarray(matrix.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return index


def build_ivf(matrix: torch.Tensor, nlist: int, train_size: int, seed: int = 0) -> Any:
    """Inverted-file inner-product index (``faiss.IndexIVFFlat``) trained on the rows.

    Args:
        matrix: (N, D) L2-normalized rows.
        nlist: number of cells (k-means centroids), ``1 <= nlist <= N``.
        train_size: number of rows (sampled without replacement, seeded) used for k-means;
            raised to ``nlist`` when smaller, capped at N.
        seed: seed of the sampling and of faiss' k-means.
    """
    faiss = import_faiss("faiss-ivf")
    data = np.ascontiguousarray(matrix.detach().cpu().numpy(), dtype=np.float32)
    num_rows, dim = data.shape
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    train_size = min(num_rows, max(train_size, nlist))
    index.cp.max_points_per_centroid = max(1, math.ceil(train_size / nlist))
    if train_size < num_rows:
        rng = np.random.default_rng(seed)
        sample = data[np.sort(rng.choice(num_rows, size=train_size, replace=False))]
    else:
        sample = data
    index.train(sample)  # faiss keeps a reference to the quantizer (referenced_objects)
    index.add(data)
    return index


def faiss_search(index: Any, queries: torch.Tensor, k: int, nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Search a faiss index; returns (Q, k) scores and row indices (``-1`` = empty slot)."""
    if nprobe is not None:
        index.nprobe = nprobe
    data = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
    scores, indices = index.search(data, k)
    scores_t = torch.from_numpy(scores)
    indices_t = torch.from_numpy(indices).long()
    scores_t[indices_t < 0] = float("-inf")
    return scores_t, indices_t
