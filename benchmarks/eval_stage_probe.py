"""Probe: where ``pr_metrics`` spends its time, stage by stage, idle or beside a busy process.

Times each private stage of the engine (extreme scores, the depth count, picking the items, the
radix sort, per-positive counts, the curves) over three calls of ``pr_metrics`` on the reference
problem of ``eval_bench.py``::

    python benchmarks/eval_stage_probe.py 2.0            # hard problem
    python benchmarks/eval_stage_probe.py 2.0 --busy     # with a single-threaded busy process beside it
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("extreme_stats", "_ranked_group", "flat_nonzero", "_sort_within_rows", "positives_from_ranked",
          "ranked_stats", "curves_from_ranked", "_chunk_curves")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("noise", type=float, help="1.6 = the easy problem, 2.0 = the hard one")
    parser.add_argument("--busy", action="store_true")
    args = parser.parse_args()
    import eval_bench

    import recognite.eval._engine as engine
    from recognite.eval import pairwise_scores, pr_metrics

    eval_bench.NOISE = args.noise
    queries, query_labels, gallery, gallery_labels = eval_bench._make_problem(4000, 5, 256, 4000, 0)
    scores = pairwise_scores(queries, gallery, "cosine")
    spent: collections.Counter = collections.Counter()

    def timed(name: str, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    for name in STAGES:
        setattr(engine, name, timed(name, getattr(engine, name)))
    engine.Workspace.count_ge = timed("count_ge", engine.Workspace.count_ge)
    pr_metrics(scores, gallery_labels, query_labels)  # warm-up
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for _ in range(3):
            spent.clear()
            start = time.perf_counter()
            pr_metrics(scores, gallery_labels, query_labels)
            total = time.perf_counter() - start
            print(f"total {total:.3f} s  " + "  ".join(f"{k} {v:.3f}" for k, v in spent.items()))
    finally:
        if burner is not None:
            burner.kill()


if __name__ == "__main__":
    main()
