"""Argument checks shared by the data functions (private plumbing)."""

from __future__ import annotations

import difflib
from typing import Any

import pandas as pd

from recognite.utils import validate


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """Returns ``value`` as a Python ``int`` or raises a clear error.

    Booleans and floats (even ``5.0``) are refused: they are almost always a
    mistake in a configuration.
    """
    value = validate.check_int(value, name)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def check_seed(name: str, value: Any, maximum: int | None = None) -> int:
    """Checks a random seed: a non-negative integer (below ``maximum`` if given)."""
    value = check_int(name, value, minimum=0)
    if maximum is not None and value >= maximum:
        raise ValueError(f"{name} must be < {maximum}, got {value}.")
    return value


def check_fold_args(num_folds: Any, val_fold: Any) -> tuple[int, int]:
    """Checks ``num_folds >= 2`` and ``0 <= val_fold < num_folds``."""
    num_folds = check_int("num_folds", num_folds)
    if num_folds < 2:
        raise ValueError(
            f"num_folds must be at least 2 (one fold for validation, the rest for "
            f"training), got {num_folds}."
        )
    val_fold = check_int("val_fold", val_fold)
    if not 0 <= val_fold < num_folds:
        raise ValueError(
            f"val_fold must be in 0..{num_folds - 1} (num_folds={num_folds}), "
            f"got {val_fold}."
        )
    return num_folds, val_fold


def missing_column_message(
    column: str, arg_name: str, columns: list[Any], where: str = "the DataFrame"
) -> str:
    """An error message for a column that is not there, with close matches."""
    names = [str(c) for c in columns]
    msg = (
        f"Column {column!r} ({arg_name}) not found in {where}. "
        f"Available columns: {names}."
    )
    close = difflib.get_close_matches(str(column), names, n=3)
    if close:
        msg += f" Did you mean: {', '.join(repr(c) for c in close)}?"
    return msg


def check_dataframe(df: Any, arg_name: str = "df") -> pd.DataFrame:
    """Checks that ``df`` is a pandas DataFrame."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(
            f"{arg_name} must be a pandas DataFrame, got {type(df).__name__}."
        )
    return df


def check_column(df: pd.DataFrame, column: Any, arg_name: str) -> None:
    """Checks that ``column`` is a column of ``df``."""
    if column not in df.columns:
        raise ValueError(missing_column_message(column, arg_name, list(df.columns)))


def check_label_column(df: pd.DataFrame, label_key: Any) -> None:
    """Checks the label column of a DataFrame that is about to be split."""
    check_dataframe(df)
    check_column(df, label_key, "label_key")
    if len(df) == 0:
        raise ValueError("df has no rows: there is nothing to split.")
    missing = df[label_key].isna()
    if missing.any():
        rows = df.index[missing][:5].tolist()
        raise ValueError(
            f"Column {label_key!r} (label_key) has {int(missing.sum())} missing "
            f"labels, e.g. at index {rows}. Every row needs a label."
        )
