"""``recognite``: one console script with subcommands (``recognite --help`` lists them)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from recognite.cli import (
    commands,
    deploy,
    evaluate_command,
    report_command,
    serve_command,
)

logger = logging.getLogger("recognite")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recognite",
        description="Open-set image recognition: train an embedding model, recognize classes never seen in training.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in commands.REGISTRY + evaluate_command.REGISTRY + deploy.REGISTRY + report_command.REGISTRY + serve_command.REGISTRY:
        register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (callers and tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the stream is always the current sys.stderr
        pass


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger("recognite")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"recognite {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`recognite gallery info | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except commands.USER_ERRORS as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"recognite {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (ValueError, FileNotFoundError, TypeError, FileExistsError)) else 1


def one_line(exc: BaseException) -> str:
    """The whole message of ``exc`` on one line (a multi-line message is joined, nothing dropped).

    >>> one_line(ValueError("2 files are missing.\\nFirst missing: a.png"))
    '2 files are missing. First missing: a.png'
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and any(line.startswith("Original Traceback") for line in lines):
        # An error in a DataLoader worker: its own message is the last line of the traceback.
        lines = [lines[-1].split(": ", 1)[-1]]
    text = " ".join(lines)
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
