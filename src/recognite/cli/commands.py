"""The subcommands of ``recognite``; each ``_register_*`` adds one subparser."""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from recognite.cli._options import add_dataclass_options, dataclass_values
from recognite.model import SUPPORTED_MODELS, WeightsUnavailableError
from recognite.train.config import TrainConfig, load_config_file
from recognite.train.demo import DEMO_DEFAULTS

logger = logging.getLogger("recognite")

# Exceptions shown to the user as one line instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, TypeError, ImportError, WeightsUnavailableError, RuntimeError, OSError,
)


def _train_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    values.update(dataclass_values(args, TrainConfig))
    return TrainConfig.from_dict(values)


def _log_summary(result: Any) -> None:
    from recognite.train import CrossValidationResult

    if isinstance(result, CrossValidationResult):
        return  # the trainer already logged the mean ± std table
    best = result.best
    logger.info("Best epoch %s: %s", best["epoch"], ", ".join(
        f"{k} {best[k]:.4f}" for k in ("top1", "top5", "mAP", "MAP@R", "threshold")
        if isinstance(best.get(k), float) and math.isfinite(best[k])))
    logger.info("Run folder: %s", result.run_dir)


# --- models ----------------------------------------------------------------------------------


def _run_models(args: argparse.Namespace) -> int:
    if args.timm:
        from recognite.model.backbones import list_timm_models

        names = list_timm_models(args.filter)
    else:
        names = [n for n in SUPPORTED_MODELS if args.filter in n] if args.filter else SUPPORTED_MODELS
    print("\n".join(names))
    return 0


def _register_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="List the supported backbones.",
                       description="List the torchvision backbones Recognizer accepts; with --timm, the timm "
                       "architectures (names timm/<architecture>, needs recognite[timm]).")
    p.add_argument("filter", nargs="?", default="", help="Only names containing this text.")
    p.add_argument("--timm", action="store_true", help="List timm architectures instead (timm/<name>).")
    p.set_defaults(handler=_run_models)


# --- train -----------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    from recognite.train import train

    config = _train_config(args)
    result = train(config)
    _log_summary(result)
    return 0


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="Train a recognizer on a CSV of image,label and validate on unseen labels.",
        description="Train on the labels of all folds but one; validate recognition of the held-out "
        "labels (gallery of --num-refs images per label, the rest as queries).",
    )
    p.add_argument("--config", help="YAML or JSON file setting any option below (flags given here win).", default=argparse.SUPPRESS)
    add_dataclass_options(p, TrainConfig)
    p.set_defaults(handler=_run_train)


# --- demo ------------------------------------------------------------------------------------

def _run_demo(args: argparse.Namespace) -> int:
    from recognite.train import CrossValidationResult
    from recognite.train.demo import run_demo

    config, result = run_demo(args.data_dir, num_classes=args.num_classes, **dataclass_values(args, TrainConfig))
    if isinstance(result, CrossValidationResult):
        return 0
    untrained = result.history[0]
    best = result.best
    lines = [
        "",
        f"Recognition of the {len(result.history) and 'validation'} labels, never seen in training "
        f"({config.model_name} at {config.image_size}px, fold {config.val_fold} of {config.num_folds}):",
        f"  {'':22s} {'top-1':>8s} {'top-5':>8s} {'mAP':>8s}",
        f"  {'untrained backbone':22s} {untrained['top1']:8.4f} {untrained['top5']:8.4f} {untrained['mAP']:8.4f}",
        f"  {'trained (best epoch)':22s} {best['top1']:8.4f} {best['top5']:8.4f} {best['mAP']:8.4f}",
        f"Run folder: {result.run_dir}",
    ]
    print("\n".join(lines))
    return 0


def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="Train and evaluate on a demo dataset generated offline (glyphs in many fonts).",
        description="Generate (once, cached) a dataset of character images rendered in the fonts matplotlib "
        "ships, train a small backbone on CPU, and report recognition of labels never seen in training "
        "next to the same backbone without training. Any train option can be overridden.",
    )
    p.add_argument("--data-dir", default=None, help="Where the demo dataset is generated (default: the recognite cache).")
    p.add_argument("--num-classes", type=int, default=300, help="Number of glyph classes in the demo dataset.")
    add_dataclass_options(p, TrainConfig, skip=("data_csv",), overrides=DEMO_DEFAULTS)
    p.set_defaults(handler=_run_demo)


REGISTRY = [_register_demo, _register_train, _register_models]
