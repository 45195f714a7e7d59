"""Hostile inputs and faults (issue 13): each answered with its exit status and one line that names
the problem, and for the data-loss cases the old files byte-identical afterwards."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recognite.cli.main import main

from .train.conftest import tiny_config, write_tiny_dataset


def _snapshot(paths: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    return code, errors[-1] if errors else ""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A trained tiny run, its bundle, a second bundle of the same width, a gallery and CSVs."""
    from recognite.bundle import save_bundle
    from recognite.model import Recognizer
    from recognite.train import train

    root = tmp_path_factory.mktemp("faults")
    csv_file = write_tiny_dataset(root / "data")
    train(tiny_config(csv_file, root / "run", epochs=1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        other = Recognizer("resnet18")
    save_bundle(other, root / "other_bundle", image_size=32)
    refs = root / "refs.csv"
    lines = csv_file.read_text().splitlines()
    refs.write_text("\n".join([lines[0]] + [f"{csv_file.parent / r.split(',')[0]},{r.split(',')[1]}"
                                            for r in lines[1:9]]) + "\n")
    assert main(["gallery", "build", "--bundle", str(root / "run" / "bundle"), "--csv", str(refs),
                 "--output", str(root / "gallery.safetensors"), "--no-progress"]) == 0
    return {"root": root, "csv": csv_file, "refs": refs, "run": root / "run", "bundle": root / "run" / "bundle",
            "other": root / "other_bundle", "gallery": root / "gallery.safetensors"}


def _run_files(ws) -> list[Path]:
    run = ws["run"]
    return [run / "last.pt", run / "best.pt", run / "metrics.csv", run / "config.yaml", run / "bundle" / "bundle.json",
            run / "bundle" / "model.safetensors"]


# --- data loss -------------------------------------------------------------------------------------


def test_a_new_run_into_an_existing_run_folder_is_refused(ws, capsys):
    before = _snapshot(_run_files(ws))
    code, line = _run(capsys, "train", "--data-csv", ws["csv"], "--output-dir", ws["run"], "--image-size", "32",
                      "--num-folds", "2", "--epochs", "1", "--no-progress", "--num-workers", "0")
    assert code == 2 and "already holds a run" in line and "--overwrite" in line and "--resume auto" in line
    assert _snapshot(_run_files(ws)) == before


@pytest.mark.parametrize("command", ["gallery", "embed", "recognize", "export", "evaluate"])
def test_outputs_never_overwrite_inputs(ws, capsys, command):
    refs, bundle, gallery = ws["refs"], ws["bundle"], ws["gallery"]
    argv = {
        "gallery": ["gallery", "build", "--bundle", bundle, "--csv", refs, "--output", refs],
        "embed": ["embed", "--bundle", bundle, refs, "--output", refs],
        "recognize": ["recognize", "--bundle", bundle, "--gallery", gallery, refs, "--output", refs],
        "export": ["export", "--bundle", bundle, "--format", "torchscript", "--output", bundle / "model.safetensors"],
        "evaluate": ["evaluate", "--bundle", bundle, "--data-csv", refs, "--output", refs],
    }[command]
    before = _snapshot([refs, bundle / "model.safetensors", bundle / "bundle.json"])
    code, line = _run(capsys, *argv, "--no-progress" if command != "export" else "--check")
    assert code == 2 and ("is also an input" in line or "lies inside" in line), line
    assert _snapshot([refs, bundle / "model.safetensors", bundle / "bundle.json"]) == before


# --- silently wrong results ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["recognize", "gallery add"])
def test_a_gallery_refuses_another_models_bundle(ws, capsys, command):
    before = _snapshot([ws["gallery"]])
    if command == "recognize":
        argv = ["recognize", "--bundle", ws["other"], "--gallery", ws["gallery"], ws["refs"], "--no-progress"]
    else:
        argv = ["gallery", "add", "--bundle", ws["other"], "--gallery", ws["gallery"], "--csv", ws["refs"],
                "--no-progress"]
    code, line = _run(capsys, *argv)
    assert code == 2 and "was built with another model" in line
    assert _snapshot([ws["gallery"]]) == before


def test_sixteen_bit_png_and_exif_orientation(tmp_path):
    from recognite.data.images import read_image

    values = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 32)  # 0 .. 65504
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = np.asarray(read_image(tmp_path / "deep.png", mode="L"), dtype=np.int64)
    expected = np.clip(np.rint(values.astype(np.float64) * 255 / 65535), 0, 255)
    assert np.array_equal(image, expected)  # scaled, not clipped to white
    assert image.min() == 0 and 0 < np.median(image) < 255

    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :10] = 255  # a white band on the left
    rotated = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    shown = np.asarray(read_image(tmp_path / "phone.jpg"))
    assert shown.shape == (20, 40, 3)
    assert shown[:, :10].mean() > 200 and shown[:, 20:].mean() < 50


