"""Deployment subcommands: ``bundle``, ``embed``, ``gallery build|add|remove|info``, ``recognize``, ``export``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from recognite.cli._options import (
    add_backend,
    add_bundle,
    add_csv_keys,
    add_enrolment,
    add_loading,
    add_reranking,
    reranking_values,
)

logger = logging.getLogger("recognite")

_FROM_BUNDLE = object()  # --threshold not given: use the bundle's (not a string, so argparse leaves it as is)


# --- shared options --------------------------------------------------------------------------


def _loading(args: argparse.Namespace) -> dict[str, Any]:
    """The loading options as keyword arguments of the :mod:`recognite.deploy` functions."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}.")
    return {"batch_size": args.batch_size, "num_workers": args.num_workers, "device": args.device,
            "progress": args.progress, "tta": args.tta}


# --- bundle -----------------------------------------------------------------------------------


def _run_bundle(args: argparse.Namespace) -> int:
    from recognite.bundle import (
        bundle_from_checkpoint,
        bundle_from_pretrained,
        load_bundle,
    )

    if bool(args.checkpoint) == bool(args.model_name):
        raise ValueError("Give exactly one of --checkpoint (a training checkpoint) or --model-name (with --weights: "
                         "pretrained weights alone, no training).")
    if args.checkpoint:
        out = bundle_from_checkpoint(args.checkpoint, args.output, image_size=args.image_size)
    else:
        out = bundle_from_pretrained(args.model_name, args.weights, args.output, image_size=args.image_size,
                                     embedding_dim=args.embedding_dim)
    bundle = load_bundle(out, device="cpu")
    threshold = "none" if bundle.threshold is None else f"{bundle.threshold:.4f}"
    logger.info("Bundle %s: %s, embedding_dim %d, image_size %d, threshold %s", out, bundle.model.model_name,
                bundle.embedding_dim, bundle.image_size, threshold)
    if bundle.threshold is None and not args.checkpoint:
        logger.info("No open-set threshold yet: choose one on your labelled images with "
                    "`recognite calibrate --bundle %s --data-csv labelled.csv`.", out)
    return 0


def _register_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle", help="Make a deployable model bundle from a training checkpoint, or from pretrained weights.",
        description="Convert a training checkpoint (runs/<name>/best.pt) into a bundle folder: safetensors weights, "
        "model config, preprocessing, label names and the calibrated open-set threshold. Or, with --model-name "
        "and --weights, make a bundle of pretrained features without any training (then `recognite calibrate`).")
    p.add_argument("--checkpoint", default=None, help="Training checkpoint, e.g. runs/recognite/best.pt.")
    p.add_argument("--model-name", default=None, help="Backbone of a bundle without training (see `recognite models`).")
    p.add_argument("--weights", default=None, help="With --model-name: DEFAULT, a weights name or a local file.")
    p.add_argument("--embedding-dim", type=int, default=None, help=argparse.SUPPRESS)  # refused: explained by the error
    p.add_argument("--output", required=True, help="Bundle folder to write.")
    p.add_argument("--image-size", type=int, default=None, help="Override the image size (default: training's, or "
                   "the weights' evaluation crop).")
    p.set_defaults(handler=_run_bundle)


# --- embed ------------------------------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> list[str]:
    """Positional inputs plus every ``--csv`` (one spelling for a CSV of images everywhere)."""
    inputs = list(args.inputs) + list(args.csv)
    if not inputs:
        raise ValueError("No inputs given: pass image files, folders or CSV files (positionally or with --csv).")
    return inputs


def _run_embed(args: argparse.Namespace) -> int:
    from recognite.deploy import embed_to_file

    count, dim, labelled = embed_to_file(args.bundle, _inputs(args), args.output, image_key=args.image_key,
                                         label_key=args.label_key, **_loading(args))
    logger.info("Wrote %d embeddings of dimension %d%s to %s", count, dim, " with labels" if labelled else "",
                args.output)
    return 0


def _register_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="Embed images (files, folders or CSV) into an embeddings file.",
        description="Compute the embeddings of images with a model bundle. Inputs are image files, folders "
        "(searched recursively) or CSV files (column --image-key; labels from --label-key when present).")
    add_bundle(p)
    p.add_argument("inputs", nargs="*", help="Image files, folders or CSV files.")
    p.add_argument("--csv", action="append", default=[], help="A CSV of images (column --image-key), as in `gallery "
                   "build --csv`; may be repeated, and combined with positional inputs.")
    p.add_argument("--output", required=True, help="Embeddings file to write (.safetensors).")
    add_csv_keys(p)
    add_loading(p)
    p.set_defaults(handler=_run_embed)


# --- gallery ----------------------------------------------------------------------------------


def _references(args: argparse.Namespace) -> Any:
    from recognite.deploy import read_references

    return read_references(args.csv, args.folder, image_key=args.image_key, label_key=args.label_key)


