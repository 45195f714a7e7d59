"""Tests of folder_to_csv."""

from __future__ import annotations

import os
import warnings

import pandas as pd
import pytest
from PIL import Image

from recognite.data import folder_to_csv, load_csv, train_val_datasets


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "photos"
    files = [
        "cat/b.png",
        "cat/sub/deeper/a.PNG",
        "cat/a.jpg",
        "dog/x.jpeg",
        "007/z.bmp",
        "Emu/e.webp",
        "Emu/f.png",
    ]
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".bmp": "BMP", ".webp": "WEBP", ".jpeg": "JPEG", ".jpg": "JPEG"}.get(
            path.suffix.lower(), "PNG"
        )
        Image.new("L", (6, 4), 128).save(path, format=fmt)
    # Things to skip.
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    Image.new("L", (2, 2)).save(root / ".cache" / "c.png")
    Image.new("L", (2, 2)).save(root / "top_level.png")
    (root / "empty_class").mkdir()
    return root


EXPECTED_REL_TO_ROOT = [
    ("007/z.bmp", "007"),
    ("Emu/e.webp", "Emu"),
    ("Emu/f.png", "Emu"),
    ("cat/a.jpg", "cat"),
    ("cat/b.png", "cat"),
    ("cat/sub/deeper/a.PNG", "cat"),
    ("dog/x.jpeg", "dog"),
]


def test_without_csv_paths_relative_to_root(tree):
    df = folder_to_csv(tree)
    assert list(df.columns) == ["image", "label"]
    assert list(zip(df["image"], df["label"])) == EXPECTED_REL_TO_ROOT


def test_written_csv_relative_to_csv_folder(tree, tmp_path):
    csv_file = tmp_path / "lists" / "sub" / "photos.csv"  # folders are created
    df = folder_to_csv(tree, csv_file)
    assert df["image"].tolist() == ["../../photos/" + p for p, _ in EXPECTED_REL_TO_ROOT]
    written = pd.read_csv(csv_file, dtype=str)
    pd.testing.assert_frame_equal(written, df, check_dtype=False)
    assert os.listdir(csv_file.parent) == ["photos.csv"]  # no temp file left
    loaded = load_csv(csv_file)
    assert loaded["image"].tolist() == [str(tree / p) for p, _ in EXPECTED_REL_TO_ROOT]
    assert loaded["label"].tolist() == [lab for _, lab in EXPECTED_REL_TO_ROOT]


def test_round_trip_into_train_val_datasets(tree, tmp_path, monkeypatch):
    csv_file = tmp_path / "photos.csv"
    folder_to_csv(tree, csv_file)
    monkeypatch.chdir(tree / "cat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds_train, ds_gal, ds_quer = train_val_datasets(csv_file, num_folds=2, val_fold=1)
    assert len(ds_train) + len(ds_gal) + len(ds_quer) == len(EXPECTED_REL_TO_ROOT)
    assert ds_train.unique_labels | ds_gal.unique_labels == {"007", "Emu", "cat", "dog"}
    assert ds_train.unique_labels.isdisjoint(ds_gal.unique_labels)
    for ds in (ds_train, ds_gal, ds_quer):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.mode == "RGB" and img.size in {(6, 4)}
            assert 0 <= label < len(ds.label_to_int)


def test_overwrites_existing_csv(tree, tmp_path):
    csv_file = tmp_path / "photos.csv"
    csv_file.write_text("old content\n")
    folder_to_csv(tree, csv_file)
    assert csv_file.read_text().splitlines()[0] == "image,label"


def test_extensions_argument(tree):
    df = folder_to_csv(tree, extensions=["png"])  # without dot, case-insensitive
    assert df["image"].tolist() == ["Emu/f.png", "cat/b.png", "cat/sub/deeper/a.PNG"]
    with pytest.raises(ValueError, match="extensions"):
        folder_to_csv(tree, extensions=[])


def test_errors(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match="Image folder not found: .*missing"):
        folder_to_csv(tmp_path / "missing")
    with pytest.raises(NotADirectoryError, match="must be a folder"):
        folder_to_csv(tree / "cat" / "b.png")
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    (tmp_path / "no_images" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"No images found in .*no_images"):
        folder_to_csv(tmp_path / "no_images")
    assert not (tmp_path / "out.csv").exists()
