"""Tests of load_csv and train_val_datasets."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from recognite.data import (
    k_fold_trainval_split,
    label_mapping,
    load_csv,
    split_gallery_query,
    train_val_datasets,
)

# label -> number of images; unequal counts, labels that sort differently from
# their order of appearance, a label with a leading zero and one spelled "NA".
COUNTS = {"zebra": 3, "007": 2, "NA": 4, "ant": 1, "bee": 3, "cow": 2, "7": 3, "dog": 2}


@pytest.fixture()
def dataset_csv(tmp_path):
    """CSV in tmp_path/lists/ with image paths relative to that folder."""
    lists = tmp_path / "lists"
    img_dir = tmp_path / "lists" / "imgs"
    img_dir.mkdir(parents=True)
    rows = []
    for i in range(max(COUNTS.values())):
        for label, count in COUNTS.items():  # interleaved rows
            if i < count:
                name = f"{label}_{i}.png"
                gray = (np.arange(35, dtype=np.uint8).reshape(5, 7) + 10 * i)
                Image.fromarray(gray, mode="L").save(img_dir / name)
                rows.append((f"imgs/{name}", label, len(rows)))
    csv_file = lists / "data.csv"
    pd.DataFrame(rows, columns=["image", "label", "row_id"]).to_csv(csv_file, index=False)
    return csv_file


def test_load_csv_resolves_relative_paths(dataset_csv, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rel_csv = os.path.relpath(dataset_csv, elsewhere)  # ../lists/data.csv
    df = load_csv(rel_csv)
    assert len(df) == sum(COUNTS.values())
    expected_dir = str(tmp_path / "lists" / "imgs")
    assert all(os.path.isabs(p) for p in df["image"])
    assert all(os.path.dirname(p) == expected_dir for p in df["image"])
    assert df["image"].iloc[0] == os.path.join(expected_dir, "zebra_0.png")
    # Labels stay text: '007' and '7' differ, 'NA' is not a missing value.
    assert set(df["label"]) == set(COUNTS)
    assert df["row_id"].tolist() == list(range(len(df)))


def test_load_csv_keeps_absolute_paths(tmp_path):
    img = tmp_path / "abs" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (3, 2)).save(img)
    csv_file = tmp_path / "other" / "data.csv"
    csv_file.parent.mkdir()
    pd.DataFrame({"image": [str(img)], "label": ["a"]}).to_csv(csv_file, index=False)
    assert load_csv(csv_file)["image"].tolist() == [str(img)]


def test_train_val_datasets_from_another_cwd(dataset_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds_train, ds_gal, ds_quer = train_val_datasets(
            dataset_csv, num_folds=3, val_fold=1, fold_seed=4, num_refs=1, ref_seed=2
        )
    # Independent reference: the public split functions on the loaded CSV.
    df = load_csv(dataset_csv)
    ref_train, ref_val = k_fold_trainval_split(df, 3, 1, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_gal, ref_quer = split_gallery_query(ref_val, 1, seed=2)
    pd.testing.assert_frame_equal(ds_train.df, ref_train)
    pd.testing.assert_frame_equal(ds_gal.df, ref_gal)
    pd.testing.assert_frame_equal(ds_quer.df, ref_quer)

    train_labels, val_labels = set(ref_train["label"]), set(ref_val["label"])
    assert train_labels.isdisjoint(val_labels)
    assert ds_train.unique_labels == train_labels
    assert ds_train.label_to_int == {
        lab: i for i, lab in enumerate(sorted(train_labels))
    }
    assert ds_gal.label_to_int == ds_quer.label_to_int == {
        lab: i for i, lab in enumerate(sorted(val_labels))
    }
    assert ds_gal.unique_labels == val_labels
    assert len(ds_gal) == len(val_labels)  # one reference per label
    assert len(ds_gal) + len(ds_quer) == len(ref_val)

    # Items load from this other cwd; a grayscale file comes out RGB.
    img, label = ds_train[0]
    assert img.mode == "RGB" and img.size == (7, 5)
    assert label == ds_train.label_to_int[ds_train.df["label"].iloc[0]]
    img, label = ds_quer[len(ds_quer) - 1]
    assert label == ds_quer.label_to_int[ds_quer.df["label"].iloc[-1]]


def test_train_val_datasets_transforms(dataset_csv):
    def tfm_train(img):
        return ("train", img.size)

    def tfm_val(img):
        return ("val", img.mode)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds_train, ds_gal, ds_quer = train_val_datasets(
            dataset_csv, num_folds=2, tfm_train=tfm_train, tfm_val=tfm_val
        )
    assert ds_train[0][0] == ("train", (7, 5))
    assert ds_gal[0][0] == ("val", "RGB")
    assert ds_quer[0][0] == ("val", "RGB")


def test_train_val_datasets_warns_for_short_labels(dataset_csv):
    # With num_refs=3 every label with 1 or 2 images is short.
    df = load_csv(dataset_csv)
    _, df_val = k_fold_trainval_split(df, num_folds=2, val_fold=0, seed=0)
    num_short = int((df_val["label"].value_counts() < 3).sum())
    assert num_short > 0
    with pytest.warns(UserWarning, match=rf"^{num_short} labels did not contain enough"):
        train_val_datasets(dataset_csv, num_folds=2, val_fold=0, num_refs=3)


def test_label_mapping():
    assert label_mapping(["b", "a", "b", "c"]) == {"a": 0, "b": 1, "c": 2}
    assert label_mapping([10, 2, 33]) == {2: 0, 10: 1, 33: 2}
    assert label_mapping(["x", 3, "x"]) == {"x": 0, 3: 1}  # unsortable: first appearance


# ---------------------------------------------------------------- bad input


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_csv(tmp_path):
    missing = tmp_path / "nope" / "data.csv"
    with pytest.raises(FileNotFoundError, match=r"Data CSV file not found: .*nope.*data\.csv"):
        train_val_datasets(missing)
    with pytest.raises(ValueError, match="is not a file"):
        load_csv(tmp_path)


def test_missing_column(tmp_path):
    csv_file = _write(tmp_path / "d.csv", "path,label\na.png,x\n")
    with pytest.raises(
        ValueError, match=r"'image' \(image_key\) not found.*Available columns: \['path', 'label'\]"
    ):
        train_val_datasets(csv_file)
    with pytest.raises(ValueError, match=r"'labels' \(label_key\).*Did you mean: 'label'"):
        load_csv(csv_file, image_key="path", label_key="labels")
    with pytest.raises(ValueError, match="must name different columns"):
        load_csv(csv_file, image_key="label", label_key="label")


def test_empty_csv(tmp_path):
    with pytest.raises(ValueError, match=r"is empty"):
        train_val_datasets(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(ValueError, match=r"has a header but no rows"):
        train_val_datasets(_write(tmp_path / "header.csv", "image,label\n"))


def test_empty_cells(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    csv_file = _write(tmp_path / "d.csv", "image,label\na.png,x\na.png,\n")
    with pytest.raises(ValueError, match=r"Column 'label' .* 1 empty cells, e.g. on lines \[3\]"):
        load_csv(csv_file)


def test_missing_image_files(dataset_csv):
    lines = dataset_csv.read_text().splitlines()
    extra = [f"imgs/missing_{i}.png,ghost,{100 + i}" for i in range(7)]
    dataset_csv.write_text("\n".join(lines[:3] + extra + lines[3:]) + "\n")
    total = len(lines) - 1 + 7
    with pytest.raises(FileNotFoundError) as info:
        train_val_datasets(dataset_csv)
    msg = str(info.value)
    assert f"7 of {total} image files" in msg
    for i in range(5):
        assert os.path.join("imgs", f"missing_{i}.png") in msg
    assert "missing_5.png" not in msg  # only the first five are listed
    assert str(dataset_csv.parent) in msg
    # check_files=False skips the check.
    assert len(load_csv(dataset_csv, check_files=False)) == total


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_folds": 3, "val_fold": 3}, ValueError, r"val_fold must be in 0\.\.2.*got 3"),
        ({"val_fold": -1}, ValueError, r"val_fold must be in 0\.\.4"),
        ({"num_folds": 1}, ValueError, r"num_folds must be at least 2"),
        ({"num_folds": 9, "val_fold": 8}, ValueError, r"Validation fold 8 is empty: 8 labels"),
        ({"num_refs": 0}, ValueError, r"num_refs must be >= 1, got 0"),
        ({"num_folds": "5"}, TypeError, r"num_folds must be an integer"),
        ({"num_refs": 1.0}, TypeError, r"num_refs must be an integer"),
        ({"fold_seed": -1}, ValueError, r"fold_seed must be >= 0"),
        ({"ref_seed": 0.5}, TypeError, r"ref_seed must be an integer"),
    ],
)
def test_bad_split_arguments(dataset_csv, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        train_val_datasets(dataset_csv, **kwargs)


def test_argument_errors_come_before_reading(tmp_path):
    # A bad val_fold is reported even when the CSV does not exist.
    with pytest.raises(ValueError, match="val_fold"):
        train_val_datasets(tmp_path / "missing.csv", num_folds=2, val_fold=2)


def test_empty_query_set_warns(tmp_path):
    rows = []
    for label in "abcd":
        Image.new("RGB", (2, 2)).save(tmp_path / f"{label}.png")
        rows.append(f"{label}.png,{label}")
    csv_file = _write(tmp_path / "d.csv", "image,label\n" + "\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="query set of validation fold 0 is empty"):
        _, ds_gal, ds_quer = train_val_datasets(csv_file, num_folds=2)
    assert len(ds_quer) == 0 and len(ds_gal) == 2