def _run_gallery_build(args: argparse.Namespace) -> int:
    from recognite.deploy import build_gallery

    gallery, written = build_gallery(args.bundle, _references(args), args.output, aggregation=args.aggregation,
                                     backend=args.backend, nlist=args.nlist, nprobe=args.nprobe, enrol=args.enrol_aug,
                                     **_loading(args))
    logger.info("Gallery %s: %d references of %d labels (aggregation %s, backend %s)", written, len(gallery),
                len(gallery.labels), gallery.aggregation, gallery.backend)
    return 0


def _run_gallery_add(args: argparse.Namespace) -> int:
    from recognite.deploy import add_to_gallery

    refs = _references(args)
    gallery, written, new_labels = add_to_gallery(args.bundle, args.gallery, refs, enrol=args.enrol_aug,
                                                  **_loading(args))
    logger.info("Gallery %s: added %d references (%d new labels); now %d references of %d labels", written,
                len(refs), new_labels, len(gallery), len(gallery.labels))
    return 0


def _run_gallery_remove(args: argparse.Namespace) -> int:
    from recognite.deploy import remove_from_gallery

    gallery, written, removed = remove_from_gallery(args.gallery, args.labels)
    logger.info("Gallery %s: removed %d references of %d labels; now %d references of %d labels", written,
                removed, len(set(args.labels)), len(gallery), len(gallery.labels))
    return 0


def _run_gallery_info(args: argparse.Namespace) -> int:
    from recognite.gallery import GalleryIndex

    gallery = GalleryIndex.load(args.gallery)
    info = gallery.info()
    info.pop("device", None)
    info["model_id"] = gallery.model_id
    if args.json:
        if args.list_labels:
            info["label_counts"] = gallery.label_counts()
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    lines = [f"{k:<{width}}  {v}" for k, v in info.items()]
    if args.list_labels:
        lines.append("")
        lines += [f"{count:>6d}  {label}" for label, count in gallery.label_counts().items()]
    print("\n".join(lines))
    return 0


def _register_gallery(sub: argparse._SubParsersAction) -> None:
    from recognite.gallery import AGGREGATIONS

    p = sub.add_parser(
        "gallery", help="Build, update or inspect a gallery of labelled reference embeddings.",
        description="A gallery is one .safetensors file of L2-normalized reference embeddings with their labels "
        "and image paths; `recognite recognize` searches it.")
    gsub = p.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)

    b = gsub.add_parser("build", help="Embed reference images and write a new gallery.",
                        description="Embed reference images (a CSV of image,label rows or a folder-per-label tree) "
                        "with a bundle and write a gallery file.")
    add_bundle(b)
    b.add_argument("--output", required=True, help="Gallery file to write (.safetensors), or an existing folder.")
    b.add_argument("--csv", help="CSV of reference images (columns --image-key, --label-key).")
    b.add_argument("--folder", help="Folder with one subfolder of reference images per label.")
    b.add_argument("--aggregation", choices=AGGREGATIONS, default="all",
                   help="Per label: keep all references, or one re-normalized mean prototype (default: all).")
    add_backend(b, "torch")
    add_csv_keys(b)
    add_loading(b)
    add_enrolment(b)
    b.set_defaults(handler=_run_gallery_build)

    a = gsub.add_parser("add", help="Embed more reference images into an existing gallery.",
                        description="Add references (new labels or more images of enrolled labels) to a gallery.")
    add_bundle(a)
    a.add_argument("--gallery", required=True, help="Gallery file to update in place.")
    a.add_argument("--csv", help="CSV of reference images (columns --image-key, --label-key).")
    a.add_argument("--folder", help="Folder with one subfolder of reference images per label.")
    add_csv_keys(a)
    add_loading(a)
    add_enrolment(a)
    a.set_defaults(handler=_run_gallery_add)

    r = gsub.add_parser("remove", help="Remove labels (all their references) from a gallery.",
                        description="Remove every reference of the given labels from a gallery, in place.")
    r.add_argument("--gallery", required=True, help="Gallery file to update in place.")
    r.add_argument("--labels", nargs="+", required=True, help="Labels to remove.")
    r.set_defaults(handler=_run_gallery_remove)

    i = gsub.add_parser("info", help="Show the size, labels and settings of a gallery.",
                        description="Print the number of references and labels, the dimension and search settings.")
    i.add_argument("--gallery", required=True, help="Gallery file.")
    i.add_argument("--list-labels", action="store_true", help="Also list every label with its number of references.")
    i.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    i.set_defaults(handler=_run_gallery_info)


# --- recognize --------------------------------------------------------------------------------


