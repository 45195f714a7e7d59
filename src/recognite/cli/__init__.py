"""The ``recognite`` command line."""

from recognite.cli.main import main

__all__ = ["main"]
