"""Training, gallery and query datasets from one CSV file."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ._checks import check_fold_args, check_int, check_seed
from ._csv import load_csv
from .dataset import DataFrameDataset
from .splits import _split_gallery_query, k_fold_trainval_split

__all__ = ["train_val_datasets", "label_mapping"]


def label_mapping(labels: Iterable[Hashable]) -> dict[Hashable, int]:
    """Maps the distinct labels to ``0..L-1`` in sorted order.

    Labels that cannot be sorted together (e.g. a mix of strings and
    integers) are numbered in order of first appearance instead.

    Args:
        labels: Label values, duplicates allowed.

    Returns:
        ``{label: index}`` with indices ``0..L-1``.

    Example:
        >>> label_mapping(['dog', 'cat', 'dog', 'ant'])
        {'ant': 0, 'cat': 1, 'dog': 2}
    """
    distinct = list(dict.fromkeys(labels))
    try:
        distinct = sorted(distinct)
    except TypeError:
        pass
    return {label: i for i, label in enumerate(distinct)}


def train_val_datasets(
    data_csv_file: str | os.PathLike,
    image_key: str = "image",
    label_key: str = "label",
    num_folds: int = 5,
    val_fold: int = 0,
    fold_seed: int = 0,
    num_refs: int = 1,
    ref_seed: int = 0,
    tfm_train: Callable[[Any], Any] | None = None,
    tfm_val: Callable[[Any], Any] | None = None,
) -> tuple[DataFrameDataset, DataFrameDataset, DataFrameDataset]:
    """Creates training, gallery and query datasets from a CSV file.

    1. :func:`~recognite.data.load_csv` reads the CSV, checks it, and makes
       the image paths absolute (relative paths are relative to the CSV
       file's folder).
    2. :func:`~recognite.data.k_fold_trainval_split` splits the rows by label
       into training and validation (``num_folds``, ``val_fold``,
       ``fold_seed``), so the validation labels are never seen in training.
    3. :func:`~recognite.data.split_gallery_query` splits the validation rows
       into a gallery with ``num_refs`` references per label and a query set
       with the rest (``ref_seed``).

    Training labels map to ``0..L-1`` in sorted order
    (``ds_train.label_to_int``); gallery and query share one mapping of the
    validation labels to ``0..V-1``. The label values are strings, as read from
    the CSV.

    Args:
        data_csv_file: CSV with a header and one row per image.
        image_key: Column with the image paths.
        label_key: Column with the labels.
        num_folds: Number of label folds, ``2 <= num_folds <= number of labels``.
        val_fold: Fold used for validation, ``0 <= val_fold < num_folds``.
        fold_seed: Seed of the fold split.
        num_refs: Gallery references per validation label, at least 1.
        ref_seed: Seed of the reference choice.
        tfm_train: Transform of the training images.
        tfm_val: Transform of the gallery and query images.

    Returns:
        ``(ds_train, ds_gallery, ds_query)``, three
        :class:`~recognite.data.DataFrameDataset`.

    Raises:
        FileNotFoundError: Missing CSV or image files.
        TypeError: A count or seed is not an integer.
        ValueError: Bad CSV contents (see :func:`~recognite.data.load_csv`) or
            bad split arguments (see the split functions).
    """
    # Cheap argument checks first, before reading a large CSV.
    check_fold_args(num_folds, val_fold)
    check_seed("fold_seed", fold_seed, maximum=2**32)
    check_int("num_refs", num_refs, minimum=1)
    check_seed("ref_seed", ref_seed)

    df = load_csv(data_csv_file, image_key=image_key, label_key=label_key)
    df_train, df_val = k_fold_trainval_split(
        df, num_folds=num_folds, val_fold=val_fold, seed=fold_seed, label_key=label_key
    )
    # stacklevel=3: the warning points at the caller of train_val_datasets.
    df_gallery, df_query = _split_gallery_query(
        df_val, num_refs=num_refs, seed=ref_seed, label_key=label_key, stacklevel=3
    )
    if len(df_query) == 0:
        warnings.warn(
            f"The query set of validation fold {val_fold} is empty: no validation "
            f"label has more than num_refs={num_refs} images.",
            UserWarning,
            stacklevel=2,
        )

    train_map = label_mapping(df_train[label_key])
    val_map = label_mapping(df_val[label_key])
    ds_train = DataFrameDataset(
        df_train, label_key=label_key, image_key=image_key, label_to_int=train_map,
        transform=tfm_train,
    )
    ds_gallery = DataFrameDataset(
        df_gallery, label_key=label_key, image_key=image_key, label_to_int=val_map,
        transform=tfm_val,
    )
    ds_query = DataFrameDataset(
        df_query, label_key=label_key, image_key=image_key, label_to_int=val_map,
        transform=tfm_val,
    )
    return ds_train, ds_gallery, ds_query
