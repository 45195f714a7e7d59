"""Metric loggers: a CSV file always; TensorBoard and Weights & Biases when asked for."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from recognite.train.config import atomic_write_text


class CSVLogger:
    """Keeps one row per evaluation and rewrites ``metrics.csv`` atomically after each."""

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = list(rows or [])

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        columns: list[str] = []
        for r in self.rows:
            columns += [c for c in r if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "--tensorboard needs the optional dependency tensorboard: pip install 'recognite[tensorboard]'"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, project: str, config: dict[str, Any], run_dir: Path) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("--wandb-project needs the optional dependency wandb: pip install 'recognite[wandb]'") from exc
        self.run = wandb.init(project=project, config=config, dir=str(run_dir))

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(row.get("step", 0)))

    def close(self) -> None:
        self.run.finish()