def test_float_tiff_is_scaled_from_unit_range(tmp_path):
    from recognite.data.images import read_image

    values = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    image = np.asarray(read_image(tmp_path / "float.tif", mode="L"))
    assert image.min() == 0 and image.max() == 255


def test_duplicated_rows_and_a_gallery_equal_to_the_queries_warn(ws, tmp_path, caplog):
    from recognite.data import load_csv
    from recognite.evaluate import evaluate_bundle

    doubled = tmp_path / "doubled.csv"
    text = ws["refs"].read_text().splitlines()
    doubled.write_text("\n".join(text + [text[1]]) + "\n")
    with pytest.warns(UserWarning, match="1 images are listed more than once"):
        load_csv(doubled)
    with caplog.at_level(logging.WARNING, logger="recognite"):
        evaluate_bundle(ws["bundle"], ws["refs"], gallery_csv=ws["refs"], device="cpu")
    assert any("both gallery references" in r.getMessage() for r in caplog.records)


def _train_argv(ws, **overrides) -> list:
    """The options of the workspace run (tiny_config), with ``overrides``."""
    options = {"data-csv": ws["csv"], "image-size": 32, "num-folds": 2, "epochs": 1, "num-workers": 0,
               "batch-size": 8, "optimizer": "sgd", "lr": 0.05, "warmup-epochs": 0.5, "max-steps-per-epoch": 2,
               "val-batch-size": 16, "output-dir": ws["run"]}
    options.update({k.replace("_", "-"): v for k, v in overrides.items()})
    argv: list = ["train", "--no-progress", "--no-report"]
    for key, value in options.items():
        argv += [f"--{key}", value]
    return argv


def test_resume_refuses_changed_fixed_options_and_another_folder(ws, capsys, tmp_path):
    last = ws["run"] / "last.pt"
    before = _snapshot(_run_files(ws))
    code, line = _run(capsys, *_train_argv(ws, lr=0.5, resume=last))
    assert code == 2 and "options fixed by the checkpoint differ" in line and "lr (0.05" in line, line
    code, line = _run(capsys, *_train_argv(ws, optimizer="adamw", resume=last))
    assert code == 2 and "optimizer ('sgd' in the checkpoint, 'adamw' now)" in line, line
    code, line = _run(capsys, *_train_argv(ws, output_dir=tmp_path / "elsewhere", resume=last))
    assert code == 2 and "belongs to the run folder" in line, line
    other_csv = write_tiny_dataset(tmp_path / "other_data", num_labels=10, per_label=5)
    code, line = _run(capsys, *_train_argv(ws, data_csv=other_csv, resume=last))
    assert code == 2 and "data_csv" in line, line
    assert _snapshot(_run_files(ws)) == before


@pytest.mark.parametrize(("text", "expected"), [('"no"', False), ("'false'", False), ("off", False), ('"yes"', True)])
def test_quoted_booleans_in_a_config_file_mean_what_they_say(tmp_path, text, expected):
    from recognite.train import TrainConfig, load_config_file

    path = tmp_path / "run.yaml"
    path.write_text(f"data_csv: x.csv\nreport: {text}\nfrozen_layers: conv1\n")
    config = TrainConfig.from_dict(load_config_file(path))
    assert config.report is expected
    assert config.frozen_layers == ["conv1"]  # one name, not split into letters


@pytest.mark.parametrize(("argv_tail", "message"), [
    (["--threshold", "nan"], "threshold must be a number"),
    (["--threshold", "2"], "threshold must be in [-1, 1]"),
    (["--group-key", "alphabet", "--episodes", "3"], "group_key 'alphabet' names no column"),
])
def test_evaluate_refuses_bad_values_in_one_line(ws, capsys, argv_tail, message):
    code, line = _run(capsys, "evaluate", "--bundle", ws["bundle"], "--data-csv", ws["refs"], "--no-progress",
                      *argv_tail)
    assert code == 2 and message in line, line


