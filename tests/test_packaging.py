"""Packaging: every subpackage and the CUDA sources reach an installed wheel.

The wheel test builds with pip and build isolation: it needs the package index (or a
wheelhouse pip is configured with) for setuptools; it is not skipped without one."""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in
             (ROOT / "gpufusion").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_kernel_sources_are_importable_resources() -> None:
    names = {p.name for p in importlib.resources.files("gpufusion.kernels").iterdir()}
    on_disk = {p.name for p in (ROOT / "kernels").glob("*.cu")}
    assert on_disk and on_disk <= names


def _copy_source_tree(dest: Path) -> None:
    """The files a build from a clean checkout sees: git's tracked and untracked-but-not-
    ignored files (no build/, egg-info or caches), else the folders the build needs."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60).stdout.decode()
        files = [ROOT / f for f in listed.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [ROOT / "pyproject.toml", ROOT / "README.md",
                 *(p for top in ("gpufusion", "kernels") for p in (ROOT / top).rglob("*")
                   if "__pycache__" not in p.parts)]
    for src in files:
        if src.is_file():
            target = dest / src.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@pytest.mark.slow
def test_built_wheel_ships_kernels_and_every_package(tmp_path: Path) -> None:
    """Build a real wheel (with build isolation, so the setuptools that pyproject.toml asks
    for) from a copy of the tree, and check its contents. The editable install the other
    tests run against maps gpufusion.kernels onto kernels/ and cannot show this."""
    src, out = tmp_path / "src", tmp_path / "dist"
    _copy_source_tree(src)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out),
         str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("gpufusion-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    kernels = sorted(p.name for p in (ROOT / "kernels").iterdir()
                     if p.suffix in (".cu", ".cuh"))
    assert "fuse.cu" in kernels and "downsample.cu" in kernels
    missing = [k for k in kernels if f"gpufusion/kernels/{k}" not in names]
    assert not missing, f"kernel sources missing from the wheel: {missing}"
    assert "gpufusion/py.typed" in names
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in
                (ROOT / "gpufusion").rglob("__init__.py")}
    for package in packages:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert b"License-Expression: BSD-3-Clause" in metadata
