"""The one style of argument validation: the same bad value gets the same exception everywhere.

- a value of the wrong type (``True`` or ``2.5`` for an integer, a string for a number) raises
  :class:`InvalidTypeError`, which is both a ``TypeError`` and a ``ValueError`` (code written
  against either keeps working);
- a value of the right type outside its range, or not among the choices, raises ``ValueError``.

Messages name the argument, show the value and say what is allowed.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["InvalidTypeError", "check_choice", "check_cosine_threshold", "check_int", "check_number", "check_threshold"]


class InvalidTypeError(TypeError, ValueError):
    """An argument of the wrong type (an instance of both ``TypeError`` and ``ValueError``)."""


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None,
              message: str | None = None) -> int:
    """``value`` as a Python ``int`` within ``[minimum, maximum]``.

    Booleans and floats (even ``5.0``) are refused: in a configuration they are a mistake. A
    wrong type raises :class:`InvalidTypeError`, a value out of range ``ValueError``; ``message``
    replaces the default text of both (a caller's established wording).

    >>> check_int(3, "k", minimum=1)
    3
    >>> check_int(-1, "num_workers", minimum=0)
    Traceback (most recent call last):
    ...
    ValueError: num_workers must be an integer >= 0, got -1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(message or f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        if message:
            raise ValueError(message)
        if maximum is None and minimum == 1:
            raise ValueError(f"{name} must be a positive integer, got {value}.")
        if maximum is None:
            allowed = f">= {minimum}"
        elif minimum is None:
            allowed = f"<= {maximum}"
        else:
            allowed = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value}.")
    return value


def check_number(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite ``float`` within ``[minimum, maximum]`` (NaN and infinities refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "numel") and value.numel() == 1 and not isinstance(value, bool):
            value = float(value)
        else:
            raise InvalidTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        low = "-inf" if minimum is None else f"{minimum:g}"
        high = "inf" if maximum is None else f"{maximum:g}"
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``; else a ``ValueError`` listing them and close matches."""
    if value in choices and not isinstance(value, bool):
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=2)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}.{hint}")


def check_threshold(threshold: Any, name: str = "threshold") -> float | None:
    """An open-set threshold: ``None`` or a number (``-inf`` accepts all, ``+inf`` rejects all).

    Raises:
        InvalidTypeError: not a number (a 1-element tensor counts as a number).
        ValueError: NaN.
    """
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        if hasattr(threshold, "numel") and threshold.numel() == 1:
            threshold = float(threshold)
        else:
            raise InvalidTypeError(
                f"{name} must be a number or None, got {type(threshold).__name__} {threshold!r}."
            )
    value = float(threshold)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number (or None), got {value!r}.")
    return value


COSINE_SLACK = 1e-5
"""How far outside [-1, 1] a cosine threshold may lie (float rounding of unit vectors)."""


def check_cosine_threshold(threshold: Any, name: str = "threshold") -> float | None:
    """A threshold on cosine similarities: ``None`` or a number in ``[-1, 1]``.

    A threshold outside the range scores can take would silently accept or reject every query.

    >>> check_cosine_threshold(2.0)
    Traceback (most recent call last):
    ...
    ValueError: threshold must be in [-1, 1] (a cosine similarity) or None, got 2.0.
    """
    value = check_threshold(threshold, name)
    # float32 cosines of (near-)duplicates reach 1 + a few ulps; so does a threshold just above them
    if value is not None and not -1.0 - COSINE_SLACK <= value <= 1.0 + COSINE_SLACK:
        raise ValueError(f"{name} must be in [-1, 1] (a cosine similarity) or None, got {value!r}.")
    return value
