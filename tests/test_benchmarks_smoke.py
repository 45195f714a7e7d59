"""Smoke tests of the benchmark scripts on real data (slow; skipped without the data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "datasets" / "omniglot"


@pytest.mark.slow
@pytest.mark.skipif(not (OMNIGLOT / "omniglot.csv").is_file(), reason="Omniglot data folder absent")
def test_omniglot_benchmark_on_a_few_alphabets(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "omniglot.py"), "--alphabets", "3", "--epochs", "1",
               "--max-steps", "3", "--batch-size", "16", "--image-size", "28", "--episodes", "20",
               "--output-dir", str(tmp_path / "run"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "within one alphabet (Lake)" in out and "1-shot gallery | top-1" in out
    assert "training wall time" in out
    assert (tmp_path / "run" / "train" / "best.pt").is_file()
