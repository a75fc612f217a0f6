"""What the `folio` command runs: cli.py, then serve, generate, batch, the offline
LLM and the benchmarks (bench/)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

FOLIO_PACKAGES = ("cluster", "router", "worker", "kernels", "protos")


def optional_module(name: str) -> Optional[ModuleType]:
    """The module, or None when a third-party package it needs is missing: a GPU image
    without Ray or the HTTP stack still runs `folio generate` and the offline benchmarks.
    A missing folio module is a bug, and raises."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in FOLIO_PACKAGES:
            raise
        return None
