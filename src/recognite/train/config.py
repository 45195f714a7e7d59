"""Typed training configuration; its field docs become the ``--help`` text of ``recognite train``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recognite._atomic import atomic_write_text
from recognite.data.transforms import RandomAffineOnBorder, RandomElasticOnBorder
from recognite.model.backbones import SMALL_INPUT_STEM_FAMILIES, check_model_name
from recognite.utils.validate import InvalidTypeError, check_int

LOSSES = ("norm_softmax", "cosface", "arcface", "subcenter_arcface")
OPTIMIZERS = ("sgd", "adamw")
SAMPLERS = ("random", "pk")
METRICS = ("inner", "cosine", "euclid", "sq_euclid")
AMP_MODES = ("auto", "bf16", "fp16", "none")
DEVICES = ("auto", "cpu", "cuda")
THRESHOLD_METHODS = ("f1", "far")
# Metrics a checkpoint can be chosen by; all are "higher is better".
CHECKPOINT_METRICS = ("top1", "top5", "mAP", "MAP@R", "R-precision")


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything ``recognite train`` needs; every field is a ``--flag`` (underscores → dashes)."""

    data_csv: str = _doc("CSV file with one row per image: an image path (relative to the CSV's folder) and a label.", default="")
    image_key: str = _doc("CSV column holding the image paths.", default="image")
    label_key: str = _doc("CSV column holding the labels.", default="label")
    num_folds: int = _doc("Number of label-disjoint folds the labels are split into.", default=5)
    val_fold: str = _doc("Fold used for validation (0..num_folds-1), or 'all' to cross-validate over every fold.", default="0")
    fold_seed: int = _doc("Seed of the label shuffle that makes the folds.", default=0)
    num_refs: int = _doc("Reference images per validation label in the gallery; the rest are queries.", default=1)
    ref_seed: int = _doc("Seed of the choice of gallery references.", default=0)

    model_name: str = _doc("torchvision backbone (see `recognite models`).", default="resnet18")
    weights: str | None = _doc("Pretrained weights: DEFAULT, a weights name (IMAGENET1K_V1 ...), or a local file. None = from scratch.", default=None)
    image_size: int = _doc("Side of the square network input in pixels.", default=224)
    embedding_dim: int | None = _doc("Add an embedding neck: a projection (linear, no bias, then batch norm) from the backbone's width to this many dimensions (None = no neck: the backbone's pooled features).", default=None)
    small_input_stem: bool = _doc("ResNet-family backbones only, from scratch: replace the 7x7 stride-2 stem convolution and max-pool by one 3x3 stride-1 convolution, so 28-64 px inputs keep their spatial detail (about 16x the compute of the residual stages). Stored in the bundle.", default=False)
    rrc_scale: tuple[float, float] = _doc("Random-resized-crop area range (fraction of the image).", default=(0.25, 1.0))
    rrc_ratio: tuple[float, float] = _doc("Random-resized-crop aspect-ratio range.", default=(3 / 4, 4 / 3))
    hflip: float = _doc("Probability of a horizontal flip in training (0 for text, logos, characters).", default=0.0)
    content_crop: bool = _doc("Cut every image (training, validation, and later recognition via the bundle) to the square around its content: the pixels that differ from the border colour. For characters, logos, products on plain backgrounds.", default=False)
    content_margin: float = _doc("Margin around the content box for --content-crop, as a fraction of its longer side.", default=0.05)
    affine_degrees: float = _doc("Training augmentation: random rotation in [-D, D] degrees (0 = off).", default=0.0)
    affine_translate: float = _doc("Training augmentation: random shift up to this fraction of the side (0 = off).", default=0.0)
    affine_scale: tuple[float, float] = _doc("Training augmentation: random scale factor range (1 1 = off).", default=(1.0, 1.0))
    affine_shear: float = _doc("Training augmentation: random shear in [-D, D] degrees (0 = off).", default=0.0)
    elastic_magnitude: float = _doc("Training augmentation: random smooth elastic distortion, displacements up to this fraction of the side at the nodes of an --elastic-grid lattice (0 = off; ~0.04 for handwriting).", default=0.0)
    elastic_grid: int = _doc("Lattice nodes per side of the elastic distortion (>= 2; more = more local wobble).", default=4)
    rotation_classes: bool = _doc("Also train on every image rotated by 90, 180 and 270 degrees, each rotation of a class a new class (4x the classes). For characters, symbols, logos: objects whose rotated version is a different thing.", default=False)

    loss: str = _doc(f"Loss on cosine scores: one of {', '.join(LOSSES)} (see benchmarks/RESULTS.md, Losses).", default="cosface")
    temperature: float = _doc("Softmax temperature of norm_softmax (scores are divided by it).", default=0.05)
    learn_temperature: bool = _doc("Learn the temperature of norm_softmax, starting from --temperature.", default=False)
    margin: float = _doc("Margin of cosface (cosine) / arcface and subcenter_arcface (radians).", default=0.2)
    scale: float = _doc("Scale of cosface / arcface logits.", default=20.0)
    num_subcenters: int = _doc("Sub-centers per class for subcenter_arcface.", default=3)

    batch_size: int = _doc("Training batch size (per process under torchrun).", default=64)
    val_batch_size: int = _doc("Batch size for computing validation embeddings.", default=128)
    sampler: str = _doc("Batch composition: 'random' shuffling, or 'pk' (P labels x K images each).", default="random")
    pk_k: int = _doc("Images per label in a batch with --sampler pk (P = batch_size / K).", default=4)
    num_workers: int = _doc("Data-loading worker processes.", default=2)

    optimizer: str = _doc("Optimizer: adamw or sgd.", default="adamw")
    lr: float = _doc("Peak learning rate (adamw from scratch: ~2e-3; fine-tuning pretrained weights: ~1e-4 adamw or ~1e-2 sgd).", default=0.001)
    momentum: float = _doc("SGD momentum (adamw: beta1).", default=0.9)
    weight_decay: float = _doc("Weight decay (decoupled for adamw).", default=0.05)
    epochs: int = _doc("Training epochs.", default=10)
    warmup_epochs: float = _doc("Linear LR warm-up length in epochs (fractions allowed), then cosine decay to 0.", default=1.0)
    frozen_layers: list[str] = _doc("Backbone parameter-name prefixes to freeze, e.g. conv1 bn1 layer1 (BatchNorm statistics freeze too).", default_factory=list)
    max_steps_per_epoch: int = _doc("Cap on training steps per epoch (0 = the whole training set); for quick runs.", default=0)

    metric: str = _doc(f"Similarity for validation: one of {', '.join(METRICS)}.", default="cosine")
    checkpoint_metric: str = _doc(f"Validation metric that picks best.pt: one of {', '.join(CHECKPOINT_METRICS)}.", default="mAP")
    three_crop: bool = _doc("Validate with three crops along the long side, averaging their embeddings.", default=False)
    avg_refs: bool = _doc("Average the reference embeddings of each gallery label into one prototype.", default=False)
    threshold_method: str = _doc("Open-set threshold calibration: 'f1' (best F1 of accept-correct) or 'far' (target false-accept rate).", default="f1")
    target_far: float = _doc("Target false-accept rate for --threshold-method far.", default=0.05)

    output_dir: str = _doc("Run folder: checkpoints, config.yaml, metrics.csv, report.", default="runs/recognite")
    resume: str | None = _doc("Checkpoint to resume from exactly, or 'auto' for output_dir/last.pt when present.", default=None)
    overwrite: bool = _doc("Start a new run in an output_dir that already holds one, replacing its files (without it, such a folder is refused unless --resume is given).", default=False)
    seed: int = _doc("Seed for initialization, shuffling and augmentation.", default=0)
    device: str = _doc("Device: auto (CUDA when available), cpu or cuda.", default="auto")
    channels_last: bool = _doc("Train in the channels-last memory layout (NHWC), which convolutions on GPUs with tensor cores and on oneDNN CPUs can be faster in; the same results up to float rounding. Measure before relying on it (benchmarks/train_bench.py).", default=False)
    amp: str = _doc("Mixed precision on GPU: auto (bf16 when supported, else fp16), bf16, fp16 or none. CPU runs in float32.", default="auto")
    tensorboard: bool = _doc("Also log metrics to TensorBoard (needs recognite[tensorboard]).", default=False)
    wandb_project: str | None = _doc("Also log to this Weights & Biases project (needs recognite[wandb]).", default=None)
    report: bool = _doc("Write the HTML report for the best checkpoint at the end (needs recognite[plot]).", default=True)
    progress: bool = _doc("Show progress bars.", default=True)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the flag, the value and what is allowed."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, str(f.type), getattr(self, f.name)))
        if not self.data_csv:
            raise ValueError("--data-csv is required: a CSV file with columns for image paths and labels.")
        _positive_int("num_folds", self.num_folds, minimum=2)
        if str(self.val_fold) != "all":
            try:
                fold = int(self.val_fold)
            except ValueError:
                raise ValueError(f"--val-fold must be an integer in 0..{self.num_folds - 1} or 'all', got {self.val_fold!r}.") from None
            if not 0 <= fold < self.num_folds:
                raise ValueError(f"--val-fold must be in 0..{self.num_folds - 1} (num_folds={self.num_folds}) or 'all', got {fold}.")
        self.val_fold = str(self.val_fold)
        _positive_int("num_refs", self.num_refs)
        check_model_name(self.model_name)
        _positive_int("image_size", self.image_size, minimum=8)
        if self.embedding_dim is not None:
            _positive_int("embedding_dim", self.embedding_dim)
        if self.small_input_stem:
            if not self.model_name.startswith(SMALL_INPUT_STEM_FAMILIES):
                raise ValueError(f"--small-input-stem applies to ResNet-family models (resnet*, resnext*, "
                                 f"wide_resnet*), not --model-name {self.model_name}.")
            if self.weights is not None:
                raise ValueError(f"--small-input-stem replaces the first convolution, so pretrained --weights "
                                 f"{self.weights} would not fit it: train from scratch (no --weights).")
        self.rrc_scale = _pair("rrc_scale", self.rrc_scale, 0.0, 1.0)
        self.rrc_ratio = _pair("rrc_ratio", self.rrc_ratio, 0.0, math.inf)
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"--hflip is a probability in [0, 1], got {self.hflip}.")
        if not 0.0 <= self.content_margin <= 1.0:
            raise ValueError(f"--content-margin is a fraction of the content box in [0, 1], got {self.content_margin}.")
        if not 0.0 <= self.affine_degrees <= 180.0 or not 0.0 <= self.affine_shear < 90.0:
            raise ValueError(f"Need 0 <= --affine-degrees <= 180 and 0 <= --affine-shear < 90, got {self.affine_degrees} and {self.affine_shear}.")
        if not 0.0 <= self.affine_translate <= 1.0:
            raise ValueError(f"--affine-translate is a fraction of the image side in [0, 1], got {self.affine_translate}.")
        self.affine_scale = _pair("affine_scale", self.affine_scale, 0.0, math.inf)
        if not 0.0 <= self.elastic_magnitude <= 1.0:
            raise ValueError(f"--elastic-magnitude is a fraction of the image side in [0, 1], got {self.elastic_magnitude}.")
        _positive_int("elastic_grid", self.elastic_grid, minimum=2)
        _choice("loss", self.loss, LOSSES)
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}.")
        if self.margin < 0 or self.scale <= 0:
            raise ValueError(f"--margin must be >= 0 and --scale > 0, got {self.margin} and {self.scale}.")
        _positive_int("num_subcenters", self.num_subcenters)
        _positive_int("batch_size", self.batch_size)
        _positive_int("val_batch_size", self.val_batch_size)
        _choice("sampler", self.sampler, SAMPLERS)
        _positive_int("pk_k", self.pk_k)
        if self.sampler == "pk" and (self.batch_size % self.pk_k or self.batch_size // self.pk_k < 2):
            raise ValueError(f"--batch-size ({self.batch_size}) must be a multiple of --pk-k ({self.pk_k}) with at least 2 labels per batch.")
        _positive_int("num_workers", self.num_workers, minimum=0)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"Need --lr > 0, --weight-decay >= 0 and 0 <= --momentum < 1; got {self.lr}, {self.weight_decay}, {self.momentum}.")
        _positive_int("epochs", self.epochs)
        if self.warmup_epochs < 0:
            raise ValueError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}.")
        _positive_int("max_steps_per_epoch", self.max_steps_per_epoch, minimum=0)
        _choice("metric", self.metric, METRICS)
        _choice("checkpoint_metric", self.checkpoint_metric, CHECKPOINT_METRICS)
        _choice("threshold_method", self.threshold_method, THRESHOLD_METHODS)
        if not 0 < self.target_far < 1:
            raise ValueError(f"--target-far must be in (0, 1), got {self.target_far}.")
        _choice("device", self.device, DEVICES)
        _choice("amp", self.amp, AMP_MODES)
        self.frozen_layers = list(self.frozen_layers)

    def affine(self) -> RandomAffineOnBorder | None:
        """The training random affine these options describe, or ``None`` when all are off."""
        if not (self.affine_degrees or self.affine_translate or self.affine_shear or self.affine_scale != (1.0, 1.0)):
            return None
        return RandomAffineOnBorder(self.affine_degrees, self.affine_translate, self.affine_scale, self.affine_shear)

    def elastic(self) -> RandomElasticOnBorder | None:
        """The training elastic distortion these options describe, or ``None`` when it is off."""
        return RandomElasticOnBorder(self.elastic_magnitude, self.elastic_grid) if self.elastic_magnitude else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rrc_scale"] = list(self.rrc_scale)
        d["rrc_ratio"] = list(self.rrc_ratio)
        d["affine_scale"] = list(self.affine_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown}; allowed keys: {sorted(names)}.")
        d = dict(d)
        for key in ("rrc_scale", "rrc_ratio", "affine_scale"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a dict of field values (keys may use dashes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"Config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option names to values, got {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    check_int(value, name, minimum=minimum, message=f"{_flag(name)} must be an integer >= {minimum}, got {value!r}.")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}.")


def _pair(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{_flag(name)} takes two numbers (min max), got {value!r}.") from None
    if not (low < a <= b <= high):
        raise ValueError(f"{_flag(name)} needs {low} < min <= max <= {high}, got {a} {b}.")
    return a, b


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """``value`` of a config field as its annotated type, or a ``ValueError`` naming the flag.

    Strings from a config file are read as what they spell for booleans (``"no"`` is false), a
    single string for a list field is a one-item list; anything else of the wrong type is refused
    instead of surfacing later as a Python error.
    """
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise InvalidTypeError(f"{_flag(name)} must be true or false, got {value!r}.")
    if base == "int":
        return check_int(value, name, message=f"{_flag(name)} must be an integer, got {value!r}.")
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidTypeError(f"{_flag(name)} must be a number, got {value!r}.")
        return float(value)
    if base == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidTypeError(f"{_flag(name)} must be a string, got {value!r}.")
        return str(value)
    if base == "list[str]":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidTypeError(f"{_flag(name)} must be a list of strings, got {value!r}.")
        return list(value)
    return value
