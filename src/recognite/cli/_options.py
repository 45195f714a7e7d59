"""Turn a config dataclass into argparse options (field docs become the ``--help`` text)."""

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
            py_type = {"int": int, "float": float}.get(type_name, str)
            parser.add_argument(flag, type=py_type, default=suppress, help=help_text + shown)


def dataclass_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}
