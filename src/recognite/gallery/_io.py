"""On-disk format of a gallery: one safetensors file with JSON metadata in its header.

Tensors: ``embeddings`` (G, D) float32, ``label_codes`` (G,) int64, ``label_bytes`` (UTF-8 of
all labels) with ``label_offsets`` (L + 1,) int64, and when references have ids ``id_bytes`` with
``id_offsets`` (G + 1,). The header entry ``recognite_gallery`` holds a JSON object with the
format name and version, the counts, the aggregation and backend settings and a SHA-256 of every
tensor, so that a changed, truncated or mismatched file is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from recognite._atomic import atomic_path

FORMAT_NAME = "recognite.gallery"
FORMAT_VERSION = 1
METADATA_KEY = "recognite_gallery"
DEFAULT_FILENAME = "gallery.safetensors"


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A folder means ``<folder>/gallery.safetensors``; anything else is the file itself."""
    path = Path(path)
    return path / DEFAULT_FILENAME if path.is_dir() else path


def encode_strings(strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of all strings (uint8) and (len + 1,) int64 offsets into them."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.long)
    if encoded:
        offsets[1:] = torch.cumsum(torch.tensor([len(b) for b in encoded], dtype=torch.long), 0)
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if offsets[-1] > 0 else torch.zeros(0, dtype=torch.uint8)
    return data, offsets


def decode_strings(data: torch.Tensor, offsets: torch.Tensor, what: str, path: Path) -> list[str]:
    """Inverse of :func:`encode_strings`; raises ValueError on inconsistent offsets."""
    if offsets.ndim != 1 or offsets.numel() < 1 or int(offsets[0]) != 0:
        raise ValueError(f"Gallery file {path} is corrupt: {what} offsets are malformed.")
    if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) != data.numel():
        raise ValueError(
            f"Gallery file {path} is corrupt: {what} offsets do not match the "
            f"{data.numel()} stored bytes."
        )
    raw = data.numpy().tobytes()
    bounds = offsets.tolist()
    try:
        return [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
    except UnicodeDecodeError as err:
        raise ValueError(f"Gallery file {path} is corrupt: {what} are not valid UTF-8.") from err


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"").hexdigest()


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors + metadata atomically (temporary file in the same folder, then replace)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = dict(metadata, sha256={name: _digest(t) for name, t in tensors.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def read_file(path: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata; refuse files that are not (intact) recognite galleries.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable/truncated file, missing or foreign metadata, unsupported format
            version, or (with ``verify``) a tensor whose SHA-256 differs from the recorded one.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"No gallery file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:  # safetensors raises its own error type for corrupt files
        raise ValueError(
            f"Gallery file {path} cannot be read (truncated or not a safetensors file): {err}"
        ) from err
    if METADATA_KEY not in header:
        raise ValueError(
            f"File {path} is a safetensors file but not a recognite gallery "
            f"(no {METADATA_KEY!r} metadata)."
        )
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"Gallery file {path} is corrupt: its metadata is not valid JSON.") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"File {path} is not a recognite gallery (format {metadata.get('format') if isinstance(metadata, dict) else None!r}).")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Gallery file {path} has format version {metadata.get('format_version')!r}; "
            f"this recognite reads version {FORMAT_VERSION}."
        )
    if verify:
        recorded = metadata.get("sha256", {})
        if set(recorded) != set(tensors):
            raise ValueError(
                f"Gallery file {path} is corrupt: it holds tensors {sorted(tensors)} but its "
                f"metadata lists {sorted(recorded)}."
            )
        for name, tensor in tensors.items():
            if _digest(tensor) != recorded[name]:
                raise ValueError(
                    f"Gallery file {path} was modified after it was written: the checksum of "
                    f"tensor {name!r} does not match its metadata."
                )
    return tensors, metadata
