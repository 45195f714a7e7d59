"""The training loop behind ``recognite train``: one fold, or every fold (cross-validation)."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from recognite.checkpoint import (
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from recognite.data import train_val_datasets
from recognite.data.images import check_images
from recognite.data.rotation_classes import RotationClasses
from recognite.data.samplers import PKBatchSampler
from recognite.data.transforms import (
    eval_transform,
    three_crop_eval_transform,
    train_transform,
)
from recognite.losses import build_loss
from recognite.model import Recognizer
from recognite.model.backbones import input_size_kwargs
from recognite.train import _distributed as distributed
from recognite.train._interrupt import GracefulInterrupt
from recognite.train.config import TrainConfig, atomic_write_text
from recognite.train.evaluation import ValidationResult, validate
from recognite.train.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from recognite.utils.device import resolve_device

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("top1", "top5", "mAP", "MAP@R", "hard_pos_mean", "hard_neg_mean")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """Outcome of training on one fold.

    Attributes:
        run_dir: The run folder.
        history: One dict per evaluation (epoch 0 = before training), as in ``metrics.csv``.
        best: The row of the best epoch by ``checkpoint_metric``.
        threshold: Open-set similarity threshold calibrated on the validation split at the best epoch.
        interrupted: True when training stopped on Ctrl-C (a checkpoint was saved).
    """

    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]
    threshold: float | None
    interrupted: bool = False


@dataclass
class CrossValidationResult:
    """Outcome of ``--val-fold all``: one :class:`TrainResult` per fold, and mean / std of metrics."""

    folds: list[TrainResult]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


def train(config: TrainConfig) -> TrainResult | CrossValidationResult:
    """Train as configured; with ``val_fold='all'`` run every fold and summarize.

    Raises:
        TrainingDivergedError: The loss became NaN/inf (the last good checkpoint is kept).
        KeyboardInterrupt: Re-raised after a checkpoint is saved on Ctrl-C.
    """
    if config.val_fold != "all":
        return train_fold(config)
    results = []
    for fold in range(config.num_folds):
        fold_config = replace(config, val_fold=str(fold), output_dir=str(Path(config.output_dir) / f"fold_{fold}"))
        results.append(train_fold(fold_config))
    summary = CrossValidationResult(folds=results)
    for key in (*SUMMARY_METRICS, "threshold"):
        values = [r.best.get(key) for r in results]
        values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if values:
            summary.mean[key] = statistics.fmean(values)
            summary.std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    lines = ["metric,mean,std"] + [f"{k},{summary.mean[k]:.6f},{summary.std[k]:.6f}" for k in summary.mean]
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(Path(config.output_dir) / "cv_summary.csv", "\n".join(lines) + "\n")
    logger.info("Cross-validation over %d folds (best epoch of each):", config.num_folds)
    for key in summary.mean:
        logger.info("  %-14s %.4f ± %.4f", key, summary.mean[key], summary.std[key])
    return summary


class _EpochBatches(Sampler[list[int]]):
    """Shuffled batches of dataset indices for one epoch, sharded over ranks, optionally skipping a prefix.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, epoch: int, info: distributed.DistInfo,
                 max_batches: int = 0, start_batch: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_items, generator=generator).tolist()
        per_rank = num_items // (batch_size * info.world_size)
        if per_rank == 0:
            raise ValueError(
                f"--batch-size {batch_size} x {info.world_size} process(es) is larger than the training set "
                f"({num_items} images); lower --batch-size."
            )
        if max_batches:
            per_rank = min(per_rank, max_batches)
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(per_rank * info.world_size)]
        self.batches = batches[info.rank::info.world_size][start_batch:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _SkipBatches(Sampler[list[int]]):
    def __init__(self, sampler: Sampler[list[int]], start_batch: int, max_batches: int) -> None:
        batches = list(sampler)
        if max_batches:
            batches = batches[:max_batches]
        self.batches = batches[start_batch:]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _device(config: TrainConfig, info: distributed.DistInfo) -> torch.device:
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise ValueError(f"--device: {exc}") from exc
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config.amp == "none":
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _freeze(model: Recognizer, prefixes: list[str]) -> list[nn.Module]:
    """Freeze backbone parameters under ``prefixes``; return the frozen BatchNorm modules."""
    if not prefixes:
        return []
    names = [name for name, _ in model.backbone.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"--frozen-layers {prefix!r} matches no backbone parameter; top-level names: {tops}.")
    frozen_bn = []
    for name, param in model.backbone.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(name == p or name.startswith(p + ".") for p in prefixes):
            frozen_bn.append(module)
    return frozen_bn


def _lr_lambda(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    return torch.optim.AdamW(params, lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)


def _loss_kwargs(config: TrainConfig) -> dict[str, Any]:
    if config.loss == "norm_softmax":
        return {"temperature": config.temperature, "learn_temperature": config.learn_temperature}
    if config.loss == "cosface":
        return {"scale": config.scale, "margin": config.margin}
    if config.loss == "arcface":
        return {"scale": config.scale, "margin": config.margin}
    return {"scale": config.scale, "margin": config.margin, "num_subcenters": config.num_subcenters}


def _shard(dataset: Dataset, info: distributed.DistInfo) -> Dataset:
    if not info.enabled:
        return dataset
    return Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))


