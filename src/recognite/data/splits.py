"""Label-disjoint train/validation folds and gallery/query splits of a DataFrame."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ._checks import check_fold_args, check_int, check_label_column, check_seed

__all__ = ["k_fold_trainval_split", "split_gallery_query"]


def k_fold_trainval_split(
    df: pd.DataFrame,
    num_folds: int = 5,
    val_fold: int = 0,
    seed: int = 0,
    label_key: str = "label",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits a DataFrame into label-disjoint training and validation parts.

    The folds are made of *labels*, not rows: the unique labels, in order of
    first appearance, are shuffled by ``numpy.random.RandomState(seed)`` (NumPy's
    legacy generator, a local instance: the global random state is left
    untouched) and cut into ``num_folds`` folds of near-equal size with
    ``numpy.array_split`` (the first ``L % num_folds`` folds get one label
    more). The rows of fold ``val_fold`` form the validation set, all other
    rows the training set. No label is in both; over ``val_fold =
    0..num_folds-1`` every row is in exactly one validation set. For a given
    seed the folds equal those of recognite's earlier release.

    Rows keep their original relative order and the indices are reset.

    Args:
        df: One row per image; needs the column ``label_key``.
        num_folds: Number of folds, at least 2 and at most the number of
            unique labels.
        val_fold: Index of the validation fold, ``0 <= val_fold < num_folds``.
        seed: Seed of the label shuffle, ``0 <= seed < 2**32``.
        label_key: Column with the labels (strings or integers).

    Returns:
        ``(df_train, df_val)``, new DataFrames with a fresh ``RangeIndex``.

    Raises:
        TypeError: An argument that must be an integer is not one.
        ValueError: Missing label column, empty ``df``, missing labels,
            ``num_folds < 2``, ``val_fold`` out of range, or more folds than
            labels.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({'image': [f'{i}.jpg' for i in range(7)],
        ...                    'label': ['a', 'a', 'b', 'c', 'c', 'd', 'e']})
        >>> df_train, df_val = k_fold_trainval_split(df, num_folds=2, val_fold=0)
        >>> df_val['label'].tolist(), df_train['label'].tolist()
        (['a', 'a', 'b', 'c', 'c'], ['d', 'e'])
    """
    num_folds, val_fold = check_fold_args(num_folds, val_fold)
    seed = check_seed("seed", seed, maximum=2**32)
    check_label_column(df, label_key)

    labels = np.asarray(df[label_key].unique())
    if len(labels) < 2:
        raise ValueError(
            f"Column {label_key!r} has {len(labels)} unique label(s); label-disjoint training and "
            "validation folds need at least 2 labels (one to train on, one to validate on)."
        )
    if num_folds > len(labels):
        # Allowed as in the earlier release, as long as the folds used are not empty.
        if val_fold >= len(labels):
            raise ValueError(
                f"Validation fold {val_fold} is empty: {len(labels)} labels fill only folds "
                f"0..{len(labels) - 1} of num_folds={num_folds}. Use val_fold < {len(labels)} or "
                f"num_folds <= {len(labels)}."
            )
        warnings.warn(
            f"num_folds ({num_folds}) is larger than the number of unique labels ({len(labels)}) "
            f"in column {label_key!r}: folds {len(labels)}..{num_folds - 1} are empty.",
            UserWarning,
            stacklevel=2,
        )

    # Shuffling the positions draws exactly the same random numbers as the
    # earlier release's ``np.random.seed(seed); np.random.shuffle(labels)``
    # (Fisher-Yates whose draws depend only on the length), but works for any
    # label dtype and leaves the global generator alone.
    order = np.arange(len(labels))
    np.random.RandomState(seed).shuffle(order)
    folds = np.array_split(labels[order], num_folds)

    is_val = df[label_key].isin(folds[val_fold]).to_numpy()
    df_train = df[~is_val].reset_index(drop=True)
    df_val = df[is_val].reset_index(drop=True)
    return df_train, df_val


def split_gallery_query(
    df: pd.DataFrame,
    num_refs: int = 1,
    seed: int = 0,
    label_key: str = "label",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits a DataFrame into a gallery (references) and a query set.

    Per label, ``num_refs`` randomly chosen rows go to the gallery and the
    other rows to the query set. Labels with fewer than ``num_refs`` rows put
    all their rows in the gallery (and none in the query set); they cause a
    single ``UserWarning`` "N labels did not contain enough reference
    candidates to select K references for the gallery.". A label with exactly
    ``num_refs`` rows also ends up in the gallery only, without a warning.

    Randomness: every row gets a random key from a local
    ``numpy.random.default_rng(seed)``; per label, the ``num_refs`` rows with the
    smallest keys are the references. The choice depends only on the seed and
    the row order, not on the label type, and the global random state is left
    untouched.

    Rows keep their original relative order in both outputs and the indices
    are reset.

    Args:
        df: One row per image; needs the column ``label_key``.
        num_refs: References per label in the gallery, at least 1.
        seed: Seed of the reference choice, a non-negative integer.
        label_key: Column with the labels (strings or integers).

    Returns:
        ``(df_gallery, df_query)``, new DataFrames with a fresh ``RangeIndex``.

    Raises:
        TypeError: ``num_refs`` or ``seed`` is not an integer.
        ValueError: Missing label column, empty ``df``, missing labels,
            ``num_refs < 1`` or ``seed < 0``.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({'image': [f'{i}.jpg' for i in range(6)],
        ...                    'label': [7, 7, 7, 3, 3, 5]})
        >>> df_gal, df_quer = split_gallery_query(df, num_refs=1, seed=0)
        >>> df_gal['image'].tolist(), df_gal['label'].tolist()
        (['2.jpg', '3.jpg', '5.jpg'], [7, 3, 5])
        >>> df_quer['image'].tolist(), df_quer['label'].tolist()
        (['0.jpg', '1.jpg', '4.jpg'], [7, 7, 3])
    """
    return _split_gallery_query(df, num_refs, seed, label_key, stacklevel=3)


def _split_gallery_query(
    df: pd.DataFrame, num_refs: int, seed: int, label_key: str, stacklevel: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`split_gallery_query` whose warning points ``stacklevel`` frames up."""
    num_refs = check_int("num_refs", num_refs, minimum=1)
    seed = check_seed("seed", seed)
    check_label_column(df, label_key)

    codes, uniques = pd.factorize(df[label_key], sort=False)
    keys = np.random.default_rng(seed).random(len(codes))
    # Sort the rows by label, then by random key; a row's rank inside its
    # label group decides whether it is a reference.
    order = np.lexsort((keys, codes))
    counts = np.bincount(codes, minlength=len(uniques))
    group_starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sorted_codes = codes[order]
    rank = np.arange(len(codes)) - group_starts[sorted_codes]
    in_gallery = np.empty(len(codes), dtype=bool)
    in_gallery[order] = rank < num_refs

    num_short = int((counts < num_refs).sum())
    if num_short > 0:
        warnings.warn(
            f"{num_short} labels did not contain enough reference candidates to "
            f"select {num_refs} references for the gallery.",
            UserWarning,
            stacklevel=stacklevel,
        )

    df_gallery = df[in_gallery].reset_index(drop=True)
    df_query = df[~in_gallery].reset_index(drop=True)
    return df_gallery, df_query
