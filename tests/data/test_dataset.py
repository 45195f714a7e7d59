"""Tests of DataFrameDataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from recognite.data import DataFrameDataset


@pytest.fixture()
def images(tmp_path):
    """A grayscale 8x6, an RGB 5x7 and a palette 4x4 image with known pixels."""
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5  # (H, W) = (6, 8)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    rgb = np.zeros((7, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 200, 30
    rgb[3, 2] = (255, 0, 128)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 250, 120, 5] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    df = pd.DataFrame(
        {
            "path": [str(tmp_path / n) for n in ("gray.png", "rgb.png", "palette.png")],
            "species": ["owl", "cat", "owl"],
        }
    )
    return df, gray, rgb


def test_items_are_rgb_images_with_int_labels(images):
    df, gray, rgb = images
    ds = DataFrameDataset(df, "species", "path", {"cat": 0, "owl": 1})
    assert len(ds) == 3
    img, label = ds[0]
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB" and img.getbands() == ("R", "G", "B")
    assert img.size == (8, 6)
    arr = np.asarray(img)
    assert arr.shape == (6, 8, 3)
    for band in range(3):
        np.testing.assert_array_equal(arr[..., band], gray)
    assert label == 1 and type(label) is int

    img, label = ds[1]
    np.testing.assert_array_equal(np.asarray(img), rgb)
    assert label == 0

    img, label = ds[-1]  # negative index counts from the end
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (250, 120, 5)
    assert label == 1


def test_transform_is_applied(images):
    df, gray, _ = images

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255

    ds = DataFrameDataset(df, "species", "path", {"cat": 0, "owl": 1}, transform=to_tensor)
    x, label = ds[0]
    assert x.shape == (3, 6, 8)
    torch.testing.assert_close(x[1], torch.from_numpy(gray).float() / 255)
    assert label == 1
    assert ds.transform is to_tensor


def test_image_mode(images):
    df, gray, rgb = images
    ds_keep = DataFrameDataset(df, "species", "path", {"cat": 0, "owl": 1}, image_mode=None)
    assert ds_keep[0][0].mode == "L"
    np.testing.assert_array_equal(np.asarray(ds_keep[0][0]), gray)
    assert ds_keep[2][0].mode == "P"
    ds_gray = DataFrameDataset(df, "species", "path", {"cat": 0, "owl": 1}, image_mode="L")
    img = ds_gray[1][0]
    assert img.mode == "L"
    # ITU-R 601-2 luma, as PIL computes it: L = R*299/1000 + G*587/1000 + B*114/1000
    assert abs(img.getpixel((0, 0)) - (10 * 299 + 200 * 587 + 30 * 114) / 1000) <= 1


def test_attributes(images):
    df, _, _ = images
    mapping = {"cat": 4, "owl": 9}
    ds = DataFrameDataset(df, label_key="species", image_key="path", label_to_int=mapping)
    assert ds.df is df
    assert ds.label_key == "species" and ds.image_key == "path"
    assert ds.label_to_int is mapping
    assert ds.transform is None
    assert ds.unique_labels == {"owl", "cat"}
    assert ds.int_labels.tolist() == [9, 4, 9]
    assert [ds[i][1] for i in range(len(ds))] == [9, 4, 9]
    assert "num_images=3" in repr(ds)


def test_integer_labels(images):
    df, _, _ = images
    df = df.assign(species=[30, 7, 30])
    ds = DataFrameDataset(df, "species", "path", {7: 0, 30: 1})
    assert ds.unique_labels == {7, 30}
    assert all(type(lab) is int for lab in ds.unique_labels)
    assert [ds[i][1] for i in range(3)] == [1, 0, 1]


def test_index_error_past_the_end(images):
    df, _, _ = images
    ds = DataFrameDataset(df, "species", "path", {"cat": 0, "owl": 1})
    with pytest.raises(IndexError):
        ds[3]


def test_bad_arguments(images):
    df, _, _ = images
    with pytest.raises(
        ValueError, match=r"'label' \(label_key\).*Available columns: \['path', 'species'\]"
    ):
        DataFrameDataset(df, "label", "path", {"cat": 0, "owl": 1})
    with pytest.raises(ValueError, match=r"'image' \(image_key\)"):
        DataFrameDataset(df, "species", "image", {"cat": 0, "owl": 1})
    with pytest.raises(ValueError, match=r"1 labels .* no entry in label_to_int.*'owl'"):
        DataFrameDataset(df, "species", "path", {"cat": 0})
    with pytest.raises(TypeError, match="label_to_int must be a mapping"):
        DataFrameDataset(df, "species", "path", ["cat", "owl"])
    with pytest.raises(TypeError, match="transform must be callable"):
        DataFrameDataset(df, "species", "path", {"cat": 0, "owl": 1}, transform=3)
    with pytest.raises(TypeError, match="pandas DataFrame"):
        DataFrameDataset(df.to_dict(), "species", "path", {"cat": 0, "owl": 1})


def test_works_with_dataloader(images):
    df, _, _ = images
    ds = DataFrameDataset(
        df, "species", "path", {"cat": 0, "owl": 1},
        transform=lambda im: torch.from_numpy(np.asarray(im.resize((4, 4))).copy()),
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, num_workers=0)
    batches = list(loader)
    assert batches[0][0].shape == (2, 4, 4, 3)
    assert batches[0][1].tolist() == [1, 0]
    assert batches[1][1].tolist() == [1]
