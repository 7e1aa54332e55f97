"""Progress display: one labelled line per stage (count done/total, rate, ETA), redrawn in
place without leftover characters, on a terminal only and never with ``--quiet``."""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from dask.callbacks import Callback

import gpufusion.progress as progress_module
from gpufusion import fuse_to_file, register_mosaic
from gpufusion.cli import main, show_progress
from gpufusion.progress import Progress, dask_progress
from gpufusion.synthetic import make_mosaic
from gpufusion.writers.ome_tiff import write_ome_tiff

from .tile_files import write_tile_csv

#: A finished progress line: label, [bar] done/total unit (or done unit), rate, elapsed time.
FINISHED = re.compile(
    r"^(?P<label>\S.*?)\s+(?:\[(?P<bar>[#-]+)\]\s+)?(?P<done>\d+)(?:/(?P<total>\d+))?"
    r" (?P<unit>[a-z]+)\s+(?P<rate>[\d.,]+|--)/s\s+in (?P<time>\d+:\d\d(?::\d\d)?)$"
)


class FakeClock:
    """A time source the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def screen(text: str) -> list[str]:
    """The lines a terminal shows after printing ``text``: a carriage return moves back to
    the start of the line and what follows overwrites it; a newline starts a new line."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if line:
        lines.append("".join(line))
    return lines


def finished(text: str) -> list[re.Match]:
    """The finished progress lines on the screen after ``text``, in order."""
    matches = [FINISHED.match(line.rstrip()) for line in screen(text)]
    return [m for m in matches if m]


def labels(text: str) -> list[str]:
    return [m["label"] for m in finished(text)]


def assert_complete(lines: list[re.Match]) -> None:
    """Every line with a known total counts up to it, with a full bar."""
    for m in lines:
        if m["total"] is not None:
            assert int(m["done"]) == int(m["total"]) > 0, m.string
            assert set(m["bar"]) == {"#"}, m.string


# ---------------------------------------------------------------------------- the line


def test_line_shows_label_count_rate_and_eta() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = Progress("reading things", 100, unit="items", stream=out, clock=clock, interval=0)
    clock.t = 5.0
    bar.update(25)  # 5 per second: 75 left take 15 s
    frame = out.getvalue().split("\r")[-1].split()
    assert frame == ["reading", "things", "[#####---------------]", "25/100", "items", "5.0/s",
                     "ETA", "0:15"]
    clock.t = 3 * 3600 + 20.0
    bar.update(75)
    bar.close()
    assert out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
    assert screen(out.getvalue())[-1].split()[-5:] == ["100/100", "items", "0.0/s", "in",
                                                       "3:00:20"]


def test_a_shorter_line_leaves_no_characters_of_the_longer_one() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = Progress("counting", unit="items", stream=out, clock=clock, interval=0)
    clock.t = 0.001
    bar.update(5000)  # 5,000,000/s
    clock.t = 1000.0
    bar.update(1)  # 5.0/s: a shorter line
    frames = out.getvalue().split("\r")[1:]
    assert len(frames[-1].rstrip()) < len(frames[0])  # it did shrink
    (shown,) = screen(out.getvalue())
    assert shown.rstrip() == frames[-1].rstrip()  # nothing of the longer line is left
    assert shown.split() == ["counting", "5001", "items", "5.0/s", "elapsed", "16:40"]
    bar.close()
    (shown,) = screen(out.getvalue())
    assert shown.rstrip() == out.getvalue().split("\r")[-1].rstrip()
    assert shown.split()[-2:] == ["in", "16:40"]


def test_redraws_are_throttled_and_the_last_step_always_drawn() -> None:
    out, clock = io.StringIO(), FakeClock()
    bar = Progress("steps", 10, stream=out, clock=clock, interval=1.0)
    for _ in range(9):
        clock.t += 0.01
        bar.update()
    assert out.getvalue().count("\r") == 1  # only the first frame: too soon to redraw
    bar.update()
    assert out.getvalue().count("\r") == 2 and " 10/10 " in out.getvalue().split("\r")[-1]


