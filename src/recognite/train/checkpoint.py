"""Kept for code written against 0.1.0: the checkpoint format lives in :mod:`recognite.checkpoint`."""

from recognite.checkpoint import (
    CHECKPOINT_VERSION,
    checkpoint_threshold,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "checkpoint_threshold",
    "load_checkpoint",
    "rng_states",
    "save_checkpoint",
    "set_rng_states",
]
