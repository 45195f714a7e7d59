"""Training: configuration, the training loop, checkpoints and metric logs."""

from recognite.train.config import TrainConfig, load_config_file
from recognite.train.evaluation import (
    ValidationResult,
    calibrate_threshold,
    validation_metrics,
)
from recognite.train.trainer import (
    CrossValidationResult,
    TrainingDivergedError,
    TrainResult,
    train,
    train_fold,
)

__all__ = [
    "CrossValidationResult",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "ValidationResult",
    "calibrate_threshold",
    "load_config_file",
    "train",
    "train_fold",
    "validation_metrics",
]
