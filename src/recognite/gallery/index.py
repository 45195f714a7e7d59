"""A searchable gallery of labelled reference embeddings."""

from __future__ import annotations

import copy
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from recognite.gallery import _faiss, _io, rerank
from recognite.gallery._search import exact_topk, label_topk
from recognite.gallery.k_reciprocal import (
    KReciprocal,
    KReciprocalGallery,
    warn_if_degenerate,
)
from recognite.gallery.open_set import UNKNOWN, RecognitionResult, open_set_predictions
from recognite.utils.validate import check_int

logger = logging.getLogger(__name__)

#: Per-label aggregation modes: every reference, or one re-normalized mean prototype per label.
AGGREGATIONS = ("all", "mean")
#: Search backends: exact torch (default), exact FAISS flat, approximate FAISS IVF.
BACKENDS = ("torch", "faiss-flat", "faiss-ivf")
#: Default largest number of query x reference scores held at once by the torch backend
#: (2**24 float32 scores = 64 MiB).
DEFAULT_CHUNK_SIZE = 2**24
#: Default number of IVF cells visited per query.
DEFAULT_NPROBE = 16


@dataclass
class SearchResult:
    """Best matches of Q queries, best first.

    Attributes:
        scores: (Q, k) float32 cosine similarities, descending per row; ``-inf`` in slots
            that could not be filled (only possible with the approximate ``faiss-ivf``).
        labels: (Q, <=k) labels of the matches (a row is shorter only where slots are empty).
        label_codes: (Q, k) int64 codes of those labels (index into ``GalleryIndex.labels``),
            ``-1`` in empty slots.
        reference_indices: (Q, k) int64 index of the matching reference in the gallery
            (for label search with aggregation ``'all'``: the label's best reference); ``-1``
            for aggregation ``'mean'`` label search and in empty slots.
        reference_ids: (Q, <=k) ids of those references when the gallery has ids, else None.
    """

    scores: torch.Tensor
    labels: list[list[str]]
    label_codes: torch.Tensor
    reference_indices: torch.Tensor
    reference_ids: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, allowed, n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}.{hint}")
    return value


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    allowed = "a positive integer" + (" or None" if allow_none else "")
    return check_int(value, name, minimum=1, message=f"{name} must be {allowed}, got {value!r}.")


def _as_embeddings(values: Any, name: str, dim: int | None, allow_vector: bool) -> torch.Tensor:
    """Validate and L2-normalize embeddings; returns a (N, D) float32 CPU tensor."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    elif not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or array of shape (N, D), got {type(values).__name__}.") from err
    if not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}.")
    if values.ndim == 1 and allow_vector:
        values = values.unsqueeze(0)
    if values.ndim != 2:
        shape = "(N, D) or (D,)" if allow_vector else "(N, D)"
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(values.shape)}.")
    if dim is not None and values.shape[1] != dim:
        raise ValueError(
            f"{name} have dimension {values.shape[1]} but the gallery holds {dim}-dimensional embeddings."
        )
    if values.shape[1] == 0:
        raise ValueError(f"{name} must have at least one dimension, got shape {tuple(values.shape)}.")
    values = values.detach().to("cpu", torch.float32)
    finite = torch.isfinite(values).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:5].tolist()
        raise ValueError(f"{name} contain NaN or infinite values (rows {bad}{'...' if (~finite).sum() > 5 else ''}).")
    norms = torch.linalg.vector_norm(values, dim=1)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms == 0).flatten()[:5].tolist()
        raise ValueError(f"{name} contain all-zero rows {bad}, which have no direction to compare.")
    return F.normalize(values, dim=1).contiguous()


def _as_strings(values: Any, name: str, count: int, reserved: str | None = None) -> list[str]:
    """Validate a sequence of ``count`` strings (ints are converted); ``reserved`` marks labels,
    for which the empty string and ``reserved`` are refused."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of {count} strings, got a single {type(values).__name__}.")
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = values.tolist()
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} embeddings.")
    out = []
    for pos, value in enumerate(values):
        if isinstance(value, (str, np.str_)):
            out.append(str(value))
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out.append(str(int(value)))
        else:
            raise TypeError(f"{name}[{pos}] must be a string (or an int), got {type(value).__name__} {value!r}.")
        if reserved is not None and out[-1] in ("", reserved):
            raise ValueError(
                f"{name}[{pos}] is {out[-1]!r}, which cannot be a label: the empty string and "
                f"{reserved!r} (the answer for rejected queries) are reserved."
            )
    return out


