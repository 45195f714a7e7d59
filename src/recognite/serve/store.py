"""The service's gallery: durable, serialised edits; searches never see a half-made change.

Every enrolment or removal builds a new :class:`~recognite.gallery.GalleryIndex` from the current
one, writes it to the gallery file (temporary file, ``fsync``, atomic rename; under the file's
lock, so the CLI's ``gallery add`` beside the service takes turns with it) and only then replaces
the gallery that searches use. So an acknowledged edit is on disk, a ``kill -9`` at any moment
leaves the old or the new file (both load), and a search uses one whole gallery or the other.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import torch

from recognite._atomic import file_lock
from recognite.gallery import GalleryIndex

__all__ = ["GalleryStore", "image_id"]


def image_id(data: bytes) -> str:
    """The reference id of an uploaded image: the SHA-256 of its bytes (never a path)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class GalleryStore:
    """Holds the gallery of a running service and writes every edit to ``path``.

    Args:
        path: The gallery file; when it does not exist yet, the gallery starts empty and the file
            is written by the first enrolment.
        model_id: SHA-256 of the bundle's weights; a gallery made with another model is refused.
        aggregation: Aggregation of a new gallery (``'all'`` or ``'mean'``).
    """

    def __init__(self, path: str | os.PathLike, model_id: str | None, aggregation: str = "all") -> None:
        self.path = GalleryIndex.resolve_path(path)
        self.model_id = model_id
        self._lock = threading.Lock()
        self._aggregation = aggregation
        self._seen: tuple[int, int, int] | None = None
        self._gallery = self._read()

    @property
    def gallery(self) -> GalleryIndex:
        """The gallery searches use now (replace-only: never edited in place)."""
        return self._gallery

    def _read(self) -> GalleryIndex:
        if not self.path.exists():
            self._seen = None
            return GalleryIndex(aggregation=self._aggregation, model_id=self.model_id)
        gallery = GalleryIndex.load(self.path)
        if self.model_id and gallery.model_id and gallery.model_id != self.model_id:
            raise ValueError(f"The gallery {self.path} was built with another model (weights SHA-256 "
                             f"{gallery.model_id[:12]}...) than the bundle ({self.model_id[:12]}...); "
                             "rebuild it with this bundle or serve the bundle it was built with.")
        gallery.model_id = gallery.model_id or self.model_id
        self._seen = _stat_key(self.path)
        return gallery

    def _current(self) -> GalleryIndex:
        """The newest gallery: re-read when another writer changed the file since we last saw it."""
        if _stat_key(self.path) != self._seen:
            self._gallery = self._read()
        return self._gallery

    def _commit(self, gallery: GalleryIndex) -> None:
        gallery.save(self.path)
        self._seen = _stat_key(self.path)
        self._gallery = gallery

    def enrol(self, label: str, embeddings: torch.Tensor, ids: list[str]) -> dict[str, int]:
        """Add ``(N, D)`` embeddings (or ``(N, K, D)``: ``K`` rows per image, its enrolment views)
        under ``label``; images already enrolled under it are skipped.

        Returns:
            ``{"added", "skipped", "references"}`` (the label's references after the edit).
        """
        with self._lock, file_lock(self.path):
            current = self._current()
            known = set(zip(current.ids or [], current.reference_labels)) if current.ids is not None else set()
            keep = [row for row, ref in enumerate(ids) if (ref, label) not in known and ref not in ids[:row]]
            if keep:
                gallery = current.copy()
                rows = embeddings[keep]
                per_image = rows.shape[1] if rows.dim() == 3 else 1
                gallery.add(rows.flatten(0, 1) if rows.dim() == 3 else rows, [label] * (len(keep) * per_image),
                            ids=[ids[row] for row in keep for _ in range(per_image)])
                self._commit(gallery)
            return {"added": len(keep), "skipped": len(ids) - len(keep),
                    "references": self._gallery.label_counts().get(label, 0)}

    def remove(self, label: str) -> int:
        """Remove every reference of ``label``; returns how many (``KeyError`` when none)."""
        with self._lock, file_lock(self.path):
            current = self._current()
            if label not in current:
                raise KeyError(label)
            gallery = current.copy()
            removed = gallery.remove(label)
            self._commit(gallery)
            return removed
