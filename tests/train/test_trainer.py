from __future__ import annotations

import csv
import signal

import pytest
import torch
import yaml

from recognite.train import TrainConfig, TrainingDivergedError, train
from recognite.train import trainer as trainer_module
from recognite.train.checkpoint import load_checkpoint

from .conftest import tiny_config


def _params(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_a_short_run_writes_checkpoints_metrics_and_config(tiny_csv, tmp_path):
    result = train(tiny_config(tiny_csv, tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.csv", "config.yaml", "bundle/bundle.json", "bundle/model.safetensors"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for r in rows:
        assert 0.0 <= float(r["top1"]) <= 1.0 and 0.0 <= float(r["mAP"]) <= 1.0
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["step"] == 4
    assert len(state["label_names"]) == 5  # 10 labels, 2 folds
    assert result.best["epoch"] in (1, 2)
    best_row = max(rows[1:], key=lambda r: float(r["mAP"]))
    assert float(best_row["mAP"]) == pytest.approx(result.best["mAP"])
    assert (TrainConfig.from_dict(__import__("yaml").safe_load((run / "config.yaml").read_text()))
            == tiny_config(tiny_csv, tmp_path / "run"))


def test_resume_after_interrupt_matches_an_uninterrupted_run(tiny_csv, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(tiny_config(tiny_csv, reference))

    # Interrupt in the middle of epoch 2 (after its first step), then resume.
    original_step = torch.optim.SGD.step
    calls = {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C arrives in the middle of a step
            signal.raise_signal(signal.SIGINT)
        return out

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(torch.optim.SGD, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_csv, interrupted))
    monkeypatch.setattr(torch.optim.SGD, "step", original_step)
    state = load_checkpoint(interrupted / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 1, 3)

    train(tiny_config(tiny_csv, interrupted, resume=str(interrupted / "last.pt")))
    expected, resumed = _params(reference / "last.pt"), _params(interrupted / "last.pt")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    timing = "train_images_per_s"  # wall-clock speed differs between runs; everything else must not
    rows_ref = [{k: v for k, v in r.items() if k != timing} for r in csv.DictReader((reference / "metrics.csv").open())]
    rows_res = [{k: v for k, v in r.items() if k != timing} for r in csv.DictReader((interrupted / "metrics.csv").open())]
    assert rows_ref == rows_res


def test_resume_auto_at_an_epoch_boundary(tiny_csv, tmp_path):
    reference = tmp_path / "reference"
    train(tiny_config(tiny_csv, reference, epochs=2))
    split = tmp_path / "split"
    original = trainer_module.validate
    calls = {"n": 0}

    def validate_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # validation after epoch 2 (1 = before training)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    trainer_module.validate = validate_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(tiny_csv, split, epochs=2))
    finally:
        trainer_module.validate = original
    train(tiny_config(tiny_csv, split, epochs=2, resume="auto"))
    for key, value in _params(reference / "last.pt").items():
        torch.testing.assert_close(_params(split / "last.pt")[key], value, rtol=0, atol=0)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_csv, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(tiny_csv, run, epochs=1))
    before = _params(run / "last.pt")
    original_forward = trainer_module.Recognizer.forward

    def nan_forward(self, x):
        return original_forward(self, x) * float("nan")

    monkeypatch.setattr(trainer_module.Recognizer, "forward", nan_forward)
    with pytest.raises(TrainingDivergedError, match="loss became nan.*last good checkpoint"):
        train(tiny_config(tiny_csv, run, epochs=2, resume="auto"))
    after = _params(run / "last.pt")
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_cross_validation_over_all_folds(tiny_csv, tmp_path):
    result = train(tiny_config(tiny_csv, tmp_path / "cv", val_fold="all", epochs=1, max_steps_per_epoch=1))
    assert len(result.folds) == 2
    assert (tmp_path / "cv" / "fold_0" / "best.pt").is_file() and (tmp_path / "cv" / "fold_1" / "best.pt").is_file()
    tops = [r.best["top1"] for r in result.folds]
    assert result.mean["top1"] == pytest.approx(sum(tops) / 2)
    assert result.std["top1"] == pytest.approx(abs(tops[0] - tops[1]) / 2 ** 0.5)
    assert (tmp_path / "cv" / "cv_summary.csv").read_text().startswith("metric,mean,std")


def test_frozen_layers_do_not_change(tiny_csv, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_csv, run, epochs=1, frozen_layers=["conv1", "bn1", "layer1"]))
    from recognite.model import Recognizer

    torch.manual_seed(0)
    initial = Recognizer("resnet18").state_dict()
    trained = _params(run / "last.pt")
    for key in ("backbone.conv1.weight", "backbone.bn1.running_mean", "backbone.layer1.0.conv2.weight"):
        torch.testing.assert_close(trained[key], initial[key], rtol=0, atol=0)
    assert not torch.equal(trained["backbone.layer2.0.conv1.weight"], initial["backbone.layer2.0.conv1.weight"])
    with pytest.raises(ValueError, match="--frozen-layers 'layer9' matches no backbone parameter"):
        train(tiny_config(tiny_csv, tmp_path / "bad", frozen_layers=["layer9"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"val_fold": "7"}, "--val-fold must be in 0..1"),
        ({"model_name": "resnet19"}, "Unknown model 'resnet19'"),
        ({"loss": "triplet"}, "--loss must be one of"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
        ({"rrc_scale": (0.9, 0.1)}, "--rrc-scale needs"),
        ({"content_margin": -0.5}, "--content-margin is a fraction"),
        ({"affine_degrees": 200.0}, "--affine-degrees <= 180"),
        ({"affine_translate": 1.5}, "--affine-translate is a fraction"),
        ({"affine_scale": (1.2, 0.8)}, "--affine-scale needs"),
        ({"elastic_magnitude": 1.5}, "--elastic-magnitude is a fraction of the image side in \\[0, 1\\], got 1.5"),
        ({"elastic_grid": 1}, "--elastic-grid must be an integer >= 2, got 1"),
    ],
)
def test_bad_config_is_refused(tiny_csv, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tiny_csv, tmp_path / "run", **overrides)


def test_three_crop_validation_with_averaged_references(tiny_csv, tmp_path):
    result = train(tiny_config(tiny_csv, tmp_path / "run", epochs=1, max_steps_per_epoch=1, three_crop=True, avg_refs=True))
    assert 0.0 <= result.best["top1"] <= 1.0 and 0.0 <= result.best["mAP"] <= 1.0


def test_training_leaves_the_callers_global_rng_untouched(tiny_csv, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(tiny_config(tiny_csv, tmp_path / "run", epochs=1, max_steps_per_epoch=1))
    torch.testing.assert_close(torch.rand(3), expected)


def test_content_crop_and_affine_reach_training_and_the_bundle(tiny_csv, tmp_path):
    from recognite.bundle import load_bundle
    from recognite.data.transforms import (
        ContentCrop,
        RandomAffineOnBorder,
        RandomElasticOnBorder,
    )

    config = tiny_config(tiny_csv, tmp_path / "run", epochs=1, max_steps_per_epoch=1, content_crop=True,
                         content_margin=0.1, affine_degrees=10.0, affine_scale=(0.9, 1.1), elastic_magnitude=0.04,
                         elastic_grid=5)
    affine = config.affine()
    assert isinstance(affine, RandomAffineOnBorder) and affine.degrees == 10.0 and affine.scale == (0.9, 1.1)
    elastic = config.elastic()
    assert isinstance(elastic, RandomElasticOnBorder) and (elastic.magnitude, elastic.grid) == (0.04, 5)
    assert tiny_config(tiny_csv, tmp_path / "plain").affine() is None
    assert tiny_config(tiny_csv, tmp_path / "plain").elastic() is None
    train(config)
    bundle = load_bundle(tmp_path / "run" / "bundle", device="cpu")
    assert bundle.preprocessing.content_crop and bundle.preprocessing.content_margin == 0.1
    crop = bundle.transform.transforms[0]
    assert isinstance(crop, ContentCrop) and crop.margin == 0.1
    saved = TrainConfig.from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert saved.content_crop and saved.affine_scale == (0.9, 1.1) and saved.elastic_magnitude == 0.04


def test_rotation_classes_quadruple_the_classifier_and_the_label_names(tiny_csv, tmp_path):
    config = tiny_config(tiny_csv, tmp_path / "run", epochs=1, max_steps_per_epoch=1, rotation_classes=True)
    train(config)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    names = state["label_names"]  # 5 training labels (10 labels, 2 folds), then their 3 rotations
    assert len(names) == 20 and names[5:10] == [f"{name}@rot90" for name in names[:5]]
    assert names[15:] == [f"{name}@rot270" for name in names[:5]]
    assert state["model"]["classifier.weight"].shape == (20, 512)
    saved = TrainConfig.from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert saved.rotation_classes


def test_channels_last_layout_reaches_the_model_and_changes_no_result(tiny_csv, tmp_path, monkeypatch):
    from recognite.model import Recognizer

    layouts = []
    forward = Recognizer.forward

    def spy(self, x):
        if self.training:
            layouts.append((x.is_contiguous(memory_format=torch.channels_last),
                            self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)))
        return forward(self, x)

    monkeypatch.setattr(Recognizer, "forward", spy)
    for channels_last in (True, False):
        train(tiny_config(tiny_csv, tmp_path / str(channels_last), epochs=1, max_steps_per_epoch=1,
                          channels_last=channels_last))
    # One step each: input and weights in the chosen layout.
    assert layouts == [(True, True), (False, False)]
    ours, other = _params(tmp_path / "True" / "last.pt"), _params(tmp_path / "False" / "last.pt")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the trainer seeds the model's initialization with config.seed
        initial = Recognizer("resnet18").state_dict()
    assert ours.keys() == other.keys()
    moved = 0
    for name, value in ours.items():
        # The two runs differ only by float rounding (measured: at most 1e-5 on weights up to 0.6).
        torch.testing.assert_close(value, other[name], rtol=0, atol=1e-4, msg=name)
        if name in initial and value.is_floating_point():
            moved += not torch.allclose(value, initial[name], rtol=0, atol=1e-4)
    assert moved > 0  # training moved the weights more than the tolerance, so the comparison means something


@pytest.mark.slow
def test_resume_from_an_epoch_checkpoint_is_exact_with_loader_workers(tiny_csv, tmp_path, monkeypatch):
    """docs/faults.md: with the default --num-workers 2, resuming from an epoch boundary is exact."""
    options = dict(epochs=3, num_workers=2, rrc_scale=(0.3, 1.0), hflip=0.5)
    reference = tmp_path / "reference"
    train(tiny_config(tiny_csv, reference, **options))
    split = tmp_path / "split"
    original = trainer_module.validate
    calls = {"n": 0}

    def validate_then_stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the validation after epoch 2: last.pt of epoch 1 is the last checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "validate", validate_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_csv, split, **options))
    monkeypatch.setattr(trainer_module, "validate", original)
    train(tiny_config(tiny_csv, split, resume="auto", **options))
    for key, value in _params(reference / "last.pt").items():
        torch.testing.assert_close(_params(split / "last.pt")[key], value, rtol=0, atol=0)
