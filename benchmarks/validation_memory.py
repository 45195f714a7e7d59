"""Benchmark: peak memory of the validation metrics of ``recognite train`` and ``recognite evaluate``.

Issue 12: the validation metrics (retrieval figures, calibrated threshold, open-set rates) must stay
within 0.5 GB of the bounded-memory engine's own peak at Q=2000 queries against G=1,000,000
gallery items (D=128). Each contender runs in its own fresh subprocess on the same synthetic
embeddings; the figure is the peak RSS above the RSS once the embeddings exist.

* ``engine``: :func:`recognite.eval.evaluate_embeddings` alone (ks 1, 5).
* ``train``: :func:`recognite.train.evaluation.validation_metrics`, what ``recognite train``
  computes after each epoch (metrics + threshold calibration + DIR / FAR).
* ``evaluate``: :func:`recognite.eval.summary_metrics` at a given threshold with ks 1, 5, 10, what
  ``recognite evaluate`` (:func:`recognite.evaluate.evaluate_bundle`) computes after embedding.
* ``legacy`` (with ``--legacy``): the engine plus the per-query best positive / negative as the
  earlier code of ``recognite train`` / ``evaluate`` computed them (1024-query chunks scored in
  float64 against the whole gallery, with masked copies), for comparison; it needs about
  20 GB at G=1,000,000, so use it with ``--gallery 200000``.

Usage::

    python benchmarks/validation_memory.py                 # Q=2000, G=1,000,000 (about 3 minutes)
    python benchmarks/validation_memory.py --gallery 200000 --legacy
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DIM, PER_LABEL, NOISE, SEED = 128, 5, 1.6, 0


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _problem(num_queries: int, num_gallery: int):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    num_labels = num_gallery // PER_LABEL
    centres = torch.randn(num_labels, DIM, generator=gen)
    gallery_labels = torch.arange(num_labels).repeat_interleave(PER_LABEL)
    gallery = torch.empty(num_gallery, DIM)
    for block in torch.arange(num_gallery).split(100_000):  # in blocks: no big temporaries
        gallery[block] = centres[gallery_labels[block]] + NOISE * torch.randn(len(block), DIM, generator=gen)
    query_labels = torch.randint(0, num_labels, (num_queries,), generator=gen)
    queries = centres[query_labels] + NOISE * torch.randn(num_queries, DIM, generator=gen)
    del centres
    return queries, query_labels, gallery, gallery_labels


def _legacy_best_positive_negative(queries, query_labels, gallery, gallery_labels, chunk_size=1024):
    """The 0.1.0 computation (``train/evaluation.py: best_positive_negative``), reproduced."""
    import math

    import torch

    from recognite.eval import pairwise_scores

    max_pos, max_neg = [], []
    for start in range(0, queries.shape[0], chunk_size):
        scores = pairwise_scores(queries[start:start + chunk_size], gallery, "cosine").double()
        same = query_labels[start:start + chunk_size, None] == gallery_labels[None, :]
        max_pos.append(scores.masked_fill(~same, -math.inf).max(dim=1).values)
        max_neg.append(scores.masked_fill(same, -math.inf).max(dim=1).values)
    return torch.cat(max_pos), torch.cat(max_neg)


def run(contender: str, num_queries: int, num_gallery: int) -> dict:
    import torch

    from recognite.eval import evaluate_embeddings, summary_metrics
    from recognite.train.evaluation import validation_metrics

    queries, query_labels, gallery, gallery_labels = _problem(num_queries, num_gallery)
    torch.nn.functional.normalize(queries[:2], dim=1)  # warm up the kernels outside the measurement
    data_mb = _rss_mb()
    before_peak = _peak_mb()
    start = time.perf_counter()
    if contender == "engine":
        out = evaluate_embeddings(queries, query_labels, gallery, gallery_labels, metric="cosine", ks=(1, 5))
        figures = {"top1": out["accuracy"], "mAP": out["mAP"]}
    elif contender == "train":
        out = validation_metrics(queries, query_labels, gallery, gallery_labels, "cosine")
        figures = {key: out.metrics[key] for key in ("top1", "mAP", "threshold", "DIR", "FAR")}
    elif contender == "legacy":
        out = evaluate_embeddings(queries, query_labels, gallery, gallery_labels, metric="cosine", ks=(1, 5))
        max_pos, max_neg = _legacy_best_positive_negative(queries, query_labels, gallery, gallery_labels)
        figures = {"top1": out["accuracy"], "mAP": out["mAP"], "mean max_pos": float(max_pos.mean())}
    else:
        out = summary_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 5, 10), threshold=0.5,
                              calibrate=False)
        figures = {key: out.metrics[key] for key in ("top1", "mAP", "threshold", "DIR", "FAR")}
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    return {"contender": contender, "seconds": seconds, "data_mb": data_mb,
            "peak_above_data_mb": max(peak, before_peak) - data_mb, "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--legacy", action="store_true", help="Also run the earlier (unbounded) computation.")
    parser.add_argument("--contender", choices=("engine", "train", "evaluate", "legacy"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        print(json.dumps(run(args.contender, args.queries, args.gallery)))
        return
    results = {}
    for contender in ("engine", "train", "evaluate") + (("legacy",) if args.legacy else ()):
        done = subprocess.run([sys.executable, __file__, "--contender", contender, "--queries", str(args.queries),
                               "--gallery", str(args.gallery)], capture_output=True, text=True, check=True)
        results[contender] = json.loads(done.stdout.strip().splitlines()[-1])
    engine = results["engine"]["peak_above_data_mb"]
    print(f"Q={args.queries}, G={args.gallery:,}, D={DIM}: peak RSS above the embeddings "
          f"({results['engine']['data_mb']:.0f} MB with torch)")
    print(f"{'contender':<10} {'seconds':>8} {'peak above data (MB)':>21} {'minus engine (MB)':>18}  figures")
    for name, result in results.items():
        extra = result["peak_above_data_mb"] - engine
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result["figures"].items())
        print(f"{name:<10} {result['seconds']:>8.1f} {result['peak_above_data_mb']:>21.0f} {extra:>18.0f}  {shown}")


if __name__ == "__main__":
    main()