def test_evaluate_output_is_valid_json_when_a_rate_is_nan(ws, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--bundle", str(ws["bundle"]), "--data-csv", str(ws["refs"]), "--no-progress",
                 "--output", str(out), "--threshold", "1.0"]) == 0
    json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(threshold=5), "threshold must be in [-1, 1]"),
    (lambda m: m["preprocessing"].update(mean=[0.5, 0.5, 0.5]), "was edited after the bundle was saved"),
    (lambda m: (m["preprocessing"].update(mean=[0.5]), m.pop("config_sha256")), "mean must be a list of 3 numbers"),
    (lambda m: (m.update(image_size=100000), m.pop("config_sha256")), "image_size must be an integer in [1, 4096]"),
])
def test_bundle_json_is_validated_and_checksummed(ws, tmp_path, edit, message):
    from recognite.bundle import load_bundle

    folder = tmp_path / "bundle"
    shutil.copytree(ws["bundle"], folder)
    manifest = json.loads((folder / "bundle.json").read_text())
    edit(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="bundle.json") as info:
        load_bundle(folder, device="cpu")
    assert message in str(info.value)


def test_labels_differing_by_spaces_warn_and_stay_separate(tmp_path):
    from recognite.data import load_csv

    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "d.csv").write_text("image,label\na.png,cola\nb.png,cola \n")
    with pytest.warns(UserWarning, match=r"differ only by surrounding spaces.*'cola' vs 'cola '"):
        df = load_csv(tmp_path / "d.csv")
    assert sorted(df["label"]) == ["cola", "cola "]


def test_gallery_add_of_the_same_images_adds_nothing(ws, tmp_path, capsys):
    from recognite.gallery import GalleryIndex

    gallery = tmp_path / "g.safetensors"
    shutil.copy(ws["gallery"], gallery)
    size = len(GalleryIndex.load(gallery))
    assert main(["gallery", "add", "--bundle", str(ws["bundle"]), "--gallery", str(gallery), "--csv", str(ws["refs"]),
                 "--no-progress"]) == 0
    assert len(GalleryIndex.load(gallery)) == size


def test_two_writers_of_one_gallery_lose_no_update(ws, tmp_path):
    from recognite.bundle import load_bundle
    from recognite.deploy import add_to_gallery, read_references
    from recognite.gallery import GalleryIndex

    gallery = tmp_path / "g.safetensors"
    shutil.copy(ws["gallery"], gallery)
    bundle = load_bundle(ws["bundle"], device="cpu")
    lines = ws["csv"].read_text().splitlines()
    parts = []
    for i, rows in enumerate((lines[9:17], lines[17:25])):
        path = tmp_path / f"new{i}.csv"
        path.write_text("\n".join([lines[0]] + [f"{ws['csv'].parent / r.split(',')[0]},{r.split(',')[1]}" for r in rows]))
        parts.append(read_references(path))
    before = len(GalleryIndex.load(gallery))
    errors: list[BaseException] = []

    def writer(refs):
        try:
            add_to_gallery(bundle, gallery, refs, device="cpu")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(refs,)) for refs in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(GalleryIndex.load(gallery)) == before + 16


# --- tracebacks instead of one line --------------------------------------------------------------------


def test_an_unreadable_training_image_stops_the_run_before_training(tmp_path, capsys):
    csv_file = write_tiny_dataset(tmp_path / "data")
    (tmp_path / "data" / "images" / "l3" / "1.png").write_bytes(b"not a png at all")
    code, line = _run(capsys, "train", "--data-csv", csv_file, "--output-dir", tmp_path / "run", "--image-size", "32",
                      "--num-folds", "2", "--epochs", "1", "--no-progress", "--num-workers", "0")
    assert code == 2 and "cannot be read" in line and "l3/1.png" in line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    from recognite.data.images import read_image

    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 Mpx, a few kB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"10000 x 10000 pixels, more than the limit"):
        read_image(tmp_path / "bomb.png")


def test_an_output_dir_that_is_a_file(ws, tmp_path, capsys):
    (tmp_path / "runfile").write_text("x")
    code, line = _run(capsys, "train", "--data-csv", ws["csv"], "--output-dir", tmp_path / "runfile",
                      "--image-size", "32", "--num-folds", "2", "--no-progress")
    assert code == 2 and "is a file" in line


@pytest.mark.parametrize(("code_", "message"), [(errno.ENOSPC, "No space left on the device"),
                                                (errno.EROFS, "read-only folder or no permission")])
def test_write_faults_during_gallery_add_keep_the_gallery(ws, tmp_path, capsys, monkeypatch, code_, message):
    import safetensors.torch

    gallery = tmp_path / "g.safetensors"
    shutil.copy(ws["gallery"], gallery)
    before = _snapshot([gallery])
    lines = ws["csv"].read_text().splitlines()
    new = tmp_path / "new.csv"
    new.write_text("\n".join([lines[0]] + [f"{ws['csv'].parent / r.split(',')[0]},{r.split(',')[1]}"
                                           for r in lines[30:34]]))

    def failing_save(*args, **kwargs):
        raise OSError(code_, os.strerror(code_))

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    code, line = _run(capsys, "gallery", "add", "--bundle", ws["bundle"], "--gallery", gallery, "--csv", new,
                      "--no-progress")
    assert code == 1 and message in line and str(gallery) in line
    assert _snapshot([gallery]) == before


