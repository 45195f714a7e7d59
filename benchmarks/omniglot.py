"""Omniglot one-shot recognition with a normalized-softmax Recognizer trained from scratch on CPU.

Protocol (Lake et al. 2015): train on the 30 background alphabets (964 characters), recognize the
659 characters of the 20 evaluation alphabets, never seen in training, from one example each.
10% of the background characters are held out (label-disjoint) to pick the best epoch, so the
evaluation alphabets are used for nothing but the final numbers.

Reported, each over 1000 seeded episodes with mean and 95% confidence interval:
  - 20-way 1-shot, the 20 characters drawn from one evaluation alphabet (Lake's protocol),
  - 20-way 1-shot across alphabets, 5-way 1-shot and 5-way 5-shot (across alphabets),
and the full 659-way 1-shot gallery (one random reference per character): top-1, top-5, mAP.

Uses only the public API (recognite.train, recognite.model, recognite.data, recognite.eval).

    python benchmarks/omniglot.py --output-dir runs/omniglot    # the best settings found (defaults)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from recognite.bundle import load_bundle
from recognite.data import DataFrameDataset, k_fold_trainval_split, split_gallery_query
from recognite.eval import embed_loader, episode_accuracy, evaluate_embeddings
from recognite.train import TrainConfig, train
from recognite.utils.views import MakeViews, ViewSpec, embeddings_of_views

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "omniglot"
PUBLISHED = [
    ("People (Lake et al. 2015)", "95.5"),
    ("Bayesian program learning (Lake et al. 2015)", "96.7"),
    ("Siamese ConvNet (Koch et al. 2015)", "92.0"),
    ("Plain deep ConvNet (Lake et al. 2015)", "86.5"),
]


def load_omniglot(root: Path, num_alphabets: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Background and evaluation rows with absolute image paths (optionally the first N alphabets of each)."""
    df = pd.read_csv(root / "omniglot.csv")
    df["image"] = [str(root / p) for p in df["image"]]
    background, evaluation = df[df["set"] == "background"], df[df["set"] == "evaluation"]
    if num_alphabets:
        background = background[background["alphabet"].isin(sorted(background["alphabet"].unique())[:num_alphabets])]
        evaluation = evaluation[evaluation["alphabet"].isin(sorted(evaluation["alphabet"].unique())[:num_alphabets])]
    return background.reset_index(drop=True), evaluation.reset_index(drop=True)


def train_background(background: pd.DataFrame, args: argparse.Namespace) -> tuple[Path, float]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_file = out / "background.csv"
    background[["image", "label"]].to_csv(csv_file, index=False)
    config = TrainConfig(
        data_csv=str(csv_file), num_folds=10, val_fold="0", num_refs=1, model_name=args.model_name,
        image_size=args.image_size, small_input_stem=args.small_input_stem, rrc_scale=tuple(args.rrc_scale), rrc_ratio=(0.8, 1.25), epochs=args.epochs,
        content_crop=args.content_crop, affine_degrees=args.affine_degrees, affine_translate=args.affine_translate,
        affine_scale=tuple(args.affine_scale), affine_shear=args.affine_shear, rotation_classes=args.rotation_classes,
        elastic_magnitude=args.elastic_magnitude, elastic_grid=args.elastic_grid,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=1.0,
        loss=args.loss, temperature=args.temperature, num_workers=args.num_workers,
        max_steps_per_epoch=args.max_steps, output_dir=str(out / "train"), progress=args.progress,
        report=False, seed=args.seed,
    )
    start = time.perf_counter()
    train(config)
    return out / "train" / "bundle", time.perf_counter() - start


