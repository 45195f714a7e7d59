"""Reading and checking a CSV of ``image,label`` rows."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from ._checks import missing_column_message

__all__ = ["load_csv"]

_MAX_LISTED = 5


def load_csv(
    data_csv_file: str | os.PathLike,
    image_key: str = "image",
    label_key: str = "label",
    check_files: bool = True,
) -> pd.DataFrame:
    """Reads a CSV of image paths and labels, checks it and resolves the paths.

    The CSV needs a header row with (at least) the columns ``image_key`` and
    ``label_key``; other columns are kept. Image paths may be absolute or
    relative; relative paths are relative to the folder that holds the CSV
    file (not to the current working directory). The returned DataFrame holds
    absolute paths, so it works from any directory.

    The image and label columns are read as text: a label ``007`` stays the
    string ``'007'`` and labels such as ``NA`` or ``None`` are not turned into
    missing values. Empty cells in these two columns are an error.

    Args:
        data_csv_file: Path of the CSV file.
        image_key: Column with the image paths.
        label_key: Column with the labels.
        check_files: Check that every image file exists.

    Returns:
        The CSV as a DataFrame (fresh ``RangeIndex``) with absolute image paths
        in column ``image_key``.

    Raises:
        FileNotFoundError: The CSV file does not exist, or (with
            ``check_files``) image files are missing; the message gives the
            count and the first few paths.
        ValueError: The file is empty, has no data rows, lacks a column
            (the message lists the columns that exist), has empty image or label
            cells, or ``image_key == label_key``.
    """
    csv_path = Path(data_csv_file)
    if not csv_path.exists():
        raise FileNotFoundError(
            f"Data CSV file not found: '{csv_path}' "
            f"(absolute path: '{csv_path.absolute()}')."
        )
    if not csv_path.is_file():
        raise ValueError(f"data_csv_file must be a CSV file, but '{csv_path}' is not a file.")
    if image_key == label_key:
        raise ValueError(
            f"image_key and label_key must name different columns, both are {image_key!r}."
        )

    try:
        df = pd.read_csv(
            csv_path,
            dtype={image_key: str, label_key: str},
            keep_default_na=False,
        )
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"Data CSV file '{csv_path}' is empty: expected a header row with the "
            f"columns {image_key!r} and {label_key!r}, then one row per image."
        ) from None

    for column, arg_name in ((image_key, "image_key"), (label_key, "label_key")):
        if column not in df.columns:
            raise ValueError(
                missing_column_message(
                    column, arg_name, list(df.columns), where=f"'{csv_path}'"
                )
            )
    if len(df) == 0:
        raise ValueError(
            f"Data CSV file '{csv_path}' has a header but no rows: it lists no images."
        )
    for column in (image_key, label_key):
        empty = (df[column].str.strip() == "").to_numpy()
        if empty.any():
            # +2: one for the header line, one because CSV lines count from 1.
            lines = (df.index[empty][:_MAX_LISTED] + 2).tolist()
            raise ValueError(
                f"Column {column!r} of '{csv_path}' has {int(empty.sum())} empty "
                f"cells, e.g. on lines {lines}."
            )

    _warn_near_duplicate_labels(df[label_key], csv_path)
    csv_dir = os.path.dirname(os.path.abspath(csv_path))
    df[image_key] = [
        p if os.path.isabs(p) else os.path.normpath(os.path.join(csv_dir, p))
        for p in df[image_key]
    ]
    if check_files:
        missing = [p for p in df[image_key] if not os.path.isfile(p)]
        if missing:
            listed = "\n  ".join(missing[:_MAX_LISTED])
            more = " ..." if len(missing) > _MAX_LISTED else ""
            raise FileNotFoundError(
                f"{len(missing)} of {len(df)} image files listed in column "
                f"{image_key!r} of '{csv_path}' were not found (relative paths are "
                f"resolved against the CSV file's folder '{csv_dir}'). First "
                f"missing:\n  {listed}{more}"
            )
    _warn_duplicate_images(df[image_key], csv_path)
    return df.reset_index(drop=True)


def _warn_near_duplicate_labels(labels: pd.Series, csv_path: Path) -> None:
    """Warn (naming them) about labels that differ only by surrounding spaces; labels are kept
    as they are, so folds stay those of the earlier release."""
    groups: dict[str, set[str]] = {}
    for label in labels.unique():
        groups.setdefault(str(label).strip(), set()).add(str(label))
    clashes = [sorted(v) for v in groups.values() if len(v) > 1]
    if clashes:
        shown = "; ".join(" vs ".join(repr(v) for v in group) for group in clashes[:_MAX_LISTED])
        warnings.warn(
            f"{len(clashes)} labels of '{csv_path}' differ only by surrounding spaces and count as separate "
            f"classes: {shown}. Fix the CSV if they are the same class.",
            UserWarning,
            stacklevel=3,
        )


def _warn_duplicate_images(paths: pd.Series, csv_path: Path) -> None:
    """Warn about images listed more than once: one copy may become a gallery reference and the
    other a query, which inflates every retrieval metric."""
    duplicated = paths[paths.duplicated(keep="first")].unique()
    if len(duplicated):
        warnings.warn(
            f"{len(duplicated)} images are listed more than once in '{csv_path}', e.g. "
            f"{', '.join(duplicated[:_MAX_LISTED])}; a copy in the gallery and one among the queries inflates "
            "top-1 and mAP. Remove the duplicate rows.",
            UserWarning,
            stacklevel=3,
        )
