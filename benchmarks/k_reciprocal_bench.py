"""k-reciprocal re-ranking at re-identification scale, in bounded memory.

Zhong et al.'s reference code (and torchreid's ``re_ranking``) builds the ``(Q + G)^2`` distance
matrix and a dense ``(Q + G)^2`` weight matrix: for MSMT17 (Q = 11,659, G = 82,161) that is
2 x 35 GB in float32 (torchreid #455 reports > 25 GB). recognite re-ranks each query against the
gallery alone (gallery side once, then blocks of queries inside the evaluation engine), so memory
is the gallery's sparse neighbour weights plus a block budget. This script times both stages on
synthetic clustered embeddings of that size and prints the peak RSS; the dense figure is computed
(not run).

    python benchmarks/k_reciprocal_bench.py                      # MSMT17-sized: Q=11659, G=82161, D=512
    python benchmarks/k_reciprocal_bench.py --queries 2000 --gallery 20000 --dim 128
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from recognite.eval import evaluate_embeddings
from recognite.gallery.k_reciprocal import KReciprocal, KReciprocalGallery


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=11659)
    parser.add_argument("--gallery", type=int, default=82161)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-label", type=int, default=8, help="gallery items per identity")
    parser.add_argument("--noise", type=float, default=2.5, help="spread of items around their identity (2.5: a hard problem)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    num_labels = max(1, args.gallery // args.per_label)
    centres = F.normalize(torch.randn(num_labels, args.dim, generator=gen), dim=1)
    g_labels = torch.arange(args.gallery) % num_labels
    q_labels = torch.randint(0, num_labels, (args.queries,), generator=gen)
    noise = args.noise / args.dim**0.5
    gallery = F.normalize(centres[g_labels] + noise * torch.randn(args.gallery, args.dim, generator=gen), dim=1)
    queries = F.normalize(centres[q_labels] + noise * torch.randn(args.queries, args.dim, generator=gen), dim=1)
    print(f"Q={args.queries}, G={args.gallery}, D={args.dim}, {num_labels} identities; "
          f"embeddings {(args.queries + args.gallery) * args.dim * 4 / 1e9:.2f} GB; RSS {_rss_gb():.2f} GB")
    dense = 2 * (args.queries + args.gallery) ** 2 * 4 / 1e9
    print(f"dense reference (distance + weight matrices of (Q+G)^2 float32): {dense:.1f} GB")
    start = time.perf_counter()
    plain = evaluate_embeddings(queries, q_labels, gallery, g_labels, ks=(1,))
    plain_s = time.perf_counter() - start
    print(f"exact evaluation, no re-ranking: {plain_s:.1f} s, top-1 {100 * plain['accuracy']:.2f} %, "
          f"mAP {100 * plain['mAP']:.2f} %; peak RSS {_rss_gb():.2f} GB", flush=True)
    start = time.perf_counter()
    side = KReciprocalGallery(gallery, KReciprocal())
    side_s = time.perf_counter() - start
    kept = (side.plain_idx.numel() + side.idx.numel()) * 12 / 1e9
    print(f"gallery side (k1=20, k2=6): {side_s:.1f} s, {kept:.2f} GB of sparse weights; peak RSS {_rss_gb():.2f} GB",
          flush=True)
    start = time.perf_counter()
    reranked = evaluate_embeddings(queries, q_labels, gallery, g_labels, ks=(1,), rerank=side.rerank_scores)
    rerank_s = time.perf_counter() - start
    print(f"exact evaluation with re-ranking: {rerank_s:.1f} s ({1000 * (rerank_s - plain_s) / args.queries:.2f} ms "
          f"per query more), top-1 {100 * reranked['accuracy']:.2f} %, mAP {100 * reranked['mAP']:.2f} %; "
          f"peak RSS {_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
