"""A 2-process torchrun (gloo) run of `recognite train` on CPU (about 25 s on 2 idle cores)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest
import torch

from recognite.train.checkpoint import load_checkpoint

ARGS = [
    "--model-name", "resnet18", "--image-size", "32", "--num-folds", "2", "--epochs", "1", "--batch-size", "4",
    "--val-batch-size", "8", "--num-workers", "0", "--max-steps-per-epoch", "2", "--no-progress", "--no-report",
    "--device", "cpu",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun_matches_single_process_outputs(tiny_csv, tmp_path):
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "recognite", "train", "--data-csv", str(tiny_csv), "--output-dir", str(ddp_dir), *ARGS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "recognite", "train", "--data-csv", str(tiny_csv),
                             "--output-dir", str(single_dir), *ARGS], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_rows = list(csv.DictReader((ddp_dir / "metrics.csv").open()))
    single_rows = list(csv.DictReader((single_dir / "metrics.csv").open()))
    assert [r.keys() for r in ddp_rows] == [r.keys() for r in single_rows]
    assert [r["epoch"] for r in ddp_rows] == ["0", "1"]
    # Before training both evaluate the same initial model on the same (gathered) validation set.
    for key in ("top1", "mAP", "MAP@R"):
        assert float(ddp_rows[0][key]) == pytest.approx(float(single_rows[0][key]), abs=1e-6)
    ddp_state, single_state = load_checkpoint(ddp_dir / "last.pt"), load_checkpoint(single_dir / "last.pt")
    assert ddp_state["world_size"] == 2 and len(ddp_state["rng"]) == 2
    assert ddp_state["step"] == 2 and single_state["step"] == 2
    for key, value in single_state["model"].items():
        assert ddp_state["model"][key].shape == value.shape
    assert not any(p.name.startswith(".") for p in ddp_dir.iterdir())  # no temp files left behind
    assert torch.isfinite(ddp_state["model"]["classifier.weight"]).all()
