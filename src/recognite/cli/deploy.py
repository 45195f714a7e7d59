"""Deployment subcommands: ``bundle``, ``embed``, ``gallery build|add|remove|info``, ``recognize``, ``export``."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from recognite._atomic import atomic_path
from recognite.cli._options import add_backend, add_bundle, add_csv_keys, add_loading

logger = logging.getLogger("recognite")

_FROM_BUNDLE = object()  # --threshold not given: use the bundle's (not a string, so argparse leaves it as is)


# --- shared options --------------------------------------------------------------------------


def _check_loading(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}.")


def _load_bundle(args: argparse.Namespace) -> Any:
    from recognite.bundle import load_bundle

    return load_bundle(args.bundle, device=args.device)


def _embed(bundle: Any, paths: list[str], args: argparse.Namespace) -> Any:
    from recognite.embedding import embed_images

    _check_loading(args)
    return embed_images(bundle.model, paths, bundle.transform, batch_size=args.batch_size,
                        num_workers=args.num_workers, progress=args.progress)


# --- bundle -----------------------------------------------------------------------------------


def _run_bundle(args: argparse.Namespace) -> int:
    from recognite.bundle import bundle_from_checkpoint, load_bundle

    out = bundle_from_checkpoint(args.checkpoint, args.output, image_size=args.image_size)
    bundle = load_bundle(out, device="cpu")
    threshold = "none" if bundle.threshold is None else f"{bundle.threshold:.4f}"
    logger.info("Bundle %s: %s, embedding_dim %d, image_size %d, threshold %s", out, bundle.model.model_name,
                bundle.embedding_dim, bundle.image_size, threshold)
    return 0


def _register_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle", help="Make a deployable model bundle from a training checkpoint.",
        description="Convert a training checkpoint (runs/<name>/best.pt) into a bundle folder: safetensors weights, "
        "model config, preprocessing, label names and the calibrated open-set threshold.")
    p.add_argument("--checkpoint", required=True, help="Training checkpoint, e.g. runs/recognite/best.pt.")
    p.add_argument("--output", required=True, help="Bundle folder to write.")
    p.add_argument("--image-size", type=int, default=None, help="Override the training image size.")
    p.set_defaults(handler=_run_bundle)


# --- embed ------------------------------------------------------------------------------------


def _run_embed(args: argparse.Namespace) -> int:
    from recognite.embedding import list_images, save_embeddings

    bundle = _load_bundle(args)
    images = list_images(args.inputs, image_key=args.image_key, label_key=args.label_key)
    embeddings = _embed(bundle, images.paths, args)
    meta = {"bundle": os.path.abspath(args.bundle), "weights_sha256": bundle.weights_sha256}
    save_embeddings(args.output, embeddings, images.paths, images.labels, metadata=meta)
    logger.info("Wrote %d embeddings of dimension %d%s to %s", embeddings.shape[0], embeddings.shape[1],
                " with labels" if images.labels is not None else "", args.output)
    return 0


def _register_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="Embed images (files, folders or CSV) into an embeddings file.",
        description="Compute the embeddings of images with a model bundle. Inputs are image files, folders "
        "(searched recursively) or CSV files (column --image-key; labels from --label-key when present).")
    add_bundle(p)
    p.add_argument("inputs", nargs="+", help="Image files, folders or CSV files.")
    p.add_argument("--output", required=True, help="Embeddings file to write (.safetensors).")
    add_csv_keys(p)
    add_loading(p)
    p.set_defaults(handler=_run_embed)


# --- gallery ----------------------------------------------------------------------------------


def _references(args: argparse.Namespace) -> Any:
    from recognite.embedding import read_image_csv, read_image_folder

    if bool(args.csv) == bool(args.folder):
        raise ValueError("Give the reference images with exactly one of --csv (image,label rows) or --folder "
                         "(one subfolder per label).")
    if args.csv:
        return read_image_csv(args.csv, image_key=args.image_key, label_key=args.label_key)
    return read_image_folder(args.folder)


def _check_dim(bundle: Any, gallery: Any, gallery_path: str) -> None:
    if gallery.dim is not None and gallery.dim != bundle.embedding_dim:
        raise ValueError(f"The gallery {gallery_path} holds {gallery.dim}-dimensional embeddings but the bundle "
                         f"{bundle.path} makes {bundle.embedding_dim}-dimensional ones: use the bundle the gallery "
                         "was built with.")


def _backend_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"nlist": args.nlist}
    if args.nprobe is not None:
        kwargs["nprobe"] = args.nprobe
    return kwargs


def _run_gallery_build(args: argparse.Namespace) -> int:
    from recognite.gallery import GalleryIndex

    refs = _references(args)
    gallery = GalleryIndex(aggregation=args.aggregation, backend=args.backend, **_backend_kwargs(args))
    bundle = _load_bundle(args)
    embeddings = _embed(bundle, refs.paths, args)
    gallery.add(embeddings, refs.labels, ids=refs.paths)
    written = gallery.save(args.output)
    logger.info("Gallery %s: %d references of %d labels (aggregation %s, backend %s)", written, len(gallery),
                len(gallery.labels), gallery.aggregation, gallery.backend)
    return 0


def _run_gallery_add(args: argparse.Namespace) -> int:
    from recognite.gallery import GalleryIndex

    refs = _references(args)
    gallery = GalleryIndex.load(args.gallery)
    bundle = _load_bundle(args)
    _check_dim(bundle, gallery, args.gallery)
    before = len(gallery.labels)
    gallery.add(_embed(bundle, refs.paths, args), refs.labels, ids=refs.paths)
    written = gallery.save(args.gallery)
    logger.info("Gallery %s: added %d references (%d new labels); now %d references of %d labels", written,
                len(refs), len(gallery.labels) - before, len(gallery), len(gallery.labels))
    return 0


def _run_gallery_remove(args: argparse.Namespace) -> int:
    from recognite.gallery import GalleryIndex

    gallery = GalleryIndex.load(args.gallery)
    removed = gallery.remove(args.labels)
    written = gallery.save(args.gallery)
    logger.info("Gallery %s: removed %d references of %d labels; now %d references of %d labels", written,
                removed, len(set(args.labels)), len(gallery), len(gallery.labels))
    return 0


def _run_gallery_info(args: argparse.Namespace) -> int:
    from recognite.gallery import GalleryIndex

    gallery = GalleryIndex.load(args.gallery)
    info = gallery.info()
    info.pop("device", None)
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
    b.set_defaults(handler=_run_gallery_build)

    a = gsub.add_parser("add", help="Embed more reference images into an existing gallery.",
                        description="Add references (new labels or more images of enrolled labels) to a gallery.")
    add_bundle(a)
    a.add_argument("--gallery", required=True, help="Gallery file to update in place.")
    a.add_argument("--csv", help="CSV of reference images (columns --image-key, --label-key).")
    a.add_argument("--folder", help="Folder with one subfolder of reference images per label.")
    add_csv_keys(a)
    add_loading(a)
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


def _score(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _records(images: Any, result: Any) -> list[dict[str, Any]]:
    records = []
    for i, path in enumerate(images.paths):
        answer = result[i]
        record: dict[str, Any] = {"path": path}
        if images.labels is not None:
            record["label"] = images.labels[i]
        record["prediction"] = answer["prediction"]
        record["score"] = None if answer["score"] is None else _score(answer["score"])
        record["top_k"] = [{**entry, "score": _score(entry["score"])} for entry in answer["top_k"]]
        records.append(record)
    return records


def _write_atomic(path: Path, write: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)


def _write_csv(path: Path, records: list[dict[str, Any]], k: int) -> None:
    has_label = bool(records) and "label" in records[0]
    header = ["path"] + (["label"] if has_label else []) + ["prediction", "score"]
    for j in range(1, k + 1):
        header += [f"label_{j}", f"score_{j}"]

    def write(f: Any) -> None:
        writer = csv.writer(f)
        writer.writerow(header)
        for rec in records:
            row = [rec["path"]] + ([rec["label"]] if has_label else []) + [rec["prediction"], _fmt(rec["score"])]
            for j in range(k):
                entry = rec["top_k"][j] if j < len(rec["top_k"]) else {"label": "", "score": None}
                row += [entry["label"], _fmt(entry["score"])]
            writer.writerow(row)

    _write_atomic(path, write)


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
    from recognite.embedding import list_images
    from recognite.gallery import GalleryIndex

    if args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}.")
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output must end in .csv or .json, got {args.output!r}.")
    images = list_images(args.inputs, image_key=args.image_key, label_key=args.label_key)
    gallery = GalleryIndex.load(args.gallery, backend=args.backend)
    bundle = _load_bundle(args)
    _check_dim(bundle, gallery, args.gallery)
    threshold = bundle.threshold if args.threshold is _FROM_BUNDLE else args.threshold
    if threshold is None:
        logger.info("No threshold (%s): every query gets its best label, never 'unknown'.",
                    "--threshold none" if args.threshold is None else "none in the bundle; set one with --threshold")
    embeddings = _embed(bundle, images.paths, args)
    result = gallery.recognize(embeddings, k=args.top_k, threshold=threshold, nprobe=args.nprobe)
    records = _records(images, result)
    k = min(args.top_k, len(gallery.labels))
    if output is None:
        _print_table(records)
    elif output.suffix.lower() == ".json":
        document = {"bundle": os.path.abspath(args.bundle), "gallery": os.path.abspath(args.gallery),
                    "threshold": threshold, "top_k": k, "results": records}
        _write_atomic(output, lambda f: f.write(json.dumps(document, indent=2, allow_nan=False) + "\n"))
    else:
        _write_csv(output, records, k)
    unknown = sum(r["prediction"] == "unknown" for r in records)
    logger.info("Recognized %d images: %d known, %d unknown%s", len(records), len(records) - unknown, unknown,
                f" (threshold {threshold:g})" if threshold is not None else "")
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
    p.add_argument("inputs", nargs="+", help="Image files, folders or CSV files.")
    p.add_argument("--top-k", type=int, default=5, help="Labels listed per image (default: 5).")
    p.add_argument("--threshold", type=_parse_threshold, default=_FROM_BUNDLE,
                   help="Cosine-similarity threshold below which the answer is 'unknown'; 'none' never answers "
                   "unknown (default: the threshold calibrated in training, stored in the bundle).")
    p.add_argument("--output", default=None, help="Write results to a .csv or .json file instead of the terminal table.")
    add_backend(p, None, nlist=False)
    add_csv_keys(p)
    add_loading(p)
    p.set_defaults(handler=_run_recognize)


# --- export -----------------------------------------------------------------------------------


def _run_export(args: argparse.Namespace) -> int:
    from recognite.export import check_export, export_onnx, export_torchscript

    if args.format == "onnx":
        from recognite.export import _import_onnx

        _import_onnx()  # fail before loading the model
    bundle = _load_bundle(args)
    metadata = {"preprocessing": bundle.preprocessing.to_dict(), "embedding_dim": bundle.embedding_dim,
                "model_name": bundle.model.model_name, "threshold": bundle.threshold,
                "weights_sha256": bundle.weights_sha256}
    if args.format == "onnx":
        export_onnx(bundle.model, args.output, bundle.image_size, opset=args.opset, metadata=metadata)
    else:
        export_torchscript(bundle.model, args.output, bundle.image_size, metadata=metadata)
    logger.info("Exported %s to %s: input images (N, 3, %d, %d) preprocessed, output L2-normalized embeddings "
                "(N, %d)", args.format, args.output, bundle.image_size, bundle.image_size, bundle.embedding_dim)
    if args.check:
        diff = check_export(bundle.model, args.output, args.format, bundle.image_size, atol=args.atol)
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
