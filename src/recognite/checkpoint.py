"""The training checkpoint format (foundation layer): everything needed to resume exactly.

Written atomically by the trainer; read by the trainer (resume), bundles and reports. It imports
nothing above the foundation layer.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recognite._atomic import atomic_path

CHECKPOINT_VERSION = 1


def rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global RNGs (CUDA included when present)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        # Stored as plain types and tensors so that checkpoints load with weights_only=True.
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore RNG states saved by :func:`rng_states`."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash while writing leaves the previous checkpoint at ``path`` intact.
    """
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a recognite training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        # Only tensors and plain Python values: no code from the file runs while loading.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"Could not read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state or "version" not in state:
        raise ValueError(f"{path} is not a recognite training checkpoint (no 'model'/'version' entries).")
    return state


def epoch_row(state: dict[str, Any]) -> dict[str, Any] | None:
    """The validation row (of ``state['history']``) of the epoch whose weights ``state`` holds."""
    epoch = state.get("epoch")
    for row in state.get("history") or []:
        if isinstance(row, dict) and row.get("epoch") == epoch:
            return row
    return None


def checkpoint_threshold(state: dict[str, Any]) -> float | None:
    """The open-set threshold calibrated on the weights that ``state`` holds.

    ``last.pt`` carries the *best* epoch's threshold in ``state['threshold']`` but the weights of
    the last epoch; the threshold that belongs to its own weights is the one of its own epoch's
    validation row. Falls back to ``state['threshold']`` for checkpoints without a history.

    Returns:
        The threshold (a similarity in the training metric), or ``None`` when none was calibrated.
    """
    row = epoch_row(state)
    value = row.get("threshold") if row is not None else None
    if value is None:
        value = state.get("threshold")
    if value is None:
        return None
    value = float(value)
    return None if value != value else value  # NaN: none calibrated
