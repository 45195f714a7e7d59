"""Turn a folder-per-class image tree into an ``image,label`` table."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import pandas as pd

from recognite._atomic import atomic_path

__all__ = ["IMAGE_EXTENSIONS", "folder_to_csv"]

logger = logging.getLogger(__name__)

#: File extensions recognised as images (the same as torchvision's ImageFolder).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)


def _normalize_extensions(extensions: Iterable[str]) -> frozenset[str]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    normalized = set()
    for ext in extensions:
        if not isinstance(ext, str) or not ext.strip("."):
            raise ValueError(
                f"extensions must be file extensions such as '.jpg', got {ext!r}."
            )
        ext = ext.lower()
        normalized.add(ext if ext.startswith(".") else "." + ext)
    if not normalized:
        raise ValueError("extensions is empty: give at least one, e.g. ('.jpg', '.png').")
    return frozenset(normalized)


def _write_csv_atomically(df: pd.DataFrame, csv_file: str) -> None:
    with atomic_path(csv_file) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        df.to_csv(f, index=False)


def folder_to_csv(
    root: str | os.PathLike,
    csv_file: str | os.PathLike | None = None,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> pd.DataFrame:
    """Lists a folder-per-class image tree as a table with columns ``image,label``.

    Expects ``root/<label>/<image>``; images may also sit in deeper subfolders
    of a class folder (``root/<label>/a/b/<image>``), they still get the label
    of the top folder. Hidden files and folders (name starting with ``.``) and
    files directly in ``root`` are skipped. Extensions match case-insensitively.
    Rows are sorted by label, then by path, so the result is deterministic.

    With ``csv_file``, the table is also written there (atomically; missing
    folders are created) and the image paths are relative to the CSV file's
    folder, so :func:`~recognite.data.train_val_datasets` can read it from any
    working directory. Without ``csv_file``, the paths are relative to
    ``root`` (write the table into ``root`` to get a loadable CSV).

    Args:
        root: Folder with one subfolder per label.
        csv_file: Where to write the CSV, or ``None`` to only return the table.
        extensions: File extensions of images (with or without the dot).

    Returns:
        DataFrame with columns ``image`` (POSIX-style relative paths) and
        ``label`` (the class folder names, as strings).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        ValueError: No images were found, or ``extensions`` is empty.
    """
    exts = _normalize_extensions(extensions)
    root_str = os.fspath(root)
    if not os.path.exists(root_str):
        raise FileNotFoundError(f"Image folder not found: '{root_str}'.")
    if not os.path.isdir(root_str):
        raise NotADirectoryError(f"root must be a folder, but '{root_str}' is not one.")
    root_abs = os.path.abspath(root_str)
    if csv_file is not None:
        csv_file = os.path.abspath(os.fspath(csv_file))
        base = os.path.dirname(csv_file)
    else:
        base = root_abs

    rows: list[tuple[str, str]] = []
    skipped_top_level = 0
    for entry in sorted(os.scandir(root_abs), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            skipped_top_level += entry.is_file()
            continue
        label = entry.name
        found = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                    continue
                found.append(os.path.join(dirpath, name))
        if not found:
            logger.warning("Class folder '%s' holds no images; skipped.", entry.path)
        rows.extend((path, label) for path in found)
    if skipped_top_level:
        logger.warning(
            "Skipped %d files directly in '%s': images must be inside a class folder.",
            skipped_top_level, root_abs,
        )
    if not rows:
        raise ValueError(
            f"No images found in '{root_str}': expected files with extensions "
            f"{sorted(exts)} inside class folders (root/<label>/<image>)."
        )

    def rel(path: str) -> str:
        try:
            return os.path.relpath(path, base).replace(os.sep, "/")
        except ValueError:  # other drive on Windows: no relative path exists
            return path

    records = sorted((label, rel(path)) for path, label in rows)
    df = pd.DataFrame(
        {"image": [r[1] for r in records], "label": [r[0] for r in records]}
    )
    if csv_file is not None:
        _write_csv_atomically(df, csv_file)
    return df
