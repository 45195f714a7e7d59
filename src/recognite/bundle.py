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

from recognite._atomic import FILE_MODE, atomic_write_text
from recognite._bundle_files import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    WEIGHTS_FILE,
    config_digest,
    read_manifest,
    sha256_file,
)
from recognite.checkpoint import checkpoint_threshold, epoch_row, load_checkpoint
from recognite.model.recognizer import Recognizer, load_bundle_model
from recognite.preprocessing import MAX_SIDE, Preprocessing
from recognite.utils.device import resolve_device
from recognite.utils.reranking import Reranking
from recognite.utils.validate import check_cosine_threshold, check_int, check_threshold
from recognite.utils.views import EnrolmentAugmentation, ViewSpec

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Bundle",
    "bundle_from_checkpoint",
    "bundle_from_pretrained",
    "write_threshold",
    "load_bundle",
    "resolve_device",
    "save_bundle",
]

logger = logging.getLogger(__name__)



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
        test_time_augmentation: The views whose mean embedding :meth:`embed` computes
            (:class:`~recognite.utils.views.ViewSpec`), or ``None`` (the image alone).
        enrolment_augmentation: How :meth:`embed_references` enrols each reference image
            (:class:`~recognite.utils.views.EnrolmentAugmentation`: its views, scored by the best
            one or their mean), or ``None`` (as a query).
        reranking: The re-ranking ``recognize`` and ``evaluate`` apply
            (:class:`~recognite.utils.reranking.Reranking`), or ``None``.
    """

    model: Recognizer
    preprocessing: Preprocessing
    image_size: int
    threshold: float | None = None
    label_names: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    weights_sha256: str | None = None
    test_time_augmentation: ViewSpec | None = None
    enrolment_augmentation: EnrolmentAugmentation | None = None
    reranking: Reranking | None = None

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
              progress: bool = False, tta: bool = True) -> torch.Tensor:
        """Embed image files with this bundle's model and transform.

        Args:
            paths, batch_size, num_workers, progress: as in :func:`recognite.embedding.embed_images`.
            tta: Use the bundle's test-time augmentation, if it has one (False = the image alone).

        Returns:
            ``(N, D)`` float32 embeddings on the CPU (L2-normalized when the model normalizes).
        """
        from recognite.embedding import embed_images

        return embed_images(self.model, paths, self.transform, batch_size=batch_size, num_workers=num_workers,
                            progress=progress, views=self.test_time_augmentation if tta else None)

    def embed_references(self, paths: Sequence[str | os.PathLike], batch_size: int = 64, num_workers: int = 0,
                         progress: bool = False, tta: bool = True, enrol: bool = True) -> torch.Tensor:
        """Embed reference (gallery) images as they are enrolled.

        With the bundle's enrolment augmentation (and ``enrol``), each image gives ``K`` rows (its
        views, scoring ``'max'``) or one, the mean of its views (``'mean'``); otherwise one row,
        as :meth:`embed` (with ``tta``).

        Returns:
            ``(N, K, D)`` float32 embeddings on the CPU; ``K = 1`` unless scoring is ``'max'``.
        """
        from recognite.embedding import embed_images

        augmentation = self.enrolment_augmentation if enrol else None
        if augmentation is None:
            return self.embed(paths, batch_size, num_workers, progress, tta).unsqueeze(1)
        keep = augmentation.scoring == "max"
        out = embed_images(self.model, paths, self.transform, batch_size=batch_size, num_workers=num_workers,
                           progress=progress, views=augmentation.views, keep_views=keep)
        return out if keep else out.unsqueeze(1)


# --- saving ---------------------------------------------------------------------------------


def _check_image_size(image_size: Any) -> int:
    check_int(image_size, "image_size", minimum=1,
              message=f"image_size must be a positive integer (the network input side in pixels), got {image_size!r}.")
    return check_int(image_size, "image_size", maximum=MAX_SIDE)


def _check_threshold(threshold: Any) -> float | None:
    try:
        value = check_threshold(threshold)
    except ValueError as exc:
        if isinstance(exc, TypeError):
            raise
        raise ValueError(f"threshold must be a finite number (a cosine similarity) or None, got {threshold!r}.") from exc
    if value is None or value == -math.inf:  # -inf accepts every query: the same as no threshold
        return None
    if not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number (a cosine similarity) or None, got {value!r}.")
    return check_cosine_threshold(value)


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
            "weights_sha256": sha256_file(weights_path),
            "config_sha256": "",
            "metadata": metadata,
        }
        if config["neck_dim"] is not None:  # written only with a neck: other bundles keep the 0.1.0 layout
            manifest["model"]["neck_dim"] = config["neck_dim"]
        if config["small_input_stem"]:  # likewise written only when used
            manifest["model"]["small_input_stem"] = True
        manifest["config_sha256"] = config_digest(manifest)
        os.chmod(weights_path, FILE_MODE)
        with open(tmp_dir / BUNDLE_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, allow_nan=False)
            f.write("\n")
        os.chmod(tmp_dir / BUNDLE_FILE, FILE_MODE)
        _install_folder(tmp_dir, path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Saved model bundle %s (%s, embedding_dim %d)", path, config["model_name"], config["embedding_dim"])
    return path


# --- loading --------------------------------------------------------------------------------


def load_bundle(path: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True) -> Bundle:
    """Load a bundle written by :func:`save_bundle`.

    Args:
        path: The bundle folder.
        device: Where to put the model: ``None``/``'auto'`` (CUDA when available), ``'cpu'``,
            ``'cuda'``...
        verify: Check the SHA-256 of the weights file against ``bundle.json``. With ``False``
            the file is not hashed (faster for large models) and ``weights_sha256`` is the
            recorded one.

    Returns:
        A :class:`Bundle` whose model is in eval mode.

    Raises:
        FileNotFoundError: The folder, ``bundle.json`` or the weights file is missing.
        ValueError: Unreadable manifest, modified weights (checksum mismatch), or weights that
            do not fit the architecture named in ``bundle.json`` (the message names the mismatch).
    """
    folder = Path(path).expanduser()
    model, manifest, digest = load_bundle_model(folder, verify=verify)
    source = f"{folder / BUNDLE_FILE}"
    try:
        image_size = check_int(manifest["image_size"], "image_size", 1, MAX_SIDE)
        threshold = check_cosine_threshold(manifest.get("threshold"))
        views = manifest.get("test_time_augmentation")
        views = None if views is None else ViewSpec.from_dict(views, "test_time_augmentation")
        enrolment = manifest.get("enrolment_augmentation")
        enrolment = None if enrolment is None else EnrolmentAugmentation.from_dict(enrolment)
        reranking = manifest.get("reranking")
        reranking = None if reranking is None else Reranking.from_dict(reranking)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    model.to(resolve_device(device)).eval()
    return Bundle(
        model=model,
        preprocessing=model.preprocessing,
        image_size=image_size,
        threshold=threshold,
        label_names=manifest.get("label_names"),
        metadata=manifest.get("metadata") or {},
        path=folder,
        weights_sha256=digest,
        test_time_augmentation=views,
        enrolment_augmentation=enrolment,
        reranking=reranking,
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
                           image_size: int | None = None, threshold: float | None | str = "checkpoint") -> Path:
    """Make a bundle from a training checkpoint (``best.pt`` / ``last.pt`` of ``recognite train``).

    The model config, weights, label names and calibrated threshold come from the checkpoint;
    the image size from its training config. A threshold calibrated with a distance metric on
    unit-norm embeddings is converted to the equivalent cosine similarity.

    Args:
        checkpoint_path: The training checkpoint (read with ``torch.load(weights_only=True)``).
        out_dir: The bundle folder to write.
        image_size: Override the training image size.
        threshold: ``'checkpoint'`` (default): the threshold calibrated on the checkpoint's own
            epoch; otherwise this threshold (in the training metric, ``None`` for none), e.g. one
            calibrated on single-crop embeddings when validation used three crops.

    Returns:
        The bundle folder.

    Raises:
        FileNotFoundError: No such checkpoint.
        ValueError: Not a recognite training checkpoint, or weights that do not fit its config.
    """
    state = load_checkpoint(checkpoint_path)
    model_config = state.get("model_config")
    if not isinstance(model_config, dict) or "model_name" not in model_config:
        raise ValueError(f"{checkpoint_path} has no 'model_config' with a model_name: it was not written by recognite train.")
    train_config = state.get("config") or {}
    if image_size is None:
        image_size = train_config.get("image_size")
        if image_size is None:
            raise ValueError(f"{checkpoint_path} records no image_size in its training config; pass image_size.")
    model = Recognizer.from_config(model_config, source=str(checkpoint_path))
    model.load_weights(state["model"], source=str(checkpoint_path))
    # The threshold of the checkpoint's own epoch: last.pt holds the best epoch's threshold in
    # state["threshold"], but the weights of the last epoch.
    raw = checkpoint_threshold(state) if isinstance(threshold, str) and threshold == "checkpoint" else threshold
    cosine_threshold = _threshold_as_cosine(check_threshold(raw), train_config, model.normalize)
    metadata = {
        "source_checkpoint": os.path.abspath(os.fspath(checkpoint_path)),
        "epoch": state.get("epoch"),
        "train_config": train_config,
        "validation": epoch_row(state),
    }
    return save_bundle(model, out_dir, int(image_size), threshold=cosine_threshold, label_names=state.get("label_names"),
                       metadata=_json_safe(metadata), model_kwargs=model.model_kwargs)


def bundle_from_pretrained(model_name: str, weights: Any, out_dir: str | os.PathLike, image_size: int | None = None,
                           **model_kwargs: Any) -> Path:
    """Make a bundle from pretrained weights alone, without training (no threshold, no classifier).

    The fastest path to recognition: pretrained features, a gallery, and a threshold calibrated
    on the user's own labelled images (:func:`recognite.evaluate.calibrate_bundle`).

    Args:
        model_name: A supported backbone name.
        weights: What :class:`~recognite.model.Recognizer` accepts (``"DEFAULT"``, a weights
            name, a local file).
        out_dir: The bundle folder to write.
        image_size: Network input side (default: the weights' evaluation crop size).
        **model_kwargs: Passed to the network builder.

    Raises:
        ValueError: ``embedding_dim`` given (an untrained neck would be a random projection).
    """
    if model_kwargs.get("embedding_dim") is not None:
        raise ValueError("A bundle without training cannot have an embedding neck (--embedding-dim): untrained, it "
                         "would be a random projection. Train with --embedding-dim instead.")
    model_kwargs.pop("embedding_dim", None)
    model = Recognizer(model_name, weights=weights, **model_kwargs)
    size = int(image_size) if image_size is not None else model.preprocessing.crop_size
    # Where the weights came from: the name (with its tag) or the file and its SHA-256.
    metadata = {"weights_source": {"model_name": model_name, "weights": None if weights is None else str(weights),
                                   "file_sha256": model.weights_sha256}}
    return save_bundle(model, out_dir, size, threshold=None, metadata=metadata, model_kwargs=model.model_kwargs)


def write_threshold(bundle_dir: str | os.PathLike, threshold: float | None) -> Path:
    """Store a new open-set threshold (a cosine similarity) in a bundle's ``bundle.json``, atomically.

    The threshold is not covered by ``config_sha256`` (it is range-checked instead), so the
    bundle's checksums stay valid.
    """
    folder = Path(bundle_dir).expanduser()
    manifest = read_manifest(folder)
    manifest["threshold"] = _check_threshold(threshold)
    atomic_write_text(folder / BUNDLE_FILE, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return folder


def write_test_time_augmentation(bundle_dir: str | os.PathLike, views: ViewSpec | None) -> Path:
    """Store (or, with ``None``, remove) a bundle's test-time augmentation, atomically.

    It changes every embedding the bundle computes, so it is covered by ``config_sha256``, which
    is recomputed; calibrate the threshold again afterwards (``recognite calibrate``), on
    embeddings made the same way.
    """
    _check_flips(bundle_dir, views, "test-time views")
    return _write_covered_entry(bundle_dir, "test_time_augmentation",
                                None if views is None or views.num_views == 1 else views.to_dict())


def _check_flips(bundle_dir: str | os.PathLike, views: ViewSpec | None, what: str) -> None:
    """Refuse mirrored views for a bundle whose training config records no horizontal flips."""
    if views is None or not views.hflip:
        return
    train_config = (read_manifest(Path(bundle_dir).expanduser()).get("metadata") or {}).get("train_config") or {}
    if float(train_config.get("hflip", 1.0) or 0.0) == 0.0:
        raise ValueError(f"{what} with hflip=True: this bundle's model was trained without horizontal flips "
                         f"(train_config hflip = {train_config.get('hflip')}), so mirror images are not the same "
                         f"label to it (text, logos, characters). Leave hflip off.")


def _write_covered_entry(bundle_dir: str | os.PathLike, key: str, value: dict[str, Any] | None) -> Path:
    """Set (or, with ``None``, remove) an entry of ``bundle.json`` that ``config_sha256`` covers,
    recompute the digest and write the manifest atomically."""
    folder = Path(bundle_dir).expanduser()
    manifest = read_manifest(folder)
    if value is None:
        manifest.pop(key, None)
    else:
        manifest[key] = value
    manifest["config_sha256"] = config_digest(manifest)
    atomic_write_text(folder / BUNDLE_FILE, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return folder


def write_enrolment_augmentation(bundle_dir: str | os.PathLike, augmentation: EnrolmentAugmentation | None) -> Path:
    """Store (or, with ``None``, remove) a bundle's enrolment augmentation, atomically.

    It changes the gallery rows the bundle enrols, so it is covered by ``config_sha256``, which is
    recomputed; galleries built before keep their rows until they are built again.
    """
    _check_flips(bundle_dir, None if augmentation is None else augmentation.views, "enrolment views")
    return _write_covered_entry(bundle_dir, "enrolment_augmentation",
                                None if augmentation is None else augmentation.to_dict())


def write_reranking(bundle_dir: str | os.PathLike, reranking: Reranking | None) -> Path:
    """Store (or, with ``None`` or nothing active, remove) a bundle's re-ranking, atomically.

    It changes what ``recognize`` and ``evaluate`` answer, so it is covered by ``config_sha256``,
    which is recomputed.
    """
    return _write_covered_entry(bundle_dir, "reranking",
                                None if reranking is None or not reranking.active else reranking.to_dict())


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
