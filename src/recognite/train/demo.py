"""The demo run behind ``recognite demo``: generate the glyph dataset once, then train on it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from recognite.data.demo import default_demo_root, make_demo_dataset
from recognite.train.config import TrainConfig
from recognite.train.trainer import CrossValidationResult, TrainResult, train

__all__ = ["DEMO_DEFAULTS", "run_demo"]

logger = logging.getLogger(__name__)

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
    values = {**DEMO_DEFAULTS, "data_csv": str(csv_file), **overrides}
    if not values.get("resume") and _is_earlier_demo_run(Path(values["output_dir"]), csv_file):
        logger.info("Replacing the previous demo run in %s.", values["output_dir"])
        values["overwrite"] = True
    config = TrainConfig.from_dict(values)
    return config, train(config)


def _is_earlier_demo_run(run_dir: Path, csv_file: Path) -> bool:
    """Whether ``run_dir`` holds a run of the demo dataset (which the demo may replace)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return False
    try:
        saved = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(saved, dict) and os.path.abspath(str(saved.get("data_csv", ""))) == os.path.abspath(csv_file)
