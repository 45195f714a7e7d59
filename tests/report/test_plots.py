"""Figures drawn from hand-made inputs: sizes, and that the grid frames correct items green, wrong red."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recognite.report import plots
from recognite.report.plots import RetrievedItem, distinct_digits, range_digits


def _colour_fraction(path, colour: str, tol: int = 40) -> float:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return float((np.abs(pixels - rgb).max(axis=2) < tol).mean())


def _image(path, value: int) -> str:
    Image.fromarray(np.full((30, 45, 3), value, dtype=np.uint8)).save(path)
    return str(path)


def test_grid_frames_correct_green_and_wrong_red(tmp_path):
    gray = _image(tmp_path / "gray.png", 128)
    only_correct = plots.plot_retrieval_grid(tmp_path / "green.png", [
        (RetrievedItem(gray, "a"), [RetrievedItem(gray, "a", 0.9, True), RetrievedItem(gray, "a", 0.8, True)])])
    only_wrong = plots.plot_retrieval_grid(tmp_path / "red.png", [
        (RetrievedItem(gray, "a"), [RetrievedItem(gray, "b", 0.9, False), RetrievedItem(gray, "c", 0.8, False)])])
    assert _colour_fraction(only_correct, plots.POSITIVE_COLOR) > 0.005
    assert _colour_fraction(only_correct, plots.NEGATIVE_COLOR) < 0.0005
    assert _colour_fraction(only_wrong, plots.NEGATIVE_COLOR) > 0.005
    assert _colour_fraction(only_wrong, plots.POSITIVE_COLOR) < 0.0005
    with Image.open(only_wrong) as image:
        assert 300 <= image.width <= 3000 and 200 <= image.height <= 3000
    # a far-down correct item gets an extra, wider column
    wider = plots.plot_retrieval_grid(tmp_path / "extra.png", [
        (RetrievedItem(gray, "a"), [RetrievedItem(gray, "b", 0.9, False), RetrievedItem(gray, "a", 0.1, True, rank=9)])])
    assert Image.open(wider).width > Image.open(only_wrong).width
    with pytest.raises(ValueError, match="rows"):
        plots.plot_retrieval_grid(tmp_path / "none.png", [])


def test_unreadable_images_become_a_gray_cell(tmp_path):
    path = plots.plot_retrieval_grid(tmp_path / "g.png", [
        (RetrievedItem(str(tmp_path / "missing.png"), "a"), [RetrievedItem(str(tmp_path / "missing.png"), "a", 1.0, True)])])
    assert path.is_file()


def test_curves_and_histograms_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.7, 0.1, 300), rng.normal(0.3, 0.1, 3000)
    files = [
        plots.plot_pr_curves(tmp_path / "pr.png", np.array([1.0, 0.5, 0.0]), np.array([0.5, 1.0, 1.0]), 0.75,
                             np.linspace(0, 1, 11), np.full(11, 0.8), 0.8, (0.5, 1.0), 0.6, pos, 0.1),
        plots.plot_cmc(tmp_path / "cmc.png", np.linspace(0.5, 1.0, 20), np.linspace(0.05, 1.0, 20)),
        plots.plot_score_histograms(tmp_path / "h.png", pos[:50], neg[:50], pos, neg, 0.5, "cosine", 300, 30000),
        plots.plot_training_curves(tmp_path / "t.png", [
            {"epoch": "0", "mAP": "0.1", "top1": "0.05", "train_loss": ""},
            {"epoch": "1", "mAP": "0.4", "top1": "0.3", "train_loss": "2.5"}], best_epoch=1),
    ]
    for path in files:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert 300 <= image.width <= 3000 and 200 <= image.height <= 3000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_digits():
    assert range_digits(2.0) == 3 and range_digits(0.01) == 4 and range_digits(float("nan")) == 6
    assert distinct_digits([0.123441, 0.123449]) == 5 and distinct_digits([]) == 3
