"""Faults the duplicated code hid: the threshold of last.pt, three-crop thresholds in bundles, a NaN
checkpoint metric, ViTs at other input sizes, and ``load_bundle(verify=False)``."""

from __future__ import annotations

import math

import pytest
import torch

from recognite import _bundle_files
from recognite.bundle import load_bundle
from recognite.checkpoint import checkpoint_threshold, epoch_row
from recognite.data import train_val_datasets
from recognite.eval import summary_metrics
from recognite.model import Recognizer
from recognite.model import backbones as backbones_module
from recognite.train import train
from recognite.train import trainer as trainer_module
from recognite.train.evaluation import ValidationResult

from .conftest import tiny_config, write_tiny_dataset


def test_checkpoint_threshold_is_the_one_of_its_own_epoch():
    history = [{"epoch": 0, "threshold": 0.1}, {"epoch": 1, "threshold": 0.7}, {"epoch": 2, "threshold": 0.4}]
    last = {"epoch": 2, "history": history, "threshold": 0.7}  # best epoch 1, weights of epoch 2
    assert checkpoint_threshold(last) == pytest.approx(0.4)
    assert epoch_row(last) == history[2]
    assert checkpoint_threshold({"epoch": 1, "history": history, "threshold": 0.7}) == pytest.approx(0.7)
    assert checkpoint_threshold({"epoch": 3, "history": [], "threshold": 0.25}) == pytest.approx(0.25)
    assert checkpoint_threshold({"epoch": 3, "history": [{"epoch": 3, "threshold": math.nan}]}) is None


def test_three_crop_run_ships_a_threshold_calibrated_on_single_crops(tmp_path):
    # Wide images: the three crops (left, centre, right) differ, so their mean embedding does too.
    tiny_csv = write_tiny_dataset(tmp_path / "data", size=20, width=60)
    config = tiny_config(tiny_csv, tmp_path / "run", three_crop=True)
    result = train(config)
    bundle = load_bundle(tmp_path / "run" / "bundle", device="cpu")
    _, ds_gallery, ds_query = train_val_datasets(tiny_csv, num_folds=2, num_refs=1)
    root = tiny_csv.parent
    gallery_embs = bundle.embed([root / p for p in ds_gallery.df["image"]])
    query_embs = bundle.embed([root / p for p in ds_query.df["image"]])
    gallery_labels = torch.tensor([ds_gallery.label_to_int[v] for v in ds_gallery.df["label"]])
    query_labels = torch.tensor([ds_query.label_to_int[v] for v in ds_query.df["label"]])
    single = summary_metrics(query_embs, query_labels, gallery_embs, gallery_labels).threshold
    assert bundle.threshold == pytest.approx(single, abs=1e-6)
    assert result.threshold is not None and result.threshold != pytest.approx(single, abs=1e-6)  # three-crop one


def test_a_nan_checkpoint_metric_still_writes_best_pt_and_the_bundle(tiny_csv, tmp_path, monkeypatch):
    original = trainer_module.validate

    def validate_with_nan_map(*args, **kwargs):
        result = original(*args, **kwargs)
        return ValidationResult(metrics={**result.metrics, "mAP": math.nan}, threshold=result.threshold)

    monkeypatch.setattr(trainer_module, "validate", validate_with_nan_map)
    train(tiny_config(tiny_csv, tmp_path / "run"))
    assert (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "bundle" / "bundle.json").is_file()


def test_top5_checkpoint_metric_with_a_small_gallery_is_refused_up_front(tiny_csv, tmp_path):
    with pytest.raises(ValueError, match="checkpoint-metric top5 needs at least 5 gallery items"):
        train(tiny_config(tiny_csv, tmp_path / "run", checkpoint_metric="top5", num_folds=5))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_vit_takes_another_input_size_at_build_time():
    torch.manual_seed(0)
    model = Recognizer("vit_b_32", **backbones_module.input_size_kwargs("vit_b_32", 64)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 768)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert model.config()["model_kwargs"] == {"image_size": 64}


def test_pretrained_vit_position_embeddings_are_interpolated(monkeypatch):
    """The pretrained path: weights built at 224 px, then moved to a 64 px grid."""
    torch.manual_seed(0)
    pretrained = {}

    def fake_enum_build(builder, weights, **kwargs):
        network = builder(weights=None, **kwargs)
        pretrained["state"] = {k: v.clone() for k, v in network.state_dict().items()}
        return network

    monkeypatch.setattr(backbones_module, "_build_with_enum", fake_enum_build)
    from torchvision.models import ViT_B_32_Weights

    network = backbones_module.build_network("vit_b_32", ViT_B_32_Weights.IMAGENET1K_V1, image_size=64)
    assert network.image_size == 64
    state = network.state_dict()
    grid = state["encoder.pos_embedding"]
    assert grid.shape == (1, 1 + (64 // 32) ** 2, 768)
    # The class token's embedding is carried over; the other weights are the pretrained ones.
    assert torch.equal(grid[:, :1], pretrained["state"]["encoder.pos_embedding"][:, :1])
    assert torch.equal(state["conv_proj.weight"], pretrained["state"]["conv_proj.weight"])


def test_load_bundle_without_verify_does_not_hash(tmp_path, monkeypatch):
    from recognite.bundle import save_bundle

    model = Recognizer("resnet18", num_classes=3)
    save_bundle(model, tmp_path / "b", image_size=32)

    def refuse(path):
        raise AssertionError("hashed although verify=False")

    monkeypatch.setattr(_bundle_files, "sha256_file", refuse)
    bundle = load_bundle(tmp_path / "b", device="cpu", verify=False)
    assert bundle.weights_sha256 == _bundle_files.read_manifest(tmp_path / "b")["weights_sha256"]
    with pytest.raises(AssertionError, match="hashed"):
        load_bundle(tmp_path / "b", device="cpu", verify=True)
