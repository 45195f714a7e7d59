"""Model bundles: a trained recognizer saved as a folder that loads without running pickled code.

A bundle folder holds two files:

- ``model.safetensors``: the :class:`~recognite.model.Recognizer` state dict (safetensors, so
  loading it runs no code from the file);
- ``bundle.json``: the format version, the model config (``model_name``, ``embedding_dim``,
  ``normalize``, ``num_classes``, ``bias``, ``num_subcenters``, builder ``model_kwargs``), the
  preprocessing, the network input side ``image_size``, the training label names, the calibrated
  open-set ``threshold`` (a cosine similarity), free-form ``metadata`` and the SHA-256 of the
  weights file, so that a modified or truncated weights file is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recognite.model.backbones import Preprocessing
from recognite.model.recognizer import Recognizer

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Bundle",
    "bundle_from_checkpoint",
    "load_bundle",
    "resolve_device",
    "save_bundle",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "recognite.bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
_MAX_LISTED = 5


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``'auto'`` → CUDA when available, else CPU; anything else → ``torch.device``.

    Raises:
        ValueError: An unknown device string, or CUDA asked for on a machine without it.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for, but CUDA is not available on this machine; use 'cpu' or 'auto'.")
    return resolved


@dataclass
class Bundle:
    """A loaded model bundle.

    Attributes:
        model: The :class:`~recognite.model.Recognizer`, in eval mode, on the requested device.
        preprocessing: Mean / std / resize proportion / interpolation the model expects.
        image_size: Side S of the square network input; images are fed as ``(N, 3, S, S)``.
        threshold: Calibrated open-set threshold (cosine similarity; accept when the best score
            is ``>= threshold``), or ``None`` when the bundle has none.
        label_names: Names of the training classes (index = classifier output), or ``None``.
        metadata: Free-form information saved with the bundle (e.g. the training config).
        path: The bundle folder.
        weights_sha256: SHA-256 of ``model.safetensors`` (identifies the model).
    """

    model: Recognizer
    preprocessing: Preprocessing
    image_size: int
    threshold: float | None = None
    label_names: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    weights_sha256: str | None = None

    @property
    def transform(self) -> Callable:
        """Evaluation transform: PIL image → ``(3, image_size, image_size)`` normalized tensor."""
        from recognite.data.transforms import eval_transform

        return eval_transform(self.preprocessing, self.image_size)

    @property
    def embedding_dim(self) -> int:
        """Embedding dimension D."""
        return self.model.embedding_dim

    def embed(self, paths: Sequence[str | os.PathLike], batch_size: int = 64, num_workers: int = 0,
              progress: bool = False) -> torch.Tensor:
        """Embed image files with this bundle's model and transform.

        Returns:
            ``(N, D)`` float32 embeddings on the CPU (L2-normalized when the model normalizes).
        """
        from recognite.embedding import embed_images

        return embed_images(self.model, paths, self.transform, batch_size=batch_size,
                            num_workers=num_workers, progress=progress)


# --- saving ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (the network input side in pixels), got {image_size!r}.")
    return int(image_size)


def _check_threshold(threshold: Any) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
            threshold = float(threshold)
        else:
            raise TypeError(f"threshold must be a number or None, got {type(threshold).__name__} {threshold!r}.")
    value = float(threshold)
    if value == -math.inf:  # accepts every query: the same as no threshold
        return None
    if not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number (a cosine similarity) or None, got {value!r}.")
    return value


def _check_label_names(label_names: Any, num_classes: int | None) -> list[str] | None:
    if label_names is None:
        return None
    if isinstance(label_names, (str, bytes)) or not isinstance(label_names, Sequence):
        raise TypeError(f"label_names must be a sequence of strings or None, got {type(label_names).__name__}.")
    names = [str(name) for name in label_names]
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"label_names has {len(names)} entries but the model's classifier has num_classes={num_classes}.")
    return names


def _json_ready(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serializable (plain dicts, lists, strings, finite numbers): {exc}") from exc


def _model_kwargs(model: Recognizer, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        model_kwargs = getattr(model, "model_kwargs", None) or model.config().get("model_kwargs") or {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}.")
    return _json_ready(dict(model_kwargs), "model_kwargs")


def _state_for_saving(model: Recognizer) -> dict[str, torch.Tensor]:
    # Clones break storage sharing (safetensors refuses shared tensors) and leave the model as is.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def _install_folder(tmp_dir: Path, path: Path) -> None:
    """Move the finished ``tmp_dir`` to ``path``, replacing an earlier bundle there."""
    if not path.exists():
        os.replace(tmp_dir, path)
        return
    if path.is_dir() and not any(path.iterdir()):
        os.rmdir(path)
        os.replace(tmp_dir, path)
        return
    if not (path.is_dir() and (path / BUNDLE_FILE).is_file()):
        raise FileExistsError(f"Cannot write the bundle to {str(path)!r}: it exists and is not a model bundle "
                              "(no bundle.json); choose a new folder.")
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, old / path.name)
    try:
        os.replace(tmp_dir, path)
    except BaseException:
        os.replace(old / path.name, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_bundle(
    model: Recognizer,
    path: str | os.PathLike,
    image_size: int,
    threshold: float | None = None,
    label_names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a bundle folder (written to a temporary folder, then renamed).

    Args:
        model: A :class:`~recognite.model.Recognizer` (its classifier, if any, is saved too).
        path: The bundle folder. It must not exist, be empty, or be an earlier bundle (replaced).
        image_size: Side S of the square network input the model was trained / validated at.
        threshold: Open-set threshold on the cosine similarity (``-inf`` is stored as ``None``).
        label_names: Training class names, one per classifier output class.
        metadata: Any JSON-serializable dict, stored as is (e.g. the training config).
        model_kwargs: Keyword arguments the torchvision builder needs to rebuild the network
            (e.g. ``{"image_size": 384}`` for a ViT); default: ``model.model_kwargs`` if present.

    Returns:
        The bundle folder.

    Raises:
        TypeError: ``model`` is not a Recognizer, or arguments of the wrong type.
        ValueError: Bad ``image_size`` / ``threshold``, ``label_names`` that do not match
            ``num_classes``, metadata that is not JSON-serializable.
        FileExistsError: ``path`` is a non-empty folder or file that is not a bundle.
    """
    from safetensors.torch import save_file

    if not isinstance(model, Recognizer):
        raise TypeError(f"model must be a recognite.model.Recognizer, got {type(model).__name__}.")
    image_size = _check_image_size(image_size)
    threshold = _check_threshold(threshold)
    config = model.config()
    names = _check_label_names(label_names, config["num_classes"])
    metadata = _json_ready(dict(metadata or {}), "metadata")
    kwargs = _model_kwargs(model, model_kwargs)

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp."))
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private (0700); a bundle is meant to be shared
        weights_path = tmp_dir / WEIGHTS_FILE
        save_file(_state_for_saving(model), str(weights_path), metadata={"format": BUNDLE_FORMAT})
        from recognite import __version__

        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "recognite_version": __version__,
            "model": {
                "model_name": config["model_name"],
                "embedding_dim": config["embedding_dim"],
                "normalize": config["normalize"],
                "num_classes": config["num_classes"],
                "bias": config["bias"],
                "num_subcenters": config["num_subcenters"],
                "model_kwargs": kwargs,
            },
            "preprocessing": config["preprocessing"],
            "image_size": image_size,
            "threshold": threshold,
            "threshold_metric": "cosine",
            "label_names": names,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256(weights_path),
            "metadata": metadata,
        }
        with open(tmp_dir / BUNDLE_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, allow_nan=False)
            f.write("\n")
        _install_folder(tmp_dir, path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Saved model bundle %s (%s, embedding_dim %d)", path, config["model_name"], config["embedding_dim"])
    return path


# --- loading --------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise FileNotFoundError(f"Model bundle {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise ValueError(f"A model bundle is a folder (holding {BUNDLE_FILE} and {WEIGHTS_FILE}); {str(folder)!r} is a file.")
    manifest_path = folder / BUNDLE_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a model bundle: {BUNDLE_FILE} is missing.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{manifest_path} is not a recognite bundle manifest (format is not {BUNDLE_FORMAT!r}).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
        raise ValueError(f"{manifest_path} has bundle format version {version!r}; this recognite reads up to "
                         f"{BUNDLE_FORMAT_VERSION}. Upgrade recognite.")
    missing = [k for k in ("model", "preprocessing", "image_size", "weights_sha256") if k not in manifest]
    if missing:
        raise ValueError(f"{manifest_path} lacks the entries {missing}.")
    return manifest


def _describe_mismatch(model: Recognizer, state: dict[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
            problems.append(f"{what} {items[:_MAX_LISTED]}{more}")
    return problems


def load_bundle(path: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True) -> Bundle:
    """Load a bundle written by :func:`save_bundle`.

    Args:
        path: The bundle folder.
        device: Where to put the model: ``None``/``'auto'`` (CUDA when available), ``'cpu'``,
            ``'cuda'``...
        verify: Check the SHA-256 of the weights file against ``bundle.json``.

    Returns:
        A :class:`Bundle` whose model is in eval mode.

    Raises:
        FileNotFoundError: The folder, ``bundle.json`` or the weights file is missing.
        ValueError: Unreadable manifest, modified weights (checksum mismatch), or weights that
            do not fit the architecture named in ``bundle.json`` (the message names the mismatch).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    manifest = _read_manifest(folder)
    weights_path = folder / str(manifest.get("weights_file", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise FileNotFoundError(f"Model bundle {str(folder)!r} is incomplete: the weights file {weights_path.name} is missing.")
    digest = _sha256(weights_path)
    if verify and digest != manifest["weights_sha256"]:
        raise ValueError(f"The weights file {weights_path} does not match the SHA-256 recorded in {BUNDLE_FILE} "
                         f"(expected {manifest['weights_sha256'][:16]}..., found {digest[:16]}...): it was modified "
                         "or truncated after the bundle was saved.")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"Could not read the weights file {weights_path}: {exc}") from exc

    spec = manifest["model"]
    model_name = spec.get("model_name")
    try:
        model = Recognizer(
            model_name,
            num_classes=spec.get("num_classes"),
            weights=None,
            bias=bool(spec.get("bias", False)),
            normalize=bool(spec.get("normalize", True)),
            num_subcenters=int(spec.get("num_subcenters", 1)),
            **(spec.get("model_kwargs") or {}),
        )
    except TypeError as exc:
        raise ValueError(f"{BUNDLE_FILE} in {folder} describes a model that cannot be built: {exc}") from exc
    problems = _describe_mismatch(model, state)
    if problems:
        raise ValueError(f"The weights in {weights_path} do not fit the architecture {model_name!r} named in "
                         f"{BUNDLE_FILE}: {'; '.join(problems)}.")
    model.load_state_dict(state)
    expected_dim = spec.get("embedding_dim")
    if expected_dim is not None and expected_dim != model.embedding_dim:
        raise ValueError(f"{BUNDLE_FILE} says embedding_dim={expected_dim}, but {model_name!r} gives {model.embedding_dim}.")
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    model.preprocessing = preprocessing
    model.to(resolve_device(device)).eval()
    threshold = manifest.get("threshold")
    return Bundle(
        model=model,
        preprocessing=preprocessing,
        image_size=_check_image_size(manifest["image_size"]),
        threshold=None if threshold is None else float(threshold),
        label_names=manifest.get("label_names"),
        metadata=manifest.get("metadata") or {},
        path=folder,
        weights_sha256=digest,
    )


# --- from a training checkpoint -------------------------------------------------------------


def _threshold_as_cosine(threshold: float | None, train_config: dict[str, Any], normalize: bool) -> float | None:
    """Convert a threshold calibrated with the training ``metric`` to a cosine similarity.

    For unit-norm embeddings: inner = cosine, euclid = -sqrt(2 - 2 cos), sq_euclid = -(2 - 2 cos).
    """
    if threshold is None:
        return None
    t = float(threshold)
    if math.isnan(t) or t == -math.inf:  # none calibrated, or "accept everything"
        return None
    metric = train_config.get("metric", "cosine")
    if metric == "cosine":
        return float(threshold)
    if not normalize or train_config.get("avg_refs", False):
        logger.warning("The checkpoint's threshold was calibrated with metric %r on %s embeddings; it cannot be "
                       "converted to a cosine similarity, so the bundle gets no threshold (pass --threshold to "
                       "recognize).", metric, "averaged reference" if normalize else "unnormalized")
        return None
    if metric == "inner":
        return t
    if metric == "euclid":
        return 1.0 - t * t / 2.0
    if metric == "sq_euclid":
        return 1.0 + t / 2.0
    logger.warning("Unknown training metric %r: the bundle gets no threshold.", metric)
    return None


def bundle_from_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike,
                           image_size: int | None = None) -> Path:
    """Make a bundle from a training checkpoint (``best.pt`` / ``last.pt`` of ``recognite train``).

    The model config, weights, label names and calibrated threshold come from the checkpoint;
    the image size from its training config. A threshold calibrated with a distance metric on
    unit-norm embeddings is converted to the equivalent cosine similarity.

    Args:
        checkpoint_path: The training checkpoint (read with ``torch.load(weights_only=True)``).
        out_dir: The bundle folder to write.
        image_size: Override the training image size.

    Returns:
        The bundle folder.

    Raises:
        FileNotFoundError: No such checkpoint.
        ValueError: Not a recognite training checkpoint, or weights that do not fit its config.
    """
    from recognite.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_path)
    model_config = state.get("model_config")
    if not isinstance(model_config, dict) or "model_name" not in model_config:
        raise ValueError(f"{checkpoint_path} has no 'model_config' with a model_name: it was not written by recognite train.")
    train_config = state.get("config") or {}
    if image_size is None:
        image_size = train_config.get("image_size")
        if image_size is None:
            raise ValueError(f"{checkpoint_path} records no image_size in its training config; pass image_size.")
    kwargs = dict(model_config.get("model_kwargs") or {})
    model = Recognizer(
        model_config["model_name"],
        num_classes=model_config.get("num_classes"),
        weights=None,
        bias=bool(model_config.get("bias", False)),
        normalize=bool(model_config.get("normalize", True)),
        num_subcenters=int(model_config.get("num_subcenters", 1)),
        **kwargs,
    )
    weights = state["model"]
    if isinstance(weights, dict) and weights and all(k.startswith("module.") for k in weights):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    problems = _describe_mismatch(model, weights)
    if problems:
        raise ValueError(f"The weights in {checkpoint_path} do not fit {model_config['model_name']!r}: {'; '.join(problems)}.")
    model.load_state_dict(weights)
    if "preprocessing" in model_config:
        model.preprocessing = Preprocessing.from_dict(model_config["preprocessing"])
    # The validation row of the checkpoint's own epoch: last.pt holds the best epoch's threshold
    # in state["threshold"], but the weights of the last epoch.
    row = next((r for r in state.get("history") or [] if isinstance(r, dict) and r.get("epoch") == state.get("epoch")), None)
    raw_threshold = row["threshold"] if row is not None and row.get("threshold") is not None else state.get("threshold")
    threshold = _threshold_as_cosine(raw_threshold, train_config, model.normalize)
    metadata = {
        "source_checkpoint": os.path.abspath(os.fspath(checkpoint_path)),
        "epoch": state.get("epoch"),
        "train_config": train_config,
        "validation": row,
    }
    return save_bundle(model, out_dir, int(image_size), threshold=threshold, label_names=state.get("label_names"),
                       metadata=_json_safe(metadata), model_kwargs=kwargs)


def _json_safe(value: Any) -> Any:
    """Replace what JSON cannot hold (NaN/inf, tensors, tuples) by JSON-friendly values."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # NumPy scalars
        return _json_safe(value.item())
    return str(value)
