"""Test-time augmentation views (issue 17, lever 1): each view and the averaging, against direct
computations; the bundle stores them and every embedding follows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from recognite.bundle import load_bundle, save_bundle, write_test_time_augmentation
from recognite.model import Recognizer
from recognite.utils.views import (
    ViewSpec,
    collate_views,
    embeddings_of_views,
    make_views,
)


def test_each_view_by_hand():
    img = torch.arange(16.0).reshape(1, 4, 4)
    views = make_views(img, ViewSpec(shift=0.25, scales=(2.0,), hflip=True))
    assert views.shape == (12, 1, 4, 4) and ViewSpec(shift=0.25, scales=(2.0,), hflip=True).num_views == 12
    assert torch.equal(views[0], img)
    # left by one column (the last column repeats), right, up, down
    assert views[1, 0, 0].tolist() == [1.0, 2.0, 3.0, 3.0]
    assert views[2, 0, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert views[3, 0, :, 0].tolist() == [4.0, 8.0, 12.0, 12.0]
    assert views[4, 0, :, 0].tolist() == [0.0, 0.0, 4.0, 8.0]
    # zoom x2 about the centre = the central 2x2 block, upsampled bilinearly
    expected = F.interpolate(img[None], size=(8, 8), mode="bilinear", align_corners=False)[0, :, 2:6, 2:6]
    assert torch.allclose(views[5], expected)
    assert all(torch.equal(views[6 + i], views[i].flip(-1)) for i in range(6))
    small = make_views(torch.ones(1, 4, 4), ViewSpec(scales=(0.5,)))[1]
    assert torch.allclose(small, torch.ones(1, 4, 4))  # shrinking pads with the edge: a flat image stays flat


def test_the_mean_of_the_views_is_renormalized():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    images = [torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    spec = ViewSpec(hflip=True)
    batch, _ = collate_views([(make_views(image, spec), 0) for image in images])
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    got = embeddings_of_views(model, batch)
    assert calls == [6]  # one pass over B * K views
    with torch.no_grad():
        expected = torch.stack([F.normalize(model(make_views(image, spec)).mean(0), dim=0) for image in images])
    torch.testing.assert_close(got.detach(), expected)
    with pytest.raises(ValueError, match="shift"):
        ViewSpec(shift=0.9)
    with pytest.raises(ValueError, match="keys"):
        ViewSpec.from_dict({"shfit": 0.1})


def test_a_bundle_stores_its_views_and_embeds_with_them(tmp_path):
    torch.manual_seed(0)
    model = Recognizer("resnet18").eval()
    bundle_dir = save_bundle(model, tmp_path / "b", image_size=32)
    digest_before = json.loads((bundle_dir / "bundle.json").read_text())["config_sha256"]
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    spec = ViewSpec(shift=0.05, scales=(0.9,))
    write_test_time_augmentation(bundle_dir, spec)
    bundle = load_bundle(bundle_dir)  # the recomputed config_sha256 holds
    assert bundle.test_time_augmentation == spec
    plain = bundle.embed([str(path)], tta=False)
    with_views = bundle.embed([str(path)])
    from recognite.data.images import read_image

    views = make_views(bundle.transform(read_image(path)), spec)
    with torch.no_grad():
        expected = F.normalize(bundle.model.embed(views).mean(0, keepdim=True), dim=1)
    torch.testing.assert_close(with_views, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(plain, bundle.model.embed(views[:1]), atol=1e-5, rtol=1e-5)
    write_test_time_augmentation(bundle_dir, None)
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert "test_time_augmentation" not in manifest and manifest["config_sha256"] == digest_before
    assert load_bundle(bundle_dir).test_time_augmentation is None
