"""Benchmark: recognite.eval against a straightforward full-matrix baseline, and the streaming path.

Reference problem (issue 3): Q=4000 noisy queries, G=20000 gallery items (5 per label), D=256,
cosine scores. Contenders run one at a time, each in its own fresh subprocess, so every peak-RSS
figure (``ru_maxrss`` of that process: torch import + data + computation) is independent.

* ``baseline``: full score matrix, then a Python loop over queries with one ``np.argsort`` each
  (top-1, top-5, hardest positive/negative, per-query PR curve, AP, max-F1).
* ``library``: ``score_matrix`` + ``accuracy`` + ``top_k_accuracy`` + ``hard_pos_neg_scores`` +
  ``pr_metrics`` (the documented metric set), same outputs.
* ``streaming``: ``evaluate_embeddings`` for Q=1000 queries against G=1,000,000 (D=128):
  top-1, top-k accuracy, recall@k, mAP, MAP@R, R-precision, CMC.

Usage::

    python benchmarks/eval_bench.py              # all contenders (about 2-4 minutes on 2 CPU cores)
    python benchmarks/eval_bench.py --skip-streaming
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

NUM_LABELS, PER_LABEL, DIM = 4000, 5, 256
STREAM_QUERIES, STREAM_GALLERY, STREAM_DIM, STREAM_PER_LABEL = 1000, 1_000_000, 128, 5
NOISE = 1.6
SEED = 0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _make_problem(num_labels: int, per_label: int, dim: int, num_queries: int, seed: int):
    """Class centres; gallery = centre + noise; queries = centre of a random label + noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_labels, dim, generator=gen)
    gallery_labels = torch.arange(num_labels).repeat_interleave(per_label)
    gallery = torch.empty(num_labels * per_label, dim)
    for block in torch.arange(len(gallery)).split(100_000):  # in blocks: no big temporaries
        gallery[block] = centres[gallery_labels[block]] + NOISE * torch.randn(len(block), dim, generator=gen)
    query_labels = torch.randint(0, num_labels, (num_queries,), generator=gen)
    queries = centres[query_labels] + NOISE * torch.randn(num_queries, dim, generator=gen)
    return queries, query_labels, gallery, gallery_labels


def run_baseline() -> dict:
    import numpy as np
    import torch

    queries, query_labels, gallery, gallery_labels = _make_problem(NUM_LABELS, PER_LABEL, DIM, NUM_LABELS, SEED)
    start = time.perf_counter()
    q = torch.nn.functional.normalize(queries, dim=1)
    g = torch.nn.functional.normalize(gallery, dim=1)
    scores = (q @ g.T).numpy()
    scoring = time.perf_counter() - start
    gl, ql = gallery_labels.numpy(), query_labels.numpy()
    top1 = top5 = 0
    hard_pos, hard_neg, aps, max_f1, curves = [], [], [], [], []
    for i in range(scores.shape[0]):
        row = scores[i]
        order = np.argsort(-row, kind="stable")
        sorted_scores, rel = row[order], gl[order] == ql[i]
        top1 += bool(rel[0])
        top5 += bool(rel[:5].any())
        positives = gl == ql[i]
        if positives.any():
            hard_pos.append(row[positives].min())
        if (~positives).any():
            hard_neg.append(row[~positives].max())
        num_pos = rel.sum()
        if num_pos == 0:
            continue
        ends = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(row) - 1]
        tps = np.cumsum(rel)[ends]
        precision, recall = tps / (ends + 1), tps / num_pos
        last = np.searchsorted(tps, num_pos) + 1
        precision, recall, thresholds = precision[:last], recall[:last], sorted_scores[ends][:last]
        curves.append((np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]))
        aps.append(float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        max_f1.append(f1.max())
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed, "scoring_seconds": scoring, "peak_rss_mb": _peak_rss_mb(),
        "top1": top1 / len(ql), "top5": top5 / len(ql), "mAP": float(np.mean(aps)),
        "hard_pos_mean": float(np.mean(hard_pos)), "hard_neg_mean": float(np.mean(hard_neg)),
        "max_f1_mean": float(np.mean(max_f1)),
    }


