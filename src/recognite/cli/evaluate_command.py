"""``recognite evaluate``: recognition metrics of a bundle on a labelled CSV of unseen labels."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from recognite.cli.deploy import _add_bundle, _add_csv_keys, _add_loading, _embed, _load_bundle
from recognite.train.config import atomic_write_text

logger = logging.getLogger("recognite")


def evaluate_bundle_on_csv(args: argparse.Namespace) -> dict[str, Any]:
    """Embed the gallery and query images of ``args`` with the bundle and compute every metric."""
    from recognite.data import load_csv, split_gallery_query
    from recognite.eval import episode_accuracy, evaluate_embeddings
    from recognite.train.evaluation import best_positive_negative

    if args.num_refs < 1:
        raise ValueError(f"--num-refs must be >= 1, got {args.num_refs}.")
    bundle = _load_bundle(args)
    df = load_csv(args.data_csv, args.image_key, args.label_key)
    if args.gallery_csv:
        df_gallery, df_query = load_csv(args.gallery_csv, args.image_key, args.label_key), df
    else:
        df_gallery, df_query = split_gallery_query(df, num_refs=args.num_refs, seed=args.ref_seed, label_key=args.label_key)
    if len(df_query) == 0:
        raise ValueError(f"No query images: every label of {args.data_csv} has at most --num-refs {args.num_refs} images.")
    names = sorted(set(df_gallery[args.label_key]) | set(df_query[args.label_key]))
    to_int = {name: i for i, name in enumerate(names)}
    gallery_labels = torch.tensor([to_int[v] for v in df_gallery[args.label_key]])
    query_labels = torch.tensor([to_int[v] for v in df_query[args.label_key]])
    gallery_embs = _embed(bundle, list(df_gallery[args.image_key]), args)
    query_embs = _embed(bundle, list(df_query[args.image_key]), args)

    ks = tuple(k for k in (1, 5, 10) if k <= len(set(gallery_labels.tolist()))) or (1,)
    result = evaluate_embeddings(query_embs, query_labels, gallery_embs, gallery_labels, metric="cosine", ks=ks)
    metrics: dict[str, Any] = {
        "num_gallery": len(df_gallery), "num_queries": len(df_query), "num_labels": len(names),
        "top1": result["accuracy"],
        **{f"top{k}": result["top_k_accuracy"][k] for k in ks if k > 1},
        **{f"recall@{k}": result["recall_at_k"][k] for k in ks},
        "mAP": result["mAP"], "MAP@R": result["map_at_r"], "R-precision": result["r_precision"],
        "hard_pos_mean": result["hard_pos_mean"], "hard_neg_mean": result["hard_neg_mean"],
    }
    threshold = args.threshold if args.threshold is not None else bundle.threshold
    if threshold is not None:
        max_pos, max_neg = best_positive_negative(query_embs, query_labels, gallery_embs, gallery_labels)
        known = torch.isfinite(max_pos)
        correct = known & (max_pos > max_neg)
        best = torch.maximum(max_pos, max_neg)
        metrics["threshold"] = float(threshold)
        metrics["DIR"] = float(((best >= threshold) & correct).sum() / known.sum().clamp(min=1))
        # Each query once more as unknown (its own label removed): its best score is its best negative.
        has_neg = torch.isfinite(max_neg)
        metrics["FAR"] = float(((max_neg >= threshold) & has_neg).sum() / has_neg.sum().clamp(min=1))
    if args.episodes:
        groups = None
        if args.group_key:
            group_names = {g: i for i, g in enumerate(sorted(set(df_query[args.group_key]) | set(df_gallery[args.group_key])))}
            groups = torch.tensor([group_names[g] for g in list(df_gallery[args.group_key]) + list(df_query[args.group_key])])
        episodes = episode_accuracy(torch.cat([gallery_embs, query_embs]), torch.cat([gallery_labels, query_labels]),
                                    n_way=args.n_way, k_shot=args.k_shot, num_episodes=args.episodes, groups=groups,
                                    seed=args.ref_seed)
        metrics[f"{args.n_way}-way {args.k_shot}-shot"] = episodes["mean"]
        metrics[f"{args.n_way}-way {args.k_shot}-shot ci95"] = episodes["ci95"]
    return metrics


def _run_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_bundle_on_csv(args)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.output:
        atomic_write_text(Path(args.output), json.dumps(metrics, indent=2) + "\n")
        logger.info("Metrics written to %s", args.output)
    return 0


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="Measure recognition of a bundle on a labelled CSV (gallery/query split of unseen labels).",
        description="Split the CSV per label into --num-refs gallery references and queries (or use --gallery-csv), "
        "embed both with the bundle, and print top-k, recall@k, mAP, MAP@R, R-precision, the open-set rates at the "
        "bundle's threshold and, with --episodes, N-way K-shot accuracy.",
    )
    _add_bundle(p)
    p.add_argument("--data-csv", required=True, help="CSV of labelled images (the queries, or queries + references).")
    p.add_argument("--gallery-csv", default=None, help="Separate CSV of reference images (default: split --data-csv).")
    p.add_argument("--num-refs", type=int, default=1, help="References per label when splitting (default: 1).")
    p.add_argument("--ref-seed", type=int, default=0, help="Seed of the reference choice and episodes (default: 0).")
    p.add_argument("--threshold", type=float, default=None, help="Open-set threshold (default: the bundle's).")
    p.add_argument("--episodes", type=int, default=0, help="Also run this many N-way K-shot episodes (default: 0).")
    p.add_argument("--n-way", type=int, default=5, help="Classes per episode (default: 5).")
    p.add_argument("--k-shot", type=int, default=1, help="References per class in an episode (default: 1).")
    p.add_argument("--group-key", default=None, help="CSV column grouping labels; episodes draw classes from one group.")
    p.add_argument("--output", default=None, help="Also write the metrics to this JSON file.")
    _add_csv_keys(p)
    _add_loading(p)
    p.set_defaults(handler=_run_evaluate)


REGISTRY = [_register_evaluate]