def _parse_threshold(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'none', got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("must be a number or 'none', got nan")
    return value


def _fmt(score: float | None) -> str:
    return "" if score is None else f"{score:.6f}"


def _print_table(records: list[dict[str, Any]]) -> None:
    name_width = min(60, max(len(os.path.basename(r["path"])) for r in records))
    pred_width = max(10, *(len(r["prediction"]) for r in records))
    lines = [f"{'image':<{name_width}}  {'prediction':<{pred_width}}  {'score':>7}  top-k"]
    for rec in records:
        top = ", ".join(f"{e['label']} {_fmt(e['score'])[:6]}" for e in rec["top_k"])
        score = _fmt(rec["score"])[:7]
        lines.append(f"{os.path.basename(rec['path'])[:name_width]:<{name_width}}  {rec['prediction']:<{pred_width}}  "
                     f"{score:>7}  {top}")
    print("\n".join(lines))


def _run_recognize(args: argparse.Namespace) -> int:
    from recognite.deploy import FROM_BUNDLE, recognize_images, write_recognitions

    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output must end in .csv or .json, got {args.output!r}.")
    threshold = FROM_BUNDLE if args.threshold is _FROM_BUNDLE else args.threshold
    answers = recognize_images(args.bundle, args.gallery, _inputs(args), top_k=args.top_k, threshold=threshold,
                               backend=args.backend, nprobe=args.nprobe, image_key=args.image_key,
                               label_key=args.label_key, **reranking_values(args), **_loading(args))
    if answers.threshold is None:
        logger.info("No threshold (%s): every query gets its best label, never 'unknown'.",
                    "--threshold none" if args.threshold is None else "none in the bundle; set one with --threshold")
    if output is None:
        _print_table(answers.records)
    else:
        context = {"bundle": os.path.abspath(args.bundle), "gallery": os.path.abspath(args.gallery)}
        write_recognitions(output, answers, context)
    total = len(answers.records)
    logger.info("Recognized %d images: %d known, %d unknown%s", total, total - answers.num_unknown,
                answers.num_unknown, f" (threshold {answers.threshold:g})" if answers.threshold is not None else "")
    if output is not None:
        logger.info("Wrote %s", output)
    return 0


def _register_recognize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recognize", help="Recognize images against a gallery: top-k labels, or 'unknown'.",
        description="Embed query images (files, folders or CSV) and search the gallery. The prediction is the best "
        "label, or 'unknown' when its cosine similarity is below the threshold.")
    add_bundle(p)
    p.add_argument("--gallery", required=True, help="Gallery file (made by `recognite gallery build`).")
    p.add_argument("inputs", nargs="*", help="Image files, folders or CSV files.")
    p.add_argument("--csv", action="append", default=[], help="A CSV of images (column --image-key), as in `gallery "
                   "build --csv`; may be repeated, and combined with positional inputs.")
    p.add_argument("--top-k", type=int, default=5, help="Labels listed per image (default: 5).")
    p.add_argument("--threshold", type=_parse_threshold, default=_FROM_BUNDLE,
                   help="Cosine-similarity threshold below which the answer is 'unknown'; 'none' never answers "
                   "unknown (default: the threshold calibrated in training, stored in the bundle).")
    p.add_argument("--output", default=None, help="Write results to a .csv or .json file instead of the terminal table.")
    add_reranking(p)
    add_backend(p, None, nlist=False)
    add_csv_keys(p)
    add_loading(p)
    p.set_defaults(handler=_run_recognize)


# --- export -----------------------------------------------------------------------------------


def _run_export(args: argparse.Namespace) -> int:
    from recognite.bundle import load_bundle
    from recognite.deploy import export_bundle
    from recognite.export import import_onnx

    if args.format == "onnx":
        import_onnx()  # fail before loading the model
    bundle = load_bundle(args.bundle, device=args.device)
    diff = export_bundle(bundle, args.output, args.format, opset=args.opset, check=args.check, atol=args.atol)
    logger.info("Exported %s to %s: input images (N, 3, %d, %d) preprocessed, output L2-normalized embeddings "
                "(N, %d)", args.format, args.output, bundle.image_size, bundle.image_size, bundle.embedding_dim)
    if diff is not None:
        logger.info("Parity check passed: max abs difference to PyTorch %.3g", diff)
    return 0


def _register_export(sub: argparse._SubParsersAction) -> None:
    from recognite.export import EXPORT_FORMATS

    p = sub.add_parser(
        "export", help="Export a bundle's embedding model to ONNX or TorchScript.",
        description="The exported graph takes preprocessed images (N, 3, S, S) (resize, centre crop, normalize with "
        "the bundle's mean/std) and returns L2-normalized embeddings (N, D); the batch size is dynamic.")
    add_bundle(p)
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="onnx (needs recognite[onnx]) or torchscript.")
    p.add_argument("--output", required=True, help="File to write (.onnx or .pt).")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17).")
    p.add_argument("--check", action="store_true", help="Compare the exported graph with PyTorch on random inputs.")
    p.add_argument("--atol", type=float, default=None, help="Tolerance of --check (default: 1e-4 onnx, 1e-5 torchscript).")
    p.add_argument("--device", default="cpu", help="Device the model is exported from (default: cpu).")
    p.set_defaults(handler=_run_export)


REGISTRY = [_register_embed, _register_gallery, _register_recognize, _register_export, _register_bundle]
