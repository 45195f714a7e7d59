"""Track the best value seen so far per key (e.g. the best validation metrics)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX", "MIN", "RunningExtrema"]

MAX = "max"
"""Track maxima (higher is better)."""
MIN = "min"
"""Track minima (lower is better)."""


def _as_number(value: Any) -> float | None:
    """``float(value)`` when ``value`` is a real number (or 0-d tensor/array), else ``None``."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    if hasattr(value, "numel") and callable(value.numel):
        if value.numel() != 1:
            return None
        value = value.item()
    elif hasattr(value, "size") and hasattr(value, "item") and not isinstance(value, (int, float)):
        if getattr(value, "size", 0) != 1:
            return None
        value = value.item()
    try:
        value < 0  # noqa: B015 - comparability check
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    if math.isnan(number) or isinstance(value, complex):
        return None
    return number


class RunningExtrema:
    """Running maximum (``MAX``) or minimum (``MIN``) of values per key.

    Values that cannot be compared to a number (strings, ``None``, lists, multi-element tensors,
    NaN) are ignored. 0-d tensors and NumPy scalars are stored as Python floats.

    Args:
        mode: :data:`MAX` or :data:`MIN`.

    Example:
        >>> best = RunningExtrema(MAX)
        >>> best.update_dict({'acc': 0.5, 'loss': 2.0, 'name': 'run1'})
        >>> best.is_new_extremum('acc', 0.4), best.is_new_extremum('acc', 0.7)
        (False, True)
        >>> best.update('acc', 0.7)
        True
        >>> best.extrema_dict
        {'acc': 0.7, 'loss': 2.0}
    """

    def __init__(self, mode: str) -> None:
        if mode not in (MAX, MIN):
            raise ValueError(f"mode must be MAX ({MAX!r}) or MIN ({MIN!r}), got {mode!r}")
        self.mode = mode
        self.extrema_dict: dict[Any, float] = {}

    def is_new_extremum(self, key: Any, val: Any) -> bool:
        """Whether ``val`` beats the stored extremum of ``key`` (``True`` for a new key).

        ``False`` when ``val`` cannot be compared to a number. Equal values are not new.
        """
        number = _as_number(val)
        if number is None:
            return False
        if key not in self.extrema_dict:
            return True
        current = self.extrema_dict[key]
        return number > current if self.mode == MAX else number < current

    def update(self, key: Any, val: Any) -> bool:
        """Store ``val`` for ``key`` if it is a new extremum; return whether it was stored."""
        if not self.is_new_extremum(key, val):
            return False
        self.extrema_dict[key] = _as_number(val)  # type: ignore[assignment]
        return True

    def update_dict(self, d: Mapping[Any, Any]) -> None:
        """:meth:`update` every ``key: value`` pair of ``d``."""
        for key, val in d.items():
            self.update(key, val)

    def clear(self) -> None:
        """Forget all extrema."""
        self.extrema_dict.clear()

    def __repr__(self) -> str:
        return f"RunningExtrema({self.mode!r}, {self.extrema_dict!r})"
