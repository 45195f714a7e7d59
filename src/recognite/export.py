"""Export a recognizer's embedding graph to ONNX or TorchScript, with a parity check.

The exported graph takes *preprocessed* images ``images: (N, 3, S, S)`` float32 (resized,
centre-cropped, scaled to [0, 1] and normalized with the bundle's mean/std, see
:attr:`recognite.bundle.Bundle.transform`) and returns L2-normalized embeddings
``embeddings: (N, D)``. The batch size N is dynamic. The preprocessing, image size and any other
metadata given are stored in the file (ONNX ``metadata_props``; TorchScript extra file
``recognite.json``).

ONNX needs the optional dependencies ``onnx`` and ``onnxruntime`` (``pip install 'recognite[onnx]'``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recognite._atomic import atomic_path
from recognite.utils.validate import check_int

__all__ = [
    "DEFAULT_ATOL",
    "EXPORT_FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "EmbeddingGraph",
    "ExportMismatchError",
    "check_export",
    "export_onnx",
    "export_torchscript",
    "import_onnx",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
#: Largest max-abs difference to PyTorch that :func:`check_export` accepts by default.
DEFAULT_ATOL = {"onnx": 1e-4, "torchscript": 1e-5}
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
_METADATA_FILE = "recognite.json"
_EXPORT_BATCH = 2
_EPS = 1e-12


class ExportMismatchError(ValueError):
    """The exported graph's output differs from PyTorch by more than the tolerance."""


