"""Embeddings from a model and similarity scores between queries and a gallery.

All scores are *similarities*: higher means more alike. Distances are negated so that the same
ranking code serves every metric.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from recognite.utils.device import resolve_device

from ._checks import DEFAULT_MEMORY_BUDGET, as_labels, rows_per_chunk
from ._rows_cpu import run_blocks

__all__ = ["METRICS", "embed_loader", "pairwise_scores", "score_matrix"]

METRICS: tuple[str, ...] = ("inner", "cosine", "euclid", "sq_euclid")
"""Similarity metrics understood by :func:`score_matrix` and :func:`pairwise_scores`."""

EmbeddingsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
AggregateFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def check_metric(metric: Any) -> str:
    """Return ``metric`` if it is one of :data:`METRICS`, else raise a ``ValueError``."""
    if metric not in METRICS:
        close = difflib.get_close_matches(str(metric), METRICS, n=2)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown metric {metric!r}; allowed: {', '.join(METRICS)}.{hint}")
    return metric


def _check_embeddings(embeddings: Any, name: str) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(embeddings.shape)}")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    return embeddings


SCORE_BLOCK_ROWS = 64
"""Fewest query rows of a matrix product. BLAS takes another kernel (with other rounding) for
products of a few rows, so shorter chunks are zero-padded to this many rows; from this size on
every row of a product has the same bits as in the full product (checked on this CPU for
``D`` 3-1000 and ``G`` 50-20001), so a query's scores do not depend on the chunk it is scored in.
On the CPU longer products are split into work items of at least this many rows
(:data:`PRODUCT_BLOCK_ROWS`) or, for a single chunk, into column blocks
(:data:`PRODUCT_BLOCK_COLUMNS`), which keep the same bits."""


PRODUCT_BLOCK_ROWS = 512
"""Query rows per work item of a CPU score product (at least :data:`SCORE_BLOCK_ROWS`)."""

PRODUCT_BLOCK_COLUMNS = 4096
"""Fewest gallery columns per work item when a CPU chunk's product is split by columns (a chunk
too short to split by rows: :meth:`_GalleryScorer.pooled`). Column blocks of this width or more
(up to twice it) keep every score's bits of the full product (checked on this CPU for ``D`` 3-1000
and ``G`` 9000-70000); narrower ones do not always."""


def _blocked_matmul(rows: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows @ right``, with fewer than :data:`SCORE_BLOCK_ROWS` rows zero-padded to that many.

    ``out``: a buffer of at least ``len(rows)`` rows; the product is written into its first rows
    and that view returned. A padded product is computed within ``out`` when it has
    :data:`SCORE_BLOCK_ROWS` rows (no temporary as large as the product), else in a temporary.
    """
    num_rows = rows.shape[0]
    if num_rows >= SCORE_BLOCK_ROWS:
        return torch.matmul(rows, right, out=None if out is None else out[:num_rows])
    padded = rows.new_zeros((SCORE_BLOCK_ROWS, rows.shape[1]))
    padded[:num_rows] = rows
    if out is not None and out.shape[0] >= SCORE_BLOCK_ROWS:
        return torch.matmul(padded, right, out=out[:SCORE_BLOCK_ROWS])[:num_rows]
    product = torch.matmul(padded, right)[:num_rows]
    if out is None:
        return product
    return out[:num_rows].copy_(product)


