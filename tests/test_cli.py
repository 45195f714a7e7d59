"""The `recognite` command line: help, bad input, and a short train -> resume -> evaluate run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from recognite.cli import main
from recognite.model import SUPPORTED_MODELS

from .train.conftest import write_tiny_dataset

FAST = ["--model-name", "resnet18", "--image-size", "32", "--num-folds", "2", "--batch-size", "8",
        "--val-batch-size", "16", "--num-workers", "0", "--max-steps-per-epoch", "1", "--no-progress", "--no-report"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "evaluate", "embed", "gallery", "recognize", "export", "report", "models", "bundle"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--val-fold" in out and "--temperature" in out and "(default: cosface)" in out


def test_models_lists_the_supported_backbones(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == SUPPORTED_MODELS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-csv", "{missing}"], "missing.csv"),
        (["--data-csv", "{csv}", "--model-name", "resnet19"], "Unknown model 'resnet19'. Did you mean: resnet18"),
        (["--data-csv", "{csv}", "--val-fold", "5", "--num-folds", "2"], "--val-fold must be in 0..1"),
        (["--data-csv", "{csv}", "--num-folds", "20"], "folds"),
        (["--config", "{missing}"], "missing.csv"),
    ],
)
def test_bad_train_input_is_one_line_without_traceback(tmp_path, capsys, args, message):
    csv_file = write_tiny_dataset(tmp_path / "data")
    args = [a.format(missing=tmp_path / "missing.csv", csv=csv_file) for a in args]
    code = main(["train", "--output-dir", str(tmp_path / "run"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("recognite train: error: ")
    assert message in err[0]


def test_bad_input_as_a_subprocess_exits_non_zero_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recognite", "train", "--data-csv", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "nope.csv" in done.stderr


def test_train_resume_and_evaluate_from_the_command_line(tmp_path, capsys):
    csv_file = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\nlr: 0.01\n")
    assert main(["train", "--config", str(config), "--data-csv", str(csv_file), "--output-dir", str(run), *FAST]) == 0
    assert main(["train", "--config", str(config), "--epochs", "2", "--resume", "auto", "--data-csv", str(csv_file),
                 "--output-dir", str(run), *FAST]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert "lr: 0.01" in (run / "config.yaml").read_text()  # from the YAML file
    assert "epochs: 2" in (run / "config.yaml").read_text()  # the flag wins over the file
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--bundle", str(run / "bundle"), "--data-csv", str(csv_file), "--output", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_labels"] == 10 and 0 <= metrics["top1"] <= 1


def test_demo_end_to_end_on_a_small_generated_dataset(tmp_path, capsys):
    code = main(["demo", "--data-dir", str(tmp_path / "demo_data"), "--num-classes", "20", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--batch-size", "16", "--output-dir", str(tmp_path / "run"),
                 "--no-progress", "--no-report"])
    assert code == 0
    out = capsys.readouterr().out
    assert "untrained backbone" in out and "trained (best epoch)" in out
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    untrained, trained = rows[0], rows[-1]
    line = next(line for line in out.splitlines() if "untrained backbone" in line)
    assert line.split()[-3:] == [f"{float(untrained[k]):.4f}" for k in ("top1", "top5", "mAP")]
    assert (tmp_path / "demo_data" / "demo.csv").is_file() and (tmp_path / "run" / "bundle" / "bundle.json").is_file()
    assert float(trained["top1"]) >= 0.0
