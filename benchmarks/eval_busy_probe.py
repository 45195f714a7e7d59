"""Probe: where the documented metric set spends its time, idle and beside a busy process.

Times ``pairwise_scores``, then ``accuracy`` + ``top_k_accuracy`` + ``hard_pos_neg_scores``, then
``pr_metrics`` on the reference problem of ``eval_bench.py`` (after a warm-up), once idle and once
with a single-threaded busy process started beside it. Run it under different thread settings to
see what waits on a descheduled thread::

    python benchmarks/eval_busy_probe.py 2.0                          # hard problem, default threads
    OMP_WAIT_POLICY=PASSIVE python benchmarks/eval_busy_probe.py 2.0
    python benchmarks/eval_busy_probe.py 2.0 --threads 1
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
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import eval_bench

    from recognite.eval import (
        accuracy,
        hard_pos_neg_scores,
        pairwise_scores,
        pr_metrics,
        top_k_accuracy,
    )

    eval_bench.NOISE = args.noise
    queries, query_labels, gallery, gallery_labels = eval_bench._make_problem(4000, 5, 256, 4000, 0)

    def run() -> list[float]:
        start = time.perf_counter()
        scores = pairwise_scores(queries, gallery, "cosine")
        scored = time.perf_counter()
        accuracy(scores, gallery_labels, query_labels)
        top_k_accuracy(scores, gallery_labels, query_labels, 5)
        hard_pos_neg_scores(scores, gallery_labels, query_labels)
        light = time.perf_counter()
        pr_metrics(scores, gallery_labels, query_labels)
        return [scored - start, light - scored, time.perf_counter() - light]

    run()  # warm-up
    idle = run()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    try:
        busy = run()
    finally:
        burner.kill()
    show = " / ".join
    print(f"noise {args.noise}, threads {torch.get_num_threads()}: scores / light metrics / pr_metrics  "
          f"idle {show(f'{t:.2f}' for t in idle)} s  busy {show(f'{t:.2f}' for t in busy)} s")


if __name__ == "__main__":
    main()