class _GalleryScorer:
    """Scores query chunks against a fixed gallery; gallery statistics are computed once.

    ``cosine``: ``(q / |q|) @ g.T / |g|`` (norms clamped at 1e-12, so zero vectors score 0). The
    gallery norms are applied elementwise after the product (no normalized copy of a large
    gallery is held), so a score does not depend on which other queries share its chunk.
    ``sq_euclid``: ``-(|q|^2 + |g|^2 - 2 q.g)`` clamped at 0; ``euclid``: ``-sqrt`` of that.
    No ``(Q, G, D)`` tensor is ever built.
    """

    def __init__(self, gallery_embs: torch.Tensor, metric: str) -> None:
        self.metric = check_metric(metric)
        self.gallery = _check_embeddings(gallery_embs, "gallery_embs")
        self.gallery_t = self.gallery.t()
        self.inv_norms: torch.Tensor | None = None
        self.sq_norms: torch.Tensor | None = None
        if metric == "cosine":
            self.inv_norms = 1.0 / self.gallery.norm(dim=1).clamp_min(1e-12)
        if metric in ("euclid", "sq_euclid"):
            self.sq_norms = (self.gallery * self.gallery).sum(dim=1)

    def __call__(self, query_embs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(c, G)`` scores of a query chunk, written into the first ``c`` rows of ``out`` when given.

        ``out`` may have more rows: a chunk of fewer than :data:`SCORE_BLOCK_ROWS` queries is then
        padded within it (see :func:`_blocked_matmul`).
        """
        rows, query_sq = self._product_rows(query_embs)
        return self._columns(rows, query_sq, slice(None), out)

    def pooled(self, query_embs: torch.Tensor, out: torch.Tensor, workers: int) -> torch.Tensor:
        """Like ``self(query_embs, out=out)`` (the same bits), the product split by gallery columns.

        For a CPU chunk too short to split by rows: blocks of :data:`PRODUCT_BLOCK_COLUMNS` to twice
        that many columns are work items of a pool of ``workers`` threads, so on a busy machine the
        thread sharing a core takes fewer of them (one product split statically waits for it).
        """
        num_gallery = self.gallery.shape[0]
        num_blocks = num_gallery // PRODUCT_BLOCK_COLUMNS
        if workers <= 1 or num_blocks < 2:
            return self(query_embs, out=out)
        rows, query_sq = self._product_rows(query_embs)
        bounds = [block * num_gallery // num_blocks for block in range(num_blocks + 1)]
        run_blocks(lambda block, _: self._columns(rows, query_sq, slice(bounds[block], bounds[block + 1]),
                                                  out[:, bounds[block] : bounds[block + 1]]),
                   num_blocks, 1, workers)
        return out[: query_embs.shape[0]]

    def _product_rows(self, query_embs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows that multiply the gallery (unit rows for cosine) and, for distances, ``|q|^2``."""
        query_embs = query_embs.to(device=self.gallery.device, dtype=self.gallery.dtype)
        if query_embs.shape[1] != self.gallery.shape[1]:
            raise ValueError(
                f"query_embs has dimension {query_embs.shape[1]} but gallery_embs has dimension "
                f"{self.gallery.shape[1]}; they must match"
            )
        if self.metric == "inner":
            return query_embs, None
        if self.metric == "cosine":
            return query_embs / query_embs.norm(dim=1, keepdim=True).clamp_min(1e-12), None
        return query_embs, (query_embs * query_embs).sum(dim=1, keepdim=True)

    def _columns(
        self, rows: torch.Tensor, query_sq: torch.Tensor | None, columns: slice, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Scores of ``rows`` against the gallery ``columns`` (elementwise steps after the product)."""
        products = _blocked_matmul(rows, self.gallery_t[:, columns], out)
        if self.metric == "inner":
            return products
        if self.metric == "cosine":
            return products.mul_(self.inv_norms[columns])
        sq_dist = products.mul_(-2.0).add_(query_sq).add_(self.sq_norms[columns])
        sq_dist.clamp_(min=0.0)
        if self.metric == "euclid":
            sq_dist.sqrt_()
        return sq_dist.neg_()


def pairwise_scores(
    query_embs: torch.Tensor,
    gallery_embs: torch.Tensor,
    metric: str = "inner",
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Similarity scores between every query and every gallery embedding.

    Args:
        query_embs: ``(Q, D)`` query embeddings.
        gallery_embs: ``(G, D)`` gallery embeddings.
        metric: ``'inner'`` (dot product), ``'cosine'`` (correct for vectors of any norm; a zero
            vector scores 0 against everything), ``'euclid'`` (negated Euclidean distance) or
            ``'sq_euclid'`` (negated squared Euclidean distance).
        memory_budget: bytes of temporary memory per query chunk (default 256 MiB). Memory use
            is ``Q * G`` for the result plus one chunk; it never grows with ``Q * G * D``.

    Returns:
        ``(Q, G)`` scores, higher = more alike, on the gallery's device and dtype.

    Example:
        >>> q = torch.tensor([[3.0, 0.0]])
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        >>> pairwise_scores(q, g, metric='cosine')
        tensor([[1.0000, 0.0000, 0.7071]])
        >>> pairwise_scores(q, g, metric='sq_euclid')
        tensor([[ -4., -13.,  -5.]])
    """
    query_embs = _check_embeddings(query_embs, "query_embs")
    scorer = _GalleryScorer(gallery_embs, metric)
    num_queries = query_embs.shape[0]
    chunk = rows_per_chunk(gallery_embs.shape[0], memory_budget)
    workers = torch.get_num_threads()
    on_cpu = gallery_embs.device.type == "cpu"
    if num_queries <= chunk and not (on_cpu and workers > 1 and num_queries >= 2 * PRODUCT_BLOCK_ROWS):
        return scorer(query_embs)
    scores = torch.empty((num_queries, gallery_embs.shape[0]), dtype=gallery_embs.dtype, device=gallery_embs.device)
    if on_cpu:
        # Blocks of rows taken by a pool of the caller's thread count: on a busy machine the thread
        # sharing a core takes fewer (a single product waits for its slowest half).
        rows = min(chunk, PRODUCT_BLOCK_ROWS)
        run_blocks(lambda start, stop: scorer(query_embs[start:stop], out=scores[start:stop]), num_queries, rows,
                   workers)
        return scores
    for start in range(0, num_queries, chunk):
        scorer(query_embs[start : start + chunk], out=scores[start : start + chunk])
    return scores


def batched_pairwise_scores(
    query_embs: torch.Tensor, gallery_embs: torch.Tensor, metric: str
) -> torch.Tensor:
    """Scores of ``(B, M, D)`` queries against ``(B, N, D)`` galleries -> ``(B, M, N)`` (private).

    Same formulas as :class:`_GalleryScorer`, batched with ``bmm`` for many small problems.
    """
    check_metric(metric)
    if metric == "cosine":
        query_embs = query_embs / query_embs.norm(dim=2, keepdim=True).clamp_min(1e-12)
        gallery_embs = gallery_embs / gallery_embs.norm(dim=2, keepdim=True).clamp_min(1e-12)
    products = torch.bmm(query_embs, gallery_embs.transpose(1, 2))
    if metric in ("inner", "cosine"):
        return products
    query_sq = (query_embs * query_embs).sum(dim=2, keepdim=True)
    gallery_sq = (gallery_embs * gallery_embs).sum(dim=2).unsqueeze(1)
    sq_dist = products.mul_(-2.0).add_(query_sq).add_(gallery_sq).clamp_(min=0.0)
    if metric == "euclid":
        sq_dist.sqrt_()
    return sq_dist.neg_()


def _labels_to_tensor(labels: Any) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.detach().reshape(-1).cpu()
    return torch.as_tensor(labels).reshape(-1)


def embed_loader(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    get_embeddings_fn: EmbeddingsFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over a loader and collect embeddings and labels.

    The model is put in eval mode and run under ``torch.no_grad()``; afterwards every submodule's
    ``training`` flag is restored to what it was.

    Args:
        model: the embedding model; called as ``model(images)`` unless ``get_embeddings_fn`` is given.
        loader: any iterable of ``(images, labels)`` batches (e.g. a ``DataLoader``).
        device: where the model runs; ``None`` -> CUDA when available, else CPU. The model is
            moved there.
        get_embeddings_fn: ``fn(model, images) -> (B, D)`` replacing ``model(images)`` (e.g.
            :func:`recognite.utils.embeddings_three_crops`).

    Returns:
        ``(embeddings (N, D), labels (N,))`` on the CPU; embeddings are float32 or the model's
        floating dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = resolve_device(device)
    model.to(device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    embeddings: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch_index, batch in enumerate(loader):
                try:
                    images, batch_labels = batch[0], batch[1]
                except (TypeError, IndexError, KeyError) as err:
                    raise TypeError(
                        f"loader must yield (images, labels) batches; batch {batch_index} is a "
                        f"{type(batch).__name__}"
                    ) from err
                images = images.to(device)
                embs = get_embeddings_fn(model, images) if get_embeddings_fn else model(images)
                if not isinstance(embs, torch.Tensor) or embs.dim() != 2:
                    shape = tuple(embs.shape) if isinstance(embs, torch.Tensor) else type(embs).__name__
                    raise ValueError(
                        f"the model (or get_embeddings_fn) must return (B, D) embeddings, got {shape}"
                    )
                embeddings.append(embs.detach().cpu())
                labels.append(_labels_to_tensor(batch_labels))
    finally:
        for module, mode in modes:
            module.training = mode
    if not embeddings:
        raise ValueError("loader yielded no batches; cannot compute embeddings of an empty set")
    all_labels = as_labels(torch.cat(labels), "labels yielded by the loader")
    all_embeddings = torch.cat(embeddings)
    if all_embeddings.shape[0] != all_labels.shape[0]:
        raise ValueError(
            f"the loader yielded {all_embeddings.shape[0]} images but {all_labels.shape[0]} labels"
        )
    return all_embeddings, all_labels


def score_matrix(
    model: nn.Module,
    dl_gal: Iterable[Any],
    dl_quer: Iterable[Any],
    metric: str = "inner",
    device: str | torch.device | None = None,
    agg_gal_fn: AggregateFn | None = None,
    get_embeddings_fn: EmbeddingsFn | None = None,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed a gallery and a query set with ``model`` and score every query against the gallery.

    Args:
        model: embedding model (eval mode and no grad are used; training flags are restored).
        dl_gal: iterable of ``(images, labels)`` gallery batches.
        dl_quer: iterable of ``(images, labels)`` query batches.
        metric: ``'inner'``, ``'cosine'``, ``'euclid'`` (negated distance) or ``'sq_euclid'``
            (negated squared distance); see :func:`pairwise_scores`.
        device: ``None`` -> CUDA when available, else CPU.
        agg_gal_fn: optional ``fn(embeddings, labels) -> (embeddings, labels)`` that aggregates the
            gallery before scoring, e.g. :func:`recognite.utils.avg_ref_embs`.
        get_embeddings_fn: optional ``fn(model, images) -> (B, D)`` replacing ``model(images)``.
        memory_budget: bytes of temporary memory per query chunk while scoring (default 256 MiB).

    Returns:
        ``(scores (Q, G), gallery_labels (G,), query_labels (Q,))`` on the CPU; scores are
        similarities (higher = more alike). Memory never grows with ``Q * G * D``.
    """
    check_metric(metric)
    device = resolve_device(device)
    gallery_embs, gallery_labels = embed_loader(model, dl_gal, device, get_embeddings_fn)
    if agg_gal_fn is not None:
        gallery_embs, gallery_labels = agg_gal_fn(gallery_embs, gallery_labels)
        gallery_labels = as_labels(gallery_labels, "gallery labels returned by agg_gal_fn")
    query_embs, query_labels = embed_loader(model, dl_quer, device, get_embeddings_fn)
    scores = pairwise_scores(
        query_embs.to(device), gallery_embs.to(device), metric,
        memory_budget=memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET,
    )
    return scores.cpu(), gallery_labels.cpu(), query_labels.cpu()
