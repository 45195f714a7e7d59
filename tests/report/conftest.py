from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_confusable_dataset(root: Path, num_labels: int = 16, per_label: int = 4, size: int = 24) -> Path:
    """Labels come in groups of four that share a colour and differ only in stripe period, plus noise,
    so that a barely trained model confuses some of them (AP varies between queries). Returns the CSV."""
    rng = np.random.default_rng(3)
    rows = ["image,label"]
    colours = rng.integers(40, 215, size=(num_labels // 4 + 1, 3))
    for label in range(num_labels):
        colour = colours[label // 4]
        period = 2 + label % 4
        for i in range(per_label):
            img = np.tile(colour, (size, size + 6, 1)).astype(np.float64)  # non-square images
            img[:, ::period] *= 0.5
            img += rng.normal(0, 60, size=img.shape)
            path = root / "images" / f"l{label:02d}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            rows.append(f"images/l{label:02d}/{i}.png,label_{label:02d}")
    csv_file = root / "data.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    return csv_file


def tiny_train_config(csv_file: Path, output_dir: Path, **overrides):
    from recognite.train import TrainConfig

    values = dict(
        data_csv=str(csv_file), model_name="resnet18", image_size=32, num_folds=2, epochs=2, batch_size=8,
        val_batch_size=16, num_workers=0, lr=0.05, warmup_epochs=0.5, output_dir=str(output_dir),
        progress=False, report=False, max_steps_per_epoch=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny training run (2 epochs of 1 step, CPU), shared by the report tests."""
    from recognite.train import train

    root = tmp_path_factory.mktemp("report_run")
    csv_file = write_confusable_dataset(root / "data")
    train(tiny_train_config(csv_file, root / "run", device="cpu"))
    return root / "run"
