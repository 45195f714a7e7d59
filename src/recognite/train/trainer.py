"""The training loop behind ``recognite train``: one fold, or every fold (cross-validation)."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from recognite.data import train_val_datasets
from recognite.data.rotation_classes import RotationClasses
from recognite.data.samplers import PKBatchSampler
from recognite.data.transforms import (
    eval_transform,
    three_crop_eval_transform,
    train_transform,
)
from recognite.losses import build_loss
from recognite.model import Recognizer
from recognite.train import _distributed as distributed
from recognite.train._interrupt import GracefulInterrupt
from recognite.train.checkpoint import (
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from recognite.train.config import TrainConfig, atomic_write_text
from recognite.train.evaluation import ValidationResult, validate
from recognite.train.loggers import CSVLogger, TensorBoardLogger, WandbLogger

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
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available.")
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


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


def _train_fold(config: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    device = _device(config, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_dir = Path(config.output_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"

    resume_path = None
    if config.resume == "auto":
        resume_path = last_path if last_path.is_file() else None
    elif config.resume:
        resume_path = Path(config.resume)
    resume_state = load_checkpoint(resume_path) if resume_path else None

    torch.manual_seed(config.seed)  # model init (DDP broadcasts rank 0's parameters anyway)
    model = Recognizer(config.model_name, weights=config.weights, num_subcenters=1)
    loss_fn = build_loss(config.loss, **_loss_kwargs(config))
    if config.content_crop:
        model.preprocessing = replace(model.preprocessing, content_crop=True, content_margin=config.content_margin)
    preprocessing = model.preprocessing
    tfm_train = train_transform(preprocessing, config.image_size, config.rrc_scale, config.rrc_ratio, config.hflip,
                                config.affine(), config.elastic())
    tfm_val = (three_crop_eval_transform if config.three_crop else eval_transform)(preprocessing, config.image_size)
    ds_train, ds_gallery, ds_query = train_val_datasets(
        config.data_csv, image_key=config.image_key, label_key=config.label_key, num_folds=config.num_folds,
        val_fold=int(config.val_fold), fold_seed=config.fold_seed, num_refs=config.num_refs, ref_seed=config.ref_seed,
        tfm_train=tfm_train, tfm_val=tfm_val,
    )
    if config.rotation_classes:
        ds_train = RotationClasses(ds_train)
    num_classes = len(ds_train.unique_labels)
    num_outputs = loss_fn.num_outputs(num_classes)
    model.num_subcenters = num_outputs // num_classes
    model.set_classifier(num_classes, bias=False)
    model.to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    frozen_bn = _freeze(model, config.frozen_layers)
    loss_fn.to(device)

    params = [p for p in model.parameters() if p.requires_grad] + list(loss_fn.parameters())
    optimizer = _make_optimizer(config, params)
    if config.sampler == "pk":
        pk = PKBatchSampler(ds_train.int_labels, p=config.batch_size // config.pk_k, k=config.pk_k, seed=config.seed,
                            num_replicas=info.world_size, rank=info.rank)
        steps_per_epoch = len(pk)
    else:
        pk = None
        steps_per_epoch = len(ds_train) // (config.batch_size * info.world_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the training set ({len(ds_train)} images).")
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup_steps, total_steps))
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    history: list[dict[str, Any]] = []
    best_value = -math.inf
    threshold: float | None = None
    start_epoch, start_batch = 0, 0
    resumed_epoch_loss: tuple[float, int] = (0.0, 0)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        loss_fn.load_state_dict(resume_state["loss"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        history = list(resume_state["history"])
        best_value = resume_state["best_value"]
        threshold = resume_state.get("threshold")
        start_epoch, start_batch = resume_state["epoch"], resume_state["batch_in_epoch"]
        resumed_epoch_loss = tuple(resume_state.get("epoch_loss", (0.0, 0)))
        if resume_state.get("world_size", 1) != info.world_size:
            raise ValueError(
                f"Checkpoint {resume_path} was written by {resume_state.get('world_size', 1)} process(es); "
                f"resume with the same number (now {info.world_size})."
            )
        saved_rng = resume_state["rng"]
        set_rng_states(saved_rng[info.rank] if isinstance(saved_rng, list) else saved_rng)
        logger.info("Resumed from %s at epoch %d, batch %d.", resume_path, start_epoch, start_batch)
    else:
        torch.manual_seed(config.seed + info.rank)

    train_model: nn.Module = model
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    label_names = sorted(ds_train.label_to_int, key=ds_train.label_to_int.get)
    csv_logger = CSVLogger(run_dir / "metrics.csv", history)
    extra_loggers: list[Any] = []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        if config.tensorboard:
            extra_loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
        if config.wandb_project:
            extra_loggers.append(WandbLogger(config.wandb_project, config.to_dict(), run_dir))

    def checkpoint_state(epoch: int, batch_in_epoch: int, rng: Any = None) -> dict[str, Any]:
        if rng is None:
            rng = rng_states()
            if info.enabled:
                gathered: list[Any] = [None] * info.world_size
                torch.distributed.all_gather_object(gathered, rng)
                rng = gathered
        return {
            "model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "step": epoch * steps_per_epoch + batch_in_epoch, "rng": rng,
            "config": config.to_dict(), "model_config": model.config(), "label_names": label_names,
            "history": history, "best_value": best_value, "epoch_loss": epoch_loss, "threshold": threshold, "world_size": info.world_size,
        }

    table_started = False

    def run_validation(epoch: int, train_loss: float | None, lr: float, images_per_s: float | None = None) -> ValidationResult:
        nonlocal table_started
        result = validate(model, _shard(ds_gallery, info), _shard(ds_query, info), config, device, info)
        row = {"epoch": epoch, "step": epoch * steps_per_epoch, "train_loss": train_loss, "lr": lr,
               "train_images_per_s": images_per_s, **result.metrics}
        history.append(row)
        if info.is_main:
            csv_logger.log(row)
            for extra in extra_loggers:
                extra.log(row)
            if not table_started:
                logger.info(_table_header())
            logger.info(_format_row(row))
        table_started = True
        return result

    show = config.progress and info.is_main
    interrupted = False
    position = (start_epoch, start_batch)  # (epoch, completed batches in it), for Ctrl-C checkpoints
    rng_after_step: Any = None
    epoch_loss = (0.0, 0)  # (sum, count) of this epoch's losses so far, for mid-epoch checkpoints
    stop = GracefulInterrupt()
    try:
        stop.__enter__()
        if start_epoch == 0 and start_batch == 0 and not history:
            run_validation(0, None, 0.0)  # the untrained model, for comparison
        epochs = tqdm(range(start_epoch, config.epochs), desc="epochs", disable=not show, initial=start_epoch, total=config.epochs)
        for epoch in epochs:
            if pk is not None:
                pk.set_epoch(epoch)
                batch_sampler: Sampler[list[int]] = _SkipBatches(pk, start_batch, steps_per_epoch)
            else:
                batch_sampler = _EpochBatches(len(ds_train), config.batch_size, config.seed, epoch, info,
                                              steps_per_epoch, start_batch)
            loader_gen = torch.Generator().manual_seed(config.seed * 7919 + epoch * 104_729 + info.rank)
            loader = DataLoader(ds_train, batch_sampler=batch_sampler, num_workers=config.num_workers,
                                generator=loader_gen, pin_memory=device.type == "cuda",
                                persistent_workers=False)
            train_model.train()
            for module in frozen_bn:
                module.eval()
            loss_sum, loss_count = (0.0, 0) if start_batch == 0 else resumed_epoch_loss
            batches = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show,
                           initial=start_batch, total=start_batch + len(batch_sampler))
            epoch_start = time.perf_counter()
            for batch_index, (images, labels) in enumerate(batches, start=start_batch):
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    scores = train_model(images)
                loss = loss_fn(scores.float(), labels)
                if distributed.any_true(not bool(torch.isfinite(loss)), info, device):
                    raise TrainingDivergedError(
                        f"The loss became {loss.item()} at epoch {epoch + 1}, batch {batch_index + 1}; training stopped. "
                        f"The last good checkpoint ({last_path}) is intact. Try a lower --lr or a higher --temperature."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.item()
                loss_count += 1
                epoch_loss = (loss_sum, loss_count)
                if show:
                    batches.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                position = (epoch, batch_index + 1)
                rng_after_step = rng_states()  # before the next batch is loaded and augmented
                if distributed.any_true(stop.requested, info, device):
                    raise KeyboardInterrupt
            start_batch_of_epoch, start_batch = start_batch, 0
            position = (epoch, start_batch_of_epoch + len(batch_sampler))
            rng_after_step = None
            train_seconds = time.perf_counter() - epoch_start
            images_per_s = len(batch_sampler) * config.batch_size * info.world_size / max(train_seconds, 1e-9)
            train_loss = distributed.mean_across(loss_sum / max(1, loss_count), info, device)
            result = run_validation(epoch + 1, train_loss, scheduler.get_last_lr()[0], images_per_s)
            value = result.metrics[config.checkpoint_metric]
            improved = value > best_value
            if improved:
                best_value = value
                threshold = result.threshold
            state = checkpoint_state(epoch + 1, 0)
            if info.is_main:
                save_checkpoint(state, last_path)
                if improved:
                    save_checkpoint(state, best_path)
            distributed.barrier(info)
            position = (epoch + 1, 0)
            epoch_loss = (0.0, 0)
    except KeyboardInterrupt:
        interrupted = True
        current_epoch, done_batches = position
        # Own RNG state only: other ranks may be interrupted too, so no collective calls here.
        state = checkpoint_state(current_epoch, done_batches, rng_after_step or rng_states())
        if info.is_main:
            save_checkpoint(state, last_path)
            logger.warning("Interrupted: saved %s (epoch %d, batch %d); resume with --resume %s",
                           last_path, current_epoch + 1, done_batches, last_path)
        raise
    finally:
        stop.__exit__(None, None, None)
        for extra in extra_loggers:
            extra.close()
    if info.is_main and best_path.is_file():
        _finish_run(config, run_dir, best_path)
    best_row = max((r for r in history if r["epoch"] > 0), key=lambda r: r[config.checkpoint_metric], default=history[-1])
    best_row = {**best_row, "threshold": threshold}
    return TrainResult(run_dir=run_dir, history=history, best=best_row, threshold=threshold, interrupted=interrupted)


def _finish_run(config: TrainConfig, run_dir: Path, best_path: Path) -> None:
    """Write the deployable bundle of the best checkpoint, and the report when asked for."""
    from recognite.bundle import bundle_from_checkpoint

    bundle_dir = bundle_from_checkpoint(best_path, run_dir / "bundle")
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
