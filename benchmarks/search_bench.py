"""Gallery search benchmark: exact torch vs FAISS flat vs FAISS IVF (recognite issue 5).

Synthetic L2-normalized embeddings (D=256 by default), ``--refs-per-label`` references per
label, and queries that are noisy copies of gallery items. For every gallery size and backend a
fresh subprocess builds a :class:`recognite.gallery.GalleryIndex`, then measures

* build time (adding the references; FAISS: building/training the index),
* per-query latency of ``recognize`` with a batch of one query (median and p95),
* throughput of ``recognize`` on all queries in one batched call,
* peak resident memory of the subprocess (``ru_maxrss``), and the peak right after the
  synthetic data was generated (so the index's own share can be read off),
* top-1 labels, from which the parent computes agreement with the exact torch answer
  (recall@1 against exact for IVF).

The baseline is exact torch in the same run; ratios are printed against it.

Example:
    python benchmarks/search_bench.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BACKENDS = ("torch", "faiss-flat", "faiss-ivf")


def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from recognite.gallery import GalleryIndex
    from recognite.gallery._faiss import default_nlist

    torch.set_num_threads(args.threads)
    if args.backend != "torch":
        import faiss

        faiss.omp_set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    size, dim = args.size, args.dim
    gallery_emb = torch.empty(size, dim)
    for start in range(0, size, 65536):  # chunked generation: no 2x temporary
        block = torch.randn(min(65536, size - start), dim, generator=gen)
        gallery_emb[start : start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    codes = torch.arange(size) // args.refs_per_label
    labels = [f"label{c}" for c in codes.tolist()]
    picks = torch.randint(0, size, (args.queries,), generator=gen)
    noise = torch.nn.functional.normalize(torch.randn(args.queries, dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(gallery_emb[picks] + args.noise * noise, dim=1)
    rss_data_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    gallery = GalleryIndex(backend=args.backend, nprobe=args.nprobe)
    gallery.add(gallery_emb, labels)
    del gallery_emb
    gallery.recognize(queries[:1], k=args.k)  # builds the FAISS index / caches
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = gallery.recognize(queries, k=args.k, threshold=args.threshold)
    batch_s = time.perf_counter() - t0

    latencies = []
    for i in range(min(args.single, args.queries)):
        t0 = time.perf_counter()
        gallery.recognize(queries[i : i + 1], k=args.k, threshold=args.threshold)
        latencies.append(time.perf_counter() - t0)
    latencies.sort()

    top1 = np.array([int(row[0][len("label"):]) if row else -1 for row in result.labels], dtype=np.int64)
    np.save(args.out, top1)
    true_label = (picks // args.refs_per_label).numpy()
    report = {
        "size": size,
        "backend": args.backend,
        "build_s": build_s,
        "batch_s": batch_s,
        "qps": args.queries / batch_s,
        "lat_median_ms": 1000 * statistics.median(latencies),
        "lat_p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "rss_data_mb": rss_data_kb / 1024,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "acc_true_item_label": float((top1 == true_label).mean()),
        "info": gallery.info(),
        "nlist": gallery.info().get("nlist") or default_nlist(size),
    }
    print("RESULT " + json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000, help="queries in the batched call")
    parser.add_argument("--single", type=int, default=100, help="batch-of-one calls timed")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--refs-per-label", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.5, help="norm of the noise added to a query")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    import numpy as np

    print(f"# load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}, threads: {args.threads}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            exact_top1 = None
            base = None
            for backend in args.backends:
                out = os.path.join(tmp, f"{size}_{backend}.npy")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", str(size),
                       "--backend", backend, "--out", out]
                for name in ("dim", "queries", "single", "k", "refs_per_label", "noise", "threshold", "nprobe", "threads", "seed"):
                    cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{size} {backend}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                    continue
                rep = json.loads(line[len("RESULT "):])
                rep["wall_s"] = time.perf_counter() - t0
                top1 = np.load(out)
                if backend == "torch":
                    exact_top1, base = top1, rep
                rep["agree_exact"] = float((top1 == exact_top1).mean()) if exact_top1 is not None else float("nan")
                if base is not None:
                    rep["lat_ratio"] = rep["lat_median_ms"] / base["lat_median_ms"]
                    rep["qps_ratio"] = rep["qps"] / base["qps"]
                else:
                    rep["lat_ratio"] = rep["qps_ratio"] = float("nan")
                rows.append(rep)
                print(f"{size:>8} {backend:<10} build {rep['build_s']:7.2f}s  latency {rep['lat_median_ms']:8.2f} ms"
                      f" (p95 {rep['lat_p95_ms']:8.2f}, x{rep['lat_ratio']:.3f} of torch)  throughput"
                      f" {rep['qps']:9.0f} q/s (x{rep['qps_ratio']:.2f})  recall@1 vs exact {rep['agree_exact']:.3f}"
                      f"  peak RSS {rep['rss_peak_mb']:7.0f} MB (data only {rep['rss_data_mb']:.0f} MB)", flush=True)
    print(f"# load average at end: {os.getloadavg()}")
    print()
    print("| G | backend | build s | latency median ms (p95) | vs torch | throughput q/s | vs torch | recall@1 vs exact | top-1 = source label | peak RSS MB (data only) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f" nlist={r['nlist']}, nprobe={r['info'].get('nprobe')}" if r["backend"] == "faiss-ivf" else ""
        print(f"| {r['size']:,} | {r['backend']}{extra} | {r['build_s']:.2f} | {r['lat_median_ms']:.2f} ({r['lat_p95_ms']:.2f}) |"
              f" {r['lat_ratio']:.2f}x | {r['qps']:.0f} | {r['qps_ratio']:.2f}x | {r['agree_exact']:.3f} |"
              f" {r['acc_true_item_label']:.3f} | {r['rss_peak_mb']:.0f} ({r['rss_data_mb']:.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
