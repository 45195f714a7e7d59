"""Tests of the embedded demo dataset (characters rendered from matplotlib's fonts)."""

from __future__ import annotations

import csv
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recognite.data import demo
from recognite.data.demo import default_demo_root, make_demo_dataset

pytest.importorskip("matplotlib")

TINY = dict(num_classes=10, images_per_class=3, image_size=32, progress=False)


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == ["image", "label"]
        return list(reader)


def _pixels(csv_path: Path) -> dict[str, np.ndarray]:
    return {
        row["image"]: np.asarray(Image.open(csv_path.parent / row["image"]))
        for row in _rows(csv_path)
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "tiny", **TINY)


def test_files_csv_and_manifest(tiny):
    root = tiny.parent
    assert tiny == root / "demo.csv"
    rows = _rows(tiny)
    assert len(rows) == 30
    manifest = json.loads((root / "demo.json").read_text(encoding="utf-8"))
    chars = [c["char"] for c in manifest["classes"]]
    assert chars == list(demo._GLYPHS[:10])  # classes in the documented order
    labels = [f"U+{ord(c):04X}" for c in chars]
    assert [c["label"] for c in manifest["classes"]] == labels
    assert manifest["classes"][0]["name"] == "DIGIT ZERO"
    assert manifest["params"]["num_classes"] == 10 and manifest["num_images"] == 30
    # rows: class by class, images/<label>/<n>.png relative to the CSV folder
    expected = [(f"images/{label}/{n}.png", label) for label in labels for n in range(3)]
    assert [(r["image"], r["label"]) for r in rows] == expected
    for row in rows:
        with Image.open(root / row["image"]) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (32, 32)
            assert image.convert("RGB").size == (32, 32)
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".demo-")]
    assert leftovers == [] or leftovers == [".demo.lock"]


def test_images_show_a_glyph_with_variation(tiny):
    pixels = _pixels(tiny)
    for image in pixels.values():
        # a glyph on a background: clearly more than noise
        assert np.percentile(image, 99) - np.percentile(image, 1) > 50
    # the three images of a class differ (random font / affine / intensities)
    first_class = [pixels[f"images/U+0030/{n}.png"] for n in range(3)]
    assert not np.array_equal(first_class[0], first_class[1])
    assert not np.array_equal(first_class[1], first_class[2])


def test_deterministic_for_seed_and_prefix_stable(tiny, tmp_path):
    again = make_demo_dataset(tmp_path / "again", **TINY)
    expected = _pixels(tiny)
    got = _pixels(again)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)

    other = _pixels(make_demo_dataset(tmp_path / "seed1", **{**TINY, "seed": 1}))
    assert other.keys() == expected.keys()
    assert sum(not np.array_equal(other[k], expected[k]) for k in expected) == len(expected)

    # more classes and images: the first ones stay the same
    bigger = _pixels(
        make_demo_dataset(tmp_path / "bigger", **{**TINY, "num_classes": 12, "images_per_class": 4})
    )
    assert len(bigger) == 48
    assert all(np.array_equal(bigger[k], expected[k]) for k in expected)


def test_cache_hit_returns_without_rewriting(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    csv_path = make_demo_dataset(root, **TINY)
    image = root / "images" / "U+0031" / "2.png"
    stamps = {p: p.stat().st_mtime_ns for p in (csv_path, root / "demo.json", image)}

    def fail(*args, **kwargs):
        raise AssertionError("the cached dataset was regenerated")

    monkeypatch.setattr(demo, "_generate", fail)
    assert make_demo_dataset(root, **TINY) == csv_path
    assert make_demo_dataset(str(root), **{**TINY, "progress": True}) == csv_path
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    monkeypatch.undo()

    # other parameters replace the dataset
    make_demo_dataset(root, **{**TINY, "images_per_class": 2})
    rows = _rows(csv_path)
    assert len(rows) == 20
    assert not image.exists()
    assert sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) == sorted(
        f"U+{ord(c):04X}" for c in demo._GLYPHS[:10]
    )
    # overwrite=True regenerates even when the parameters match
    before = csv_path.stat().st_mtime_ns
    inode = (root / "images").stat().st_ino
    make_demo_dataset(root, **{**TINY, "images_per_class": 2}, overwrite=True)
    assert (root / "images").stat().st_ino != inode or csv_path.stat().st_mtime_ns != before
    assert [p.name for p in root.iterdir() if p.name.startswith(".demo-")] == []


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    root = tmp_path / "broken"

    def broken_render(masks, image_size, rng):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_render_image", broken_render)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(root, **TINY)
    assert not (root / "demo.csv").exists() and not (root / "images").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".demo-")] == []
    monkeypatch.undo()
    assert len(_rows(make_demo_dataset(root, **TINY))) == 30


