"""The demo run behind ``recognite demo``: generate the glyph dataset once, then train on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recognite.data.demo import default_demo_root, make_demo_dataset
from recognite.train.config import TrainConfig
from recognite.train.trainer import CrossValidationResult, TrainResult, train

__all__ = ["DEMO_DEFAULTS", "run_demo"]

DEMO_DEFAULTS: dict[str, Any] = {
    "model_name": "resnet18",
    "image_size": 32,
    "epochs": 4,
    "batch_size": 64,
    "optimizer": "adamw",
    "lr": 0.002,
    "weight_decay": 0.05,
    "rrc_scale": (0.6, 1.0),
    "warmup_epochs": 0.5,
    "num_workers": 0,
    "output_dir": "runs/demo",
}
"""Training options of the demo (any of them can be overridden)."""


def run_demo(data_dir: str | os.PathLike | None = None, num_classes: int = 300,
             **overrides: Any) -> tuple[TrainConfig, TrainResult | CrossValidationResult]:
    """Generate (once, cached) the demo dataset and train on it.

    Args:
        data_dir: Where the dataset is generated (default: the recognite cache).
        num_classes: Number of glyph classes.
        **overrides: :class:`~recognite.train.TrainConfig` options replacing :data:`DEMO_DEFAULTS`
            (``progress`` also shows the dataset generation's progress).

    Returns:
        The resolved config and the training result.
    """
    root = Path(data_dir) if data_dir else default_demo_root()
    csv_file = make_demo_dataset(root, num_classes=num_classes, progress=bool(overrides.get("progress", True)))
    config = TrainConfig.from_dict({**DEMO_DEFAULTS, "data_csv": str(csv_file), **overrides})
    return config, train(config)
