"""Deployment workflows behind ``recognite embed``, ``gallery``, ``recognize`` and ``export``.

Each function takes a loaded :class:`~recognite.bundle.Bundle` (or a bundle folder) and plain
arguments, does one job and returns its result; the command line only parses and prints.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from recognite._atomic import atomic_path, file_lock, refuse_overwriting_inputs
from recognite.bundle import Bundle, load_bundle
from recognite.embedding import (
    ImageList,
    list_images,
    read_image_csv,
    read_image_folder,
    save_embeddings,
)
from recognite.gallery import GalleryIndex
from recognite.gallery.k_reciprocal import KReciprocal
from recognite.utils.reranking import choose_reranking
from recognite.utils.validate import check_cosine_threshold, check_int

__all__ = [
    "Recognitions",
    "add_to_gallery",
    "build_gallery",
    "embed_to_file",
    "export_bundle",
    "read_references",
    "recognize_images",
    "remove_from_gallery",
    "write_recognitions",
]

logger = logging.getLogger(__name__)

FROM_BUNDLE = "bundle"
"""``threshold=FROM_BUNDLE``: use the threshold stored in the bundle."""


def _bundle(bundle: Bundle | str | os.PathLike, device: str | torch.device | None) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=device)


def _embed(bundle: Bundle, paths: Sequence[str], batch_size: int, num_workers: int, progress: bool,
           tta: bool = True) -> torch.Tensor:
    check_int(batch_size, "batch_size", minimum=1)
    check_int(num_workers, "num_workers", minimum=0)
    return bundle.embed(paths, batch_size=batch_size, num_workers=num_workers, progress=progress, tta=tta)


def _embed_references(bundle: Bundle, paths: Sequence[str], labels: Sequence[str], batch_size: int,
                      num_workers: int, progress: bool, tta: bool, enrol: bool) -> tuple[torch.Tensor, list[str], list[str]]:
    """Gallery rows of reference images: ``(N * K, D)`` embeddings, their labels and ids (each
    image's path, repeated for its ``K`` views under the bundle's enrolment augmentation).
    ``batch_size`` / ``num_workers`` are checked by :func:`recognite.embedding.embed_images`."""
    views = bundle.embed_references(paths, batch_size=batch_size, num_workers=num_workers, progress=progress,
                                    tta=tta, enrol=enrol)
    k = views.shape[1]
    return (views.flatten(0, 1), [label for label in labels for _ in range(k)],
            [path for path in paths for _ in range(k)])


def read_references(csv_file: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                    image_key: str = "image", label_key: str = "label") -> ImageList:
    """Reference images from exactly one of a CSV (``image,label`` rows) or a folder per label."""
    if bool(csv_file) == bool(folder):
        raise ValueError("Give the reference images with exactly one of --csv (image,label rows) or --folder "
                         "(one subfolder per label).")
    if csv_file:
        return read_image_csv(csv_file, image_key=image_key, label_key=label_key)
    return read_image_folder(folder)


def check_gallery_fits(bundle: Bundle, gallery: GalleryIndex, gallery_path: str | os.PathLike) -> None:
    """Refuse a gallery built by another model than the bundle's (or of another embedding width).

    Galleries record the SHA-256 of the bundle weights that built them (``model_id``); galleries
    written before that was recorded are accepted with a warning.
    """
    if gallery.dim is not None and gallery.dim != bundle.embedding_dim:
        raise ValueError(f"The gallery {gallery_path} holds {gallery.dim}-dimensional embeddings but the bundle "
                         f"{bundle.path} makes {bundle.embedding_dim}-dimensional ones: use the bundle the gallery "
                         "was built with.")
    if gallery.model_id is None:
        if len(gallery):
            logger.warning("The gallery %s does not record which model built it; make sure it is %s's.",
                           gallery_path, bundle.path)
        return
    if bundle.weights_sha256 and gallery.model_id != bundle.weights_sha256:
        raise ValueError(f"The gallery {gallery_path} was built with another model (weights SHA-256 "
                         f"{gallery.model_id[:12]}...) than the bundle {bundle.path} ({bundle.weights_sha256[:12]}...): "
                         "its scores would mean nothing. Use the bundle the gallery was built with, or build a new "
                         "gallery with this one.")


def embed_to_file(bundle: Bundle | str | os.PathLike, inputs: Sequence[str], output: str | os.PathLike,
                  image_key: str = "image", label_key: str = "label", batch_size: int = 64, num_workers: int = 0,
                  device: str | torch.device | None = "auto", progress: bool = False,
                  tta: bool = True) -> tuple[int, int, bool]:
    """Embed image files, folders or CSVs and write an embeddings file.

    Returns:
        ``(number of images, embedding dimension, whether labels were written)``.
    """
    images = list_images(inputs, image_key=image_key, label_key=label_key)
    refuse_overwriting_inputs(output, images.sources)
    bundle = _bundle(bundle, device)
    embeddings = _embed(bundle, images.paths, batch_size, num_workers, progress, tta)
    meta = {"bundle": os.path.abspath(bundle.path) if bundle.path else None, "weights_sha256": bundle.weights_sha256}
    save_embeddings(output, embeddings, images.paths, images.labels, metadata=meta)
    return embeddings.shape[0], embeddings.shape[1], images.labels is not None


def build_gallery(bundle: Bundle | str | os.PathLike, references: ImageList, output: str | os.PathLike,
                  aggregation: str = "all", backend: str = "torch", nlist: int | None = None,
                  nprobe: int | None = None, batch_size: int = 64, num_workers: int = 0,
                  device: str | torch.device | None = "auto", progress: bool = False,
                  tta: bool = True, enrol: bool = True) -> tuple[GalleryIndex, Path]:
    """Embed reference images and write a new gallery file; returns the gallery and where it went.

    With the bundle's enrolment augmentation (and ``enrol``) scoring ``'max'``, every image is
    enrolled as its ``K`` views (``K`` rows with the image's label and path as id).
    """
    refuse_overwriting_inputs(output, references.sources)
    kwargs: dict[str, Any] = {"nlist": nlist}
    if nprobe is not None:
        kwargs["nprobe"] = nprobe
    gallery = GalleryIndex(aggregation=aggregation, backend=backend, **kwargs)
    bundle = _bundle(bundle, device)
    gallery.model_id = bundle.weights_sha256
    gallery.add(*_embed_references(bundle, references.paths, references.labels, batch_size, num_workers, progress,
                                   tta, enrol))
    return gallery, Path(gallery.save(output))


def add_to_gallery(bundle: Bundle | str | os.PathLike, gallery_path: str | os.PathLike, references: ImageList,
                   batch_size: int = 64, num_workers: int = 0, device: str | torch.device | None = "auto",
                   progress: bool = False, tta: bool = True, enrol: bool = True) -> tuple[GalleryIndex, Path, int]:
    """Embed more references into an existing gallery file, in place (enrolled as in :func:`build_gallery`).

    Returns:
        ``(gallery, path written, number of new labels)``.
    """
    gallery_path = GalleryIndex.resolve_path(gallery_path)
    refuse_overwriting_inputs(gallery_path, references.sources)
    bundle = _bundle(bundle, device)
    with file_lock(gallery_path):  # writers of one gallery file take turns: no update is lost
        gallery = GalleryIndex.load(gallery_path)
        check_gallery_fits(bundle, gallery, gallery_path)
        known = set(zip(gallery.ids or [], gallery.reference_labels)) if gallery.ids is not None else set()
        keep = [i for i, item in enumerate(zip(references.paths, references.labels)) if item not in known]
        if len(keep) < len(references):
            logger.warning("%d of %d references are already in %s (same image and label) and were skipped.",
                           len(references) - len(keep), len(references), gallery_path)
        before = len(gallery.labels)
        if keep:
            paths = [references.paths[i] for i in keep]
            gallery.add(*_embed_references(bundle, paths, [references.labels[i] for i in keep], batch_size,
                                           num_workers, progress, tta, enrol))
        written = Path(gallery.save(gallery_path))
    return gallery, written, len(gallery.labels) - before


def remove_from_gallery(gallery_path: str | os.PathLike, labels: Sequence[str]) -> tuple[GalleryIndex, Path, int]:
    """Remove every reference of ``labels`` from a gallery file, in place.

    Returns:
        ``(gallery, path written, number of references removed)``.
    """
    gallery_path = GalleryIndex.resolve_path(gallery_path)
    with file_lock(gallery_path):
        gallery = GalleryIndex.load(gallery_path)
        removed = gallery.remove(labels)
        written = Path(gallery.save(gallery_path))
    return gallery, written, removed


@dataclass
class Recognitions:
    """Answers of :func:`recognize_images`.

    Attributes:
        records: One dict per image: ``path``, ``label`` (when the inputs carry labels),
            ``prediction`` (a label or ``'unknown'``), ``score`` and ``top_k`` (label, score,
            reference id); non-finite scores are ``None``.
        threshold: The threshold used (``None``: never unknown).
        top_k: Labels listed per image (at most the number of gallery labels).
        sources: The inputs the images came from (never overwritten by :func:`write_recognitions`).
    """

    records: list[dict[str, Any]]
    threshold: float | None
    top_k: int
    sources: list[str] = field(default_factory=list)

    @property
    def num_unknown(self) -> int:
        return sum(r["prediction"] == "unknown" for r in self.records)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _records(images: ImageList, result: Any) -> list[dict[str, Any]]:
    records = []
    for i, path in enumerate(images.paths):
        answer = result[i]
        record: dict[str, Any] = {"path": path}
        if images.labels is not None:
            record["label"] = images.labels[i]
        record["prediction"] = answer["prediction"]
        record["score"] = _finite(answer["score"])
        record["top_k"] = [{**entry, "score": _finite(entry["score"])} for entry in answer["top_k"]]
        records.append(record)
    return records


def recognize_images(bundle: Bundle | str | os.PathLike, gallery: GalleryIndex | str | os.PathLike,
                     inputs: Sequence[str], top_k: int = 5, threshold: float | None | str = FROM_BUNDLE,
                     backend: str | None = None, nprobe: int | None = None, image_key: str = "image",
                     label_key: str = "label", batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device | None = "auto", progress: bool = False,
                     tta: bool = True, query_expansion: int = 0, qe_alpha: float = 3.0,
                     k_reciprocal: KReciprocal | None = None, rerank: bool = True) -> Recognitions:
    """Embed query images (files, folders or CSVs) and answer the top-k labels or ``'unknown'``.

    ``query_expansion``, ``qe_alpha``, ``k_reciprocal``: as in :meth:`GalleryIndex.recognize`; when
    none is asked for, the bundle's stored re-ranking applies unless ``rerank`` is False.
    """
    top_k = check_int(top_k, "top_k", minimum=1)
    images = list_images(inputs, image_key=image_key, label_key=label_key)
    if not isinstance(gallery, GalleryIndex):
        gallery_path = gallery
        gallery = GalleryIndex.load(gallery, backend=backend)
    else:
        gallery_path = "the gallery"
    bundle = _bundle(bundle, device)
    check_gallery_fits(bundle, gallery, gallery_path)
    if isinstance(threshold, str) and threshold == FROM_BUNDLE:
        threshold = bundle.threshold
    threshold = check_cosine_threshold(threshold)
    embeddings = _embed(bundle, images.paths, batch_size, num_workers, progress, tta)
    chosen = choose_reranking(bundle.reranking, rerank, query_expansion, qe_alpha, k_reciprocal)
    result = gallery.recognize(embeddings, k=top_k, threshold=threshold, nprobe=nprobe,
                               query_expansion=chosen.query_expansion, qe_alpha=chosen.qe_alpha,
                               k_reciprocal=chosen.k_reciprocal)
    return Recognitions(records=_records(images, result), threshold=threshold, top_k=min(top_k, len(gallery.labels)),
                        sources=images.sources)


def _fmt(score: float | None) -> str:
    return "" if score is None else f"{score:.6f}"


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)


def _write_csv(path: Path, records: list[dict[str, Any]], k: int) -> None:
    has_label = bool(records) and "label" in records[0]
    header = ["path"] + (["label"] if has_label else []) + ["prediction", "score"]
    for j in range(1, k + 1):
        header += [f"label_{j}", f"score_{j}"]

    def write(f: Any) -> None:
        writer = csv.writer(f)
        writer.writerow(header)
        for rec in records:
            row = [rec["path"]] + ([rec["label"]] if has_label else []) + [rec["prediction"], _fmt(rec["score"])]
            for j in range(k):
                entry = rec["top_k"][j] if j < len(rec["top_k"]) else {"label": "", "score": None}
                row += [entry["label"], _fmt(entry["score"])]
            writer.writerow(row)

    _write_atomic(path, write)


def write_recognitions(path: str | os.PathLike, recognitions: Recognitions, context: dict[str, Any] | None = None) -> Path:
    """Write answers atomically to a ``.csv`` (one row per image) or ``.json`` file (with ``context``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"--output must end in .csv or .json, got {str(path)!r}.")
    refuse_overwriting_inputs(path, recognitions.sources)
    if suffix == ".json":
        document = {**(context or {}), "threshold": recognitions.threshold, "top_k": recognitions.top_k,
                    "results": recognitions.records}
        _write_atomic(path, lambda f: f.write(json.dumps(document, indent=2, allow_nan=False) + "\n"))
    else:
        _write_csv(path, recognitions.records, recognitions.top_k)
    return path


def export_bundle(bundle: Bundle | str | os.PathLike, output: str | os.PathLike, format: str, opset: int = 17,
                  check: bool = False, atol: float | None = None, device: str | torch.device | None = "cpu") -> float | None:
    """Export a bundle's embedding model to ONNX or TorchScript (metadata included).

    Returns:
        The largest absolute difference to PyTorch when ``check`` (the parity check), else ``None``.
    """
    from recognite.export import (
        check_export,
        export_onnx,
        export_torchscript,
        import_onnx,
    )

    if format == "onnx":
        import_onnx()  # fail before loading the model
    bundle = _bundle(bundle, device)
    refuse_overwriting_inputs(output, [], protected_folders=[bundle.path] if bundle.path else [])
    metadata = {"preprocessing": bundle.preprocessing.to_dict(), "embedding_dim": bundle.embedding_dim,
                "model_name": bundle.model.model_name, "threshold": bundle.threshold,
                "weights_sha256": bundle.weights_sha256}
    if format == "onnx":
        export_onnx(bundle.model, output, bundle.image_size, opset=opset, metadata=metadata)
    else:
        export_torchscript(bundle.model, output, bundle.image_size, metadata=metadata)
    if not check:
        return None
    try:
        return check_export(bundle.model, output, format, bundle.image_size, atol=atol)
    except Exception:
        Path(output).unlink(missing_ok=True)  # a graph that failed its parity check is not left behind
        raise
