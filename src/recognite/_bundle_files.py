"""The bundle folder format (foundation layer): file names, the manifest and the weights file.

Reading a bundle's files needs no model code, so :class:`recognite.model.Recognizer` (which
builds the network) and :mod:`recognite.bundle` (which adds preprocessing, threshold and label
names) both read through here, and neither imports the other's layer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUNDLE_FILE",
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "check_config_digest",
    "config_digest",
    "read_manifest",
    "read_weights",
    "sha256_file",
]

BUNDLE_FORMAT = "recognite.bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed ``bundle.json`` of ``folder``, with its format checked.

    Raises:
        FileNotFoundError: No such folder, or no ``bundle.json`` in it.
        ValueError: A file instead of a folder, invalid JSON, another format, a newer version or
            missing entries (each message names the file).
    """
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
    if not isinstance(manifest["model"], dict):
        raise ValueError(f"{manifest_path}: 'model' must be an object, got {manifest['model']!r}.")
    return manifest


def check_config_digest(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a ``bundle.json`` whose covered entries changed since it was saved (0.1.0 bundles,
    which record no ``config_sha256``, are accepted)."""
    recorded = manifest.get("config_sha256")
    if recorded and recorded != config_digest(manifest):
        raise ValueError(f"{folder / BUNDLE_FILE} was edited after the bundle was saved: its model, preprocessing, "
                         "image_size or label_names no longer match its config_sha256. Restore it, or save a new "
                         "bundle.")


def config_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of what in ``bundle.json`` changes predictions besides the threshold (which is
    range-checked instead): the model config, the preprocessing, the image size and the label
    names, and the test-time and enrolment augmentations and the re-ranking when the bundle has
    them, as canonical JSON."""
    covered = {key: manifest.get(key) for key in ("model", "preprocessing", "image_size", "label_names")}
    for optional in ("test_time_augmentation", "enrolment_augmentation", "reranking"):
        if manifest.get(optional) is not None:  # covered when present: other bundles keep their digest
            covered[optional] = manifest[optional]
    return hashlib.sha256(json.dumps(covered, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


def read_weights(folder: Path, manifest: dict[str, Any], verify: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of the bundle's weights file and its SHA-256.

    Args:
        folder: The bundle folder.
        manifest: Its manifest (:func:`read_manifest`).
        verify: Hash the file and compare with the manifest. With ``False`` the file is not hashed
            and the returned digest is the one the manifest records.

    Raises:
        FileNotFoundError: The weights file is missing.
        ValueError: Checksum mismatch, or an unreadable (corrupt) safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = folder / str(manifest.get("weights_file", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise FileNotFoundError(f"Model bundle {str(folder)!r} is incomplete: the weights file {weights_path.name} is missing.")
    recorded = str(manifest["weights_sha256"])
    digest = sha256_file(weights_path) if verify else recorded
    if digest != recorded:
        raise ValueError(f"The weights file {weights_path} does not match the SHA-256 recorded in {BUNDLE_FILE} "
                         f"(expected {recorded[:16]}..., found {digest[:16]}...): it was modified "
                         "or truncated after the bundle was saved.")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"Could not read the weights file {weights_path}: {exc}") from exc
    return state, digest
