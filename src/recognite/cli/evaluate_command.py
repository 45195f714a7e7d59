"""``recognite evaluate``: recognition metrics of a bundle on a labelled CSV of unseen labels."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from recognite._atomic import atomic_write_text, refuse_overwriting_inputs
from recognite.cli._options import add_bundle, add_csv_keys, add_loading

logger = logging.getLogger("recognite")


def evaluate_bundle_on_csv(args: argparse.Namespace) -> dict[str, Any]:
    """The metrics of :func:`recognite.evaluate.evaluate_bundle` for parsed ``recognite evaluate`` options."""
    from recognite.evaluate import evaluate_bundle

    if args.num_refs < 1:
        raise ValueError(f"--num-refs must be >= 1, got {args.num_refs}.")
    if args.output:
        refuse_overwriting_inputs(args.output, [p for p in (args.data_csv, args.gallery_csv) if p],
                                  protected_folders=[args.bundle])
    return evaluate_bundle(
        args.bundle, args.data_csv, gallery_csv=args.gallery_csv, num_refs=args.num_refs, ref_seed=args.ref_seed,
        threshold="bundle" if args.threshold is None else args.threshold, episodes=args.episodes,
        n_way=args.n_way, k_shot=args.k_shot, group_key=args.group_key, image_key=args.image_key,
        label_key=args.label_key, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, tta=args.tta,
        progress=args.progress,
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_bundle_on_csv(args)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.output:
        # Non-finite figures (nan: no trial of that kind) are written as null: NaN is not JSON.
        finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        atomic_write_text(Path(args.output), json.dumps(finite, indent=2, allow_nan=False) + "\n")
        logger.info("Metrics written to %s", args.output)
    return 0


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="Measure recognition of a bundle on a labelled CSV (gallery/query split of unseen labels).",
        description="Split the CSV per label into --num-refs gallery references and queries (or use --gallery-csv), "
        "embed both with the bundle, and print top-k, recall@k, mAP, MAP@R, R-precision, the open-set rates at the "
        "bundle's threshold and, with --episodes, N-way K-shot accuracy.",
    )
    add_bundle(p)
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
    add_csv_keys(p)
    add_loading(p)
    p.set_defaults(handler=_run_evaluate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from recognite.evaluate import calibrate_bundle

    if args.num_refs < 1:
        raise ValueError(f"--num-refs must be >= 1, got {args.num_refs}.")
    method = args.threshold_method or ("far" if args.target_far is not None else "f1")
    if args.views_shift is not None or args.views_scales is not None or args.views_hflip is not None:
        from recognite.bundle import load_bundle, write_test_time_augmentation
        from recognite.utils.views import ViewSpec

        current = load_bundle(args.bundle, device="cpu", verify=False).test_time_augmentation or ViewSpec()
        views = ViewSpec(
            shift=current.shift if args.views_shift is None else args.views_shift,
            scales=current.scales if args.views_scales is None else tuple(args.views_scales),
            hflip=current.hflip if args.views_hflip is None else args.views_hflip,
        )
        write_test_time_augmentation(args.bundle, views)
        print(f"test-time views  {views.num_views} per image (shift {views.shift}, scales {list(views.scales)}, "
              f"hflip {views.hflip})")
    threshold = calibrate_bundle(
        args.bundle, args.data_csv, num_refs=args.num_refs, ref_seed=args.ref_seed, threshold_method=method,
        target_far=0.05 if args.target_far is None else args.target_far, image_key=args.image_key,
        label_key=args.label_key, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, tta=args.tta,
        progress=args.progress,
    )
    print("threshold  " + ("none" if threshold is None else f"{threshold:.6f}"))
    return 0


def _register_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="Choose a bundle's open-set threshold on your own labelled images and store it.",
        description="Split the CSV per label into --num-refs references and queries (as `recognite evaluate`), embed "
        "both with the bundle, calibrate the threshold as training does (best F1 of accepted-and-correct; with "
        "--target-far the lowest threshold with at most that false-accept rate) and write it into the bundle.",
    )
    add_bundle(p)
    p.add_argument("--data-csv", required=True, help="CSV of labelled images (at least 2 images for some labels).")
    p.add_argument("--num-refs", type=int, default=1, help="References per label (default: 1).")
    p.add_argument("--ref-seed", type=int, default=0, help="Seed of the reference choice (default: 0).")
    p.add_argument("--threshold-method", choices=("f1", "far"), default=None,
                   help="f1 or far (default: f1, or far when --target-far is given).")
    p.add_argument("--target-far", type=float, default=None, help="Target false-accept rate of --threshold-method far "
                   "(default: 0.05).")
    views = p.add_argument_group("test-time augmentation", "Set the bundle's test-time views first (the threshold is "
                                 "then calibrated on embeddings made the same way); unset options keep the bundle's.")
    views.add_argument("--views-shift", type=float, default=None,
                       help="Four views shifted by this fraction of the side (0 = none).")
    views.add_argument("--views-scales", type=float, nargs="*", default=None,
                       help="Views rescaled about the centre by these factors (none given = no rescaled views).")
    views.add_argument("--views-hflip", action=argparse.BooleanOptionalAction, default=None,
                       help="Also the mirror image of every view (only for models trained with flips).")
    add_csv_keys(p)
    add_loading(p)
    p.set_defaults(handler=_run_calibrate)


REGISTRY = [_register_evaluate, _register_calibrate]
