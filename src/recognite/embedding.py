"""Embed image files with a recognizer, and list images from files, folders and CSVs.

Embeddings files (``recognite embed``) are safetensors files holding ``embeddings`` ``(N, D)``
float32 and the image paths (and labels, when known) as UTF-8 bytes with offsets, so that a
million paths need no giant JSON header. :func:`save_embeddings` / :func:`load_embeddings`
write and read them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from recognite._atomic import atomic_path
from recognite.data.folders import IMAGE_EXTENSIONS
from recognite.data.images import read_image
from recognite.utils.device import resolve_device
from recognite.utils.validate import check_int
from recognite.utils.views import MakeViews, ViewSpec, embeddings_of_views

__all__ = [
    "EmbeddingsFile",
    "ImageList",
    "embed_images",
    "list_images",
    "load_embeddings",
    "read_image_csv",
    "read_image_folder",
    "save_embeddings",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5
_FORMAT = "recognite.embeddings"
_FORMAT_VERSION = 1


@dataclass
class ImageList:
    """Image paths with their labels when the source gives them.

    Attributes:
        paths: (N,) absolute image paths.
        labels: (N,) label strings, or ``None`` when at least one source has no labels.
        sources: The files and folders the list was read from (CSVs, folders, image files), so
            that an output is never written over one of them.
    """

    paths: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _images_in_folder(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, n) for n in sorted(filenames)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions]
    return found


def read_image_csv(csv_file: str | os.PathLike, image_key: str = "image", label_key: str | None = "label") -> ImageList:
    """Image paths (relative ones resolved against the CSV's folder) and labels from a CSV.

    Args:
        csv_file: CSV with a header row.
        image_key: Column of image paths.
        label_key: Column of labels; ``None`` → no labels. A missing label column is an error.

    Raises:
        FileNotFoundError: No such CSV, or image files that do not exist (count + first few).
        ValueError: Empty CSV, missing columns (the existing ones are listed), empty cells.
    """
    import pandas as pd

    from recognite.data import load_csv

    if label_key is not None:
        df = load_csv(csv_file, image_key=image_key, label_key=label_key)
        return ImageList(paths=[str(p) for p in df[image_key]], labels=[str(v) for v in df[label_key]],
                         sources=[os.path.abspath(csv_file)])
    csv_path = Path(csv_file)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {str(csv_path)!r}.")
    try:
        df = pd.read_csv(csv_path, dtype={image_key: str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"CSV file {str(csv_path)!r} is empty: expected a header row with the column {image_key!r}.") from None
    if image_key not in df.columns:
        raise ValueError(f"CSV file {str(csv_path)!r} has no column {image_key!r} (image_key); its columns are "
                         f"{list(df.columns)}.")
    if len(df) == 0:
        raise ValueError(f"CSV file {str(csv_path)!r} has a header but no rows: it lists no images.")
    empty = [i + 2 for i, p in enumerate(df[image_key]) if not str(p).strip()]
    if empty:
        raise ValueError(f"Column {image_key!r} of {str(csv_path)!r} has {len(empty)} empty cells, e.g. on lines {empty[:_MAX_LISTED]}.")
    base = os.path.dirname(os.path.abspath(csv_path))
    paths = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in df[image_key]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} image files listed in column {image_key!r} of "
                                f"{str(csv_path)!r} were not found (relative paths are resolved against the CSV's "
                                f"folder), e.g. {', '.join(missing[:_MAX_LISTED])}.")
    return ImageList(paths=paths, labels=None, sources=[os.path.abspath(csv_path)])


def read_image_folder(root: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> ImageList:
    """Images of a folder-per-label tree ``root/<label>/.../<image>`` with their labels.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is not a folder or holds no images in label folders.
    """
    from recognite.data import folder_to_csv

    root_path = Path(root)
    if root_path.exists() and not root_path.is_dir():
        raise ValueError(f"--folder must be a folder with one subfolder per label, but {str(root)!r} is a file.")
    df = folder_to_csv(root_path, extensions=extensions)
    base = root_path.resolve()
    return ImageList(paths=[str(base / p) for p in df["image"]], labels=[str(v) for v in df["label"]],
                     sources=[str(base)])


def list_images(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    image_key: str = "image",
    label_key: str | None = "label",
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> ImageList:
    """Collect images from image files, folders (searched recursively, sorted) and CSV files.

    CSV files (``.csv``) give their ``image_key`` column, and labels from ``label_key`` when the
    CSV has that column. The result has labels only when every input gave labels.

    Args:
        inputs: One path or a sequence of paths.
        image_key: CSV column of image paths.
        label_key: CSV column of labels (ignored when absent); ``None`` → never read labels.
        extensions: File extensions that count as images in folders.

    Returns:
        An :class:`ImageList` in input order.

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: No inputs, an input file that is neither an image nor a CSV, a folder without
            images, or a CSV problem (see :func:`read_image_csv`).
    """
    import pandas as pd

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("No inputs given: pass image files, folders or CSV files.")
    exts = _extensions(extensions)
    paths: list[str] = []
    labels: list[str] | None = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Input {str(item)!r} does not exist.")
        if path.is_dir():
            found = _images_in_folder(path, exts)
            if not found:
                raise ValueError(f"The folder {str(item)!r} holds no images (extensions {', '.join(exts)}).")
            paths += [os.path.abspath(p) for p in found]
            labels = None
        elif path.suffix.lower() == ".csv":
            try:
                columns = list(pd.read_csv(path, nrows=0).columns)
            except pd.errors.EmptyDataError:
                columns = []
            with_labels = label_key is not None and label_key in columns and label_key != image_key
            part = read_image_csv(path, image_key, label_key if with_labels else None)
            paths += part.paths
            if labels is not None and part.labels is not None:
                labels += part.labels
            else:
                labels = None
        elif path.suffix.lower() in exts:
            paths.append(os.path.abspath(path))
            labels = None
        else:
            raise ValueError(f"Input {str(item)!r} is neither an image ({', '.join(exts)}), a folder nor a .csv file.")
    return ImageList(paths=paths, labels=labels, sources=[os.path.abspath(Path(item).expanduser()) for item in inputs])


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_image(self.paths[index]))


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def embed_images(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    transform: Callable,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    views: ViewSpec | None = None,
    keep_views: bool = False,
) -> torch.Tensor:
    """Embed image files.

    Each file is opened with PIL, converted to RGB and passed through ``transform`` (e.g.
    :attr:`recognite.bundle.Bundle.transform`); batches go through ``model.embed`` (or
    ``model(x)`` for modules without ``embed``) in eval mode without gradients. The model's
    training mode is restored afterwards.

    Args:
        model: A :class:`~recognite.model.Recognizer` or any module mapping ``(B, 3, S, S)`` to
            ``(B, D)``.
        paths: (N,) image files.
        transform: PIL image → ``(3, S, S)`` tensor.
        batch_size: Images per forward pass.
        device: Where to run; ``None`` = where the model's parameters are (the model is moved
            when another device is given); ``'auto'`` = CUDA when available.
        num_workers: DataLoader worker processes (0 = load in this process).
        progress: Show a tqdm progress bar.
        views: Test-time augmentation: embed the views of every image that this
            :class:`~recognite.utils.views.ViewSpec` lists and keep their mean (re-normalized when
            the model normalizes). None = the image alone.
        keep_views: Return every view's embedding, ``(N, K, D)``, instead of their mean
            (enrolment augmentation; ``K = 1`` without ``views``).

    Returns:
        ``(N, D)`` (or ``(N, K, D)`` with ``keep_views``) float32 embeddings on the CPU, in the
        order of ``paths``.

    Raises:
        ValueError: Empty ``paths``, bad ``batch_size``/``num_workers``, an unreadable image.
        FileNotFoundError: Image files that do not exist (count + first few).
    """
    from tqdm.auto import tqdm

    for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        check_int(value, name, minimum=minimum, message=f"{name} must be an integer >= {minimum}, got {value!r}.")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty: there are no images to embed.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED])
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} image files do not exist, e.g. {listed}"
                                f"{' ...' if len(missing) > _MAX_LISTED else ''}.")
    if device is not None:
        model.to(resolve_device(device))
    run_device = _model_device(model)
    if views is not None and views.num_views > 1:
        transform = T.Compose([transform, MakeViews(views)])
    else:
        views = None
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=run_device.type == "cuda")
    embed = getattr(model, "embed", model)
    if views is not None and keep_views:  # every view's embedding, (B, K, D)
        embed_each = embed
        embed = lambda batch: embed_each(batch.flatten(0, 1)).unflatten(0, batch.shape[:2])  # noqa: E731
    elif views is not None:  # the mean of each image's views, re-normalized as the model normalizes
        normalize = bool(getattr(model, "normalize", True))
        embed_views = embed
        embed = lambda batch: embeddings_of_views(embed_views, batch, normalize=normalize)  # noqa: E731
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for images in tqdm(loader, desc="embed", unit="batch", disable=not progress, leave=False):
            chunks.append(embed(images.to(run_device, non_blocking=True)).float().cpu())
    finally:
        model.train(was_training)
    out = torch.cat(chunks)
    return out.unsqueeze(1) if keep_views and views is None else out


# --- embeddings files -----------------------------------------------------------------------


@dataclass
class EmbeddingsFile:
    """Contents of an embeddings file.

    Attributes:
        embeddings: (N, D) float32.
        paths: (N,) image paths.
        labels: (N,) labels, or ``None``.
        metadata: JSON metadata (e.g. the bundle it was computed with).
    """

    embeddings: torch.Tensor
    paths: list[str]
    labels: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _encode(strings: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    if encoded:
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in encoded], dtype=torch.int64), 0)
    data = bytearray(b"".join(encoded))
    return (torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)), offsets


def _decode(data: torch.Tensor, offsets: torch.Tensor, path: Path) -> list[str]:
    bounds = offsets.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != data.numel() or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"Embeddings file {path} is corrupt: string offsets do not match the stored bytes.")
    raw = data.numpy().tobytes()
    return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]


def save_embeddings(
    path: str | os.PathLike,
    embeddings: torch.Tensor,
    paths: Sequence[str],
    labels: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write an embeddings file (safetensors; temporary file + rename).

    Args:
        path: Output file (``.safetensors`` suggested).
        embeddings: (N, D) embeddings.
        paths: (N,) image paths.
        labels: (N,) labels, or ``None``.
        metadata: JSON-serializable dict stored in the header.

    Raises:
        ValueError: Shapes or lengths that do not match.
    """
    from safetensors.torch import save_file

    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D tensor (N, D), got {getattr(embeddings, 'shape', type(embeddings).__name__)}.")
    num = embeddings.shape[0]
    if len(paths) != num:
        raise ValueError(f"paths has {len(paths)} entries but embeddings has {num} rows.")
    tensors = {"embeddings": embeddings.detach().to("cpu", torch.float32).contiguous()}
    tensors["path_bytes"], tensors["path_offsets"] = _encode([str(p) for p in paths])
    if labels is not None:
        if len(labels) != num:
            raise ValueError(f"labels has {len(labels)} entries but embeddings has {num} rows.")
        tensors["label_bytes"], tensors["label_offsets"] = _encode([str(v) for v in labels])
    header = {"format": _FORMAT, "format_version": str(_FORMAT_VERSION),
              "metadata": json.dumps(metadata or {}, allow_nan=False)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_embeddings(path: str | os.PathLike) -> EmbeddingsFile:
    """Read a file written by :func:`save_embeddings` (or ``recognite embed``).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not an embeddings file, or a corrupt one.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Embeddings file {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"Could not read the embeddings file {path}: {exc}") from exc
    if header.get("format") != _FORMAT or not {"embeddings", "path_bytes", "path_offsets"} <= set(tensors):
        raise ValueError(f"{path} is not a recognite embeddings file (written by `recognite embed`).")
    embeddings = tensors["embeddings"]
    paths = _decode(tensors["path_bytes"], tensors["path_offsets"], path)
    labels = None
    if "label_bytes" in tensors:
        labels = _decode(tensors["label_bytes"], tensors["label_offsets"], path)
    if len(paths) != embeddings.shape[0] or (labels is not None and len(labels) != embeddings.shape[0]):
        raise ValueError(f"Embeddings file {path} is corrupt: {embeddings.shape[0]} embeddings but {len(paths)} paths.")
    return EmbeddingsFile(embeddings=embeddings, paths=paths, labels=labels, metadata=json.loads(header.get("metadata", "{}")))