class GalleryIndex:
    """Labelled reference embeddings with exact or FAISS search and open-set recognition.

    References are stored L2-normalized, so every score is a cosine similarity (higher = more
    alike). Labels are strings (ints are converted with ``str``); internally each label has an
    int code, its position in :attr:`labels` (order of first enrolment).

    Searches return the top-k *labels* per query. With aggregation ``'all'`` a label's score is
    the best score of any of its references (the raw reference neighbours are available from
    :meth:`search_references`); with ``'mean'`` it is the score of the label's prototype, the
    re-normalized mean of its references.

    Args:
        dim: embedding dimension D; None takes it from the first :meth:`add`.
        aggregation: ``'all'`` or ``'mean'``.
        backend: ``'torch'`` (exact, chunked matmul + top-k; default), ``'faiss-flat'`` (exact,
            ``faiss.IndexFlatIP``) or ``'faiss-ivf'`` (approximate, ``faiss.IndexIVFFlat`` with
            inner product, trained on the gallery). FAISS needs ``pip install 'recognite[faiss]'``.
        nlist: IVF cells; None = about ``4 * sqrt(number of searchable rows)``.
        nprobe: IVF cells visited per query (more = higher recall, slower).
        ivf_train_size: rows sampled for IVF k-means; None = ``50 * nlist`` (at most all).
        device: device for the torch backend's search matrix (default CPU). Results are on CPU.
        model_id: what identifies the model that embeds the references (the SHA-256 of a
            bundle's weights); saved with the gallery so that another model's queries are refused.

    Example:
        >>> gallery = GalleryIndex()
        >>> gallery.add(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8]]), ["cat", "dog", "dog"])
        >>> result = gallery.search(torch.tensor([[0.8, 0.6]]), k=2)
        >>> result.labels
        [['dog', 'cat']]
        >>> [round(s, 2) for s in result.scores[0].tolist()]
        [0.96, 0.8]
        >>> gallery.recognize(torch.tensor([[0.8, 0.6], [-1.0, 0.0]]), k=1, threshold=0.5).predictions
        ['dog', 'unknown']
    """

    def __init__(
        self,
        dim: int | None = None,
        aggregation: str = "all",
        backend: str = "torch",
        *,
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        ivf_train_size: int | None = None,
        device: str | torch.device | None = None,
        model_id: str | None = None,
    ) -> None:
        self._dim = _check_positive_int("dim", dim, allow_none=True)
        self.model_id = model_id
        self._aggregation = _check_choice("aggregation", aggregation, AGGREGATIONS)
        self._embeddings = torch.zeros(0, self._dim or 0)
        self._codes = torch.zeros(0, dtype=torch.long)
        self._labels: list[str] = []
        self._label_to_code: dict[str, int] = {}
        self._ids: list[str] | None = None
        self._device = torch.device(device if device is not None else "cpu")
        self._cache: dict[str, Any] = {}
        self._backend = "torch"
        self._nlist: int | None = None
        self._nprobe = DEFAULT_NPROBE
        self._ivf_train_size: int | None = None
        self.set_backend(backend, nlist=nlist, nprobe=nprobe, ivf_train_size=ivf_train_size)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int | None:
        """Embedding dimension D (None until the first :meth:`add`)."""
        return self._dim

    @property
    def aggregation(self) -> str:
        """``'all'`` or ``'mean'``."""
        return self._aggregation

    @property
    def backend(self) -> str:
        """Search backend name, one of :data:`BACKENDS`."""
        return self._backend

    @property
    def labels(self) -> list[str]:
        """(L,) distinct labels in order of first enrolment; a label's code is its position."""
        return list(self._labels)

    @property
    def embeddings(self) -> torch.Tensor:
        """(G, D) float32 L2-normalized reference embeddings (the stored tensor: do not modify)."""
        return self._embeddings

    @property
    def label_codes(self) -> torch.Tensor:
        """(G,) int64 label code of every reference (the stored tensor: do not modify)."""
        return self._codes

    @property
    def reference_labels(self) -> list[str]:
        """(G,) label of every reference."""
        return [self._labels[c] for c in self._codes.tolist()]

    @property
    def ids(self) -> list[str] | None:
        """(G,) id (e.g. image path) of every reference, ``''`` where none was given; None if no
        reference has an id."""
        return None if self._ids is None else list(self._ids)

    def __len__(self) -> int:
        """Number of references G."""
        return self._embeddings.shape[0]

    def __contains__(self, label: object) -> bool:
        return label in self._label_to_code

    def __repr__(self) -> str:
        return (
            f"GalleryIndex(references={len(self)}, labels={len(self._labels)}, dim={self._dim}, "
            f"aggregation={self._aggregation!r}, backend={self._backend!r})"
        )

    def label_counts(self) -> dict[str, int]:
        """Number of references per label, in label order."""
        counts = torch.bincount(self._codes, minlength=len(self._labels)).tolist()
        return dict(zip(self._labels, counts))

    def info(self) -> dict[str, Any]:
        """Summary: ``num_references``, ``num_labels``, ``dim``, ``aggregation``, ``backend``,
        ``has_ids``, ``device`` and, for ``faiss-ivf``, ``nlist`` (None = automatic) and ``nprobe``."""
        info: dict[str, Any] = {
            "num_references": len(self),
            "num_labels": len(self._labels),
            "dim": self._dim,
            "aggregation": self._aggregation,
            "backend": self._backend,
            "has_ids": self._ids is not None,
            "device": str(self._device),
        }
        if self._backend == "faiss-ivf":
            info["nlist"] = self._nlist
            info["nprobe"] = self._nprobe
        return info

    # ------------------------------------------------------------------ configuration
    def set_backend(
        self,
        backend: str,
        *,
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        ivf_train_size: int | None = None,
    ) -> None:
        """Switch the search backend (the FAISS index is rebuilt at the next search).

        Args: see :class:`GalleryIndex`.

        Raises:
            ValueError: unknown backend or non-positive ``nlist``/``nprobe``/``ivf_train_size``.
            ImportError: a FAISS backend without faiss installed.
        """
        _check_choice("backend", backend, BACKENDS)
        self._nlist = _check_positive_int("nlist", nlist, allow_none=True)
        self._nprobe = int(_check_positive_int("nprobe", nprobe))  # type: ignore[arg-type]
        self._ivf_train_size = _check_positive_int("ivf_train_size", ivf_train_size, allow_none=True)
        if backend != "torch":
            _faiss.import_faiss(backend)  # fail now, not at the first search
        self._backend = backend
        self._cache.pop("faiss", None)

    def copy(self) -> GalleryIndex:
        """An independent gallery with the same references and settings (cheap: the tensors are
        shared, and :meth:`add` / :meth:`remove` replace them rather than write into them)."""
        twin = copy.copy(self)
        twin._labels = list(self._labels)
        twin._label_to_code = dict(self._label_to_code)
        twin._ids = None if self._ids is None else list(self._ids)
        twin._cache = {}
        return twin

    # ------------------------------------------------------------------ editing
    def add(
        self,
        embeddings: torch.Tensor | np.ndarray,
        labels: Sequence[str],
        ids: Sequence[str] | None = None,
    ) -> None:
        """Enrol references.

        Args:
            embeddings: (N, D) reference embeddings (any norm; stored L2-normalized).
            labels: (N,) label of every row (strings; ints are converted with ``str``).
            ids: (N,) optional id of every row, e.g. its image path.

        Raises:
            ValueError: wrong shape or dimension, NaN/inf or all-zero rows, wrong number of
                labels/ids, a label that is empty or ``'unknown'``.
            TypeError: labels/ids that are not strings.
        """
        emb = _as_embeddings(embeddings, "embeddings", self._dim, allow_vector=False)
        new_labels = _as_strings(labels, "labels", emb.shape[0], reserved=UNKNOWN)
        new_ids = None
        if ids is not None:
            new_ids = _as_strings(ids, "ids", emb.shape[0])
        if emb.shape[0] == 0:
            return
        codes = []
        for label in new_labels:
            code = self._label_to_code.get(label)
            if code is None:
                code = self._label_to_code[label] = len(self._labels)
                self._labels.append(label)
            codes.append(code)
        if self._dim is None:
            self._dim = emb.shape[1]
            self._embeddings = torch.zeros(0, self._dim)
        if new_ids is not None and self._ids is None:
            self._ids = [""] * len(self)
        if self._ids is not None:
            self._ids.extend(new_ids if new_ids is not None else [""] * emb.shape[0])
        new_codes = torch.tensor(codes, dtype=torch.long)
        if len(self) == 0:  # no copy of a large first batch
            self._embeddings, self._codes = emb, new_codes
        else:
            self._embeddings = torch.cat([self._embeddings, emb])
            self._codes = torch.cat([self._codes, new_codes])
        self._cache.clear()

    def remove(self, labels: str | Iterable[str]) -> int:
        """Remove every reference of the given labels.

        Args:
            labels: a label or labels to remove.

        Returns:
            The number of references removed.

        Raises:
            ValueError: a label that is not in the gallery (all such labels are named).
        """
        wanted = [labels] if isinstance(labels, str) else [str(x) for x in labels]
        unknown = [x for x in dict.fromkeys(wanted) if x not in self._label_to_code]
        if unknown:
            hints = []
            for label in unknown[:5]:
                close = difflib.get_close_matches(label, self._labels, n=2)
                if close:
                    hints.append(f"{label!r} -> {', '.join(close)}")
            hint = f" Close matches: {'; '.join(hints)}." if hints else ""
            raise ValueError(
                f"Cannot remove labels that are not in the gallery: {unknown[:20]}"
                f"{' ...' if len(unknown) > 20 else ''} ({len(self._labels)} labels enrolled).{hint}"
            )
        drop = torch.zeros(len(self._labels), dtype=torch.bool)
        drop[[self._label_to_code[x] for x in wanted]] = True
        keep_rows = ~drop[self._codes]
        new_code = torch.cumsum((~drop).long(), 0) - 1
        removed = int((~keep_rows).sum())
        self._embeddings = self._embeddings[keep_rows].contiguous()
        self._codes = new_code[self._codes[keep_rows]]
        if self._ids is not None:
            keep = keep_rows.tolist()
            self._ids = [i for i, k in zip(self._ids, keep) if k]
        self._labels = [x for x, d in zip(self._labels, drop.tolist()) if not d]
        self._label_to_code = {x: c for c, x in enumerate(self._labels)}
        self._cache.clear()
        return removed

    # ------------------------------------------------------------------ search
    def _searchable(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(N, D) rows searched for labels (references or prototypes), their (N,) codes on CPU,
        and the largest number of rows sharing a label."""
        if "rows" not in self._cache:
            if self._aggregation == "mean":
                sums = torch.zeros(len(self._labels), self._dim or 0).index_add_(0, self._codes, self._embeddings)
                rows = F.normalize(sums, dim=1)
                codes = torch.arange(len(self._labels))
                max_per_label = 1
            else:
                rows, codes = self._embeddings, self._codes
                max_per_label = int(torch.bincount(codes).max())
            self._cache["rows"] = (rows, codes, max_per_label)
        return self._cache["rows"]

    def _device_rows(self, rows: torch.Tensor, key: str) -> torch.Tensor:
        if self._device.type == "cpu":
            return rows
        if key not in self._cache:
            self._cache[key] = rows.to(self._device)
        return self._cache[key]

    def _faiss_index(self, rows: torch.Tensor) -> Any:
        if "faiss" not in self._cache:
            if self._backend == "faiss-flat":
                index = _faiss.build_flat(rows)
            else:
                nlist = min(self._nlist or _faiss.default_nlist(rows.shape[0]), rows.shape[0])
                train_size = self._ivf_train_size or 50 * nlist
                index = _faiss.build_ivf(rows, nlist, train_size)
                logger.info("Built IVF index: %d rows, nlist=%d, trained on %d rows", rows.shape[0], nlist, min(train_size, rows.shape[0]))
            self._cache["faiss"] = index
        return self._cache["faiss"]

    def _raw_search_fn(self, rows: torch.Tensor, key: str, use_backend: bool, chunk_size: int, nprobe: int):
        if use_backend and self._backend != "torch":
            index = self._faiss_index(rows)
            probe = nprobe if self._backend == "faiss-ivf" else None
            return lambda q, m: _faiss.faiss_search(index, q, m, probe)
        matrix = self._device_rows(rows, key)

        def search(q: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
            scores, idx = exact_topk(q.to(matrix.device), matrix, m, chunk_size)
            return scores.cpu(), idx.cpu()

        return search

    def _prepare_queries(self, query_embeddings: Any, k: Any, chunk_size: Any, nprobe: Any) -> tuple[torch.Tensor, int, int, int]:
        if len(self) == 0:
            raise ValueError("The gallery is empty: add references before searching.")
        k = int(_check_positive_int("k", k))  # type: ignore[arg-type]
        chunk_size = int(_check_positive_int("chunk_size", DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size))  # type: ignore[arg-type]
        nprobe = int(_check_positive_int("nprobe", self._nprobe if nprobe is None else nprobe))  # type: ignore[arg-type]
        queries = _as_embeddings(query_embeddings, "query_embeddings", self._dim, allow_vector=True)
        return queries, k, chunk_size, nprobe

    def _result(self, scores: torch.Tensor, ref_idx: torch.Tensor, codes: torch.Tensor) -> SearchResult:
        labels = [[self._labels[c] for c in row if c >= 0] for row in codes.tolist()]
        ids = None
        if self._ids is not None:
            ids = [[self._ids[i] if i >= 0 else "" for i, c in zip(r, cr) if c >= 0] for r, cr in zip(ref_idx.tolist(), codes.tolist())]
        return SearchResult(scores=scores, labels=labels, label_codes=codes, reference_indices=ref_idx, reference_ids=ids)

    def search(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int = 5,
        chunk_size: int | None = None,
        *,
        nprobe: int | None = None,
    ) -> SearchResult:
        """Top-k distinct labels per query.

        With aggregation ``'all'`` a label scores the best cosine similarity of any of its
        references, and the top-k is over labels (a label never appears twice). The torch and
        faiss-flat backends are exact; equal scores are ordered arbitrarily. The torch backend
        scores ``chunk_size`` query x reference pairs at a time, so memory stays bounded for any
        gallery size.

        Args:
            query_embeddings: (Q, D) or (D,) queries (any norm; normalized before scoring).
            k: labels per query; capped at the number of labels.
            chunk_size: torch backend: largest number of scores computed at once
                (default :data:`DEFAULT_CHUNK_SIZE`).
            nprobe: faiss-ivf: cells visited per query (default: the index's ``nprobe``).

        Returns:
            A :class:`SearchResult` with ``min(k, number of labels)`` columns.

        Raises:
            ValueError: empty gallery, ``k``/``chunk_size``/``nprobe`` < 1, query dimension
                different from the gallery's, NaN/inf or all-zero queries.
        """
        queries, k, chunk_size, nprobe = self._prepare_queries(query_embeddings, k, chunk_size, nprobe)
        rows, row_codes, max_per_label = self._searchable()
        raw = self._raw_search_fn(rows, "rows_device", True, chunk_size, nprobe)
        k = min(k, len(self._labels))
        scores, idx, codes = label_topk(queries, raw, row_codes, rows.shape[0], k, max_per_label)
        if self._aggregation == "mean":
            idx = torch.full_like(idx, -1)
        return self._result(scores, idx, codes)

    def search_references(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int = 5,
        chunk_size: int | None = None,
        *,
        nprobe: int | None = None,
    ) -> SearchResult:
        """Top-k raw reference neighbours per query (a label may appear several times).

        Uses the gallery's backend with aggregation ``'all'``; with ``'mean'`` (where the
        backend indexes the prototypes) it searches the references exactly with torch.

        Args: as :meth:`search`; ``k`` is capped at the number of references.

        Returns:
            A :class:`SearchResult` whose ``reference_indices`` index :attr:`embeddings`.
        """
        queries, k, chunk_size, nprobe = self._prepare_queries(query_embeddings, k, chunk_size, nprobe)
        use_backend = self._aggregation == "all"
        raw = self._raw_search_fn(self._embeddings, "rows_device" if use_backend else "refs_device", use_backend, chunk_size, nprobe)
        scores, idx = raw(queries, min(k, len(self)))
        codes = torch.where(idx >= 0, self._codes[idx.clamp_min(0)], torch.full_like(idx, -1))
        return self._result(scores, idx, codes)

    def _k_reciprocal_side(self, settings: KReciprocal, chunk_size: int) -> KReciprocalGallery:
        """The gallery side of k-reciprocal re-ranking on the searched rows, cached until an edit."""
        key = ("k_reciprocal", settings, chunk_size)
        if key not in self._cache:
            rows, codes, _ = self._searchable()
            warn_if_degenerate(codes)
            self._cache[key] = KReciprocalGallery(rows, settings, chunk_size=chunk_size)
        return self._cache[key]

    def _k_reciprocal_search(self, queries: torch.Tensor, k: int, settings: KReciprocal,
                             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k labels by re-ranked score: ``(scores, row indices, codes)``, each (Q, k)."""
        rows, row_codes, max_per_label = self._searchable()
        side = self._k_reciprocal_side(settings, chunk_size)
        unit_rows = F.normalize(rows.float(), dim=1)
        block = max(1, chunk_size // max(1, rows.shape[0]))

        def search(q: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [torch.topk(side.rerank_scores(F.normalize(chunk.float(), dim=1) @ unit_rows.T), m, dim=1)
                     for chunk in q.split(block)]
            return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

        return label_topk(queries, search, row_codes, rows.shape[0], min(k, len(self._labels)), max_per_label)

    def recognize(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int = 5,
        threshold: float | None = None,
        chunk_size: int | None = None,
        *,
        nprobe: int | None = None,
        query_expansion: int = 0,
        qe_alpha: float = 3.0,
        k_reciprocal: KReciprocal | None = None,
    ) -> RecognitionResult:
        """Open-set recognition: top-k labels per query and a prediction that is the best label,
        or :data:`UNKNOWN` (``'unknown'``) when its score is below ``threshold``.

        Args:
            query_embeddings: (Q, D) or (D,) queries.
            k: labels listed per query.
            threshold: cosine-similarity threshold, e.g. from
                ``recognite.eval.threshold_at_far`` on validation queries; scores equal to it are
                accepted; None (or ``-inf``) never answers unknown.
            chunk_size, nprobe: as in :meth:`search`.
            query_expansion: re-rank by alpha query expansion with this many neighbours
                (:func:`recognite.gallery.rerank.query_expansion` against the searched rows:
                references, or prototypes with ``'mean'``); 0 = off (the default: on one-shot
                galleries it never changes the top-1 label, see ``benchmarks/RESULTS.md``).
            qe_alpha: the weight exponent of query expansion.
            k_reciprocal: re-rank by k-reciprocal neighbours with these settings
                (:mod:`recognite.gallery.k_reciprocal`; exact torch search over the searched
                rows, whatever the backend; the gallery side is computed once and kept until the
                gallery changes). The listed scores are then the re-ranked scores; the open-set
                decision still compares the predicted row's cosine similarity with
                ``threshold``, so calibrated thresholds keep their meaning. None = off.

        Returns:
            A :class:`RecognitionResult`; ``result[i]`` / ``result.to_records()`` give dicts.
        """
        check_int(query_expansion, "query_expansion", minimum=0)
        if k_reciprocal is not None and not isinstance(k_reciprocal, KReciprocal):
            raise TypeError(f"k_reciprocal must be a KReciprocal or None, got {type(k_reciprocal).__name__}")
        if query_expansion and len(self):
            queries = _as_embeddings(query_embeddings, "query_embeddings", self._dim, allow_vector=True)
            query_embeddings = rerank.query_expansion(queries, self._searchable()[0], k=query_expansion,
                                                      alpha=qe_alpha)
        if k_reciprocal is None:
            result = self.search(query_embeddings, k=k, chunk_size=chunk_size, nprobe=nprobe)
            decision_scores = result.scores[:, 0]
        else:
            queries, k, chunk, _ = self._prepare_queries(query_embeddings, k, chunk_size, nprobe)
            scores, idx, codes = self._k_reciprocal_search(queries, k, k_reciprocal, chunk)
            rows = self._searchable()[0]
            decision_scores = (F.normalize(queries.float(), dim=1)
                               * F.normalize(rows[idx[:, 0].clamp_min(0)].float(), dim=1)).sum(dim=1)
            if self._aggregation == "mean":
                idx = torch.full_like(idx, -1)
            result = self._result(scores, idx, codes)
        top1 = [row[0] if row else "" for row in result.labels]
        predictions = open_set_predictions(top1, decision_scores, threshold)
        ref_ids = result.reference_ids if self._aggregation == "all" else None
        return RecognitionResult(
            predictions=predictions,
            labels=result.labels,
            scores=result.scores,
            threshold=None if threshold is None else float(threshold),
            reference_ids=ref_ids,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the gallery to one safetensors file (atomically: temporary file + replace).

        The backend settings are saved; a FAISS index is rebuilt (IVF: retrained) on first
        search after :meth:`load`.

        Args:
            path: file path (``.safetensors`` suggested), or an existing folder, which receives
                ``gallery.safetensors``.

        Returns:
            The path of the written file.
        """
        target = _io.resolve_path(path)
        label_bytes, label_offsets = _io.encode_strings(self._labels)
        tensors = {
            "embeddings": self._embeddings,
            "label_codes": self._codes,
            "label_bytes": label_bytes,
            "label_offsets": label_offsets,
        }
        if self._ids is not None:
            tensors["id_bytes"], tensors["id_offsets"] = _io.encode_strings(self._ids)
        metadata = {
            "format": _io.FORMAT_NAME,
            "format_version": _io.FORMAT_VERSION,
            "num_references": len(self),
            "num_labels": len(self._labels),
            "dim": self._dim,
            "aggregation": self._aggregation,
            "backend": {"name": self._backend, "nlist": self._nlist, "nprobe": self._nprobe, "ivf_train_size": self._ivf_train_size},
            "has_ids": self._ids is not None,
            "model_id": self.model_id,
        }
        _io.write_file(target, tensors, metadata)
        return str(target)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        backend: str | None = None,
        device: str | torch.device | None = None,
        verify: bool = True,
    ) -> "GalleryIndex":
        """Read a gallery written by :meth:`save`.

        Args:
            path: the file, or a folder holding ``gallery.safetensors``.
            backend: override the saved backend (e.g. ``'torch'`` where faiss is missing).
            device: device for the torch backend.
            verify: check the SHA-256 of every tensor against the metadata.

        Raises:
            FileNotFoundError: no such file.
            ValueError: truncated/corrupt/modified file, or metadata inconsistent with the data.
            ImportError: the saved (or given) backend needs faiss, which is missing.
        """
        target = _io.resolve_path(path)
        tensors, meta = _io.read_file(target, verify=verify)

        def corrupt(msg: str) -> ValueError:
            return ValueError(f"Gallery file {target} is inconsistent: {msg}.")

        required = {"embeddings", "label_codes", "label_bytes", "label_offsets"}
        if not required <= set(tensors):
            raise corrupt(f"missing tensors {sorted(required - set(tensors))}")
        emb, codes = tensors["embeddings"], tensors["label_codes"]
        num_refs, num_labels, dim = meta.get("num_references"), meta.get("num_labels"), meta.get("dim")
        if emb.dtype != torch.float32 or emb.ndim != 2:
            raise corrupt(f"embeddings must be a 2-D float32 tensor, found {emb.dtype} of shape {tuple(emb.shape)}")
        if emb.shape[0] != num_refs or (num_refs and emb.shape[1] != dim):
            raise corrupt(
                f"metadata says {num_refs} references of dimension {dim}, but the embeddings "
                f"have shape {tuple(emb.shape)}"
            )
        if codes.dtype != torch.long or tuple(codes.shape) != (num_refs,):
            raise corrupt(f"label_codes must be int64 of shape ({num_refs},), found {codes.dtype} {tuple(codes.shape)}")
        labels = _io.decode_strings(tensors["label_bytes"], tensors["label_offsets"], "labels", target)
        if len(labels) != num_labels or len(set(labels)) != len(labels):
            raise corrupt(f"metadata says {num_labels} labels, the file holds {len(labels)} ({len(set(labels))} distinct)")
        if num_refs and (int(codes.min()) < 0 or int(codes.max()) >= num_labels or torch.unique(codes).numel() != num_labels):
            raise corrupt(f"label codes must cover 0..{num_labels - 1} exactly")
        if num_refs and not bool(torch.isfinite(emb).all()):
            raise corrupt("embeddings contain NaN or infinite values")
        if num_refs and not torch.allclose(torch.linalg.vector_norm(emb, dim=1), torch.ones(num_refs), atol=1e-3):
            raise corrupt("embeddings are not L2-normalized")
        ids = None
        if meta.get("has_ids"):
            if "id_bytes" not in tensors or "id_offsets" not in tensors:
                raise corrupt("metadata says references have ids but the file has none")
            ids = _io.decode_strings(tensors["id_bytes"], tensors["id_offsets"], "ids", target)
            if len(ids) != num_refs:
                raise corrupt(f"{len(ids)} ids for {num_refs} references")
        backend_meta = meta.get("backend") or {}
        try:
            gallery = cls(
                dim=dim,
                aggregation=meta.get("aggregation"),  # type: ignore[arg-type]
                backend=backend or backend_meta.get("name", "torch"),
                nlist=backend_meta.get("nlist"),
                nprobe=backend_meta.get("nprobe", DEFAULT_NPROBE),
                ivf_train_size=backend_meta.get("ivf_train_size"),
                device=device,
            )
        except ValueError as err:
            raise corrupt(str(err)) from err
        gallery._embeddings = emb if num_refs else torch.zeros(0, dim or 0)
        gallery._codes = codes
        gallery._labels = labels
        gallery._label_to_code = {x: c for c, x in enumerate(labels)}
        gallery._ids = ids
        model_id = meta.get("model_id")
        gallery.model_id = str(model_id) if model_id is not None else None
        return gallery

    @staticmethod
    def resolve_path(path: str | os.PathLike[str]) -> Path:
        """The file a gallery path names: a folder means ``<folder>/gallery.safetensors``."""
        return _io.resolve_path(path)
