"""Model-only training throughput of backbones on random tensors (no image loading).

Each spec is NAME:SIZE or NAME:SIZE:cl (channels-last layout). Batch 64, AdamW, cross-entropy on
20x the cosine scores of a 868-class Recognizer; 3 warm-up steps, then ``--steps`` timed steps.

    python benchmarks/backbone_speed.py resnet18:64 resnet18:64:cl regnet_x_400mf:96
"""

from __future__ import annotations

import argparse
import time

import torch

from recognite.model import Recognizer


def images_per_second(name: str, size: int, channels_last: bool, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = Recognizer(name, num_classes=868).to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images = torch.randn(64, 3, size, size).to(memory_format=memory_format)
    labels = torch.randint(0, 868, (64,))
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images) * 20, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="NAME:SIZE or NAME:SIZE:cl")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for spec in args.specs:
        name, size, *rest = spec.split(":")
        channels_last = rest == ["cl"]
        rate = images_per_second(name, int(size), channels_last, args.steps, args.threads)
        print(f"{name} {size}px{' channels-last' if channels_last else ''}: {rate:.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
