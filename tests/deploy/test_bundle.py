"""Model bundles: round trip, integrity and architecture checks, conversion of training checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recognite.bundle import (
    BUNDLE_FILE,
    WEIGHTS_FILE,
    bundle_from_checkpoint,
    load_bundle,
    save_bundle,
)
from recognite.model import Preprocessing

from .conftest import IMAGE_SIZE, make_model


def _inputs(batch: int = 3, seed: int = 0) -> torch.Tensor:
    # Non-square on purpose: the model itself accepts any H x W.
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE + 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def custom_model():
    model = make_model(seed=3, num_classes=4, bias=True)
    model.preprocessing = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_size=200,
                                        resize_size=240, interpolation="bicubic")
    return model


def test_round_trip_gives_identical_embeddings_and_config(custom_model, tmp_path):
    path = save_bundle(custom_model, tmp_path / "b", 48, threshold=0.625, label_names=["a", "b", 7, "d"],
                       metadata={"note": "ünïcode", "nested": {"x": [1, 2]}})
    bundle = load_bundle(path, device="cpu")
    assert not bundle.model.training
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(bundle.model.embed(x), custom_model.embed(x))
        assert torch.equal(bundle.model.classifier.weight, custom_model.classifier.weight)
        assert torch.equal(bundle.model.classifier.bias, custom_model.classifier.bias)
    assert bundle.model.config() == custom_model.config()
    assert bundle.preprocessing == custom_model.preprocessing
    assert bundle.image_size == 48
    assert bundle.threshold == 0.625
    assert bundle.label_names == ["a", "b", "7", "d"]
    assert bundle.metadata == {"note": "ünïcode", "nested": {"x": [1, 2]}}
    assert bundle.embedding_dim == 512
    # The transform follows the stored preprocessing: resize 48 * 240 / 200 = 57.6 -> 58, crop 48.
    steps = bundle.transform.transforms
    assert steps[0].size == 58 and steps[1].size == (48, 48)
    assert list(steps[-1].mean) == [0.5, 0.4, 0.3]
    # Only the two bundle files, and no temporary folder left beside the bundle.
    assert sorted(p.name for p in path.iterdir()) == [BUNDLE_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert path.stat().st_mode & 0o777 == 0o755  # readable by others, unlike a bare mkdtemp folder


def test_bundle_json_describes_the_model(custom_model, tmp_path):
    import hashlib

    path = save_bundle(custom_model, tmp_path / "b", IMAGE_SIZE)
    manifest = json.loads((path / BUNDLE_FILE).read_text())
    assert manifest["model"] == {"model_name": "resnet18", "embedding_dim": 512, "normalize": True, "num_classes": 4,
                                 "bias": True, "num_subcenters": 1, "model_kwargs": {}}
    assert manifest["weights_sha256"] == hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert manifest["threshold"] is None and manifest["label_names"] is None
    assert manifest["preprocessing"]["interpolation"] == "bicubic"


def test_saving_over_an_earlier_bundle_replaces_it(tmp_path):
    first, second = make_model(seed=1), make_model(seed=2)
    save_bundle(first, tmp_path / "b", IMAGE_SIZE, threshold=0.1)
    save_bundle(second, tmp_path / "b", IMAGE_SIZE, threshold=0.2)
    bundle = load_bundle(tmp_path / "b", device="cpu")
    x = _inputs(2)
    with torch.no_grad():
        assert torch.equal(bundle.model.embed(x), second.embed(x))
        assert not torch.equal(bundle.model.embed(x), first.embed(x))
    assert bundle.threshold == 0.2
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a model bundle"):
        save_bundle(make_model(), tmp_path / "data", IMAGE_SIZE)
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_save_bundle_checks_its_arguments(tmp_path):
    model = make_model(num_classes=2)
    with pytest.raises(TypeError, match="Recognizer"):
        save_bundle(torch.nn.Linear(2, 2), tmp_path / "b", IMAGE_SIZE)
    with pytest.raises(ValueError, match="label_names has 3 entries but .* num_classes=2"):
        save_bundle(model, tmp_path / "b", IMAGE_SIZE, label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        save_bundle(model, tmp_path / "b", IMAGE_SIZE, threshold=math.nan)
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        save_bundle(model, tmp_path / "b", 0)
    with pytest.raises(ValueError, match="metadata must be JSON-serializable"):
        save_bundle(model, tmp_path / "b", IMAGE_SIZE, metadata={"t": torch.zeros(1)})
    assert not (tmp_path / "b").exists()
    # -inf accepts every query: stored as no threshold.
    assert load_bundle(save_bundle(model, tmp_path / "b", IMAGE_SIZE, threshold=-math.inf), "cpu").threshold is None


@pytest.fixture
def saved(tmp_path):
    return save_bundle(make_model(num_classes=3), tmp_path / "b", IMAGE_SIZE, threshold=0.5)


def test_tampered_weights_are_refused(saved):
    weights = saved / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded in bundle.json"):
        load_bundle(saved, device="cpu")


def test_truncated_weights_are_refused(saved):
    weights = saved / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="modified or truncated"):
        load_bundle(saved, device="cpu")
    with pytest.raises(ValueError, match="Could not read the weights file"):
        load_bundle(saved, device="cpu", verify=False)


def _edit_manifest(path, **model_changes):
    manifest = json.loads((path / BUNDLE_FILE).read_text())
    manifest["model"].update(model_changes)
    (path / BUNDLE_FILE).write_text(json.dumps(manifest))


def test_wrong_architecture_names_the_mismatch(saved):
    _edit_manifest(saved, model_name="resnet34")
    with pytest.raises(ValueError, match=r"do not fit the architecture 'resnet34' named in bundle.json: missing keys "
                                         r"\['backbone.layer1.2"):
        load_bundle(saved, device="cpu")


def test_wrong_class_count_names_the_shape_mismatch(saved):
    _edit_manifest(saved, num_classes=5)
    with pytest.raises(ValueError, match=r"shape mismatches \['classifier.weight: file \(3, 512\) vs model \(5, 512\)'\]"):
        load_bundle(saved, device="cpu")


def test_missing_files_are_named(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_bundle(saved)
    (saved / BUNDLE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="bundle.json is missing"):
        load_bundle(saved)


def test_garbled_manifest_is_refused(saved):
    (saved / BUNDLE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_bundle(saved)
    (saved / BUNDLE_FILE).write_text(json.dumps({"format": "recognite.bundle", "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_bundle(saved)


# --- training checkpoints ---------------------------------------------------------------------


def _checkpoint(tmp_path, model, *, metric="cosine", threshold=0.42, epoch=3, history=None, name="best.pt"):
    """A checkpoint with the keys recognite train writes (see recognite.train.trainer)."""
    from recognite.train.checkpoint import save_checkpoint

    config = {"model_name": "resnet18", "image_size": 40, "metric": metric, "avg_refs": False, "weights": None}
    state = {
        "model": model.state_dict(), "model_config": model.config(), "config": config,
        "label_names": ["l0", "l1", "l2"], "threshold": threshold, "epoch": epoch, "batch_in_epoch": 0,
        "history": history if history is not None else [{"epoch": epoch, "top1": 0.5, "threshold": threshold}],
        "optimizer": {}, "rng": {},
    }
    path = tmp_path / name
    save_checkpoint(state, path)
    return path


def test_bundle_from_checkpoint(tmp_path):
    model = make_model(seed=5, num_classes=3)
    bundle = load_bundle(bundle_from_checkpoint(_checkpoint(tmp_path, model), tmp_path / "b"), device="cpu")
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(bundle.model.embed(x), model.embed(x))
    assert bundle.image_size == 40
    assert bundle.threshold == 0.42
    assert bundle.label_names == ["l0", "l1", "l2"]
    assert bundle.model.config() == model.config()
    assert bundle.metadata["train_config"]["metric"] == "cosine"
    assert bundle.metadata["epoch"] == 3


@pytest.mark.parametrize(("metric", "threshold", "expected"), [
    ("inner", 0.3, 0.3),
    ("euclid", -0.5, 1 - 0.5**2 / 2),  # distance 0.5 between unit vectors <=> cosine 0.875
    ("sq_euclid", -0.5, 1 - 0.5 / 2),  # squared distance 0.5 <=> cosine 0.75
])
def test_checkpoint_threshold_is_converted_to_a_cosine(tmp_path, metric, threshold, expected):
    model = make_model(num_classes=3)
    path = _checkpoint(tmp_path, model, metric=metric, threshold=threshold)
    assert load_bundle(bundle_from_checkpoint(path, tmp_path / "b"), "cpu").threshold == pytest.approx(expected)


def test_last_checkpoint_uses_the_threshold_of_its_own_epoch(tmp_path):
    model = make_model(num_classes=3)
    history = [{"epoch": 1, "threshold": 0.7}, {"epoch": 2, "threshold": 0.61}]
    path = _checkpoint(tmp_path, model, threshold=0.7, epoch=2, history=history, name="last.pt")
    assert load_bundle(bundle_from_checkpoint(path, tmp_path / "b"), "cpu").threshold == 0.61


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        bundle_from_checkpoint(tmp_path / "missing.pt", tmp_path / "b")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a recognite training checkpoint"):
        bundle_from_checkpoint(tmp_path / "other.pt", tmp_path / "b")
    model = make_model(num_classes=3)
    path = _checkpoint(tmp_path, model)
    state = torch.load(path, weights_only=False)
    state["model_config"]["num_classes"] = 4
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"do not fit 'resnet18'.*classifier.weight: file \(3, 512\) vs model \(4, 512\)"):
        bundle_from_checkpoint(path, tmp_path / "b")
    assert not (tmp_path / "b").exists()
