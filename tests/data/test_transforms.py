"""Content crop, random affine on the border colour, and the transforms built from preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from recognite.data import eval_transform, train_transform
from recognite.data.transforms import (
    ContentCrop,
    RandomAffineOnBorder,
    RandomElasticOnBorder,
    border_color,
)
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


def test_elastic_displacement_is_a_smooth_field_through_random_nodes():
    elastic = RandomElasticOnBorder(magnitude=0.05, grid=4)
    torch.manual_seed(3)
    field = elastic.displacement(40, 30)
    torch.manual_seed(3)
    nodes = (torch.rand(1, 2, 4, 4) * 2 - 1) * 0.1  # the lattice: +-magnitude of the side = +-0.1 in [-1, 1] units
    assert field.shape == (1, 40, 30, 2)
    # The corner pixels sit on the corner nodes; channel 0 is x, channel 1 is y.
    for (row, col), (node_row, node_col) in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))]:
        for axis in (0, 1):
            assert float(field[0, row, col, axis]) == pytest.approx(float(nodes[0, axis, node_row, node_col]), abs=1e-6)
    assert float(field.abs().max()) <= 0.1 * 1.3  # bicubic overshoots the nodes by a little at most
    assert float(field.abs().max()) > 0.02
    # Smooth: neighbouring pixels move almost alike (a per-pixel random field would not).
    step = (field[:, 1:] - field[:, :-1]).abs().mean()
    assert float(step) < 0.25 * float(field.abs().mean())  # white noise: about 1.3x the mean


def test_elastic_moves_pixels_by_the_displacement_and_fills_with_the_border_colour(monkeypatch):
    pixels = _grey(16, 20, 200)
    pixels[4:12, 6:14] = np.arange(64, dtype=np.uint8).reshape(8, 8)
    elastic = RandomElasticOnBorder(magnitude=0.1)
    shift = torch.zeros(1, 16, 20, 2)
    shift[..., 0] = 2 * 4 / 20  # every output pixel reads the input 4 pixels to its right
    monkeypatch.setattr(elastic, "displacement", lambda height, width: shift)
    out = np.asarray(elastic(Image.fromarray(pixels))).astype(int)
    np.testing.assert_allclose(out[:, :16], pixels[:, 4:], atol=1)
    np.testing.assert_array_equal(out[:, 16:], 200)  # pulled in from outside: the border colour, not black


def test_elastic_keeps_the_background_and_zero_is_the_identity():
    pixels = _grey(32, 32, 180)
    pixels[12:20, 12:20] = BLACK
    for seed in range(5):
        torch.manual_seed(seed)
        out = np.asarray(RandomElasticOnBorder(magnitude=0.2, grid=3)(Image.fromarray(pixels)))
        assert (out[:4] == 180).all() and (out[-4:] == 180).all()  # the square cannot reach the edges
        assert out.min() < 60 and not np.array_equal(out, pixels)
    identity = RandomElasticOnBorder(magnitude=0.0)(Image.fromarray(pixels))
    np.testing.assert_array_equal(np.asarray(identity), pixels)


@pytest.mark.parametrize("kwargs, message", [
    ({"magnitude": -0.1}, "magnitude is a fraction of the image side in \\[0, 1\\], got -0.1"),
    ({"magnitude": 1.5}, "got 1.5"),
    ({"magnitude": 0.1, "grid": 1}, "grid must be an integer >= 2"),
    ({"magnitude": 0.1, "grid": 2.5}, "grid must be an integer >= 2"),
])
def test_elastic_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomElasticOnBorder(**kwargs)


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
    elastic = RandomElasticOnBorder(0.05)
    steps = train_transform(pre, 16, affine=affine, elastic=elastic).transforms
    assert steps.index(elastic) == steps.index(affine) + 1  # after the affine, at the output size
    image = Image.fromarray(np.full((40, 30, 3), 128, dtype=np.uint8))
    assert train_transform(dataclasses.replace(pre, content_crop=True), 16, affine=affine)(image).shape == (3, 16, 16)


def test_preprocessing_round_trips_the_content_crop_and_reads_old_dicts():
    pre = dataclasses.replace(Preprocessing(), content_crop=True, content_margin=0.1)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    old = Preprocessing().to_dict()
    del old["content_crop"], old["content_margin"]
    assert Preprocessing.from_dict(old) == Preprocessing()