def train_fold(config: TrainConfig) -> TrainResult:
    """Train on the folds of ``config`` other than ``config.val_fold`` and validate on that one."""
    info = distributed.setup("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    # Training seeds and uses the global RNGs (initialization, augmentation in the main process,
    # dropout) so that checkpoints can capture and restore them; the caller's states come back after.
    caller_rng = rng_states()
    try:
        return _train_fold(config, info)
    finally:
        set_rng_states(caller_rng)
        distributed.cleanup(info)


@dataclass
class _Fold:
    """What one fold's training is made of; built once by :func:`_setup_fold`."""

    config: TrainConfig
    info: distributed.DistInfo
    device: torch.device
    run_dir: Path
    model: Recognizer
    train_model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    frozen_bn: list[nn.Module]
    ds_train: Dataset
    ds_gallery: Dataset
    ds_query: Dataset
    pk: PKBatchSampler | None
    steps_per_epoch: int
    label_names: list[str]
    csv_logger: CSVLogger | None = None
    extra_loggers: list[Any] = field(default_factory=list)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def show(self) -> bool:
        return self.config.progress and self.info.is_main


@dataclass
class _Progress:
    """The mutable state of a fold's training: what a checkpoint records besides the modules."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float = -math.inf
    threshold: float | None = None
    epoch: int = 0  # position for Ctrl-C checkpoints: (epoch, completed batches in it)
    batch: int = 0
    epoch_loss: tuple[float, int] = (0.0, 0)  # (sum, count) of this epoch's losses so far
    rng_after_step: Any = None
    table_started: bool = False


def _resume_path(config: TrainConfig, last_path: Path) -> Path | None:
    if config.resume == "auto":
        return last_path if last_path.is_file() else None
    return Path(config.resume) if config.resume else None


RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "config.yaml", "bundle")
"""What a run writes into its folder; a new run refuses a folder holding any of them."""

FIXED_ON_RESUME = ("data_csv", "image_key", "label_key", "num_folds", "val_fold", "fold_seed", "num_refs", "ref_seed",
                   "model_name", "weights", "image_size", "embedding_dim", "small_input_stem", "loss", "num_subcenters", "rotation_classes", "optimizer",
                   "lr", "momentum", "weight_decay", "warmup_epochs", "batch_size", "sampler", "pk_k",
                   "max_steps_per_epoch", "seed", "metric", "checkpoint_metric")
"""Options a checkpoint fixes: data, folds, model, label set, optimizer and learning-rate schedule
(``--epochs`` may change: the cosine decay then runs to the new end from the current step)."""


def _check_run_folder(config: TrainConfig, run_dir: Path, resume_path: Path | None) -> None:
    """Refuse to start a new run over an earlier one (unless ``--overwrite``), or into a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--output-dir {str(run_dir)!r} is a file, not a folder; choose a folder.")
    if resume_path is not None:
        if resume_path.resolve().parent != run_dir.resolve():
            raise ValueError(f"--resume {str(resume_path)!r} belongs to the run folder {str(resume_path.parent)!r}, but "
                             f"--output-dir is {str(run_dir)!r}; resume with --output-dir {str(resume_path.parent)!r}.")
        return
    if config.resume == "auto":
        return  # continue the run when it has a checkpoint, else start it again (as after a crash)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present and not config.overwrite:
        raise FileExistsError(f"--output-dir {str(run_dir)!r} already holds a run ({', '.join(present)}); pass "
                              "--resume auto to continue it, --overwrite to replace it, or choose another --output-dir.")


def _check_resumable(config: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """Refuse options that differ from the checkpoint's where the checkpoint fixes them."""
    saved = state.get("config") or {}
    current = config.to_dict()
    differ = []
    for key in FIXED_ON_RESUME:
        if key not in saved:
            continue
        old, new = saved[key], current[key]
        if key == "data_csv":
            old, new = os.path.abspath(str(old)), os.path.abspath(str(new))
        if isinstance(old, (list, tuple)):
            old, new = list(old), list(new)
        if old != new:
            differ.append(f"{key} ({old!r} in the checkpoint, {new!r} now)")
    if differ:
        raise ValueError(f"Cannot resume from {path}: options fixed by the checkpoint differ: {'; '.join(differ)}. "
                         "Use the checkpoint's values, or start a new run in another --output-dir.")


def _check_labels(fold_labels: list[str], state: dict[str, Any], path: Path) -> None:
    saved = state.get("label_names")
    if saved is not None and list(saved) != list(fold_labels):
        raise ValueError(f"Cannot resume from {path}: its training labels ({len(saved)}) are not the labels of "
                         f"this data's training folds ({len(fold_labels)}); the data CSV changed.")


def _datasets(config: TrainConfig, model: Recognizer) -> tuple[Dataset, Dataset, Dataset]:
    preprocessing = model.preprocessing
    tfm_train = train_transform(preprocessing, config.image_size, config.rrc_scale, config.rrc_ratio, config.hflip,
                                config.affine(), config.elastic())
    tfm_val = (three_crop_eval_transform if config.three_crop else eval_transform)(preprocessing, config.image_size)
    with warnings.catch_warnings():
        # More folds than labels is allowed by the library (as in 0.1.0), not by a training run: see below.
        warnings.filterwarnings("ignore", message=r"num_folds \(\d+\) is larger than the number of unique labels")
        ds_train, ds_gallery, ds_query = train_val_datasets(
            config.data_csv, image_key=config.image_key, label_key=config.label_key, num_folds=config.num_folds,
            val_fold=int(config.val_fold), fold_seed=config.fold_seed, num_refs=config.num_refs,
            ref_seed=config.ref_seed, tfm_train=tfm_train, tfm_val=tfm_val,
        )
    num_labels = len(ds_train.unique_labels) + len(ds_gallery.unique_labels)
    if config.num_folds > num_labels:
        raise ValueError(f"--num-folds {config.num_folds} is larger than the number of labels ({num_labels}) in "
                         f"{config.data_csv}: some folds would be empty. Use --num-folds <= {num_labels}.")
    if config.checkpoint_metric == "top5" and len(ds_gallery) < 5:
        raise ValueError(f"--checkpoint-metric top5 needs at least 5 gallery items, but the validation gallery of "
                         f"{config.data_csv} has {len(ds_gallery)}; choose top1 or mAP.")
    paths = [str(p) for ds in (ds_train, ds_gallery, ds_query) for p in ds.df[ds.image_key]]
    check_images(paths, what=f"images of {config.data_csv}", progress=config.progress)
    if config.rotation_classes:
        ds_train = RotationClasses(ds_train)
    return ds_train, ds_gallery, ds_query


def _steps_per_epoch(config: TrainConfig, ds_train: Dataset, info: distributed.DistInfo) -> tuple[PKBatchSampler | None, int]:
    if config.sampler == "pk":
        pk = PKBatchSampler(ds_train.int_labels, p=config.batch_size // config.pk_k, k=config.pk_k, seed=config.seed,
                            num_replicas=info.world_size, rank=info.rank)
        steps = len(pk)
    else:
        pk = None
        steps = len(ds_train) // (config.batch_size * info.world_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the training set ({len(ds_train)} images).")
    return pk, steps


def _setup_fold(config: TrainConfig, info: distributed.DistInfo) -> tuple[_Fold, _Progress, dict[str, Any] | None]:
    """Build model, data, optimizer and schedule (in the order that fixes the RNG stream)."""
    device = _device(config, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = Path(config.output_dir)
    resume_path = _resume_path(config, run_dir / "last.pt")
    _check_run_folder(config, run_dir, resume_path)
    resume_state = load_checkpoint(resume_path) if resume_path else None
    if resume_state is not None:
        _check_resumable(config, resume_state, resume_path)

    torch.manual_seed(config.seed)  # model init (DDP broadcasts rank 0's parameters anyway)
    model = Recognizer(config.model_name, weights=config.weights, num_subcenters=1, embedding_dim=config.embedding_dim,
                       small_input_stem=config.small_input_stem, **input_size_kwargs(config.model_name, config.image_size))
    loss_fn = build_loss(config.loss, **_loss_kwargs(config))
    if config.content_crop:
        model.preprocessing = replace(model.preprocessing, content_crop=True, content_margin=config.content_margin)
    ds_train, ds_gallery, ds_query = _datasets(config, model)
    num_classes = len(ds_train.unique_labels)
    model.num_subcenters = loss_fn.num_outputs(num_classes) // num_classes
    model.set_classifier(num_classes, bias=False)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device)
    model.to(memory_format=memory_format)
    frozen_bn = _freeze(model, config.frozen_layers)
    loss_fn.to(device)

    optimizer = _make_optimizer(config, [p for p in model.parameters() if p.requires_grad] + list(loss_fn.parameters()))
    pk, steps_per_epoch = _steps_per_epoch(config, ds_train, info)
    schedule = _lr_lambda(round(config.warmup_epochs * steps_per_epoch), steps_per_epoch * config.epochs)
    amp_dtype = _amp_dtype(config, device)
    fold = _Fold(
        config=config, info=info, device=device, run_dir=run_dir, model=model, train_model=model, loss_fn=loss_fn,
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
        memory_format=memory_format, frozen_bn=frozen_bn, ds_train=ds_train, ds_gallery=ds_gallery,
        ds_query=ds_query, pk=pk, steps_per_epoch=steps_per_epoch,
        label_names=sorted(ds_train.label_to_int, key=ds_train.label_to_int.get),
    )
    if resume_state is not None:
        _check_labels(fold.label_names, resume_state, resume_path)
    progress = _restore(fold, resume_state, resume_path)
    if info.enabled:
        fold.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return fold, progress, resume_state


def _restore(fold: _Fold, resume_state: dict[str, Any] | None, resume_path: Path | None) -> _Progress:
    """The progress of a resumed run (modules loaded in place), or a fresh one (RNG seeded)."""
    if resume_state is None:
        torch.manual_seed(fold.config.seed + fold.info.rank)
        return _Progress()
    fold.model.load_state_dict(resume_state["model"])
    fold.loss_fn.load_state_dict(resume_state["loss"])
    fold.optimizer.load_state_dict(resume_state["optimizer"])
    fold.scheduler.load_state_dict(resume_state["scheduler"])
    fold.scaler.load_state_dict(resume_state["scaler"])
    progress = _Progress(
        history=list(resume_state["history"]), best_value=resume_state["best_value"],
        threshold=resume_state.get("threshold"), epoch=resume_state["epoch"], batch=resume_state["batch_in_epoch"],
        epoch_loss=tuple(resume_state.get("epoch_loss", (0.0, 0))),
    )
    if resume_state.get("world_size", 1) != fold.info.world_size:
        raise ValueError(
            f"Checkpoint {resume_path} was written by {resume_state.get('world_size', 1)} process(es); "
            f"resume with the same number (now {fold.info.world_size})."
        )
    saved_rng = resume_state["rng"]
    set_rng_states(saved_rng[fold.info.rank] if isinstance(saved_rng, list) else saved_rng)
    logger.info("Resumed from %s at epoch %d, batch %d.", resume_path, progress.epoch, progress.batch)
    return progress


def _open_loggers(fold: _Fold, progress: _Progress) -> None:
    fold.csv_logger = CSVLogger(fold.run_dir / "metrics.csv", progress.history)
    if not fold.info.is_main:
        return
    fold.run_dir.mkdir(parents=True, exist_ok=True)
    fold.config.save(fold.run_dir / "config.yaml")
    if fold.config.tensorboard:
        fold.extra_loggers.append(TensorBoardLogger(fold.run_dir / "tensorboard"))
    if fold.config.wandb_project:
        fold.extra_loggers.append(WandbLogger(fold.config.wandb_project, fold.config.to_dict(), fold.run_dir))


def _checkpoint_state(fold: _Fold, progress: _Progress, epoch: int, batch_in_epoch: int, rng: Any = None) -> dict[str, Any]:
    if rng is None:
        rng = rng_states()
        if fold.info.enabled:
            gathered: list[Any] = [None] * fold.info.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
    return {
        "model": fold.model.state_dict(), "loss": fold.loss_fn.state_dict(), "optimizer": fold.optimizer.state_dict(),
        "scheduler": fold.scheduler.state_dict(), "scaler": fold.scaler.state_dict(), "epoch": epoch,
        "batch_in_epoch": batch_in_epoch, "step": epoch * fold.steps_per_epoch + batch_in_epoch, "rng": rng,
        "config": fold.config.to_dict(), "model_config": fold.model.config(), "label_names": fold.label_names,
        "history": progress.history, "best_value": progress.best_value, "epoch_loss": progress.epoch_loss,
        "threshold": progress.threshold, "world_size": fold.info.world_size,
    }


def _validate_and_log(fold: _Fold, progress: _Progress, epoch: int, train_loss: float | None, lr: float,
                      images_per_s: float | None = None) -> ValidationResult:
    result = validate(fold.model, _shard(fold.ds_gallery, fold.info), _shard(fold.ds_query, fold.info), fold.config,
                      fold.device, fold.info)
    row = {"epoch": epoch, "step": epoch * fold.steps_per_epoch, "train_loss": train_loss, "lr": lr,
           "train_images_per_s": images_per_s, **result.metrics}
    progress.history.append(row)
    if fold.info.is_main:
        fold.csv_logger.log(row)
        for extra in fold.extra_loggers:
            extra.log(row)
        if not progress.table_started:
            logger.info(_table_header())
        logger.info(_format_row(row))
    progress.table_started = True
    return result


def _epoch_loader(fold: _Fold, epoch: int, start_batch: int) -> tuple[DataLoader, int]:
    config = fold.config
    if fold.pk is not None:
        fold.pk.set_epoch(epoch)
        batch_sampler: Sampler[list[int]] = _SkipBatches(fold.pk, start_batch, fold.steps_per_epoch)
    else:
        batch_sampler = _EpochBatches(len(fold.ds_train), config.batch_size, config.seed, epoch, fold.info,
                                      fold.steps_per_epoch, start_batch)
    loader_gen = torch.Generator().manual_seed(config.seed * 7919 + epoch * 104_729 + fold.info.rank)
    loader = DataLoader(fold.ds_train, batch_sampler=batch_sampler, num_workers=config.num_workers,
                        generator=loader_gen, pin_memory=fold.device.type == "cuda", persistent_workers=False)
    return loader, len(batch_sampler)


def _train_step(fold: _Fold, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch_index: int) -> float:
    """One optimizer step; returns the loss (raises :class:`TrainingDivergedError` on NaN/inf)."""
    device = fold.device
    images = images.to(device, non_blocking=True, memory_format=fold.memory_format)
    labels = labels.to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=fold.amp_dtype or torch.float32, enabled=fold.amp_dtype is not None):
        scores = fold.train_model(images)
    loss = fold.loss_fn(scores.float(), labels)
    if distributed.any_true(not bool(torch.isfinite(loss)), fold.info, device):
        kept = (f"The last good checkpoint ({fold.last_path}) is intact." if fold.last_path.is_file()
                else "No checkpoint was written yet.")
        raise TrainingDivergedError(
            f"The loss became {loss.item()} at epoch {epoch + 1}, batch {batch_index + 1}; training stopped. "
            f"{kept} Try a lower --lr or a higher --temperature."
        )
    fold.optimizer.zero_grad(set_to_none=True)
    fold.scaler.scale(loss).backward()
    fold.scaler.step(fold.optimizer)
    fold.scaler.update()
    fold.scheduler.step()
    return loss.item()


def _train_epoch(fold: _Fold, progress: _Progress, epoch: int, stop: GracefulInterrupt) -> tuple[float, float]:
    """Train one epoch (from ``progress.batch`` when resumed mid-epoch); returns (mean loss, images/s)."""
    start_batch = progress.batch if epoch == progress.epoch else 0
    loader, num_batches = _epoch_loader(fold, epoch, start_batch)
    fold.train_model.train()
    for module in fold.frozen_bn:
        module.eval()
    loss_sum, loss_count = (0.0, 0) if start_batch == 0 else progress.epoch_loss
    batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not fold.show,
                   initial=start_batch, total=start_batch + num_batches)
    epoch_start = time.perf_counter()
    for batch_index, (images, labels) in enumerate(batches, start=start_batch):
        loss = _train_step(fold, images, labels, epoch, batch_index)
        loss_sum += loss
        loss_count += 1
        progress.epoch_loss = (loss_sum, loss_count)
        if fold.show:
            batches.set_postfix(loss=f"{loss:.3f}", lr=f"{fold.scheduler.get_last_lr()[0]:.2e}")
        progress.epoch, progress.batch = epoch, batch_index + 1
        progress.rng_after_step = rng_states()  # before the next batch is loaded and augmented
        if distributed.any_true(stop.requested, fold.info, fold.device):
            raise KeyboardInterrupt
    progress.epoch, progress.batch = epoch, start_batch + num_batches
    progress.rng_after_step = None
    train_seconds = time.perf_counter() - epoch_start
    images_per_s = num_batches * fold.config.batch_size * fold.info.world_size / max(train_seconds, 1e-9)
    return distributed.mean_across(loss_sum / max(1, loss_count), fold.info, fold.device), images_per_s


