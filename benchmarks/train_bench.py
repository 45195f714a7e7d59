"""Training throughput of `recognite train` against a bare PyTorch loop, measured in one run.

Both train the same model (Recognizer + CosFace, the default loss), on the same data (the demo dataset),
with the same batch size, transform, optimizer and number of steps. Only the training steps are
timed (the trainer reports its own `train_images_per_s` per epoch; validation is excluded). The
contenders alternate `--repeats` times and the medians are compared. A third contender,
`recognite train --channels-last`, measures what the channels-last memory layout gives.

    python benchmarks/train_bench.py --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from recognite.data import (
    default_demo_root,
    make_demo_dataset,
    train_transform,
    train_val_datasets,
)
from recognite.losses import CosFaceLoss
from recognite.model import Recognizer
from recognite.train import TrainConfig, train


def bare_loop(csv_file: Path, args: argparse.Namespace) -> float:
    """Images per second of a plain PyTorch training loop."""
    torch.manual_seed(0)
    model = Recognizer(args.model_name)
    tfm = train_transform(model.preprocessing, args.image_size, (0.6, 1.0))
    ds_train, _, _ = train_val_datasets(str(csv_file), tfm_train=tfm)
    model.set_classifier(len(ds_train.unique_labels))
    loss_fn = CosFaceLoss(scale=20.0, margin=0.2)  # the default of recognite train
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05)
    loader = DataLoader(ds_train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.num_workers)
    model.train()
    start = time.perf_counter()
    steps = 0
    for images, labels in loader:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == args.steps:
            break
    return steps * args.batch_size / (time.perf_counter() - start)


def recognite_train(csv_file: Path, args: argparse.Namespace, out: Path, channels_last: bool = False) -> float:
    config = TrainConfig(
        channels_last=channels_last,
        data_csv=str(csv_file), model_name=args.model_name, image_size=args.image_size, batch_size=args.batch_size,
        num_workers=args.num_workers, epochs=1, max_steps_per_epoch=args.steps, rrc_scale=(0.6, 1.0),
        output_dir=str(out), progress=False, report=False,
    )
    train(config)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return float(rows[-1]["train_images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model-name", default="resnet18")
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()
    csv_file = make_demo_dataset(default_demo_root(), progress=False)
    bare, ours, nhwc = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            bare.append(bare_loop(csv_file, args))
            ours.append(recognite_train(csv_file, args, Path(tmp) / f"run{repeat}"))
            nhwc.append(recognite_train(csv_file, args, Path(tmp) / f"nhwc{repeat}", channels_last=True))
            print(f"repeat {repeat + 1}: bare loop {bare[-1]:.1f} img/s, recognite train {ours[-1]:.1f} img/s, "
                  f"recognite train --channels-last {nhwc[-1]:.1f} img/s")
    med_bare, med_ours, med_nhwc = (statistics.median(v) for v in (bare, ours, nhwc))
    print(f"median: bare loop {med_bare:.1f} img/s, recognite train {med_ours:.1f} img/s, "
          f"--channels-last {med_nhwc:.1f} img/s")
    print(f"recognite train / bare loop throughput: {med_ours / med_bare:.3f}")
    print(f"channels-last / contiguous layout (recognite train): {med_nhwc / med_ours:.3f}")


if __name__ == "__main__":
    main()
