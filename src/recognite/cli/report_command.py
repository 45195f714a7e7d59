"""``recognite report``: figures and an HTML page about a checkpoint of a training run."""

from __future__ import annotations

import argparse


def _run_report(args: argparse.Namespace) -> int:
    from recognite.report import build_report

    build_report(args.run_dir, checkpoint=args.checkpoint, output_dir=args.output_dir, device=args.device,
                 num_worst=args.num_worst, progress=args.progress, data_csv=args.data_csv)  # logs the path
    return 0


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="Write an HTML report (PR/CMC curves, score histograms, worst queries) for a training run.",
        description="Embed the run's validation split again with a checkpoint and write RUN_DIR/report/report.html "
        "with PNG figures: PR curves, CMC curve, histograms of positive vs negative scores with the open-set "
        "threshold, the worst queries next to what they retrieved, the most-confused labels and per-label AP. "
        "Needs matplotlib (pip install 'recognite[plot]').",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="Run folder written by `recognite train` (holds best.pt, metrics.csv).")
    p.add_argument("--checkpoint", default="best.pt", help="Checkpoint in RUN_DIR (or a path). (default: best.pt)")
    p.add_argument("--output-dir", default=None, help="Where to write the report (default: RUN_DIR/report).")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="Device for computing embeddings: auto (CUDA when available), cpu or cuda. (default: auto)")
    p.add_argument("--num-worst", type=_non_negative_int, default=8,
                   help="Number of worst queries shown with their top-5 gallery items (0: none). (default: 8)")
    p.add_argument("--data-csv", default=None,
                   help="The data CSV, when the path recorded in the run's config does not resolve from here.")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show progress bars.")
    p.set_defaults(handler=_run_report)


REGISTRY = [_register_report]
