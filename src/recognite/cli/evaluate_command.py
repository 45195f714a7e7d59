"""``recognite evaluate``: recognition metrics of a bundle on a labelled CSV of unseen labels."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from recognite._atomic import atomic_write_text, refuse_overwriting_inputs
from recognite.cli._options import (
    add_bundle,
    add_csv_keys,
    add_enrolment,
    add_loading,
    add_reranking,
    reranking_values,
)

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
        progress=args.progress, enrol=args.enrol_aug, **reranking_values(args),
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
    add_enrolment(p)
    add_reranking(p)
    p.set_defaults(handler=_run_evaluate)


def _write_enrolment(args: argparse.Namespace) -> None:
    """Set the bundle's enrolment augmentation from the --enrol-* options (unset ones keep the bundle's)."""
    from recognite.bundle import load_bundle, write_enrolment_augmentation
    from recognite.utils.views import EnrolmentAugmentation, ViewSpec

    current = load_bundle(args.bundle, device="cpu", verify=False).enrolment_augmentation
    views = current.views if current is not None else ViewSpec()
    views = ViewSpec(
        shift=views.shift if args.enrol_shift is None else args.enrol_shift,
        scales=views.scales if args.enrol_scales is None else tuple(args.enrol_scales),
        hflip=views.hflip if args.enrol_hflip is None else args.enrol_hflip,
        rotations=views.rotations if args.enrol_rotations is None else tuple(args.enrol_rotations),
    )
    scoring = args.enrol_scoring or (current.scoring if current is not None else "max")
    augmentation = EnrolmentAugmentation(views, scoring) if views.num_views > 1 else None
    write_enrolment_augmentation(args.bundle, augmentation)
    print("enrolment views  " + ("none" if augmentation is None else
                                 f"{views.num_views} per reference, scored by {scoring} (shift {views.shift}, scales "
                                 f"{list(views.scales)}, rotations {list(views.rotations)}, hflip {views.hflip})"))


def _run_calibrate(args: argparse.Namespace) -> int:
    from recognite.evaluate import calibrate_bundle

    if args.num_refs < 1:
        raise ValueError(f"--num-refs must be >= 1, got {args.num_refs}.")
    method = args.threshold_method or ("far" if args.target_far is not None else "f1")
    if any(option is not None for option in (args.views_shift, args.views_scales, args.views_hflip,
                                             args.views_rotations)):
        from recognite.bundle import load_bundle, write_test_time_augmentation
        from recognite.utils.views import ViewSpec

        current = load_bundle(args.bundle, device="cpu", verify=False).test_time_augmentation or ViewSpec()
        views = ViewSpec(
            shift=current.shift if args.views_shift is None else args.views_shift,
            scales=current.scales if args.views_scales is None else tuple(args.views_scales),
            hflip=current.hflip if args.views_hflip is None else args.views_hflip,
            rotations=current.rotations if args.views_rotations is None else tuple(args.views_rotations),
        )
        write_test_time_augmentation(args.bundle, views)
        print(f"test-time views  {views.num_views} per image (shift {views.shift}, scales {list(views.scales)}, "
              f"rotations {list(views.rotations)}, hflip {views.hflip})")
    if args.store_reranking:
        from recognite.bundle import write_reranking
        from recognite.utils.reranking import Reranking

        values = reranking_values(args)
        values.pop("rerank")
        stored = Reranking(**values)
        write_reranking(args.bundle, stored)
        print("re-ranking  " + (json.dumps(stored.to_dict()) if stored.active else "none"))
    enrol_options = (args.enrol_shift, args.enrol_scales, args.enrol_rotations, args.enrol_hflip, args.enrol_scoring)
    if any(option is not None for option in enrol_options):
        _write_enrolment(args)
    threshold = calibrate_bundle(
        args.bundle, args.data_csv, num_refs=args.num_refs, ref_seed=args.ref_seed, threshold_method=method,
        target_far=0.05 if args.target_far is None else args.target_far, image_key=args.image_key,
        label_key=args.label_key, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, tta=args.tta,
        progress=args.progress, enrol=args.enrol_aug,
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
    views.add_argument("--views-rotations", type=float, nargs="*", default=None,
                       help="Views rotated by these angles in degrees (counter-clockwise).")
    views.add_argument("--views-hflip", action=argparse.BooleanOptionalAction, default=None,
                       help="Also the mirror image of every view (only for models trained with flips).")
    enrol = p.add_argument_group("enrolment augmentation", "Set how references are enrolled (each as several views, "
                                 "scored by the best or their mean) before calibrating; unset options keep the "
                                 "bundle's; no views left = off.")
    enrol.add_argument("--enrol-shift", type=float, default=None, help="Four views shifted by this fraction of the side.")
    enrol.add_argument("--enrol-scales", type=float, nargs="*", default=None, help="Views rescaled by these factors.")
    enrol.add_argument("--enrol-rotations", type=float, nargs="*", default=None,
                       help="Views rotated by these angles in degrees (counter-clockwise).")
    enrol.add_argument("--enrol-hflip", action=argparse.BooleanOptionalAction, default=None,
                       help="Also the mirror image of every view.")
    enrol.add_argument("--enrol-scoring", choices=("max", "mean"), default=None,
                       help="max: a reference scores its best view (one gallery row per view); mean: one row, "
                            "the mean of its views (default: max).")
    add_reranking(p)
    p.add_argument("--store-reranking", action="store_true",
                   help="Store the re-ranking options given (--query-expansion, --k-reciprocal ...; none = remove) in "
                        "the bundle: recognize and evaluate then apply them unless told --no-rerank.")
    add_csv_keys(p)
    add_loading(p)
    add_enrolment(p)
    p.set_defaults(handler=_run_calibrate)


REGISTRY = [_register_evaluate, _register_calibrate]