def test_lines_fit_the_terminal_and_their_bars_line_up(monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_terminal_columns", lambda stream: 80)
    out, clock = io.StringIO(), FakeClock()
    with Progress("fusing, writing levels 0-1", 12345, unit="tasks", stream=out, clock=clock,
                  interval=0) as bar:
        clock.t = 1.0
        bar.update(6000)  # 6,000/s, ETA 0:01
        clock.t = 4000.0
        bar.update(6345)
    with Progress("writing level 2", 5, unit="tasks", stream=out, clock=clock) as bar:
        bar.update(5)
    frames = out.getvalue().split("\r")[1:]
    assert all(len(f.rstrip("\n")) <= 79 for f in frames)
    # the bar is shortened (8 of 20 fit); the count, rate and time stay whole
    assert frames[1].split()[-7:] == ["0-1", "[###-----]", "6000/12345", "tasks",
                                      "6,000/s", "ETA", "0:01"]
    first, second = screen(out.getvalue())
    assert first.split()[-3:] == ["3.1/s", "in", "1:06:40"]
    assert first.index("]") == second.index("]") == 26 + 2 + 1 + 8  # bars line up


def test_a_line_is_cut_on_a_very_narrow_terminal(monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_terminal_columns", lambda stream: 30)
    out = io.StringIO()
    with Progress("a rather long label for a stage", 3, stream=out, clock=FakeClock()) as bar:
        bar.update(3)
    frames = out.getvalue().split("\r")[1:]
    assert frames and all(len(f.rstrip("\n")) <= 29 for f in frames)


def test_disabled_progress_writes_nothing() -> None:
    out = io.StringIO()
    bar = Progress("quiet", 3, stream=out, enabled=False)
    assert list(bar.iterate([1, 2, 3])) == [1, 2, 3]
    bar.update(5)
    bar.close()
    with dask_progress("quiet dask", False, stream=out):
        da.ones(10, chunks=5).sum().compute(scheduler="sync")
    assert out.getvalue() == ""


def test_dask_progress_leaves_no_line_when_nothing_ran_here() -> None:
    out = io.StringIO()
    with dask_progress("on a cluster", stream=out):
        pass  # what a distributed client computes never reaches the local callbacks
    assert out.getvalue() == ""


def test_iterate_counts_items_and_closes_when_abandoned() -> None:
    out = io.StringIO()
    bar = Progress("items", 5, stream=out, clock=FakeClock())
    items = bar.iterate(range(5))
    assert [next(items), next(items)] == [0, 1]
    items.close()  # the consumer gave up (an error): the line is ended
    assert bar.done == 2 and out.getvalue().endswith("\n")


# ------------------------------------------------------------------------------- dask


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_dask_progress_counts_every_task_of_the_computation(scheduler: str) -> None:
    seen: list[object] = []  # dask's own count of the tasks it ran
    image = (da.arange(1600, chunks=100).reshape(40, 40).rechunk(10) + 1).sum()
    out = io.StringIO()
    with Callback(posttask=lambda key, *rest: seen.append(key)), \
            dask_progress("adding up", stream=out, clock=FakeClock()) as bar:
        assert int(image.compute(scheduler=scheduler)) == 1600 * 1601 // 2
    assert bar.done == bar.total == len(seen) > 16
    (line,) = finished(out.getvalue())
    assert (line["label"], line["unit"]) == ("adding up", "tasks")
    assert int(line["done"]) == int(line["total"]) == len(seen)


def test_dask_progress_ignores_computations_inside_tasks() -> None:
    def plain(block: np.ndarray) -> np.ndarray:
        return block + 1

    def nested(block: np.ndarray) -> np.ndarray:  # computes a graph of its own
        return block + int(da.ones(4, chunks=1).sum().compute(scheduler="sync")) - 3

    outer: list[object] = []
    image = da.zeros((20, 20), chunks=5)
    counted, other = image.map_blocks(plain).sum(), image.map_blocks(nested).sum()
    with Callback(posttask=lambda key, *rest: outer.append(key)):
        reference = counted.compute(scheduler="threads")
    with dask_progress("outer only", stream=io.StringIO()) as bar:
        value = other.compute(scheduler="threads")
    assert value == reference == 400
    assert bar.done == bar.total == len(outer)


# ------------------------------------------------------------------- the real stages


def test_fuse_to_ome_zarr_shows_one_line_per_pass_in_order(tmp_path: Path, capsys) -> None:
    mosaic = make_mosaic((2, 2), (160, 160), overlap=0.1, seed=1).mosaic()
    with dask.config.set(scheduler="threads"):
        out = fuse_to_file(mosaic, tmp_path / "m.ome.zarr", chunks=128, progress=True).path
    lines = finished(capsys.readouterr().err)
    group = zarr.open_group(str(out), mode="r")
    paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]
    assert len(paths) >= 3
    first = re.fullmatch(r"fusing, writing levels? 0(?:-(\d+))?", lines[0]["label"])
    assert first, lines[0]["label"]
    inline = int(first[1] or 0)  # levels stored with level 0, from its blocks
    assert [m["label"] for m in lines[1:]] == [f"writing level {k}"
                                              for k in range(inline + 1, len(paths))]
    assert_complete(lines)
    assert {m["unit"] for m in lines} == {"tasks"}
    # the first pass runs one task per level-0 block (it stores every level it feeds)
    assert int(lines[0]["total"]) == group[paths[0]].nchunks


def test_fuse_to_ome_tiff_stages_then_writes_each_level(tmp_path: Path, capsys) -> None:
    mosaic = make_mosaic((3, 3), (256, 256), overlap=0.1, seed=2).mosaic()
    out = fuse_to_file(mosaic, tmp_path / "m.ome.tif", chunks=256, progress=True).path
    lines = finished(capsys.readouterr().err)
    with tifffile.TiffFile(out) as tif:
        pages = [level.pages[0] for level in tif.series[0].levels]
        tiles = [len(page.dataoffsets) for page in pages]
    n = len(pages)
    assert n >= 2
    assert [m["label"] for m in lines] == (
        ["fusing, staging level 0"] + [f"staging level {k}" for k in range(1, n)]
        + [f"writing TIFF level {k}" for k in range(n)])
    assert_complete(lines)
    assert [int(m["total"]) for m in lines[n:]] == tiles  # every tile of the file, per level
    assert {m["unit"] for m in lines[n:]} == {"tiles"}


def test_ome_tiff_tile_counts_per_level(tmp_path: Path, capsys) -> None:
    data = np.arange(2 * 300 * 200, dtype=np.uint16).reshape(2, 300, 200)
    out = write_ome_tiff(da.from_array(data, chunks=(1, 128, 128)), tmp_path / "t.ome.tif",
                         axes="cyx", tile=64, progress=True)
    lines = finished(capsys.readouterr().err)
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        expected = [sum(len(p.dataoffsets) for p in level.pages) for level in levels]
        shapes = [level.shape for level in levels]
    assert expected == [2 * math.ceil(h / 64) * math.ceil(w / 64) for _, h, w in shapes]
    writing = [m for m in lines if m["label"].startswith("writing TIFF level")]
    assert [int(m["total"]) for m in writing] == expected
    assert_complete(lines)


def test_register_shows_pairs_solve_and_scoring(capsys) -> None:
    syn = make_mosaic((2, 2), (128, 128), overlap=0.2, stage_error=3, seed=1)
    result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=8, backend="numpy",
                             progress=True)
    lines = finished(capsys.readouterr().err)
    assert [m["label"] for m in lines] == ["registering pairs", "solving positions",
                                           "scoring overlaps"]
    assert_complete(lines)
    pairs, solve, scoring = lines
    assert int(pairs["total"]) == len(result.edges) == 6  # side and diagonal neighbours
    assert (pairs["unit"], solve["unit"], scoring["unit"]) == ("pairs", "solves", "pairs")
    assert solve["total"] is None and int(solve["done"]) >= 1
    assert int(scoring["total"]) == 2 * 6  # every overlapping pair, before and after