def test_a_corrupt_weights_file_and_a_yaml_syntax_error(ws, tmp_path, capsys):
    folder = tmp_path / "bundle"
    shutil.copytree(ws["bundle"], folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    code, line = _run(capsys, "embed", "--bundle", folder, ws["refs"], "--output", tmp_path / "e.safetensors")
    assert code == 2 and "model.safetensors" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    code, line = _run(capsys, "train", "--config", bad, "--data-csv", ws["csv"])
    assert code == 2 and "is not valid YAML" in line and "bad.yaml" in line


def test_gallery_info_into_a_closed_pipe_is_quiet(ws):
    command = f"{sys.executable} -m recognite gallery info --gallery {ws['gallery']} --list-labels | head -c 1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


# --- unclear messages ----------------------------------------------------------------------------------


def test_multi_line_messages_keep_every_line(tmp_path, capsys, ws):
    (tmp_path / "m.csv").write_text("image,label\nnope/1.png,a\nnope/2.png,b\n")
    code, line = _run(capsys, "evaluate", "--bundle", ws["bundle"], "--data-csv", tmp_path / "m.csv")
    assert code == 2 and "First missing:" in line and "nope/1.png" in line


@pytest.mark.parametrize(("values", "message"), [
    ({"epochs": "ten"}, "--epochs must be an integer, got 'ten'"),
    ({"lr": "fast"}, "--lr must be a number, got 'fast'"),
    ({"report": "maybe"}, "--report must be true or false"),
])
def test_wrong_config_types_name_the_flag(values, message):
    from recognite.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"data_csv": "x.csv", **values})


def test_one_label_asks_for_two(tmp_path):
    from recognite.data import train_val_datasets

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text("image,label\na.png,x\na.png,x\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="need at least 2 labels"):
        train_val_datasets(tmp_path / "d.csv", num_folds=2)


def test_bundle_files_are_shared_and_a_failed_parity_check_leaves_no_file(ws, tmp_path, monkeypatch, capsys):
    import recognite.export

    for name in ("model.safetensors", "bundle.json"):
        assert (ws["bundle"] / name).stat().st_mode & 0o777 == 0o644
    monkeypatch.setattr(recognite.export, "check_export",
                        lambda *a, **k: (_ for _ in ()).throw(recognite.export.ExportMismatchError("parity failed")))
    out = tmp_path / "m.pt"
    code, line = _run(capsys, "export", "--bundle", ws["bundle"], "--format", "torchscript", "--output", out, "--check")
    assert code != 0 and "parity failed" in line
    assert not out.exists()


# --- drop-in for the earlier API -----------------------------------------------------------------------


def test_integer_scores_and_any_three_crop_output_shape():
    from recognite.eval import accuracy, hard_pos_neg_scores, pr_metrics, top_k_accuracy
    from recognite.utils import embeddings_three_crops

    scores = torch.tensor([[3, 1, 2], [0, 5, 1], [2, 2, 9]])
    gallery_labels, query_labels = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    as_float = scores.double()
    assert accuracy(scores, gallery_labels, query_labels) == accuracy(as_float, gallery_labels, query_labels) == 2 / 3
    assert top_k_accuracy(scores, gallery_labels, query_labels, 2) == pytest.approx(2 / 3)
    assert float(pr_metrics(scores, gallery_labels, query_labels)["mAP"]) == pytest.approx(
        float(pr_metrics(as_float, gallery_labels, query_labels)["mAP"]))
    assert hard_pos_neg_scores(scores, gallery_labels, query_labels)["HardPosScores"].tolist() == [3.0, 1.0, 2.0]

    conv = torch.nn.Conv2d(3, 2, 3)
    batch = torch.randn(2, 3, 3, 6, 6)
    out = embeddings_three_crops(conv, batch)
    expected = conv(batch.reshape(6, 3, 6, 6)).reshape(2, 3, 2, 4, 4).mean(dim=1)
    assert out.shape == (2, 2, 4, 4) and torch.allclose(out, expected)


def test_demo_may_replace_its_own_run_and_says_so(tmp_path, caplog):
    from recognite.train.demo import _is_earlier_demo_run

    run = tmp_path / "demo"
    run.mkdir()
    (run / "config.yaml").write_text(f"data_csv: {tmp_path / 'demo.csv'}\n")
    assert _is_earlier_demo_run(run, tmp_path / "demo.csv")
    assert not _is_earlier_demo_run(run, tmp_path / "other.csv")
