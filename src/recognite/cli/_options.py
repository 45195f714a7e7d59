"""Options shared by subcommands: config dataclasses as flags (field docs become ``--help``), and
the bundle / loading / CSV-column / search-backend options with one spelling everywhere."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_NO_DEFAULT = dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _NO_DEFAULT:
        return f.default
    if f.default_factory is not _NO_DEFAULT:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                          overrides: dict[str, Any] | None = None) -> None:
    """Add one ``--flag`` per field of ``cls`` (defaults shown in ``--help``)."""
    overrides = overrides or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, _default(f))
        help_text = f.metadata.get("help", "")
        type_name = str(f.type).replace(" ", "")
        shown = f" (default: {default})" if default not in (None, "", []) else ""
        # Options not given stay out of the namespace (SUPPRESS), so that a --config file can set
        # them and the dataclass supplies the remaining defaults.
        suppress = argparse.SUPPRESS
        if type_name == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=suppress, help=help_text + shown)
        elif type_name.startswith("tuple[float,float]"):
            parser.add_argument(flag, nargs=2, type=float, metavar=("MIN", "MAX"), default=suppress, help=help_text + shown)
        elif type_name.startswith("list[str]"):
            parser.add_argument(flag, nargs="*", default=suppress, metavar="NAME", help=help_text)
        else:
            py_type = {"int": int, "float": float}.get(type_name.removesuffix("|None"), str)
            parser.add_argument(flag, type=py_type, default=suppress, help=help_text + shown)


def dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def add_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="Model bundle folder (made by `recognite bundle`).")


def add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="Images per forward pass (default: 64).")
    p.add_argument("--num-workers", type=int, default=0, help="Data-loading worker processes (default: 0).")
    p.add_argument("--device", default="auto", help="Device: auto (CUDA when available), cpu or cuda (default: auto).")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show progress bars.")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="Use the bundle's test-time augmentation, if it has one (--no-tta: each image alone).")


def add_enrolment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enrol-aug", action=argparse.BooleanOptionalAction, default=True,
                   help="Enrol references with the bundle's enrolment augmentation, if it has one (--no-enrol-aug: "
                        "each reference as a query).")


def add_reranking(p: argparse.ArgumentParser) -> None:
    """Re-ranking options (off unless asked for; see docs/gallery.md)."""
    g = p.add_argument_group("re-ranking", "Off by default: with one reference per label they did not help on Omniglot; "
                             "with several per identity k-reciprocal re-ranking did (benchmarks/RESULTS.md).")
    g.add_argument("--query-expansion", type=int, default=0, metavar="K",
                   help="Re-rank by alpha query expansion with K gallery neighbours (default: 0, off).")
    g.add_argument("--qe-alpha", type=float, default=3.0, help="Weight exponent of query expansion (default: 3).")
    g.add_argument("--k-reciprocal", action="store_true",
                   help="Re-rank by k-reciprocal neighbours (Zhong et al. 2017; per query, bounded memory).")
    g.add_argument("--k1", type=int, default=20, help="k-reciprocal: neighbours of the reciprocal sets (default: 20).")
    g.add_argument("--k2", type=int, default=6, help="k-reciprocal: neighbours of the local expansion (default: 6).")
    g.add_argument("--kr-lambda", type=float, default=0.3,
                   help="k-reciprocal: weight of the original distance (default: 0.3).")
    g.add_argument("--kr-top-n", type=int, default=100, help="k-reciprocal: candidates re-ranked (default: 100).")
    g.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=True,
                   help="When no re-ranking option is given, apply the bundle's stored re-ranking, if any "
                        "(--no-rerank: none).")


def reranking_values(args: argparse.Namespace) -> dict[str, Any]:
    """The re-ranking options as keyword arguments (``query_expansion``, ``qe_alpha``, ``k_reciprocal``)."""
    from recognite.gallery.k_reciprocal import KReciprocal

    k_reciprocal = None
    if args.k_reciprocal:
        k_reciprocal = KReciprocal(k1=args.k1, k2=args.k2, lambda_value=args.kr_lambda, top_n=args.kr_top_n)
    return {"query_expansion": args.query_expansion, "qe_alpha": args.qe_alpha, "k_reciprocal": k_reciprocal,
            "rerank": args.rerank}


def add_csv_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-key", default="image", help="CSV column holding the image paths (default: image).")
    p.add_argument("--label-key", default="label", help="CSV column holding the labels (default: label).")


def add_backend(p: argparse.ArgumentParser, default: str | None, nlist: bool = True) -> None:
    from recognite.gallery import BACKENDS

    shown = f" (default: {default})" if default else " (default: the one saved with the gallery)"
    p.add_argument("--backend", choices=BACKENDS, default=default,
                   help="Search backend: exact torch, exact faiss-flat, approximate faiss-ivf (FAISS needs "
                        "recognite[faiss])" + shown + ".")
    if nlist:
        p.add_argument("--nlist", type=int, default=None, help="faiss-ivf: number of cells (default: about 4*sqrt(N)).")
    p.add_argument("--nprobe", type=int, default=None, help="faiss-ivf: cells visited per query (default: 16).")
