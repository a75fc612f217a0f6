"""The code's shape, checked with every test run (so CI checks it): ruff's lint and
format, and the import contracts in pyproject.toml (lint-imports: packages depend
one way, nothing imports the entry points, no two siblings import each other)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import REPO_ROOT

CHECKS = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
    "import contracts": [os.path.join(os.path.dirname(sys.executable), "lint-imports"), "--no-cache"],
}


@pytest.mark.parametrize("name", CHECKS)
def test_code_passes(name):
    r = subprocess.run(CHECKS[name], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
