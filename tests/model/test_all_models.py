"""Build every model in SUPPORTED_MODELS (slow: about 10-20 minutes on a 2-core CPU)."""

from __future__ import annotations

import time

import pytest
import torch
import torchvision

from recognite.model import (
    SUPPORTED_MODELS,
    Recognizer,
    get_path_to_ultimate_classifier,
)

# Models that cannot run on the default 64 px test input, with the input they need.
_INPUT_SIZE = {"inception_v3": 80, "maxvit_t": 224, "vit_h_14": 56}
# ViTs check the input size against `image_size` (a multiple of the patch size); a smaller one
# keeps the test fast.
_MODEL_KWARGS = {name: {"image_size": 64} for name in SUPPORTED_MODELS if name.startswith("vit_")}
_MODEL_KWARGS["vit_h_14"] = {"image_size": 56}


@pytest.mark.slow
def test_registry_rule_for_every_classification_model():
    """Every registered classification model either is supported and ends in a Linear, or not."""
    for name in torchvision.models.list_models(module=torchvision.models):
        with torch.device("meta"):
            try:
                net = torchvision.models.get_model(name, weights=None)
            except NotImplementedError:  # regnets compute their widths with real tensors
                net = None
        if net is None:
            net = torchvision.models.get_model(name, weights=None)
        try:
            get_path_to_ultimate_classifier(net)
            ends_in_linear = True
        except ValueError:
            ends_in_linear = False
        assert ends_in_linear == (name in SUPPORTED_MODELS), name


@pytest.mark.slow
@pytest.mark.parametrize("model_name", SUPPORTED_MODELS)
def test_every_supported_model(model_name):
    start = time.perf_counter()
    size = _INPUT_SIZE.get(model_name, 64)
    kwargs = _MODEL_KWARGS.get(model_name, {})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=gen)
    for bias in (False, True):
        model = Recognizer(model_name, num_classes=5, bias=bias, **kwargs)
        assert (model.classifier.bias is not None) == bias
        model.train()
        out = model(x)
        assert out.shape == (2, 5)
        if not bias:
            assert out.abs().max() <= 1 + 1e-5
        torch.testing.assert_close(model.classifier.weight.norm(dim=1), torch.ones(5))
        model.eval()
        with torch.no_grad():
            emb = model(x)
        assert emb.shape == (2, model.embedding_dim)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    print(f"{model_name}: {time.perf_counter() - start:.1f}s at {size}px {kwargs or ''}")
