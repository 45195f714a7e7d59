"""Top-k metrics with a FAISS index (optional dependency ``faiss-cpu``; private)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._engine import NO_RANK


def import_faiss() -> Any:
    """Import faiss or raise an ImportError that names the extra to install."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "FAISS search needs the optional dependency faiss-cpu: pip install 'recognite[faiss]'"
        ) from err
    return faiss


def label_counts(gallery_labels: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """``(Q,)`` number of gallery items carrying each query's label."""
    unique, counts = torch.unique(gallery_labels, return_counts=True)
    position = torch.searchsorted(unique, query_labels).clamp(max=unique.numel() - 1)
    return torch.where(unique[position] == query_labels, counts[position], 0)


def faiss_top_k_metrics(
    query_embs: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_embs: torch.Tensor,
    gallery_labels: torch.Tensor,
    metric: str,
    ks: Sequence[int],
    chunk_size: int,
) -> dict[str, Any]:
    """accuracy, top-k accuracy, recall@k and CMC up to ``max(ks)`` from an exact flat index."""
    faiss = import_faiss()
    gallery = gallery_embs.detach().float().cpu()
    queries = query_embs.detach().float().cpu()
    if metric == "cosine":
        gallery = torch.nn.functional.normalize(gallery, dim=1)
        queries = torch.nn.functional.normalize(queries, dim=1)
    index_cls = faiss.IndexFlatIP if metric in ("inner", "cosine") else faiss.IndexFlatL2
    index = index_cls(gallery.shape[1])
    index.add(gallery.contiguous().numpy())
    num_gallery = gallery.shape[0]
    depth = min(max(ks), num_gallery)
    gallery_labels_cpu = gallery_labels.cpu()
    query_labels_cpu = query_labels.cpu()
    first_ranks, hits = [], []
    for start in range(0, queries.shape[0], chunk_size):
        _, indices = index.search(queries[start : start + chunk_size].contiguous().numpy(), depth)
        indices = torch.from_numpy(indices).long()
        labels = gallery_labels_cpu[indices.clamp(min=0)]
        is_pos = (labels == query_labels_cpu[start : start + chunk_size].unsqueeze(1)) & (indices >= 0)
        positions = torch.arange(1, depth + 1).expand_as(indices)
        first = torch.where(is_pos, positions, NO_RANK).amin(dim=1)
        first_ranks.append(first)
        cum = torch.cumsum(is_pos, dim=1)
        hits.append(torch.stack([cum[:, min(k, depth) - 1] for k in ks], dim=1))
    first_rank = torch.cat(first_ranks)
    recall_hits = torch.cat(hits)
    num_pos = label_counts(gallery_labels_cpu, query_labels_cpu)
    has_pos = num_pos > 0
    num_queries = first_rank.numel()
    from .ranking import cmc_from_first_ranks

    recall = recall_hits.double() / num_pos.clamp(min=1).double().unsqueeze(1)
    return {
        "accuracy": float(torch.count_nonzero(first_rank <= 1)) / num_queries,
        "top_k_accuracy": {
            k: float(torch.count_nonzero(first_rank <= k)) / num_queries for k in ks
        },
        "recall_at_k": {
            k: float(recall[has_pos, i].mean()) if bool(has_pos.any()) else float("nan")
            for i, k in enumerate(ks)
        },
        "cmc": cmc_from_first_ranks(first_rank, num_pos, depth),
        "num_queries": num_queries,
        "num_queries_with_positives": int(torch.count_nonzero(has_pos)),
    }
