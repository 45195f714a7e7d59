"""Accuracy levers of a trained run on its own validation labels, each on and off, with their cost,
through the shipped API (``recognite.evaluate.evaluate_bundle``, what ``recognite evaluate`` runs).

The validation labels are those the run held out (``config.yaml``: CSV, folds, fold seed), never
seen in training; the gallery is ``--num-refs`` references per label, the rest are queries.
Rows: none; test-time views; enrolment views (best view / mean); query expansion; k-reciprocal.

    recognite demo --output-dir runs/demo --no-report
    python benchmarks/levers.py --run-dir runs/demo
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import yaml

from recognite.bundle import load_bundle
from recognite.data import k_fold_trainval_split, load_csv
from recognite.evaluate import evaluate_bundle
from recognite.gallery.k_reciprocal import KReciprocal
from recognite.utils.views import EnrolmentAugmentation, ViewSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="A training run folder (config.yaml, bundle/).")
    parser.add_argument("--num-refs", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=1000, help="5-way 1-shot episodes per row")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    df = load_csv(config["data_csv"], config.get("image_key", "image"), config.get("label_key", "label"))
    _, val = k_fold_trainval_split(df, num_folds=config["num_folds"], val_fold=int(config["val_fold"]),
                                   seed=config["fold_seed"], label_key=config.get("label_key", "label"))
    bundle = load_bundle(args.run_dir / "bundle", device=args.device)
    rows = [
        ("none", {}, {}),
        ("test-time views: shift 0.05", {"test_time_augmentation": ViewSpec(shift=0.05)}, {}),
        ("test-time views: scales 0.9, 1.1", {"test_time_augmentation": ViewSpec(scales=(0.9, 1.1))}, {}),
        ("enrolment views: rotations -10, 10, best view",
         {"enrolment_augmentation": EnrolmentAugmentation(ViewSpec(rotations=(-10.0, 10.0)), "max")}, {}),
        ("enrolment views: rotations -10, 10, mean",
         {"enrolment_augmentation": EnrolmentAugmentation(ViewSpec(rotations=(-10.0, 10.0)), "mean")}, {}),
        ("enrolment views: shift 0.05 + rotations -10, 10, best view",
         {"enrolment_augmentation": EnrolmentAugmentation(ViewSpec(shift=0.05, rotations=(-10.0, 10.0)), "max")}, {}),
        ("query expansion k=1, alpha=3", {}, {"query_expansion": 1}),
        ("k-reciprocal k1=20, k2=6, lambda=0.3", {}, {"k_reciprocal": KReciprocal()}),
        ("k-reciprocal k1=5, k2=2, lambda=0.3", {}, {"k_reciprocal": KReciprocal(k1=5, k2=2)}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "val.csv"
        val.to_csv(csv, index=False)
        print(f"{args.run_dir}: {val[config.get('label_key', 'label')].nunique()} validation labels, {len(val)} images, "
              f"{args.num_refs} reference(s) per label")
        print("| lever | top-1 % | mAP % | 5-way 1-shot % | seconds (embedding + evaluation) |")
        print("|---|---|---|---|---|")
        for name, bundle_changes, call in rows:
            variant = dataclasses.replace(bundle, **bundle_changes)
            start = time.perf_counter()
            metrics = evaluate_bundle(variant, csv, num_refs=args.num_refs, threshold=None, episodes=args.episodes,
                                      n_way=5, k_shot=1, image_key=config.get("image_key", "image"),
                                      label_key=config.get("label_key", "label"), **call)
            seconds = time.perf_counter() - start
            episodes = metrics.get("5-way 1-shot", float("nan"))
            ci = metrics.get("5-way 1-shot ci95", float("nan"))
            episode_text = f"{100 * episodes:.2f} ± {100 * ci:.2f}" if not call else "-"
            print(f"| {name} | {100 * metrics['top1']:.2f} | {100 * metrics['mAP']:.2f} | {episode_text} | "
                  f"{seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
