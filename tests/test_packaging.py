"""Packaging: every subpackage and the CUDA sources reach an installed wheel."""

from __future__ import annotations

import importlib.resources
import tomllib
from pathlib import Path

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