class EmbeddingGraph(nn.Module):
    """``(N, 3, S, S)`` preprocessed images → ``(N, D)`` L2-normalized embeddings.

    Wraps a :class:`~recognite.model.Recognizer` (its ``embed``) or any module returning
    ``(N, D)``, and always L2-normalizes (a no-op up to rounding for normalizing models).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embed = getattr(self.model, "embed", None)
        out = embed(images) if embed is not None else self.model(images)
        if getattr(self.model, "normalize", False):
            return out  # Recognizer.embed already L2-normalizes
        return F.normalize(out, dim=1, eps=_EPS)


def _check_image_size(image_size: Any) -> int:
    return check_int(image_size, "image_size", minimum=1,
                     message=f"image_size must be a positive integer (the network input side), got {image_size!r}.")


def _check_format(format: Any) -> str:
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    return format


def _device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _example_input(model: nn.Module, image_size: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return x.to(_device(model))


def import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError("ONNX export needs the optional dependencies onnx and onnxruntime: "
                          "pip install 'recognite[onnx]'") from exc
    return onnx, onnxruntime


def _metadata_strings(metadata: dict[str, Any] | None, image_size: int) -> dict[str, str]:
    values = {"image_size": image_size, "input": INPUT_NAME, "output": OUTPUT_NAME, **(metadata or {})}
    try:
        return {str(k): json.dumps(v, allow_nan=False) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serializable: {exc}") from exc


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int,
    opset: int = 17,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export the embedding graph of ``model`` to an ONNX file (dynamic batch size).

    Uses torch's TorchScript-based ONNX exporter (``dynamo=False``), which needs no extra
    packages beyond ``onnx``; the file is written atomically.

    Args:
        model: A :class:`~recognite.model.Recognizer` (or a module returning ``(N, D)``).
        path: Output ``.onnx`` file.
        image_size: Side S of the square input ``(N, 3, S, S)``.
        opset: ONNX opset version.
        metadata: JSON-serializable values stored as ``metadata_props`` (JSON strings), e.g.
            the preprocessing; ``image_size``, ``input`` and ``output`` names are always stored.

    Returns:
        The written file.

    Raises:
        ImportError: onnx / onnxruntime are not installed.
        ValueError: Bad ``image_size`` / ``opset`` / metadata.
    """
    onnx, _ = import_onnx()
    image_size = _check_image_size(image_size)
    check_int(opset, "opset", minimum=9, message=f"opset must be an integer >= 9, got {opset!r}.")
    props = _metadata_strings(metadata, image_size)
    graph = EmbeddingGraph(model)
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with _eval_mode(model), torch.no_grad(), atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            (_example_input(model, image_size, _EXPORT_BATCH),),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            **kwargs,
        )
        proto = onnx.load(str(tmp))
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    logger.info("Exported ONNX model to %s", path)
    return Path(path)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Trace the embedding graph of ``model`` and save it as TorchScript (dynamic batch size).

    Load it with ``torch.jit.load(path)``; the metadata is in the extra file ``recognite.json``
    (``torch.jit.load(path, _extra_files={"recognite.json": ""})``).

    Args:
        model: A :class:`~recognite.model.Recognizer` (or a module returning ``(N, D)``).
        path: Output file (``.pt`` suggested).
        image_size: Side S of the square input ``(N, 3, S, S)``.
        metadata: JSON-serializable values stored in ``recognite.json``.

    Returns:
        The written file.
    """
    image_size = _check_image_size(image_size)
    props = _metadata_strings(metadata, image_size)
    extra = {_METADATA_FILE: json.dumps({k: json.loads(v) for k, v in props.items()})}
    graph = EmbeddingGraph(model)
    with _eval_mode(model), torch.no_grad(), atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        traced = torch.jit.trace(graph, (_example_input(model, image_size, _EXPORT_BATCH),), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files=extra)
    logger.info("Exported TorchScript model to %s", path)
    return Path(path)


def _run_exported(path: Path, format: str, x: torch.Tensor) -> torch.Tensor:
    if format == "onnx":
        _, ort = import_onnx()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})
        return torch.from_numpy(out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        loaded = torch.jit.load(str(path), map_location=x.device)
    loaded.eval()
    with torch.no_grad():
        return loaded(x).cpu()


def check_export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str,
    image_size: int,
    atol: float | None = None,
    batch_size: int = 3,
    seed: int = 0,
) -> float:
    """Compare an exported file with PyTorch on random inputs.

    Runs ``batch_size`` random images (a batch size other than the export's, so the dynamic
    batch axis is exercised) through the exported file (onnxruntime on CPU, or
    ``torch.jit.load``) and through ``model``, and returns the largest absolute difference of
    the embeddings.

    Args:
        model: The model the file was exported from.
        path: The exported file.
        format: ``'onnx'`` or ``'torchscript'``.
        image_size: Side S of the input.
        atol: Largest accepted difference; default :data:`DEFAULT_ATOL` (1e-4 ONNX, 1e-5
            TorchScript).
        batch_size: Number of random images.
        seed: Seed of the random images (a local generator; global RNGs are untouched).

    Returns:
        The max absolute difference.

    Raises:
        ExportMismatchError: (a ValueError) The difference exceeds ``atol`` or shapes differ.
        FileNotFoundError: No such file.
        ImportError: ONNX check without onnxruntime.
    """
    format = _check_format(format)
    image_size = _check_image_size(image_size)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Exported file {str(path)!r} does not exist.")
    check_int(batch_size, "batch_size", minimum=1, message=f"batch_size must be a positive integer, got {batch_size!r}.")
    tolerance = DEFAULT_ATOL[format] if atol is None else float(atol)
    x = _example_input(model, image_size, batch_size, seed)
    with _eval_mode(model), torch.no_grad():
        expected = EmbeddingGraph(model)(x).float().cpu()
    actual = _run_exported(path, format, x).float()
    if actual.shape != expected.shape:
        raise ExportMismatchError(f"The exported {format} graph returns shape {tuple(actual.shape)} for a batch of "
                                  f"{batch_size}, PyTorch {tuple(expected.shape)}.")
    diff = float((actual - expected).abs().max())
    if not diff <= tolerance:
        raise ExportMismatchError(f"The exported {format} graph differs from PyTorch by {diff:.3g} (max abs), more "
                                  f"than the tolerance {tolerance:g}.")
    logger.info("%s parity check: max abs difference %.3g (tolerance %g) on a batch of %d", format, diff, tolerance, batch_size)
    return diff
