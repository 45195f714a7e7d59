"""avg_ref_embs, RunningExtrema and three-crop test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import recognite.utils as utils
from recognite.utils import (
    MAX,
    MIN,
    RunningExtrema,
    ThreeCrop,
    avg_ref_embs,
    collate_three_crops,
    collate_with_three_crops,
    embeddings_three_crops,
    get_embeddings_three_crops,
    three_crop,
)


def test_avg_ref_embs_hand():
    embs = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0], [-1.0, 1.0]])
    labels = torch.tensor([5, 5, 2, 5, 9])
    means, unique = avg_ref_embs(embs, labels)
    assert unique.tolist() == [2, 5, 9]
    torch.testing.assert_close(means, torch.tensor([[0.0, 4.0], [2.0, 4.0 / 3.0], [-1.0, 1.0]]))
    normed, _ = avg_ref_embs(embs, labels, normalize=True)
    np.testing.assert_allclose(normed.numpy(), (means / means.norm(dim=1, keepdim=True)).numpy(), rtol=1e-6)


def test_avg_ref_embs_errors():
    with pytest.raises(ValueError, match="labels has 2 entries"):
        avg_ref_embs(torch.zeros(3, 2), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        avg_ref_embs(torch.zeros(2, 2), torch.tensor([1.0, 2.0]))


def test_running_extrema_max_and_min():
    best = RunningExtrema(MAX)
    best.update_dict({"acc": 0.5, "loss": 2.0, "name": "run", "none": None, "vec": [1, 2]})
    assert best.extrema_dict == {"acc": 0.5, "loss": 2.0}
    assert best.is_new_extremum("acc", 0.6) and not best.is_new_extremum("acc", 0.5)
    assert best.is_new_extremum("new", -1e9)
    assert not best.is_new_extremum("acc", "high") and not best.is_new_extremum("acc", float("nan"))
    assert best.update("acc", torch.tensor(0.75)) is True
    assert best.update("acc", 0.7) is False
    assert best.update("acc", torch.tensor([1.0, 2.0])) is False
    assert best.extrema_dict["acc"] == 0.75 and isinstance(best.extrema_dict["acc"], float)
    assert best.update("acc", np.float32(0.8)) is True
    lowest = RunningExtrema(MIN)
    lowest.update_dict({"loss": 2.0})
    lowest.update_dict({"loss": 3.0})
    lowest.update_dict({"loss": 1.5})
    assert lowest.extrema_dict == {"loss": 1.5}
    lowest.clear()
    assert lowest.extrema_dict == {}
    with pytest.raises(ValueError, match="mode must be MAX"):
        RunningExtrema("maximum")


def test_three_crop_landscape_positions():
    img = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)  # C=2, H=3, W=8
    crops = three_crop(img)
    assert crops.shape == (3, 2, 3, 3)
    assert torch.equal(crops[0], img[:, :, 0:3])
    assert torch.equal(crops[1], img[:, :, 2:5])  # round((8 - 3) / 2) = round(2.5) = 2
    assert torch.equal(crops[2], img[:, :, 5:8])


def test_three_crop_portrait_and_square():
    img = torch.arange(1 * 7 * 3, dtype=torch.float32).reshape(1, 7, 3)
    crops = ThreeCrop()(img)
    assert crops.shape == (3, 1, 3, 3)
    assert torch.equal(crops[0], img[:, 0:3])
    assert torch.equal(crops[1], img[:, 2:5])
    assert torch.equal(crops[2], img[:, 4:7])
    square = torch.randn(3, 4, 4)
    assert all(torch.equal(crop, square) for crop in three_crop(square))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        three_crop(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="ToTensor"):
        three_crop([[0.0]])


def test_collate_and_embeddings_three_crops():
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(2, 4, 6, generator=gen) for _ in range(3)]
    batch = [(ThreeCrop()(image), label) for image, label in zip(images, [3, 1, 4])]
    stacked, labels = collate_three_crops(batch)
    assert stacked.shape == (3, 3, 2, 4, 4) and labels.tolist() == [3, 1, 4]
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 5))
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    embs = embeddings_three_crops(model, stacked)
    assert calls == [9]  # one forward pass over B * 3 crops
    with torch.no_grad():
        expected = torch.stack([model(three_crop(image)).mean(dim=0) for image in images])
    torch.testing.assert_close(embs.detach(), expected)
    normed = embeddings_three_crops(model, stacked, normalize=True)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(B, 3, C, S, S\)"):
        embeddings_three_crops(model, stacked[0])
    with pytest.raises(ValueError, match="use ThreeCrop"):
        collate_three_crops([(images[0], 1)])


def test_aliases_and_exports():
    assert collate_with_three_crops is collate_three_crops
    assert get_embeddings_three_crops is embeddings_three_crops
    for name in utils.__all__:
        assert hasattr(utils, name)
    assert MAX != MIN
