"""The small-input stem of ResNet-family backbones (issue 17, lever 4)."""

from __future__ import annotations

import pytest
import torch

from recognite.bundle import load_bundle, save_bundle
from recognite.model import Recognizer
from recognite.train.config import TrainConfig
from recognite.train.trainer import FIXED_ON_RESUME


def _layer1_side(model: Recognizer, side: int) -> int:
    seen = []
    handle = model.backbone.layer1.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("model_name", ["resnet18", "resnext50_32x4d"])
def test_the_stem_keeps_the_input_resolution(model_name):
    plain = Recognizer(model_name).eval()
    small = Recognizer(model_name, small_input_stem=True).eval()
    conv = small.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.in_channels, conv.out_channels) == ((3, 3), (1, 1), (1, 1), 3, 64)
    assert isinstance(small.backbone.maxpool, torch.nn.Identity)
    assert _layer1_side(plain, 32) == 8 and _layer1_side(small, 32) == 32  # 7x7/2 + pool/2 = a quarter per side
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, plain.embedding_dim)


def test_the_stem_travels_in_the_config_and_the_bundle(tmp_path):
    torch.manual_seed(0)
    model = Recognizer("resnet18", small_input_stem=True).eval()
    assert model.config()["small_input_stem"] is True
    assert Recognizer.from_config(model.config()).small_input_stem is True
    bundle = load_bundle(save_bundle(model, tmp_path / "b", image_size=32))
    assert bundle.model.small_input_stem is True
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bundle.model(images), model(images), atol=1e-6)
    plain = save_bundle(Recognizer("resnet18").eval(), tmp_path / "p", image_size=32)
    assert "small_input_stem" not in (plain / "bundle.json").read_text()  # other bundles keep their layout
    assert load_bundle(plain).model.small_input_stem is False


def test_the_stem_is_refused_where_it_cannot_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing may be downloaded before the refusal
    with pytest.raises(ValueError, match="from scratch"):
        Recognizer("resnet18", weights="DEFAULT", small_input_stem=True)
    assert not any(tmp_path.rglob("*.pth"))
    with pytest.raises(ValueError, match="ResNet-family"):
        Recognizer("mobilenet_v3_small", small_input_stem=True)
    with pytest.raises(TypeError, match="True or False"):
        Recognizer("resnet18", small_input_stem="yes")
    csv = tmp_path / "d.csv"
    csv.write_text("image,label\n")
    with pytest.raises(ValueError, match="--small-input-stem .*--weights"):
        TrainConfig(data_csv=str(csv), model_name="resnet18", weights="DEFAULT", small_input_stem=True)
    with pytest.raises(ValueError, match="ResNet-family"):
        TrainConfig(data_csv=str(csv), model_name="efficientnet_b0", small_input_stem=True)
    assert "small_input_stem" in FIXED_ON_RESUME
