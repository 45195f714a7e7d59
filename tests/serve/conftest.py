"""Fixtures of the service tests: a tiny bundle (32 px ResNet-18, random weights) and image bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

API_KEY = "test-key-0123456789abcdef"


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def red() -> np.ndarray:
    img = np.zeros((40, 56, 3), np.uint8)
    img[...] = (230, 20, 10)
    return img


def stripes() -> np.ndarray:
    rows = ((np.arange(40) // 4) % 2 * 255).astype(np.uint8)
    return np.repeat(np.repeat(rows[:, None, None], 56, axis=1), 3, axis=2)


def noise(seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (44, 60, 3), dtype=np.uint8)


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header announces width x height pixels (nothing a decoder could decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    from recognite.bundle import save_bundle
    from recognite.model import Recognizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Recognizer("resnet18").eval()
    return save_bundle(model, tmp_path_factory.mktemp("serve") / "bundle", image_size=32, threshold=0.5)
