"""``gpufusion bench``: the --plot chart, and --plot problems reported before any work."""

from __future__ import annotations

import sys

import pytest

from gpufusion import bench, cli

#: The smallest run the command accepts (tiles >= 1x1, --tile >= 8), NumPy only.
TINY = ["bench", "--tiles", "2x2", "--tile", "8", "--chunk", "8", "--repeat", "1",
        "--backends", "numpy"]


@pytest.fixture
def no_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any benchmark run fails the test: the checks must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark ran before --plot was checked")

    monkeypatch.setattr(bench, "run_benchmark", refuse)


def test_plot_writes_a_png(tmp_path, capsys) -> None:
    from PIL import Image

    png = tmp_path / "x.png"
    assert cli.main([*TINY, "--plot", str(png)]) == 0
    assert f"plot written to {png}" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 0 and height > 0 and png.stat().st_size > 0


@pytest.mark.parametrize("where,why", [
    ("missing/b.png", "does not exist"),
    ("file.txt/b.png", "is not a folder"),
    ("folder.png", "is a folder"),
    ("b.svg", "expected a .png path"),
])
def test_bad_plot_path_fails_fast(tmp_path, capsys, no_benchmark, where: str,
                                  why: str) -> None:
    (tmp_path / "file.txt").write_text("")
    (tmp_path / "folder.png").mkdir()
    assert cli.main([*TINY, "--plot", str(tmp_path / where)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpufusion: error: --plot") and why in lines[0]


def test_nonexistent_folder_fails_fast(capsys, no_benchmark) -> None:
    assert cli.main([*TINY, "--plot", "/nonexistent/b.png"]) == 2
    assert capsys.readouterr().err == (
        "gpufusion: error: --plot: folder /nonexistent of /nonexistent/b.png does not exist\n")


def test_missing_matplotlib_fails_fast(tmp_path, capsys, no_benchmark,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main([*TINY, "--plot", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "gpufusion[plot]" in err[0]
    assert not (tmp_path / "b.png").exists()
