"""folio installs one top-level name, `folio`: its folders import as folio.cluster,
folio.worker, ... (pyproject.toml maps them). transformers >= 5.25 depends on Hugging
Face's `kernels` distribution and imports it at startup; a top-level `kernels` of
folio's own, installed or found in the checkout, broke every transformers import."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests import PYPROJECT, REPO_ROOT

SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _package_folders() -> set[str]:
    """Every folder with Python in it under the mapped top-level folders, as its import name."""
    names = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        for path in (REPO_ROOT / folder).rglob("*.py"):
            relative = path.parent.relative_to(REPO_ROOT / folder).parts
            names.add(".".join((package, *relative)))
    return names


def test_every_package_folder_is_installed():
    assert set(SETUPTOOLS["packages"]) == _package_folders()
    assert set(SETUPTOOLS["package-dir"]) == {
        f"folio.{name}" for name in ("cluster", "worker", "kernels", "router", "protos")
    }


def test_the_wheel_holds_folio_alone(tmp_path):
    """A real wheel, built from a copy of the checkout (a build in the checkout would
    leave build/ there): nothing in it outside folio/ and its metadata."""
    source = tmp_path / "source"
    for folder in (*SETUPTOOLS["package-dir"].values(), "pyproject.toml", "README.md"):
        copy = shutil.copy if folder.endswith((".toml", ".md")) else shutil.copytree
        copy(REPO_ROOT / folder, source / folder)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("folio-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"folio", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in ("folio/kernels/paged_decode.py", "folio/protos/worker.proto", "folio/cluster/entrypoints/cli.py"):
        assert expected in names


def test_the_checkout_does_not_shadow_an_installed_kernels_package():
    """`python -c` (like `python -m`, and like Ray, which puts its driver's working
    directory first on every worker's sys.path) makes the checkout the first place
    Python looks. Its kernels/ has no __init__.py, so a regular `kernels` package
    installed anywhere else still wins, and transformers imports."""
    code = (
        "import importlib.util, transformers.activations;"
        "spec = importlib.util.find_spec('kernels');"
        "print(spec.origin if spec else None)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    origin = r.stdout.strip().splitlines()[-1]
    assert not origin.startswith(str(REPO_ROOT / "kernels")), origin
