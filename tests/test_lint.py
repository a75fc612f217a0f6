"""The code's shape, checked with every test run (so CI checks it): ruff's lint and
format, and the import contracts in pyproject.toml (lint-imports: packages depend
one way, nothing imports the entry points, no two siblings import each other)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests import PYPROJECT, REPO_ROOT

# The folders that import as folio.<name>, as pyproject.toml maps them.
PACKAGES = tuple(PYPROJECT["tool"]["setuptools"]["package-dir"].values())


def _contracts_command(stage) -> tuple[list[str], str, dict]:
    """lint-imports on a copy of the folders laid out as they import (folio/cluster, ...).

    kernels/ has no __init__.py (README, "Layout", says why), and grimp names a
    namespace package after its folder path, which in the checkout is not
    folio/kernels. In the copy kernels/ gets an empty __init__.py: the modules and
    their imports are the checkout's, byte for byte."""
    for name in PACKAGES:
        shutil.copytree(REPO_ROOT / name, stage / "folio" / name, ignore=shutil.ignore_patterns("__pycache__"))
    (stage / "folio" / "kernels" / "__init__.py").touch()
    shutil.copy(REPO_ROOT / "pyproject.toml", stage)
    env = {**os.environ, "PYTHONPATH": str(stage)}  # ahead of the installed (editable) folio
    return [os.path.join(os.path.dirname(sys.executable), "lint-imports"), "--no-cache"], str(stage), env


CHECKS = {
    "ruff check": lambda _: ([sys.executable, "-m", "ruff", "check", "--no-cache", "."], str(REPO_ROOT), None),
    "ruff format": lambda _: (
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
        str(REPO_ROOT),
        None,
    ),
    "import contracts": _contracts_command,
}


@pytest.mark.parametrize("name", CHECKS)
def test_code_passes(name, tmp_path):
    command, cwd, env = CHECKS[name](tmp_path)
    r = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    if name == "import contracts":
        # every module was seen (and the copy's kernels/__init__.py): a staging mistake
        # would leave the contracts vacuous
        modules = 1 + sum(1 for name in PACKAGES for _ in (REPO_ROOT / name).rglob("*.py"))
        assert f"Analyzed {modules} files" in r.stdout, r.stdout[-2000:]