def test_concurrent_calls_make_one_dataset(tmp_path):
    root = tmp_path / "shared"
    results, errors = [], []

    def worker():
        try:
            results.append(make_demo_dataset(root, **TINY))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [root / "demo.csv"] * 2
    assert len(_rows(root / "demo.csv")) == 30
    assert all((root / r["image"]).is_file() for r in _rows(root / "demo.csv"))


def test_refuses_to_replace_foreign_files(tmp_path):
    root = tmp_path / "user"
    (root / "images").mkdir(parents=True)
    (root / "images" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="images.*overwrite=True"):
        make_demo_dataset(root, **TINY)
    assert (root / "images" / "mine.png").read_bytes() == b"not ours"
    make_demo_dataset(root, **TINY, overwrite=True)
    assert not (root / "images" / "mine.png").exists()
    assert len(_rows(root / "demo.csv")) == 30


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=1), "num_classes must be >= 2"),
        (dict(num_classes=5000), r"num_classes=5000 .* choose num_classes <= \d+"),
        (dict(num_classes=2.5), "num_classes must be an integer"),
        (dict(images_per_class=0), "images_per_class"),
        (dict(image_size=8), r"image_size must be in \[16, 512\]"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_demo_dataset(tmp_path / "bad", **{**TINY, **kwargs})
    assert not (tmp_path / "bad" / "demo.csv").exists()


def test_root_that_is_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="root must be a folder"):
        make_demo_dataset(path, **TINY)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'recognite\[demo\]'"):
        make_demo_dataset(tmp_path / "nompl", **TINY)


def test_default_demo_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RECOGNITE_CACHE", str(tmp_path / "rc"))
    assert default_demo_root() == tmp_path / "rc" / "demo"
    monkeypatch.delenv("RECOGNITE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_demo_root() == tmp_path / "xdg" / "recognite" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == tmp_path / "home" / ".cache" / "recognite" / "demo"
    monkeypatch.setenv("RECOGNITE_CACHE", str(tmp_path / "gen"))
    csv_path = make_demo_dataset(**TINY)  # root=None uses the default root
    assert csv_path == tmp_path / "gen" / "demo" / "demo.csv" and csv_path.is_file()


def _min_glyph_distances(num_classes: int, render_size: int = 48) -> tuple[list[str], np.ndarray]:
    """Per pair of classes, the smallest soft Jaccard distance over the fonts.

    Each glyph is cropped to its ink and scaled to 24 x 24 (as the images scale glyphs to a
    common size); distance = sum|a - b| / sum max(a, b), 0 for identical glyphs.
    """
    chars, fonts, masks = demo._glyph_masks(num_classes, render_size)
    feats = np.stack(
        [
            [
                np.asarray(Image.fromarray(m).resize((24, 24), Image.BILINEAR), np.float32).ravel()
                / 255
                for m in per_font
            ]
            for per_font in masks
        ],
        axis=1,
    )  # (F, N, 576)
    num = len(chars)
    dmin = np.full((num, num), np.inf, dtype=np.float32)
    for a in feats:
        total = a.sum(1)
        for start in range(0, num, 32):
            l1 = np.abs(a[start : start + 32, None] - a[None]).sum(-1)
            dist = 2 * l1 / (total[start : start + 32, None] + total[None] + l1)
            dmin[start : start + 32] = np.minimum(dmin[start : start + 32], dist)
    np.fill_diagonal(dmin, np.inf)
    return chars, dmin


def test_first_classes_render_distinct_glyphs_in_every_font():
    chars, dmin = _min_glyph_distances(24)
    assert len(chars) == 24
    assert dmin.min() > 0.15, (chars, np.unravel_index(dmin.argmin(), dmin.shape))
    # a naive check of the same thing: no two classes share a glyph image in any font
    _, _, masks = demo._glyph_masks(24, 48)
    for font in range(len(masks[0])):
        glyphs = {(m[font].shape, m[font].tobytes()) for m in masks}
        assert len(glyphs) == 24


@pytest.mark.slow
def test_full_class_list_has_at_least_200_distinct_classes():
    chars, dmin = _min_glyph_distances(300)
    assert len(chars) == 300 and len(set(chars)) == 300
    # every pair of classes differs in every font
    assert dmin.min() > 0.15, [
        (chars[i], chars[j]) for i, j in zip(*np.nonzero(dmin <= 0.15)) if i < j
    ]
    with pytest.raises(ValueError, match="choose num_classes <= "):
        demo._glyph_masks(len(demo._GLYPHS) + 1, 48)
