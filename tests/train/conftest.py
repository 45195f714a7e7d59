from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_tiny_dataset(root: Path, num_labels: int = 10, per_label: int = 4, size: int = 20,
                       width: int | None = None) -> Path:
    """Images whose colour and stripe pattern depend on the label, plus noise; returns the CSV."""
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for label in range(num_labels):
        colour = rng.integers(0, 255, size=3)
        period = 2 + label % 5
        for i in range(per_label):
            img = np.tile(colour, (size, width or size, 1)).astype(np.float64)
            img[:, ::period] *= 0.3
            img += rng.normal(0, 20, size=img.shape)
            path = root / "images" / f"l{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            rows.append(f"images/l{label}/{i}.png,label_{label}")
    csv_file = root / "data.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    return csv_file


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "data")


def tiny_config(csv_file: Path, output_dir: Path, **overrides):
    from recognite.train import TrainConfig

    values = dict(
        data_csv=str(csv_file), model_name="resnet18", image_size=32, num_folds=2, epochs=2, batch_size=8,
        val_batch_size=16, num_workers=0, optimizer="sgd", lr=0.05, warmup_epochs=0.5, output_dir=str(output_dir),
        progress=False, report=False, max_steps_per_epoch=2,
    )
    values.update(overrides)
    return TrainConfig(**values)
