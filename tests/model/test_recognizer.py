from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from recognite.model import (
    SUPPORTED_MODELS,
    Recognizer,
    WeightsUnavailableError,
    get_module_at_path,
    get_path_to_ultimate_classifier,
    get_ultimate_classifier,
    set_module_at_path,
    split_backbone_classifier,
    update_classifier,
)

SPEC_MODELS = (
    ["alexnet", "googlenet", "inception_v3", "maxvit_t", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
    + [f"convnext_{s}" for s in ("tiny", "small", "base", "large")]
    + [f"densenet{n}" for n in (121, 161, 169, 201)]
    + [f"efficientnet_b{i}" for i in range(8)]
    + [f"efficientnet_v2_{s}" for s in "sml"]
    + [f"mnasnet{s}" for s in ("0_5", "0_75", "1_0", "1_3")]
    + [f"resnet{n}" for n in (18, 34, 50, 101, 152)]
    + ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
    + [f"shufflenet_v2_x{s}" for s in ("0_5", "1_0", "1_5", "2_0")]
    + [f"swin_{s}" for s in "tsb"]
    + [f"swin_v2_{s}" for s in "tsb"]
    + [f"vgg{n}{bn}" for n in (11, 13, 16, 19) for bn in ("", "_bn")]
    + ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]
)


def test_supported_models_is_the_registry_minus_non_linear_heads():
    assert SUPPORTED_MODELS == sorted(SUPPORTED_MODELS)
    assert set(SPEC_MODELS) <= set(SUPPORTED_MODELS)
    regnets = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("regnet_")]
    assert len(regnets) >= 15 and set(regnets) <= set(SUPPORTED_MODELS)
    registry = set(torchvision.models.list_models(module=torchvision.models))
    assert set(SUPPORTED_MODELS) == {n for n in registry if not n.startswith("squeezenet")}


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet19'.*resnet18.*SUPPORTED_MODELS"):
        Recognizer("resnet19")
    with pytest.raises(ValueError, match="Unknown model 'squeezenet1_0'"):
        Recognizer("squeezenet1_0")


