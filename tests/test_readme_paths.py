"""Every file and folder the README names exists: the layout table and the walk
through one request must not point at code that moved."""

from __future__ import annotations

import re

from tests import REPO_ROOT

PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]*)`")  # `dir/`, `dir/file.py`, `dir/sub/file.py`


def test_every_path_in_the_readme_exists():
    text = (REPO_ROOT / "README.md").read_text()
    named = {m.group(1) for m in PATH.finditer(text)}
    assert len(named) > 40, "the pattern no longer finds the README's paths"
    missing = sorted(p for p in named if not p.startswith(("~", ".venv", "/")) and not (REPO_ROOT / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