def run_library() -> dict:
    import torch

    from recognite.eval import accuracy, hard_pos_neg_scores, pr_metrics, score_matrix, top_k_accuracy

    queries, query_labels, gallery, gallery_labels = _make_problem(NUM_LABELS, PER_LABEL, DIM, NUM_LABELS, SEED)
    dl_gal = list(zip(gallery.split(1024), gallery_labels.split(1024)))
    dl_quer = list(zip(queries.split(1024), query_labels.split(1024)))
    start = time.perf_counter()
    scores, gl, ql = score_matrix(torch.nn.Identity(), dl_gal, dl_quer, metric="cosine", device="cpu")
    scoring = time.perf_counter() - start
    top1 = accuracy(scores, gl, ql)
    top5 = top_k_accuracy(scores, gl, ql, 5)
    hard = hard_pos_neg_scores(scores, gl, ql)
    pr = pr_metrics(scores, gl, ql)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed, "scoring_seconds": scoring, "peak_rss_mb": _peak_rss_mb(),
        "top1": top1, "top5": top5,
        "mAP": float(pr["mAP"]), "hard_pos_mean": float(hard["HardPosScores"].double().mean()),
        "hard_neg_mean": float(hard["HardNegScores"].double().mean()),
        "max_f1_mean": float(pr["maxF1"].nanmean()),
    }


def run_streaming() -> dict:
    from recognite.eval import evaluate_embeddings

    num_labels = STREAM_GALLERY // STREAM_PER_LABEL
    queries, query_labels, gallery, gallery_labels = _make_problem(
        num_labels, STREAM_PER_LABEL, STREAM_DIM, STREAM_QUERIES, SEED
    )
    data_rss = _peak_rss_mb()
    start = time.perf_counter()
    out = evaluate_embeddings(queries, query_labels, gallery, gallery_labels, metric="cosine",
                              ks=(1, 5, 10), cmc_max_rank=100)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed, "peak_rss_mb": _peak_rss_mb(), "rss_after_data_mb": data_rss,
        "top1": out["accuracy"], "top5": out["top_k_accuracy"][5],
        "recall@10": out["recall_at_k"][10], "mAP": out["mAP"], "map_at_r": out["map_at_r"],
        "r_precision": out["r_precision"],
    }


CONTENDERS = {"baseline": run_baseline, "library": run_library, "streaming": run_streaming}


def _spawn(name: str, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--contender", name, "--threads", str(threads)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"contender {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", choices=sorted(CONTENDERS), help="run one contender (internal)")
    parser.add_argument("--skip-streaming", action="store_true", help="skip the 1M-gallery run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in every contender (default 1: stable figures "
                             "on a shared machine; numpy's per-query loop is single-threaded anyway)")
    args = parser.parse_args(argv)
    if args.contender:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(CONTENDERS[args.contender]()))
        return 0
    print(f"machine: {os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.2f}")
    print(f"reference problem: Q={NUM_LABELS}, G={NUM_LABELS * PER_LABEL}, D={DIM}, cosine, "
          f"noise {NOISE}, torch threads {args.threads}")
    base = _spawn("baseline", args.threads)
    lib = _spawn("library", args.threads)
    for name, res in (("baseline", base), ("library", lib)):
        print(f"  {name:9s} {res['seconds']:7.2f} s (scores {res['scoring_seconds']:.2f} s + metrics "
              f"{res['seconds'] - res['scoring_seconds']:.2f} s)  peak RSS {res['peak_rss_mb']:7.0f} MB  "
              f"top1 {res['top1']:.4f}  top5 {res['top5']:.4f}  mAP {res['mAP']:.6f}  "
              f"hardpos {res['hard_pos_mean']:.6f}  hardneg {res['hard_neg_mean']:.6f}  "
              f"maxF1 {res['max_f1_mean']:.6f}")
    print(f"  speed-up library vs baseline: {base['seconds'] / lib['seconds']:.1f}x "
          f"(target >= 10x); library peak RSS {lib['peak_rss_mb']:.0f} MB (target < 1536 MB)")
    metric_ratio = (base["seconds"] - base["scoring_seconds"]) / (lib["seconds"] - lib["scoring_seconds"])
    print(f"  speed-up of the metric part alone (after the score matrix): {metric_ratio:.1f}x")
    print(f"  |mAP difference| = {abs(base['mAP'] - lib['mAP']):.2e}")
    if not args.skip_streaming:
        stream = _spawn("streaming", args.threads)
        print(f"load average after the runs {os.getloadavg()[0]:.2f}")
        print(f"streaming: Q={STREAM_QUERIES}, G={STREAM_GALLERY}, D={STREAM_DIM}, cosine")
        print(f"  {stream['seconds']:.1f} s  peak RSS {stream['peak_rss_mb']:.0f} MB "
              f"(after building the data: {stream['rss_after_data_mb']:.0f} MB; target < 4096 MB)  "
              f"top1 {stream['top1']:.4f}  top5 {stream['top5']:.4f}  recall@10 {stream['recall@10']:.4f}  "
              f"mAP {stream['mAP']:.4f}  MAP@R {stream['map_at_r']:.4f}  R-prec {stream['r_precision']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
