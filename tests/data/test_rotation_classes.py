"""Tests of RotationClasses: rotated copies of the training images as new classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from recognite.data import DataFrameDataset, RotationClasses, label_mapping


@pytest.fixture()
def dataset(tmp_path):
    """Three 3x2 grayscale images with distinct pixels, labels b, a, b (a -> 0, b -> 1)."""
    arrays = [np.arange(6, dtype=np.uint8).reshape(2, 3) * 10 + 7 * k for k in range(3)]  # (H, W) = (2, 3)
    paths = []
    for k, array in enumerate(arrays):
        Image.fromarray(array, mode="L").save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    df = pd.DataFrame({"image": paths, "label": ["b", "a", "b"]})
    return DataFrameDataset(df, "label", "image", label_mapping(df["label"]), image_mode="L"), arrays


def test_items_are_the_rows_rotated_counter_clockwise_with_offset_labels(dataset):
    ds, arrays = dataset
    rotated = RotationClasses(ds)
    assert len(rotated) == 12
    assert rotated.rotations == (0, 90, 180, 270)
    # Expected pixels by numpy, independently of PIL: np.rot90 turns counter-clockwise like ROTATE_90.
    for r in range(4):
        for row, base_label in enumerate([1, 0, 1]):
            image, label = rotated[r * 3 + row]
            np.testing.assert_array_equal(np.asarray(image), np.rot90(arrays[row], k=r))
            assert label == base_label + 2 * r and type(label) is int
    # The 90-degree copy of a 2x3 image is 3x2; its top-left pixel is the original's top-right one.
    image, _ = rotated[3]
    assert image.size == (2, 3) and image.getpixel((0, 0)) == arrays[0][0, 2]
    image, _ = rotated[-1]  # negative index: the 270-degree copy of the last row
    np.testing.assert_array_equal(np.asarray(image), np.rot90(arrays[2], k=3))
    with pytest.raises(IndexError, match="index 12"):
        rotated[12]


def test_labels_names_and_int_labels_agree(dataset):
    ds, _ = dataset
    rotated = RotationClasses(ds, rotations=(180,))
    assert rotated.label_to_int == {"a": 0, "b": 1, "a@rot180": 2, "b@rot180": 3}
    assert rotated.unique_labels == {"a", "b", "a@rot180", "b@rot180"}
    np.testing.assert_array_equal(rotated.int_labels, [1, 0, 1, 3, 2, 3])
    assert [rotated[i][1] for i in range(len(rotated))] == rotated.int_labels.tolist()


def test_the_transform_sees_the_rotated_image(dataset):
    ds, arrays = dataset
    ds.transform = lambda image: np.asarray(image).astype(np.float32) / 2
    image, label = RotationClasses(ds, rotations=[270])[4]
    np.testing.assert_array_equal(image, np.rot90(arrays[1], k=3) / 2)
    assert label == 2


@pytest.mark.parametrize("rotations", [(), (45,), (90, 90), (0,), (True,), (360,)])
def test_bad_rotations_are_rejected(dataset, rotations):
    with pytest.raises(ValueError, match=r"rotations must be distinct angles from \[90, 180, 270\]"):
        RotationClasses(dataset[0], rotations=rotations)


def test_bad_arguments_are_rejected(dataset):
    ds, _ = dataset
    with pytest.raises(TypeError, match="rotations must be a sequence"):
        RotationClasses(ds, rotations=90)
    with pytest.raises(TypeError, match="dataset must be a DataFrameDataset"):
        RotationClasses([1, 2, 3])
    gaps = DataFrameDataset(ds.df, "label", "image", {"a": 0, "b": 5})
    with pytest.raises(ValueError, match=r"labels mapped to 0\.\.1"):
        RotationClasses(gaps)
    clash_df = pd.DataFrame({"image": list(ds.df["image"]), "label": ["a", "a@rot90", "b"]})
    clash = DataFrameDataset(clash_df, "label", "image", label_mapping(clash_df["label"]))
    with pytest.raises(ValueError, match="'a@rot90' is already a label"):
        RotationClasses(clash)
