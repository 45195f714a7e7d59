"""Probe: where the documented metric set spends its time, call by call, idle or beside a busy process.

Times each call of the documented set (``score_matrix``, ``accuracy``, ``top_k_accuracy``,
``hard_pos_neg_scores``, ``pr_metrics``) on the reference problem of ``eval_bench.py``, four
rounds in one process (the first is cold), and the share of ``pr_metrics`` spent in its pool of
blocks (the rest: merging the blocks' arrays and splitting the curves)::

    python benchmarks/eval_stage_probe.py 2.0            # hard problem
    python benchmarks/eval_stage_probe.py 1.6 --busy     # easy problem, a single-threaded busy process beside it
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("noise", type=float, help="1.6 = the easy problem, 2.0 = the hard one")
    parser.add_argument("--busy", action="store_true")
    args = parser.parse_args()
    import eval_bench
    import torch

    import recognite.eval._rows_cpu as rows_cpu
    from recognite.eval import (
        accuracy,
        hard_pos_neg_scores,
        pr_metrics,
        score_matrix,
        top_k_accuracy,
    )

    eval_bench.NOISE = args.noise
    queries, query_labels, gallery, gallery_labels = eval_bench._make_problem(4000, 5, 256, 4000, 0)
    dl_gal = list(zip(gallery.split(1024), gallery_labels.split(1024)))
    dl_quer = list(zip(queries.split(1024), query_labels.split(1024)))
    in_blocks = []
    run_blocks = rows_cpu.run_blocks

    def timed_blocks(*a, **k):
        start = time.perf_counter()
        try:
            return run_blocks(*a, **k)
        finally:
            in_blocks.append(time.perf_counter() - start)

    rows_cpu.run_blocks = timed_blocks  # the engine's pool (the score product imported its own name)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for _ in range(4):
            times = [time.perf_counter()]
            scores, gl, ql = score_matrix(torch.nn.Identity(), dl_gal, dl_quer, metric="cosine", device="cpu")
            times.append(time.perf_counter())
            accuracy(scores, gl, ql)
            times.append(time.perf_counter())
            top_k_accuracy(scores, gl, ql, 5)
            times.append(time.perf_counter())
            hard_pos_neg_scores(scores, gl, ql)
            times.append(time.perf_counter())
            in_blocks.clear()
            pr_metrics(scores, gl, ql)
            times.append(time.perf_counter())
            names = ("score_matrix", "accuracy", "top_k", "hard_pos_neg", "pr_metrics")
            print(f"total {times[-1] - times[0]:.3f} s  "
                  + "  ".join(f"{n} {b - a:.3f}" for n, a, b in zip(names, times, times[1:]))
                  + f"  (pr blocks {sum(in_blocks):.3f})")
            del scores
    finally:
        if burner is not None:
            burner.kill()


if __name__ == "__main__":
    main()