def test_no_progress_unless_asked(tmp_path: Path, capsys) -> None:
    syn = make_mosaic((2, 2), (128, 128), overlap=0.2, stage_error=3, seed=1)
    register_mosaic(syn.mosaic(syn.stage_positions), max_shift=8, backend="numpy")
    fuse_to_file(syn.mosaic(), tmp_path / "m.ome.tif", chunks=64)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------- CLI


@pytest.fixture
def tile_csv(tmp_path: Path) -> Path:
    syn = make_mosaic((2, 2), (128, 128), overlap=0.2, stage_error=3, seed=4)
    return write_tile_csv(tmp_path, syn.tiles, syn.stage_positions)


def cli(args: list, capsys) -> str:
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().err


def test_show_progress_on_a_terminal_without_quiet(monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(argparse.Namespace(quiet=False))
    assert not show_progress(argparse.Namespace(quiet=True))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_progress(argparse.Namespace(quiet=False))
    monkeypatch.setattr(sys, "stderr", object())  # no isatty at all
    assert not show_progress(argparse.Namespace(quiet=False))


def test_cli_register_then_fuse_on_a_terminal(tile_csv: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    folder = tile_csv.parent
    err = cli(["register", tile_csv, "-o", folder / "r.csv", "--backend", "numpy"], capsys)
    assert labels(err) == ["registering pairs", "solving positions", "scoring overlaps"]
    assert_complete(finished(err))
    err = cli(["fuse", folder / "r.csv", "-o", folder / "f.ome.zarr", "--backend", "numpy",
               "--chunk", "64"], capsys)
    got = labels(err)
    assert got[0].startswith("fusing, writing level") and len(got) >= 2
    assert all(label.startswith("writing level ") for label in got[1:])
    assert_complete(finished(err))


def test_cli_quiet_or_not_a_terminal_prints_no_progress(tile_csv: Path, monkeypatch,
                                                        capsys) -> None:
    folder = tile_csv.parent
    for quiet in ([], ["--quiet"]):  # stderr is not a terminal under pytest
        err = cli(["register", tile_csv, "-o", folder / "r.csv", "--backend", "numpy",
                   "--overwrite", *quiet], capsys)
        err += cli(["fuse", folder / "r.csv", "-o", folder / "f.ome.tif", "--backend",
                    "numpy", "--overwrite", *quiet], capsys)
        assert "\r" not in err and finished(err) == []
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for command in (["register", tile_csv, "-o", folder / "r.csv"],
                    ["fuse", folder / "r.csv", "-o", folder / "f.ome.tif"]):
        assert cli([*command, "--backend", "numpy", "--overwrite", "--quiet"], capsys) == ""
        assert cli(["-q", *command, "--backend", "numpy", "--overwrite"], capsys) == ""