def embed(bundle_dir: Path, df: pd.DataFrame, args: argparse.Namespace, views: ViewSpec | None = None,
          keep_views: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of ``df``'s images prepared as the bundle says (size, normalization, content crop):
    the mean over the views (``views``, default ``--tta-shift`` / ``--tta-scales``), or with
    ``keep_views`` every view's embedding, ``(N, K, D)``."""
    bundle = load_bundle(bundle_dir, device=args.device)
    label_to_int = {label: i for i, label in enumerate(sorted(df["label"].unique()))}
    alphabet_to_int = {a: i for i, a in enumerate(sorted(df["alphabet"].unique()))}
    if views is None:
        views = ViewSpec(shift=args.tta_shift, scales=tuple(args.tta_scales), hflip=False)
    transform = bundle.transform if views.num_views == 1 else T.Compose([bundle.transform, MakeViews(views)])
    dataset = DataFrameDataset(df, "label", "image", label_to_int, transform)
    loader = DataLoader(dataset, batch_size=256 // views.num_views or 1, num_workers=args.num_workers)
    fn = None if views.num_views == 1 else (lambda model, batch: embeddings_of_views(model, batch))
    if keep_views and views.num_views > 1:  # (B, K * D) through embed_loader, then (N, K, D)
        fn = lambda model, batch: model(batch.flatten(0, 1)).reshape(batch.shape[0], -1)  # noqa: E731
    embeddings, labels = embed_loader(bundle.model, loader, device=args.device, get_embeddings_fn=fn)
    if keep_views:
        embeddings = embeddings.reshape(embeddings.shape[0], views.num_views, -1)
    groups = torch.tensor([alphabet_to_int[a] for a in df["alphabet"]])
    return embeddings, labels, groups


def _loss_text(args: argparse.Namespace) -> str:
    if args.loss == "norm_softmax":
        return f"norm_softmax T={args.temperature}"
    return f"{args.loss} (TrainConfig's scale and margin)"


def _augmentation_text(args: argparse.Namespace) -> str:
    parts = ["content crop" if args.content_crop else "no content crop", f"RRC scale {tuple(args.rrc_scale)}"]
    if args.small_input_stem:
        parts.append("small-input stem (3x3 stride 1, no max-pool)")
    if args.affine_degrees or args.affine_translate or args.affine_shear or tuple(args.affine_scale) != (1.0, 1.0):
        parts.append(f"affine rot {args.affine_degrees} shift {args.affine_translate} scale {tuple(args.affine_scale)} "
                     f"shear {args.affine_shear}")
    if args.elastic_magnitude:
        parts.append(f"elastic {args.elastic_magnitude} on a {args.elastic_grid}x{args.elastic_grid} grid")
    if args.rotation_classes:
        parts.append("rotations as new classes (x4)")
    if args.max_steps:
        parts.append(f"at most {args.max_steps} steps per epoch")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="Folder holding omniglot.csv.")
    parser.add_argument("--output-dir", default="runs/omniglot")
    parser.add_argument("--model-name", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--small-input-stem", action=argparse.BooleanOptionalAction, default=False,
                        help="3x3 stride-1 stem instead of 7x7/2 + max-pool (ResNet family; e.g. with --image-size 28).")
    parser.add_argument("--rrc-scale", type=float, nargs=2, default=(0.8, 1.0))
    parser.add_argument("--content-crop", action=argparse.BooleanOptionalAction, default=True,
                        help="Cut each image to the square around its strokes (TrainConfig.content_crop).")
    parser.add_argument("--affine-degrees", type=float, default=15.0)
    parser.add_argument("--affine-translate", type=float, default=0.08)
    parser.add_argument("--affine-scale", type=float, nargs=2, default=(0.8, 1.1))
    parser.add_argument("--affine-shear", type=float, default=20.0)
    parser.add_argument("--elastic-magnitude", type=float, default=0.06,
                        help="Elastic distortion strength (TrainConfig.elastic_magnitude; 0 = off).")
    parser.add_argument("--elastic-grid", type=int, default=4)
    parser.add_argument("--rotation-classes", action=argparse.BooleanOptionalAction, default=False,
                        help="Train on the 90/180/270-degree rotations as new classes (TrainConfig.rotation_classes).")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--loss", default="cosface")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=0, help="Cap on steps per epoch (0 = all).")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="Data-loading processes (1 was fastest on the 2-core CPU).")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--tta-shift", type=float, default=0.0,
                        help="Test-time views shifted by this fraction of the side (4 more views; 0 = none).")
    parser.add_argument("--tta-scales", type=float, nargs="*", default=[],
                        help="Test-time views rescaled by these factors (one view each).")
    parser.add_argument("--held-out", action="store_true",
                        help="Report on the held-out background characters (fold 0) instead of the evaluation "
                             "alphabets: for choosing settings without looking at the evaluation alphabets.")
    parser.add_argument("--alphabets", type=int, default=0, help="Use only the first N alphabets of each side (smoke tests).")
    parser.add_argument("--bundle", type=Path, default=None, help="Evaluate this model bundle instead of training.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (args.root / "omniglot.csv").is_file():
        raise SystemExit(f"Omniglot not found: {args.root / 'omniglot.csv'} does not exist.")

    background, evaluation = load_omniglot(args.root, args.alphabets or None)
    if args.held_out:  # the background characters training held out (fold 0 of 10, TrainConfig's fold seed)
        _, evaluation = k_fold_trainval_split(background[["image", "label", "alphabet"]], num_folds=10, val_fold=0,
                                              seed=TrainConfig.__dataclass_fields__["fold_seed"].default)
    if args.bundle is None:
        bundle_dir, train_seconds = train_background(background, args)
    else:
        bundle_dir, train_seconds = args.bundle, float("nan")
    embeddings, labels, groups = embed(bundle_dir, evaluation, args)

    n_way_20 = min(20, int(labels.unique().numel()))
    rows = []
    for name, kwargs in [
        (f"{n_way_20}-way 1-shot, within one alphabet (Lake)", {"n_way": n_way_20, "k_shot": 1, "groups": groups}),
        (f"{n_way_20}-way 1-shot, across alphabets", {"n_way": n_way_20, "k_shot": 1}),
        ("5-way 1-shot, across alphabets", {"n_way": 5, "k_shot": 1}),
        ("5-way 5-shot, across alphabets", {"n_way": 5, "k_shot": 5}),
    ]:
        try:
            result = episode_accuracy(embeddings, labels, n_query=1, num_episodes=args.episodes, seed=args.seed, **kwargs)
        except ValueError as exc:  # e.g. too few characters per alphabet in a smoke test
            rows.append((name, f"n/a ({exc})"))
            continue
        rows.append((name, f"{100 * result['mean']:.2f} ± {100 * result['ci95']:.2f}"))

    eval_df = evaluation.assign(index=range(len(evaluation)))
    df_gallery, df_query = split_gallery_query(eval_df, num_refs=1, seed=args.seed)
    g, q = torch.tensor(df_gallery["index"].to_numpy()), torch.tensor(df_query["index"].to_numpy())
    full = evaluate_embeddings(embeddings[q], labels[q], embeddings[g], labels[g], metric="cosine", ks=(1, 5))
    num_chars = int(labels.unique().numel())

    where = "held-out background characters" if args.held_out else "evaluation alphabets"
    views = f", test-time views: shift {args.tta_shift}, scales {args.tta_scales}" if args.tta_shift or args.tta_scales else ""
    print(f"\nOmniglot {where}{views}: {num_chars} characters, {len(evaluation)} images; "
          f"{args.model_name} {args.image_size}px, {_loss_text(args)}, {args.epochs} epochs, {_augmentation_text(args)}; "
          f"training wall time {train_seconds / 60:.1f} min")
    print("| task | accuracy % (mean ± 95% CI) |")
    print("|---|---|")
    for name, value in rows:
        print(f"| recognite: {name} | {value} |")
    print(f"| recognite: {num_chars}-way 1-shot gallery | top-1 {100 * full['accuracy']:.2f}, "
          f"top-5 {100 * full['top_k_accuracy'][5]:.2f}, mAP {100 * full['mAP']:.2f} |")
    for name, value in PUBLISHED:
        print(f"| published, 20-way 1-shot within alphabet: {name} | {value} |")


if __name__ == "__main__":
    main()
