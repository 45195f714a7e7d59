"""Accuracy levers without retraining, on a trained Omniglot bundle, each on and off, with their
cost: test-time views (queries and references), enrolment views (references only, scored by the
best view or their mean), query expansion (QE), database-side augmentation (DBA) and k-reciprocal
re-ranking.

Rows are measured on the held-out *background* characters (``--held-out``: fold 0 of 10, which
training never saw; for choosing a lever) or on the 20 evaluation alphabets (only to report).
Episodes (20-way 1-shot within one alphabet, Lake's protocol; 20-way across alphabets) use the
episode embeddings directly; the re-rankings act on a gallery, so they are reported on the full
one-reference-per-character gallery (top-1, mAP) only.

    python benchmarks/omniglot_levers.py --bundle runs/omniglot/train/bundle --held-out
    python benchmarks/omniglot_levers.py --bundle runs/omniglot/train/bundle --views 0.05: --qe 1 --dba 1 \
        --enrol ::-10,10 --kr 20,6,0.3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import omniglot  # noqa: E402

from recognite.data import k_fold_trainval_split, split_gallery_query  # noqa: E402
from recognite.eval import episode_accuracy, evaluate_embeddings  # noqa: E402
from recognite.gallery.k_reciprocal import KReciprocal, KReciprocalGallery  # noqa: E402
from recognite.gallery.rerank import database_augmentation, query_expansion  # noqa: E402
from recognite.train import TrainConfig  # noqa: E402
from recognite.utils.views import ViewSpec  # noqa: E402


def _views(text: str) -> tuple[float, list[float]]:
    """``SHIFT:SCALE,SCALE`` -> (shift, scales); ``0.05:`` = shifts only, ``:0.9,1.1`` = scales only."""
    shift, _, scales = text.partition(":")
    return float(shift or 0.0), [float(s) for s in scales.split(",") if s]


def _enrol_views(text: str) -> ViewSpec:
    """``SHIFT:SCALES:ROTATIONS`` -> a ViewSpec, e.g. ``::-10,10`` = two rotations."""
    shift, scales, rotations = (text.split(":") + ["", ""])[:3]
    return ViewSpec(shift=float(shift or 0.0), scales=tuple(float(x) for x in scales.split(",") if x),
                    rotations=tuple(float(x) for x in rotations.split(",") if x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=omniglot.DEFAULT_ROOT)
    parser.add_argument("--held-out", action="store_true", help="the held-out background characters")
    parser.add_argument("--views", nargs="*", default=["0.05:", ":0.9,1.1", "0.05:0.9,1.1"],
                        help="test-time view sets SHIFT:SCALES to try (each a row)")
    parser.add_argument("--qe", type=int, nargs="*", default=[1, 2], help="query expansion k values to try")
    parser.add_argument("--dba", type=int, nargs="*", default=[1], help="database augmentation k values to try")
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--enrol", nargs="*", default=["::-10,10", "::-15,-7.5,7.5,15", "0.05::-10,10"],
                        help="enrolment view sets SHIFT:SCALES:ROTATIONS to try (each scored max and mean)")
    parser.add_argument("--kr", nargs="*", default=["20,6,0.3", "5,2,0.3", "3,1,0.6"],
                        help="k-reciprocal settings k1,k2,lambda to try (top_n 100)")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--combine", action="store_true",
                        help="also a row with the first --views set on the queries and the first --enrol set (best "
                             "view) on the references")
    parser.add_argument("--num-refs", type=int, default=1, help="gallery references per character (full-gallery columns)")
    args = parser.parse_args()
    background, evaluation = omniglot.load_omniglot(args.root, None)
    if args.held_out:
        _, evaluation = k_fold_trainval_split(background[["image", "label", "alphabet"]], num_folds=10, val_fold=0,
                                              seed=TrainConfig.__dataclass_fields__["fold_seed"].default)
    where = "held-out background characters" if args.held_out else "evaluation alphabets"
    eval_df = evaluation.assign(index=range(len(evaluation)))
    df_gallery, df_query = split_gallery_query(eval_df, num_refs=args.num_refs, seed=args.seed)
    g, q = torch.tensor(df_gallery["index"].to_numpy()), torch.tensor(df_query["index"].to_numpy())

    def embed(shift: float, scales: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        ns = argparse.Namespace(tta_shift=shift, tta_scales=scales, num_workers=args.num_workers, device=args.device)
        start = time.perf_counter()
        embeddings, labels, groups = omniglot.embed(args.bundle, evaluation, ns)
        return embeddings, labels, groups, 1000 * (time.perf_counter() - start) / len(evaluation)

    def episodes(embeddings, labels, groups, support_views=None, scoring="max") -> str:
        ways = min(20, int(labels.unique().numel()))
        extra = {"support_views": support_views, "support_scoring": scoring}
        try:
            within = episode_accuracy(embeddings, labels, n_way=ways, k_shot=1, n_query=1,
                                      num_episodes=args.episodes, seed=args.seed, groups=groups, **extra)
            within_text = f"{100 * within['mean']:.2f} ± {100 * within['ci95']:.2f}"
        except ValueError:  # the held-out characters: too few per alphabet for 20-way episodes
            within_text = "n/a"
        across = episode_accuracy(embeddings, labels, n_way=ways, k_shot=1, n_query=1, num_episodes=args.episodes,
                                  seed=args.seed, **extra)
        return f"{within_text} | {100 * across['mean']:.2f} ± {100 * across['ci95']:.2f}"

    def gallery(queries, gallery_embs, labels, rerank=None) -> str:
        out = evaluate_embeddings(queries, labels[q], gallery_embs, labels[g], metric="cosine", ks=(1,), rerank=rerank)
        return f"{100 * out['accuracy']:.2f} | {100 * out['mAP']:.2f}"

    print(f"Omniglot {where}: {evaluation['label'].nunique()} characters, {len(evaluation)} images; bundle {args.bundle}")
    print("| lever | 20-way 1-shot within alphabet % | 20-way 1-shot across % | full gallery top-1 % | mAP % | ms per image |")
    print("|---|---|---|---|---|---|")
    base, labels, groups, base_ms = embed(0.0, [])
    print(f"| none | {episodes(base, labels, groups)} | {gallery(base[q], base[g], labels)} | {base_ms:.1f} |", flush=True)
    for text in args.views:
        shift, scales = _views(text)
        emb, _, _, ms = embed(shift, scales)
        print(f"| views: shift {shift}, scales {scales} | {episodes(emb, labels, groups)} | "
              f"{gallery(emb[q], emb[g], labels)} | {ms:.1f} |", flush=True)
    for k in args.qe:
        start = time.perf_counter()
        expanded = query_expansion(base[q], base[g], k=k, alpha=args.alpha)
        ms = 1000 * (time.perf_counter() - start) / len(q)
        print(f"| QE k={k}, alpha={args.alpha} | - | - | {gallery(expanded, base[g], labels)} | +{ms:.2f} |", flush=True)
    for k in args.dba:
        start = time.perf_counter()
        augmented = database_augmentation(base[g], k=k, alpha=args.alpha)
        ms = 1000 * (time.perf_counter() - start) / len(g)
        print(f"| DBA k={k}, alpha={args.alpha} | - | - | {gallery(base[q], augmented, labels)} | +{ms:.2f} per reference |")
        both = query_expansion(base[q], augmented, k=k, alpha=args.alpha)
        print(f"| DBA + QE k={k} | - | - | {gallery(both, augmented, labels)} | |", flush=True)
    for text in args.kr:
        k1, k2, lam = text.split(",")
        settings = KReciprocal(k1=int(k1), k2=int(k2), lambda_value=float(lam))
        start = time.perf_counter()
        side = KReciprocalGallery(base[g], settings)
        enrol_ms = 1000 * (time.perf_counter() - start) / len(g)
        start = time.perf_counter()
        row = gallery(base[q], base[g], labels, rerank=side.rerank_scores)
        ms = 1000 * (time.perf_counter() - start) / len(q)
        print(f"| k-reciprocal k1={k1}, k2={k2}, lambda={lam} | - | - | {row} | +{ms:.2f} per query "
              f"(evaluation incl.), +{enrol_ms:.2f} per reference |", flush=True)
    for text in args.enrol:
        spec = _enrol_views(text)
        start = time.perf_counter()
        views, _, _ = omniglot.embed(args.bundle, evaluation, argparse.Namespace(
            tta_shift=0.0, tta_scales=[], num_workers=args.num_workers, device=args.device), views=spec, keep_views=True)
        ms = 1000 * (time.perf_counter() - start) / len(evaluation)
        views = torch.nn.functional.normalize(views, dim=2)
        mean = torch.nn.functional.normalize(views.mean(dim=1), dim=1)
        name = (f"enrolment views: shift {spec.shift}, scales {list(spec.scales)}, rotations {list(spec.rotations)} "
                f"(K={spec.num_views})")
        print(f"| {name}, best view | {episodes(base, labels, groups, views, 'max')} | "
              f"{gallery(base[q], views[g], labels)} | {ms:.1f} per reference |", flush=True)
        print(f"| {name}, mean | {episodes(base, labels, groups, mean.unsqueeze(1), 'mean')} | "
              f"{gallery(base[q], mean[g], labels)} | {ms:.1f} per reference |", flush=True)
    if args.combine and args.views and args.enrol:
        shift, scales = _views(args.views[0])
        queries, _, _, _ = embed(shift, scales)
        spec = _enrol_views(args.enrol[0])
        views, _, _ = omniglot.embed(args.bundle, evaluation, argparse.Namespace(
            tta_shift=0.0, tta_scales=[], num_workers=args.num_workers, device=args.device), views=spec, keep_views=True)
        views = torch.nn.functional.normalize(views, dim=2)
        print(f"| test-time views {args.views[0]} on queries + enrolment views {args.enrol[0]} (best view) | "
              f"{episodes(queries, labels, groups, views, 'max')} | {gallery(queries[q], views[g], labels)} | |",
              flush=True)


if __name__ == "__main__":
    main()
