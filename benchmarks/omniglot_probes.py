"""Two quick Omniglot probes behind rows of benchmarks/RESULTS.md (Omniglot, "Everything tried").

``steps``: train each backbone spec (NAME:SIZE) for N steps with the benchmark's augmentation and a
0.2-epoch warm-up, and print the held-out background top-1 before and after:

    python benchmarks/omniglot_probes.py steps 150 resnet18:64 shufflenet_v2_x1_0:128 regnet_x_400mf:96

``centering``: does subtracting a mean feature before the cosine (SimpleShot's CL2N) help a
trained bundle? Prints within-alphabet and across-alphabet 20-way 1-shot accuracy (1000 episodes):

    python benchmarks/omniglot_probes.py centering runs/omniglot/train/bundle
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omniglot import DEFAULT_ROOT, load_omniglot
from torch.utils.data import DataLoader

from recognite.bundle import load_bundle
from recognite.data import DataFrameDataset
from recognite.eval import embed_loader, episode_accuracy
from recognite.train import TrainConfig, train


def probe_steps(args: argparse.Namespace) -> None:
    background, _ = load_omniglot(args.root, None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    background[["image", "label"]].to_csv(out / "background.csv", index=False)
    for spec in args.specs:
        name, size = spec.split(":")
        run_dir = out / spec.replace(":", "_")
        config = TrainConfig(
            data_csv=str(out / "background.csv"), num_folds=10, val_fold="0", model_name=name, image_size=int(size),
            rrc_scale=(0.8, 1.0), rrc_ratio=(0.8, 1.25), epochs=1, content_crop=True, affine_degrees=15.0,
            affine_translate=0.08, affine_scale=(0.8, 1.1), affine_shear=20.0, batch_size=64, lr=2e-3,
            weight_decay=0.05, warmup_epochs=0.2, loss="cosface", num_workers=1, max_steps_per_epoch=args.steps,
            output_dir=str(run_dir), progress=False, report=False, seed=0,
        )
        start = time.perf_counter()
        train(config)
        rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
        print(f"{spec}: {args.steps} steps in {time.perf_counter() - start:.0f} s, "
              f"{float(rows[-1]['train_images_per_s']):.1f} img/s, held-out top-1 "
              f"{float(rows[0]['top1']):.3f} -> {float(rows[-1]['top1']):.3f}", flush=True)


def probe_centering(args: argparse.Namespace) -> None:
    background, evaluation = load_omniglot(args.root, None)
    bundle = load_bundle(args.bundle, device="cpu")

    def features(df):  # backbone features before the L2 normalization
        label_to_int = {label: i for i, label in enumerate(sorted(df["label"].unique()))}
        dataset = DataFrameDataset(df, "label", "image", label_to_int, bundle.transform)
        return embed_loader(bundle.model, DataLoader(dataset, batch_size=256, num_workers=1), device="cpu",
                            get_embeddings_fn=lambda model, images: model._features(images))

    embeddings, labels = features(evaluation)
    background_features, _ = features(background.sample(n=4000, random_state=0))
    alphabet_to_int = {a: i for i, a in enumerate(sorted(evaluation["alphabet"].unique()))}
    groups = torch.tensor([alphabet_to_int[a] for a in evaluation["alphabet"]])
    for name, x in [("plain", embeddings), ("centered on 4000 background images", embeddings - background_features.mean(0)),
                    ("centered on the evaluation images", embeddings - embeddings.mean(0))]:
        x = F.normalize(x, dim=1)
        within = episode_accuracy(x, labels, n_way=20, k_shot=1, n_query=1, num_episodes=1000, seed=0, groups=groups)
        across = episode_accuracy(x, labels, n_way=20, k_shot=1, n_query=1, num_episodes=1000, seed=0)
        print(f"{name}: within {100 * within['mean']:.2f} ± {100 * within['ci95']:.2f}, "
              f"across {100 * across['mean']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps")
    steps.add_argument("steps", type=int)
    steps.add_argument("specs", nargs="+", help="NAME:SIZE")
    steps.add_argument("--output-dir", default="runs/omniglot_probe")
    centering = commands.add_parser("centering")
    centering.add_argument("bundle", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    (probe_steps if args.command == "steps" else probe_centering)(args)


if __name__ == "__main__":
    main()
