"""Benchmark: recognite.eval against a full-matrix baseline and pytorch-metric-learning, idle and busy.

Reference problem: Q=4000 noisy queries, G=20000 gallery items (5 per label), D=256, cosine scores,
in two difficulties: ``easy`` (noise 1.6, mAP about 0.84) and ``hard`` (noise 2.0, mAP about 0.35,
where many items score above a query's lowest positive, as early in training). Contenders run one
at a time, each in its own fresh subprocess, so every peak-RSS figure (``ru_maxrss`` of that
process: torch import + data + computation) is independent. With ``--busy`` a CPU-bound
single-threaded process runs beside each contender for its whole duration (as evaluation beside a
training job); the library never changes the thread settings itself (torch's default is used
unless ``--threads`` is given).

* ``baseline``: full score matrix, then a Python loop over queries with one ``np.argsort`` each
  (top-1, top-5, hardest positive/negative, per-query PR curve, AP, max-F1).
* ``library``: ``score_matrix`` + ``accuracy`` + ``top_k_accuracy`` + ``hard_pos_neg_scores`` +
  ``pr_metrics`` (the documented metric set), same outputs.
* ``pml_exact``: pytorch-metric-learning's ``AccuracyCalculator(k=None)`` with a torch kNN
  (precision@1, mean average precision; exact).
* ``pml_faiss`` / ``pml_torch``: the same truncated to ``k="max_bin_count"`` neighbours, with FAISS
  or a torch kNN (its mAP is *not* the exact mAP: positives past k are dropped).
* ``streaming``: ``evaluate_embeddings`` for Q=1000 queries against G=1,000,000 (D=128):
  top-1, top-k accuracy, recall@k, mAP, MAP@R, R-precision, CMC.

pytorch-metric-learning and faiss-cpu are needed only here: ``pip install -e '.[bench]'``.

Usage::

    python benchmarks/eval_bench.py                       # easy + hard, idle (a few minutes)
    python benchmarks/eval_bench.py --busy                # the same with a busy process beside
    python benchmarks/eval_bench.py --busy --repeat 3     # median of 3 interleaved fresh runs of each
    python benchmarks/eval_bench.py --problems hard --contenders library pml_faiss
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
PROBLEMS = {"easy": 1.6, "hard": 2.0}  # noise of the gallery and query samples around their centres
NOISE = PROBLEMS["easy"]
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

    from recognite.eval import (
        accuracy,
        hard_pos_neg_scores,
        pr_metrics,
        score_matrix,
        top_k_accuracy,
    )

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


def _run_pml(k, knn: str) -> dict:
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

    queries, query_labels, gallery, gallery_labels = _make_problem(NUM_LABELS, PER_LABEL, DIM, NUM_LABELS, SEED)
    knn_func = FaissKNN() if knn == "faiss" else CustomKNN(CosineSimilarity())
    if knn == "faiss":  # FAISS (flat L2 index) ranks unit vectors as the cosine does
        queries = torch.nn.functional.normalize(queries, dim=1)
        gallery = torch.nn.functional.normalize(gallery, dim=1)
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision"), k=k, knn_func=knn_func,
                                    device=torch.device("cpu"))
    start = time.perf_counter()
    out = calculator.get_accuracy(queries, query_labels, gallery, gallery_labels, ref_includes_query=False)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "scoring_seconds": float("nan"), "peak_rss_mb": _peak_rss_mb(),
            "top1": float(out["precision_at_1"]), "mAP": float(out["mean_average_precision"])}


def run_pml_exact() -> dict:
    return _run_pml(None, "torch")


def run_pml_faiss() -> dict:
    return _run_pml("max_bin_count", "faiss")


def run_pml_torch() -> dict:
    return _run_pml("max_bin_count", "torch")


CONTENDERS = {"baseline": run_baseline, "library": run_library, "pml_exact": run_pml_exact,
              "pml_faiss": run_pml_faiss, "pml_torch": run_pml_torch, "streaming": run_streaming}
TABLE_CONTENDERS = ("library", "baseline", "pml_exact", "pml_faiss", "pml_torch")


def _spawn(name: str, threads: int | None, problem: str, busy: bool) -> dict:
    command = [sys.executable, __file__, "--contender", name, "--problems", problem]
    if threads:
        command += ["--threads", str(threads)]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"contender {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_runs(cases: list[tuple[str, str, str]], threads: int | None, repeat: int) -> dict:
    """For each ``(problem, mode, contender)``, the run with the median time of ``repeat`` fresh runs.

    The repeats are interleaved (every case once, then every case again, ...), so a slow spell of
    this noisy machine falls on all contenders alike instead of on one of them.
    """
    runs: dict[tuple[str, str, str], list[dict]] = {case: [] for case in cases}
    for _ in range(max(1, repeat)):
        for problem, mode, name in cases:
            runs[problem, mode, name].append(_spawn(name, threads, problem, mode == "busy"))
    results = {}
    for case, case_runs in runs.items():
        ordered = sorted(case_runs, key=lambda r: r["seconds"])
        results[case] = ordered[len(ordered) // 2]
    return results


def _print_table(results: dict, problems: list[str], modes: list[str], contenders: list[str]) -> None:
    print(f"{'problem':<6} {'mode':<5} {'contender':<10} {'seconds':>8} {'peak RSS':>9} {'top1':>7} {'mAP':>8}")
    for problem in problems:
        for mode in modes:
            for name in contenders:
                res = results[problem, mode, name]
                print(f"{problem:<6} {mode:<5} {name:<10} {res['seconds']:>8.2f} {res['peak_rss_mb']:>7.0f}MB "
                      f"{res['top1']:>7.4f} {res['mAP']:>8.4f}")
    for problem in problems:
        for mode in modes:
            if ("library" in contenders) and ("pml_faiss" in contenders):
                lib, peer = results[problem, mode, "library"], results[problem, mode, "pml_faiss"]
                print(f"{problem} {mode}: library / pml_faiss (truncated) time = {lib['seconds'] / peer['seconds']:.2f}"
                      f"  (target <= 1); pml_faiss mAP {peer['mAP']:.4f} vs exact {lib['mAP']:.4f}")
            if "pml_exact" in contenders and "library" in contenders:
                print(f"{problem} {mode}: pml_exact / library time = "
                      f"{results[problem, mode, 'pml_exact']['seconds'] / results[problem, mode, 'library']['seconds']:.1f}x")
        if "busy" in modes and "idle" in modes:
            for name in contenders:
                ratio = results[problem, "busy", name]["seconds"] / results[problem, "idle", name]["seconds"]
                print(f"{problem}: {name} busy / idle = {ratio:.2f}" + ("  (target <= 1.7)" if name == "library" else ""))


def main(argv: list[str] | None = None) -> int:
    global NOISE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", choices=sorted(CONTENDERS), help="run one contender (internal)")
    parser.add_argument("--contenders", nargs="+", choices=TABLE_CONTENDERS, default=list(TABLE_CONTENDERS),
                        help="contenders of the reference problem (default: all)")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=["easy", "hard"])
    parser.add_argument("--busy", action="store_true", help="also run every contender beside a busy process")
    parser.add_argument("--skip-streaming", action="store_true", help="skip the 1M-gallery run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh runs of every contender, interleaved; the median time is shown (this machine is noisy)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in every contender (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.contender:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        NOISE = PROBLEMS[args.problems[0]]
        print(json.dumps(CONTENDERS[args.contender]()))
        return 0
    print(f"machine: {os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.2f}")
    print(f"reference problem: Q={NUM_LABELS}, G={NUM_LABELS * PER_LABEL}, D={DIM}, cosine, problems "
          f"{', '.join(f'{p} (noise {PROBLEMS[p]})' for p in args.problems)}, threads {args.threads or 'default'}")
    modes = ["idle", "busy"] if args.busy else ["idle"]
    cases = [(problem, mode, name) for problem in args.problems for mode in modes for name in args.contenders]
    results = _median_runs(cases, args.threads, args.repeat)
    _print_table(results, args.problems, modes, args.contenders)
    if not args.skip_streaming:
        for mode in modes:
            stream = _spawn("streaming", args.threads, "easy", mode == "busy")
            print(f"streaming ({mode}): Q={STREAM_QUERIES}, G={STREAM_GALLERY}, D={STREAM_DIM}, cosine: "
                  f"{stream['seconds']:.1f} s  peak RSS {stream['peak_rss_mb']:.0f} MB (after the data: "
                  f"{stream['rss_after_data_mb']:.0f} MB)  top1 {stream['top1']:.4f}  mAP {stream['mAP']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
