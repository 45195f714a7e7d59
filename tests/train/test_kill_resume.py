"""``kill -9`` of ``recognite train`` at random moments, each followed by ``--resume auto``: the final
parameters equal those of an uninterrupted run (slow: about 20 process starts)."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch

from recognite.checkpoint import load_checkpoint

from .conftest import write_tiny_dataset

NUM_KILLS = 20


def _command(csv_file, run_dir) -> list[str]:
    return [sys.executable, "-m", "recognite", "train", "--data-csv", str(csv_file), "--output-dir", str(run_dir),
            "--model-name", "resnet18", "--image-size", "32", "--num-folds", "2", "--epochs", "4", "--batch-size", "8",
            "--val-batch-size", "16", "--num-workers", "0", "--optimizer", "sgd", "--lr", "0.05",
            "--warmup-epochs", "0.5", "--max-steps-per-epoch", "2", "--no-progress", "--no-report", "--resume", "auto"]


@pytest.mark.slow
def test_kill_nine_at_random_moments_then_resume_gives_the_uninterrupted_parameters(tmp_path):
    csv_file = write_tiny_dataset(tmp_path / "data")
    start = time.perf_counter()
    subprocess.run(_command(csv_file, tmp_path / "reference"), check=True, capture_output=True, timeout=600)
    duration = time.perf_counter() - start

    rng = random.Random(20261202)
    run_dir = tmp_path / "killed"
    kills, finished = 0, False
    while not finished:
        process = subprocess.Popen(_command(csv_file, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < NUM_KILLS:
            try:
                process.wait(timeout=rng.uniform(0.15, 0.7) * duration)
            except subprocess.TimeoutExpired:
                process.kill()  # SIGKILL: no handler runs, no checkpoint is saved on the way out
                process.wait()
                kills += 1
                continue
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.decode()[-2000:]
        finished = kills >= NUM_KILLS
        if not finished:  # it ended before its kill came: start over so that every kill counts
            for path in sorted(run_dir.glob("**/*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()

    assert kills >= NUM_KILLS
    expected = load_checkpoint(tmp_path / "reference" / "last.pt")
    got = load_checkpoint(run_dir / "last.pt")
    assert got["epoch"] == expected["epoch"] == 4
    for key, value in expected["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=0, msg=key)
    assert (run_dir / "bundle" / "bundle.json").is_file() and (run_dir / "best.pt").is_file()
