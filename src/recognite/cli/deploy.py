"""Subcommands of ``recognite`` (filled in by their owner)."""

from __future__ import annotations

REGISTRY: list = []
