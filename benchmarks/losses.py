"""Compare losses on unseen-label recognition, same budget: raw-cosine cross-entropy vs normalized
softmax with a temperature vs CosFace vs ArcFace.

Each loss trains the same backbone from the same initialization on the same label-disjoint fold,
for the same number of steps; the table shows top-1 and mAP on the validation labels (never seen
in training) of the last epoch, and the best epoch's. Runs on the demo dataset, and on Omniglot's
background alphabets when `../shared/datasets/omniglot` exists.

    python benchmarks/losses.py --epochs 3 --image-size 32
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from recognite.data import default_demo_root, make_demo_dataset
from recognite.train import TrainConfig, train

CONTENDERS = {
    "cross-entropy on raw cosines": {"loss": "norm_softmax", "temperature": 1.0},
    "norm. softmax T=0.1": {"loss": "norm_softmax", "temperature": 0.1},
    "norm. softmax T=0.05": {"loss": "norm_softmax", "temperature": 0.05},
    "norm. softmax T=0.02": {"loss": "norm_softmax", "temperature": 0.02},
    "CosFace s=20 m=0.2": {"loss": "cosface", "scale": 20.0, "margin": 0.2},
    "ArcFace s=20 m=0.2": {"loss": "arcface", "scale": 20.0, "margin": 0.2},
}
OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "omniglot"


def omniglot_background_csv(out_dir: Path) -> Path | None:
    """A CSV of Omniglot's background alphabets with absolute image paths (None if absent)."""
    source = OMNIGLOT / "omniglot.csv"
    if not source.is_file():
        return None
    df = pd.read_csv(source)
    df = df[df["set"] == "background"].copy()
    df["image"] = [str(OMNIGLOT / p) for p in df["image"]]
    target = out_dir / "omniglot_background.csv"
    df[["image", "label"]].to_csv(target, index=False)
    return target


def run(csv_file: Path, name: str, overrides: dict, args: argparse.Namespace, out: Path) -> dict:
    config = TrainConfig(
        data_csv=str(csv_file), model_name=args.model_name, image_size=args.image_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, warmup_epochs=0.5, rrc_scale=(0.6, 1.0), num_workers=args.num_workers,
        max_steps_per_epoch=args.max_steps, output_dir=str(out), progress=False, report=False, seed=0, **overrides,
    )
    start = time.perf_counter()
    result = train(config)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    last = rows[-1]
    return {
        "loss": name, "last top1": float(last["top1"]), "last mAP": float(last["mAP"]),
        "best top1": result.best["top1"], "best mAP": result.best["mAP"], "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=0, help="Cap on steps per epoch (0 = all).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.002, help="Peak AdamW learning rate (weight decay 0.05).")
    parser.add_argument("--model-name", default="resnet18")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--datasets", nargs="*", default=["demo", "omniglot"])
    parser.add_argument("--only", nargs="*", default=None, help="Run only these contenders (names as in the table).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    contenders = {k: v for k, v in CONTENDERS.items() if args.only is None or k in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {}
        if "demo" in args.datasets:
            datasets["demo"] = make_demo_dataset(default_demo_root(), progress=False)
        if "omniglot" in args.datasets:
            omniglot = omniglot_background_csv(Path(tmp))
            if omniglot is None:
                print(f"Omniglot not found at {OMNIGLOT}; skipped.")
            else:
                datasets["omniglot (background, fold 0)"] = omniglot
        for data_name, csv_file in datasets.items():
            print(f"\n## {data_name}: {args.model_name} {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr}")
            print("| loss | last top-1 | last mAP | best top-1 | best mAP | seconds |")
            print("|---|---|---|---|---|---|")
            for index, (name, overrides) in enumerate(contenders.items()):
                r = run(csv_file, name, overrides, args, Path(tmp) / f"{data_name[:4]}_{index}")
                print(f"| {r['loss']} | {r['last top1']:.4f} | {r['last mAP']:.4f} | {r['best top1']:.4f} | "
                      f"{r['best mAP']:.4f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
