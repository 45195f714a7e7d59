"""Content crop, random affine on the border colour, and the transforms built from preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from recognite.data import eval_transform, train_transform
from recognite.data.transforms import ContentCrop, RandomAffineOnBorder, border_color
from recognite.model.backbones import Preprocessing

WHITE, BLACK = 255, 0


def _grey(height: int, width: int, background: int = WHITE) -> np.ndarray:
    return np.full((height, width), background, dtype=np.uint8)


def test_border_color_is_the_median_of_the_outer_ring():
    pixels = _grey(6, 5, 200)
    pixels[0, :2] = 0  # 2 of the 18 ring pixels differ
    pixels[2:4, 2] = 0  # the inside does not count
    assert border_color(Image.fromarray(pixels)) == (200,)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 2] = 180
    assert border_color(Image.fromarray(rgb)) == (0, 0, 180)


def test_content_crop_cuts_the_square_around_the_content():
    pixels = _grey(60, 100)
    pixels[20:30, 10:30] = BLACK  # box: x 10..29, y 20..29 -> 20 wide, 10 high
    out = np.asarray(ContentCrop(margin=0.0)(Image.fromarray(pixels)))
    # Square side 20 centred on the box: x 10..29, y 15..34.
    expected = _grey(20, 20)
    expected[5:15, :] = BLACK
    np.testing.assert_array_equal(out, expected)


def test_content_crop_pads_with_the_border_colour_beyond_the_image():
    pixels = _grey(40, 40, 200)
    pixels[0:10, 0:10] = BLACK  # content in the corner
    out = np.asarray(ContentCrop(margin=0.5)(Image.fromarray(pixels)))
    # Side 10 * (1 + 2 * 0.5) = 20 centred on (5, 5): x, y from -5 to 14.
    assert out.shape == (20, 20)
    expected = np.full((20, 20), 200, dtype=np.uint8)
    expected[5:15, 5:15] = BLACK
    np.testing.assert_array_equal(out, expected)


def test_content_crop_keeps_colour_images_and_their_background():
    rgb = np.zeros((30, 30, 3), dtype=np.uint8)
    rgb[...] = (0, 0, 255)
    rgb[12:16, 3:7] = (255, 0, 0)
    out = ContentCrop(margin=0.25)(Image.fromarray(rgb))
    assert out.mode == "RGB" and out.size == (6, 6)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[1:5, 1:5], np.broadcast_to([255, 0, 0], (4, 4, 3)))
    np.testing.assert_array_equal(out[0], np.broadcast_to([0, 0, 255], (6, 3)))


def test_content_crop_of_an_empty_or_binary_image():
    blank = Image.fromarray(_grey(12, 9, 77))
    assert ContentCrop()(blank) is blank
    binary = _grey(20, 20)
    binary[5:9, 5:7] = BLACK
    out = ContentCrop(margin=0.0)(Image.fromarray(binary).convert("1"))
    assert out.mode == "L" and out.size == (4, 4)
    expected = _grey(4, 4)
    expected[:, 1:3] = BLACK
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_content_crop_refuses_a_negative_margin():
    with pytest.raises(ValueError, match="margin must be >= 0"):
        ContentCrop(margin=-0.1)


def test_random_affine_fills_with_the_border_colour():
    pixels = _grey(32, 32, 180)
    pixels[12:20, 12:20] = BLACK
    torch.manual_seed(0)
    out = np.asarray(RandomAffineOnBorder(degrees=45, scale=(0.5, 0.5))(Image.fromarray(pixels)))
    # Half size: the corners are uncovered and must be the background, not torchvision's black.
    assert out[0, 0] == out[0, -1] == out[-1, 0] == out[-1, -1] == 180
    assert out.min() < 60  # the square is still there
    identity = RandomAffineOnBorder()(Image.fromarray(pixels))
    np.testing.assert_array_equal(np.asarray(identity), pixels)


def test_eval_transform_with_content_crop_centres_the_content():
    pre = dataclasses.replace(Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), content_crop=True, content_margin=0.0)
    rgb = np.full((64, 48, 3), 255, dtype=np.uint8)
    rgb[2:10, 36:44] = 0  # an 8x8 square near the top-right corner
    out = eval_transform(pre, 16)(Image.fromarray(rgb))
    assert out.shape == (3, 16, 16)
    # The square fills the whole frame after the crop.
    assert float(out.max()) < 0.05
    plain = eval_transform(dataclasses.replace(pre, content_crop=False), 16)(Image.fromarray(rgb))
    assert float(plain.min()) > 0.2  # the centre crop misses the corner square


def test_train_transform_starts_with_the_content_crop_when_asked():
    pre = Preprocessing()
    assert not any(isinstance(t, ContentCrop) for t in train_transform(pre, 16).transforms)
    affine = RandomAffineOnBorder(degrees=5)
    steps = train_transform(dataclasses.replace(pre, content_crop=True), 16, affine=affine).transforms
    assert isinstance(steps[0], ContentCrop) and affine in steps
    image = Image.fromarray(np.full((40, 30, 3), 128, dtype=np.uint8))
    assert train_transform(dataclasses.replace(pre, content_crop=True), 16, affine=affine)(image).shape == (3, 16, 16)


def test_preprocessing_round_trips_the_content_crop_and_reads_old_dicts():
    pre = dataclasses.replace(Preprocessing(), content_crop=True, content_margin=0.1)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    old = Preprocessing().to_dict()
    del old["content_crop"], old["content_margin"]
    assert Preprocessing.from_dict(old) == Preprocessing()