def _save_epoch(fold: _Fold, progress: _Progress, epoch: int, result: ValidationResult) -> None:
    """Checkpoint after a validated epoch: ``last.pt`` always, ``best.pt`` when it improved.

    A NaN checkpoint metric never counts as an improvement, except that the first validated
    epoch is kept as best when nothing better exists (so a run always ends with a best.pt).
    """
    value = result.metrics[fold.config.checkpoint_metric]
    comparable = value if math.isfinite(value) else -math.inf
    if not math.isfinite(value):
        logger.warning("Epoch %d: checkpoint metric %s is %s.", epoch, fold.config.checkpoint_metric, value)
    improved = comparable > progress.best_value or not fold.best_path.is_file() and progress.best_value == -math.inf
    if improved:
        progress.best_value = comparable
        progress.threshold = result.threshold
    state = _checkpoint_state(fold, progress, epoch, 0)
    if fold.info.is_main:
        save_checkpoint(state, fold.last_path)
        if improved:
            save_checkpoint(state, fold.best_path)
    distributed.barrier(fold.info)
    progress.epoch, progress.batch, progress.epoch_loss = epoch, 0, (0.0, 0)


def _save_interrupted(fold: _Fold, progress: _Progress) -> None:
    # Own RNG state only: other ranks may be interrupted too, so no collective calls here.
    state = _checkpoint_state(fold, progress, progress.epoch, progress.batch, progress.rng_after_step or rng_states())
    if fold.info.is_main:
        save_checkpoint(state, fold.last_path)
        logger.warning("Interrupted: saved %s (epoch %d, batch %d); resume with --resume %s",
                       fold.last_path, progress.epoch + 1, progress.batch, fold.last_path)


