"""GPUFUSION_REQUIRE_KERNEL_CHECKS turns a skipped kernel-check module into an error (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .kernel_checks import REQUIRE_ENV

ROOT = Path(__file__).resolve().parents[1]


def run_pytest(args: list[str], require: str | None, path: str | None = None,
               cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if require is not None:
        env[REQUIRE_ENV] = require
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "-rs", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def module_without_its_tool(tmp_path: Path) -> Path:
    (tmp_path / "test_needs_tool.py").write_text(
        "from tests.kernel_checks import skip_module_unless\n"
        "skip_module_unless(False, 'the frobnicator is not installed')\n"
        "def test_kernel():\n"
        "    pass\n")
    return tmp_path


@pytest.mark.parametrize("value", [None, "", "0"])
def test_missing_tool_skips_by_default(module_without_its_tool: Path,
                                       value: str | None) -> None:
    proc = run_pytest(["test_needs_tool.py"], require=value, cwd=module_without_its_tool)
    assert proc.returncode == 5, proc.stdout + proc.stderr  # 5: no test ran (all skipped)
    assert "1 skipped" in proc.stdout and "the frobnicator is not installed" in proc.stdout


@pytest.mark.parametrize("value", ["1", "yes"])
def test_missing_tool_fails_when_required(module_without_its_tool: Path, value: str) -> None:
    proc = run_pytest(["test_needs_tool.py"], require=value, cwd=module_without_its_tool)
    assert proc.returncode not in (0, 5), proc.stdout
    assert "the frobnicator is not installed" in proc.stdout and REQUIRE_ENV in proc.stdout
    assert "skipped" not in proc.stdout.splitlines()[-1]


def test_host_kernel_module_without_gxx(tmp_path: Path) -> None:
    """The real module: with no g++ on PATH it skips, or fails when the checks are required."""
    empty = tmp_path / "bin"
    empty.mkdir()
    target = ["tests/test_kernels_host.py", "--collect-only"]
    skipped = run_pytest(target, require=None, path=str(empty))
    assert skipped.returncode == 5 and "g++ is not installed" in skipped.stdout, skipped.stdout
    failed = run_pytest(target, require="1", path=str(empty))
    assert failed.returncode not in (0, 5), failed.stdout
    assert "g++ is not installed" in failed.stdout and REQUIRE_ENV in failed.stdout
