"""timm backbones (``timm/<architecture>``): outputs, a train / resume / bundle / recognize / export
round trip, and Hub weights from a local cache (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

from recognite.model import Recognizer  # noqa: E402

TINY = ["timm/test_resnet", "timm/test_convnext", "timm/test_efficientnet", "timm/test_vit"]


@pytest.mark.parametrize("name", TINY)
def test_training_and_eval_outputs_as_for_torchvision_models(name):
    torch.manual_seed(0)
    model = Recognizer(name, num_classes=5)
    images = torch.randn(3, 3, 32, 32)
    model.train()
    scores = model(images)
    assert scores.shape == (3, 5) and bool((scores.abs() <= 1 + 1e-5).all())
    assert torch.allclose(model.classifier.weight.norm(dim=1), torch.ones(5), atol=1e-5)
    model.eval()
    with torch.no_grad():
        embeddings = model(images)
        features = model.backbone(images)  # the timm network's pooled features
    assert embeddings.shape == (3, model.embedding_dim) and model.embedding_dim == model.backbone.num_features
    assert torch.allclose(embeddings, torch.nn.functional.normalize(features, dim=1), atol=1e-6)
    # Preprocessing comes from the model's data config.
    config = timm.data.resolve_data_config({}, model=model.backbone)
    assert model.preprocessing.mean == tuple(config["mean"]) and model.preprocessing.crop_size == config["input_size"][-1]
    rebuilt = Recognizer.from_config(model.config())
    assert rebuilt.embedding_dim == model.embedding_dim and rebuilt.model_name == name


def test_unknown_timm_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown timm model 'timm/test_resnte'.*timm/test_resnet"):
        Recognizer("timm/test_resnte")


def test_a_fixed_size_timm_model_gets_img_size_through_the_one_mechanism():
    from recognite.model.backbones import input_size_kwargs

    assert input_size_kwargs("timm/test_vit", 64) == {"img_size": 64}
    assert input_size_kwargs("timm/test_convnext", 64) == {}
    assert input_size_kwargs("timm/test_vit", 160) == {}


@pytest.mark.slow
def test_train_resume_bundle_recognize_export_round_trip(tmp_path):
    from recognite.bundle import load_bundle
    from recognite.cli.main import main
    from recognite.train import train

    from ..train.conftest import tiny_config, write_tiny_dataset

    csv_file = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    config = tiny_config(csv_file, run, model_name="timm/test_resnet", epochs=1, embedding_dim=24)
    train(config)
    train(tiny_config(csv_file, run, model_name="timm/test_resnet", epochs=2, embedding_dim=24, resume="auto"))
    bundle = load_bundle(run / "bundle", device="cpu")
    assert bundle.model.model_name == "timm/test_resnet" and bundle.embedding_dim == 24
    assert main(["gallery", "build", "--bundle", str(run / "bundle"), "--folder", str(csv_file.parent / "images"),
                 "--output", str(tmp_path / "g.safetensors"), "--no-progress"]) == 0
    assert main(["recognize", "--bundle", str(run / "bundle"), "--gallery", str(tmp_path / "g.safetensors"),
                 str(csv_file.parent / "images" / "l0"), "--output", str(tmp_path / "r.json"), "--no-progress"]) == 0
    answers = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(answers) == 4 and all(a["prediction"] for a in answers)
    assert main(["export", "--bundle", str(run / "bundle"), "--format", "torchscript",
                 "--output", str(tmp_path / "m.pt"), "--check"]) == 0


_LOAD_FROM_CACHE = """
import json, sys, torch
from recognite.model import Recognizer
from safetensors.torch import load_file
try:
    model = Recognizer("timm/test_resnet.r160_in1k", weights="DEFAULT")
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
state = load_file(sys.argv[1])
same = all(torch.equal(value, state[key]) for key, value in model.backbone.state_dict().items())
print(json.dumps({"same": same, "mean": list(model.preprocessing.mean)}))
"""


def _hub_cache(root, state):
    from safetensors.torch import save_file

    repo = root / "models--timm--test_resnet.r160_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def _run_offline(cache, weights_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home")}
    done = subprocess.run([sys.executable, "-c", _LOAD_FROM_CACHE, str(weights_file)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hub_weights_load_offline_from_a_local_cache(tmp_path):
    torch.manual_seed(3)
    full = timm.create_model("test_resnet", num_classes=1000)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    weights_file = _hub_cache(tmp_path / "hub", state)
    out = _run_offline(tmp_path / "hub", weights_file)
    assert out.get("same") is True, out


def test_missing_hub_weights_name_the_repository_file_and_cache(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _run_offline(tmp_path / "empty", tmp_path / "none.safetensors")
    assert "WeightsUnavailableError" in out["error"]
    assert "timm/test_resnet.r160_in1k" in out["error"] and "model.safetensors" in out["error"]
    assert str(tmp_path / "empty") in out["error"]


def test_a_local_timm_weights_file(tmp_path):
    torch.manual_seed(4)
    source = timm.create_model("test_convnext", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = Recognizer("timm/test_convnext", weights=str(tmp_path / "w.pth"))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    assert model.weights_sha256 is not None


# One per family; (name, input side): the side is the model's own where it fixes its input size.
FAMILIES = [
    ("timm/resnet18", 64), ("timm/convnext_atto", 64), ("timm/efficientnet_b0", 64),
    ("timm/vit_tiny_patch16_224", 224), ("timm/deit_tiny_patch16_224", 224),
    ("timm/swin_tiny_patch4_window7_224", 224), ("timm/eva02_tiny_patch14_224", 224),
    ("timm/vit_small_patch14_dinov2", 518), ("timm/vit_base_patch16_clip_224", 224),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "side"), FAMILIES)
def test_every_family_builds_and_embeds(name, side):
    from recognite.model.backbones import input_size_kwargs

    torch.manual_seed(0)
    model = Recognizer(name, **input_size_kwargs(name, side)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, model.embedding_dim) and model.embedding_dim == model.backbone.num_features
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_models_lists_timm_architectures(capsys):
    from recognite.cli.main import main
    from recognite.model import SUPPORTED_MODELS

    assert main(["models", "--timm", "test_vit"]) == 0
    names = capsys.readouterr().out.split()
    assert names and all(n.startswith("timm/test_vit") for n in names) and "timm/test_vit" in names
    assert not any(n.startswith("timm/") for n in SUPPORTED_MODELS)  # the contract's list stays torchvision's