def _run_epochs(fold: _Fold, progress: _Progress, stop: GracefulInterrupt) -> None:
    config = fold.config
    if progress.epoch == 0 and progress.batch == 0 and not progress.history:
        _validate_and_log(fold, progress, 0, None, 0.0)  # the untrained model, for comparison
    start_epoch = progress.epoch
    for epoch in tqdm(range(start_epoch, config.epochs), desc="epochs", disable=not fold.show, initial=start_epoch,
                      total=config.epochs):
        train_loss, images_per_s = _train_epoch(fold, progress, epoch, stop)
        result = _validate_and_log(fold, progress, epoch + 1, train_loss, fold.scheduler.get_last_lr()[0], images_per_s)
        _save_epoch(fold, progress, epoch + 1, result)


def _train_fold(config: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    fold, progress, _ = _setup_fold(config, info)
    _open_loggers(fold, progress)
    interrupted = False
    try:
        with GracefulInterrupt() as stop:
            _run_epochs(fold, progress, stop)
    except KeyboardInterrupt:
        interrupted = True
        _save_interrupted(fold, progress)
        raise
    finally:
        for extra in fold.extra_loggers:
            extra.close()
    if info.is_main and fold.best_path.is_file():
        _finish_run(fold)
    history = progress.history
    best_row = max((r for r in history if r["epoch"] > 0), key=lambda r: _comparable(r[config.checkpoint_metric]),
                   default=history[-1])
    best_row = {**best_row, "threshold": progress.threshold}
    return TrainResult(run_dir=fold.run_dir, history=history, best=best_row, threshold=progress.threshold,
                       interrupted=interrupted)


def _comparable(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def _finish_run(fold: _Fold) -> None:
    """Write the deployable bundle of the best checkpoint, and the report when asked for."""
    from recognite.bundle import bundle_from_checkpoint

    config, run_dir, best_path = fold.config, fold.run_dir, fold.best_path
    threshold: float | None | str = "checkpoint"
    if config.three_crop:
        threshold = _single_crop_threshold(fold)
    bundle_dir = bundle_from_checkpoint(best_path, run_dir / "bundle", threshold=threshold)
    logger.info("Model bundle of the best epoch: %s", bundle_dir)
    if not config.report:
        return
    try:
        from recognite.report import build_report
    except ImportError as exc:  # the report package needs matplotlib (recognite[plot])
        logger.warning("No report: %s", exc)
        return
    try:
        build_report(run_dir, checkpoint=best_path.name, progress=config.progress)  # logs where it wrote
    except ImportError as exc:
        logger.warning("No report: %s", exc)


def _single_crop_threshold(fold: _Fold) -> float | None:
    """The best weights' threshold calibrated on single centre-crop embeddings.

    With ``--three-crop`` validation embeds the mean of three crops, but a bundle embeds one
    centre crop: its threshold must be calibrated on what it embeds.
    """
    state = load_checkpoint(fold.best_path)
    model = Recognizer.from_config(state["model_config"], source=str(fold.best_path))
    model.load_weights(state["model"], source=str(fold.best_path))
    config = replace(fold.config, three_crop=False)
    tfm_val = eval_transform(model.preprocessing, config.image_size)
    _, ds_gallery, ds_query = train_val_datasets(
        config.data_csv, image_key=config.image_key, label_key=config.label_key, num_folds=config.num_folds,
        val_fold=int(config.val_fold), fold_seed=config.fold_seed, num_refs=config.num_refs, ref_seed=config.ref_seed,
        tfm_val=tfm_val,
    )
    result = validate(model.to(fold.device), ds_gallery, ds_query, config, fold.device, distributed.DistInfo())
    logger.info("Threshold for single centre-crop embeddings (the bundle's): %s", result.threshold)
    return result.threshold


_TABLE_COLUMNS = (("epoch", "epoch", "{:>5}"), ("train_loss", "loss", "{:>7.4f}"), ("top1", "top1", "{:>6.4f}"),
                  ("top5", "top5", "{:>6.4f}"), ("mAP", "mAP", "{:>6.4f}"), ("MAP@R", "MAP@R", "{:>6.4f}"),
                  ("hard_pos_mean", "hardpos", "{:>7.4f}"), ("hard_neg_mean", "hardneg", "{:>7.4f}"),
                  ("threshold", "thresh", "{:>6.4f}"), ("train_images_per_s", "img/s", "{:>7.1f}"))
_WIDTHS = (5, 7, 6, 6, 6, 6, 7, 7, 6, 7)


def _table_header() -> str:
    return "  ".join(f"{title:>{width}}" for (_, title, _), width in zip(_TABLE_COLUMNS, _WIDTHS))


def _format_row(row: dict[str, Any]) -> str:
    """One line of the per-epoch metrics table (missing values shown as '-')."""
    cells = []
    for (key, _, fmt), width in zip(_TABLE_COLUMNS, _WIDTHS):
        value = row.get(key)
        ok = value is not None and not (isinstance(value, float) and math.isnan(value))
        cells.append(fmt.format(value) if ok else f"{'-':>{width}}")
    return "  ".join(cells)
