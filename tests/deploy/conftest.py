"""Shared fixtures of the deployment tests: a tiny recognizer and tiny synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE_SIZE = 32


def make_model(seed: int = 0, **kwargs):
    """resnet18 (random init, seeded locally; global RNG state is restored)."""
    from recognite.model import Recognizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Recognizer("resnet18", **kwargs).eval()


def solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = rgb
    return img


def stripes(h: int, w: int, period: int) -> np.ndarray:
    rows = ((np.arange(h) // period) % 2 * 255).astype(np.uint8)
    return np.repeat(np.repeat(rows[:, None, None], w, axis=1), 3, axis=2)


def save(img: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def model():
    return make_model(num_classes=3)


@pytest.fixture(scope="module")
def refs_tree(tmp_path_factory) -> Path:
    """refs/<label>/<image>: label 'red' (two near-identical red images), label 'stripes'."""
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(1)
    red = solid(40, 56, (230, 20, 10))
    save(red, root / "red" / "r0.png")
    noisy = np.clip(red.astype(int) + rng.integers(-12, 12, red.shape), 0, 255).astype(np.uint8)
    save(noisy, root / "red" / "r1.png")
    save(stripes(40, 56, 4), root / "stripes" / "s0.png")
    save(stripes(48, 36, 5), root / "stripes" / "sub" / "s1.png")
    (root / "stripes" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """q/same_red.png (identical to refs/red/r0.png) and q/noise.png (random noise, unlike any reference)."""
    root = tmp_path_factory.mktemp("queries")
    save(solid(40, 56, (230, 20, 10)), root / "same_red.png")
    save(np.random.default_rng(2).integers(0, 256, (44, 60, 3), dtype=np.uint8), root / "noise.png")
    return root