def _manual_cosines(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosine similarity written out element by element (independent of F.normalize)."""
    out = torch.empty(features.shape[0], weight.shape[0], dtype=torch.float64)
    for i in range(features.shape[0]):
        for j in range(weight.shape[0]):
            a, b = features[i].double(), weight[j].double()
            out[i, j] = (a * b).sum() / math.sqrt((a * a).sum()) / math.sqrt((b * b).sum())
    return out


def test_training_forward_returns_cosines_and_keeps_class_vectors_at_unit_norm(seeded):
    model = Recognizer("resnet18", num_classes=7)
    with torch.no_grad():
        model.classifier.weight.mul_(torch.linspace(0.5, 3.0, 7)[:, None])  # unequal norms
    weight_before = model.classifier.weight.detach().clone()
    x = torch.randn(3, 3, 32, 32)
    model.train()
    scores = model(x)
    assert scores.shape == (3, 7)
    model.eval()
    with torch.no_grad():
        features = model.backbone(x)  # eval-mode BN differs, so recompute in train mode below
    model.train()
    with torch.no_grad():
        features = model.backbone(x)
    expected = _manual_cosines(features, weight_before)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.classifier.weight.norm(dim=1), torch.ones(7))
    assert scores.abs().max() <= 1 + 1e-6


def test_eval_forward_and_embed_return_unit_embeddings(seeded):
    model = Recognizer("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    emb = model(x)
    assert emb.shape == (2, model.embedding_dim) and model.embedding_dim == 512
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    raw = model.backbone(x)
    torch.testing.assert_close(emb, raw / raw.norm(dim=1, keepdim=True))
    model.train()
    assert model.embed(x).shape == (2, 512)  # embed ignores the mode


def test_no_classifier_returns_embeddings_in_training_mode(seeded):
    model = Recognizer("resnet18").train()
    assert model.classifier is None
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_normalize_false_gives_plain_logits_and_raw_embeddings(seeded):
    model = Recognizer("resnet18", num_classes=3, bias=True, normalize=False)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    logits = model(x)
    with torch.no_grad():
        expected = model.backbone(x) @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    model.eval()
    emb = model(x)
    torch.testing.assert_close(emb, model.backbone(x))
    assert not torch.allclose(emb.norm(dim=1), torch.ones(2))


def test_gradients_go_through_the_normalization(seeded):
    model = Recognizer("resnet18", num_classes=5).train()
    scores = model(torch.randn(4, 3, 32, 32))
    loss = torch.nn.functional.cross_entropy(scores / 0.1, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    weight, grad = model.classifier.weight.detach(), model.classifier.weight.grad
    # Scores depend only on the direction of each class vector, so its gradient is tangent.
    torch.testing.assert_close((weight * grad).sum(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    assert grad.abs().sum() > 0


def test_head_gradient_matches_finite_differences():
    model = Recognizer("resnet18", num_classes=3).double().train()
    model.backbone = nn.Identity()  # test the cosine head alone, in float64
    features = torch.randn(2, 512, dtype=torch.float64, requires_grad=True)
    model.classifier.weight.data = torch.randn(3, 512, dtype=torch.float64)

    def head(f: torch.Tensor) -> torch.Tensor:
        return model(f)

    # autocast is disabled inside forward and computations are cast to float32; check the
    # float32 cosine head against central differences with a matching tolerance.
    f0 = features.detach()
    scores = head(features)
    scores[0, 1].backward()
    eps = 1e-3
    idx = 7
    plus, minus = f0.clone(), f0.clone()
    plus[0, idx] += eps
    minus[0, idx] -= eps
    numeric = (head(plus)[0, 1] - head(minus)[0, 1]) / (2 * eps)
    assert abs(features.grad[0, idx].item() - numeric.item()) < 1e-4


def test_bias_and_its_old_name():
    assert Recognizer("resnet18", num_classes=3).classifier.bias is None
    assert Recognizer("resnet18", num_classes=3, bias=True).classifier.bias is not None
    assert Recognizer("resnet18", num_classes=3, clf_bias=True).classifier.bias is not None


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        Recognizer("resnet18", num_classes=bad)


@pytest.mark.parametrize(
    ("model_name", "size", "kwargs"),
    [
        ("mobilenet_v3_small", 32, {}),  # Sequential head
        ("googlenet", 64, {}),  # auxiliary outputs
        ("inception_v3", 80, {}),  # auxiliary outputs, needs >= 75 px
        ("swin_t", 64, {}),  # transformer, plain Linear head named 'head'
        ("vit_b_32", 32, {"image_size": 32}),  # transformer, Sequential 'heads'
    ],
)
def test_representative_families(model_name, size, kwargs, seeded):
    model = Recognizer(model_name, num_classes=6, **kwargs)
    x = torch.randn(2, 3, size, size)
    model.train()
    out = model(x)
    assert out.shape == (2, 6) and out.abs().max() <= 1 + 1e-5
    model.eval()
    with torch.no_grad():
        emb = model(x)
    assert emb.shape == (2, model.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_classifier_paths_and_helpers():
    vgg = torchvision.models.vgg11(weights=None)
    assert get_path_to_ultimate_classifier(vgg) == ["classifier", "6"]
    assert get_ultimate_classifier(vgg) is vgg.classifier[6]
    resnet = torchvision.models.resnet18(weights=None)
    assert get_path_to_ultimate_classifier(resnet) == ["fc"]
    assert get_module_at_path(resnet, ["layer1", "0", "conv1"]) is resnet.layer1[0].conv1
    with pytest.raises(ValueError, match="has no child 'nope'"):
        get_module_at_path(resnet, ["layer1", "nope"])
    set_module_at_path(resnet, ["fc"], nn.Linear(512, 9))
    assert resnet.fc.out_features == 9
    update_classifier(vgg, 11, bias=True)
    assert vgg.classifier[6].out_features == 11 and vgg.classifier[6].bias is not None
    backbone, clf = split_backbone_classifier(vgg)
    assert clf.out_features == 11 and isinstance(backbone.classifier[6], nn.Identity)
    with pytest.raises(ValueError, match="does not end in a linear classifier"):
        get_path_to_ultimate_classifier(torchvision.models.squeezenet1_1(weights=None))
    recog = Recognizer("resnet18", num_classes=3)
    update_classifier(recog, 8)
    assert recog.classifier.out_features == 8 and recog.num_classes == 8


# --- weights ---------------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _write_hub_file(torch_home, weights, model_name: str) -> dict[str, torch.Tensor]:
    net = torchvision.models.get_model(model_name, weights=None)
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-0.1, 0.1)
    filename = weights.url.rsplit("/", 1)[-1]
    target = torch_home / "hub" / "checkpoints" / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    torch.save(state, target)
    return state


@pytest.mark.parametrize(
    "weights_arg",
    ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", torchvision.models.ResNet18_Weights.IMAGENET1K_V1],
)
def test_weights_from_hub_cache_without_network(torch_home, weights_arg, monkeypatch):
    state = _write_hub_file(torch_home, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "resnet18")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = Recognizer("resnet18", num_classes=4, weights=weights_arg)
    torch.testing.assert_close(model.backbone.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.preprocessing.mean == (0.485, 0.456, 0.406) and model.preprocessing.crop_size == 224


def test_failed_download_names_file_url_and_place(torch_home, monkeypatch):
    def fail(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    with pytest.raises(WeightsUnavailableError) as info:
        Recognizer("resnet18", weights="DEFAULT")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(torch_home / "hub" / "checkpoints") in message


def test_unknown_weights_name_lists_allowed():
    with pytest.raises(ValueError, match="Unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        Recognizer("resnet18", weights="IMAGENET9K")
    with pytest.raises(ValueError, match="belong to another model"):
        Recognizer("resnet18", weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)


def test_weights_path_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        Recognizer("resnet18", weights=str(tmp_path / "nope.pth"))


def test_weights_from_local_torchvision_file(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    model = Recognizer("resnet18", num_classes=2, weights=path)
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, net.layer1[0].conv1.weight)


def test_weights_from_local_recognizer_file_and_mismatch(tmp_path):
    source = Recognizer("resnet18", num_classes=3)
    path = tmp_path / "recog.pt"
    torch.save(source.state_dict(), path)
    same = Recognizer("resnet18", num_classes=3, weights=str(path))
    torch.testing.assert_close(same.classifier.weight, source.classifier.weight)
    torch.testing.assert_close(same.backbone.fc.__class__ is nn.Identity, True)
    other_head = Recognizer("resnet18", num_classes=5, weights=str(path))  # new head, same backbone
    torch.testing.assert_close(other_head.backbone.conv1.weight, source.backbone.conv1.weight)
    with pytest.raises(ValueError, match="does not fit this architecture"):
        Recognizer("resnet34", weights=str(path))
