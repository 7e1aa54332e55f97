"""``fuse --resume``: a killed or failed run is finished, byte for byte (issue #12).

A run is killed with SIGKILL (in a subprocess, right after its N-th block is recorded as
written, while other blocks are half written) or fails in a block; the resumed run fuses
only the blocks not recorded and its output is compared file by file with an uninterrupted
run's. A resumed run with other tiles, positions or options is refused (exit 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

from gpufusion.pipeline import fuse_to_file
from gpufusion.synthetic import make_mosaic
from gpufusion.writers import ome_zarr as writer
from gpufusion.writers.target import leftovers

from .test_cli import run_cli
from .test_pyramid_inline import assert_same_store
from .tile_files import write_tile_csv

OPTIONS = ["--chunk", "32", "--backend", "numpy", "--name", "slide"]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """A 4 x 4 mosaic of 160 x 160 uint16 tiles (about 600 x 600: 400 blocks of 32)."""
    folder = tmp_path_factory.mktemp("tiles")
    syn = make_mosaic((4, 4), (160, 160), overlap=0.1, seed=11)
    return write_tile_csv(folder, syn.tiles, syn.positions)


@pytest.fixture(scope="module")
def reference(tiles: Path, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "slide.ome.zarr"
    code = subprocess.run([sys.executable, "-m", "gpufusion", "fuse", str(tiles), "-o",
                           str(out), *OPTIONS], capture_output=True, text=True, check=False)
    assert code.returncode == 0, code.stderr
    return out


KILLER = """
import os, signal, sys
from gpufusion.cli import main
from gpufusion.writers import ome_zarr
after = int(sys.argv[1])
mark = ome_zarr._mark_done
done = []
def mark_then_die(folder, idx):
    mark(folder, idx)
    done.append(idx)
    if len(done) >= after:
        os.kill(os.getpid(), signal.SIGKILL)
ome_zarr._mark_done = mark_then_die
sys.exit(main(sys.argv[2:]))
"""


def done_blocks(out: Path) -> int:
    (tmp,) = writer.resumable_outputs(out)
    # a block being recorded when the run was killed: ".i.j.part" (not done)
    return len([p for p in (tmp / writer.RESUME_DONE).iterdir() if not p.name.startswith(".")])


@pytest.mark.parametrize("after", [1, 150, 350])
def test_resume_after_sigkill_is_byte_identical(tiles: Path, reference: Path, tmp_path: Path,
                                                capsys, after: int) -> None:
    out = tmp_path / "slide.ome.zarr"
    argv = ["fuse", str(tiles), "-o", str(out), *OPTIONS, "--resume"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(after), *argv],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed, not finished
    assert not out.exists()
    recorded = done_blocks(out)
    assert recorded >= after
    # the resumed run fuses only the blocks not recorded, and writes the same bytes
    with count_block_tasks() as fused:
        code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert fused.skipped == recorded
    assert fused.count == n_blocks(reference) - recorded
    assert_same_store(out, reference)
    assert leftovers(out) == []


class count_block_tasks:
    """Count the block tasks run in this process (``_BlockWriter.write`` calls)."""

    def __init__(self) -> None:
        self.count, self.lock, self.skipped = 0, threading.Lock(), None
        self.original = writer._BlockWriter.write

    def __enter__(self) -> count_block_tasks:
        counter = self

        def write(self_, idx, source):
            with counter.lock:
                counter.count += 1
            return counter.original(self_, idx, source)

        writer._BlockWriter.write = write
        self.original_graph = writer.block_task_graph

        def graph(image, block_writer, skip=None):
            counter.skipped = len(skip or ())
            return self.original_graph(image, block_writer, skip)

        writer.block_task_graph = graph
        return self

    def __exit__(self, *exc: object) -> None:
        writer._BlockWriter.write = self.original
        writer.block_task_graph = self.original_graph


def n_blocks(out: Path) -> int:
    shape = zarr.open_group(str(out), mode="r")["0"].shape
    return int(np.prod([-(-n // 32) for n in shape]))


@pytest.mark.parametrize("fail_at", [1, 7, 20])
@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_resume_after_a_failing_block(tmp_path: Path, fail_at: int, ngff_version: str,
                                      monkeypatch) -> None:
    mosaic = make_mosaic((3, 3), (200, 200), overlap=0.1, seed=5).mosaic()
    options = {"chunks": 128, "name": "m", "ngff_version": ngff_version}
    (tmp_path / "ref").mkdir()
    reference = fuse_to_file(mosaic, tmp_path / "ref" / "m.ome.zarr", **options).path
    out = tmp_path / "m.ome.zarr"
    original, calls = writer._BlockWriter.write, []

    def failing(self, idx, source):
        calls.append(idx)
        if len(calls) == fail_at:
            raise RuntimeError(f"boom at block {idx}")
        return original(self, idx, source)

    monkeypatch.setattr(writer._BlockWriter, "write", failing)
    with pytest.raises(RuntimeError, match="boom"), dask.config.set(scheduler="sync"):
        fuse_to_file(mosaic, out, resume=True, **options)
    monkeypatch.setattr(writer._BlockWriter, "write", original)
    assert not out.exists() and done_blocks(out) == fail_at - 1
    # what zarr's LocalStore leaves of a write a kill interrupted (it renames NAME.<hex>.partial
    # into place when done): never part of the result
    (tmp,) = writer.resumable_outputs(out)
    (tmp / "0" / "9.0123456789abcdef0123456789abcdef.partial").write_bytes(b"half a chunk")
    result = fuse_to_file(mosaic, out, resume=True, **options)
    assert_same_store(result.path, reference)
    assert leftovers(out) == []
    # a failure without resume leaves nothing behind, as before
    monkeypatch.setattr(writer._BlockWriter, "write", failing)
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"), dask.config.set(scheduler="sync"):
        fuse_to_file(mosaic, tmp_path / "n.ome.zarr", **options)
    assert leftovers(tmp_path / "n.ome.zarr") == []


def killed_run(tiles: Path, out: Path, after: int, *extra: str) -> None:
    argv = ["fuse", str(tiles), "-o", str(out), *OPTIONS, "--resume", *extra]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(after), *argv],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == -9, proc.stderr


def test_resume_refuses_changed_options_inputs_and_positions(tiles: Path, tmp_path: Path,
                                                           capsys) -> None:
    out = tmp_path / "slide.ome.zarr"
    killed_run(tiles, out, 10)
    base = ["fuse", tiles, "-o", out, *OPTIONS, "--resume"]
    code, _, err = run_cli([*base, "--blend", "average"], capsys)
    assert code == 2 and "options (blend: 'linear' -> 'average')" in err, err
    code, _, err = run_cli([*base, "--compression", "zstd"], capsys)
    assert code == 2 and "compression" in err, err
    # a tile file touched after the killed run
    tile = tiles.parent / "t3.tif"
    stat = tile.stat()
    os.utime(tile, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        code, _, err = run_cli(base, capsys)
        assert code == 2 and "inputs (" in err and "t3.tif" in err, err
    finally:
        os.utime(tile, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # a moved tile
    csv = tiles.read_text().splitlines()
    moved = tiles.with_name("moved.csv")
    name, x, y = csv[2].split(",")
    moved.write_text("\n".join([*csv[:2], f"{name},{float(x) + 1.0!r},{y}", *csv[3:]]) + "\n")
    code, _, err = run_cli(["fuse", moved, "-o", out, *OPTIONS, "--resume"], capsys)
    assert code == 2 and "positions" in err, err
    assert len(writer.resumable_outputs(out)) == 1  # refused: the temporary output is kept
    code, _, err = run_cli(base, capsys)  # unchanged: finishes
    assert code == 0, err
    assert zarr.open_group(str(out), mode="r")["0"].shape[0] > 500


def test_leftover_of_a_resumable_run(tiles: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "slide.ome.zarr"
    killed_run(tiles, out, 5)
    (tmp,) = writer.resumable_outputs(out)
    # without --resume: named (not removed, not used)
    code, _, err = run_cli(["fuse", tiles, "-o", out, *OPTIONS], capsys)
    assert code == 0 and tmp.name in err, err
    assert tmp.is_dir()
    # --overwrite --resume keeps and continues it...
    code, _, err = run_cli(["fuse", tiles, "-o", out, *OPTIONS, "--overwrite", "--resume"],
                           capsys)
    assert code == 0 and f"resuming {tmp.name}" in err, err
    assert not tmp.exists() and leftovers(out) == []  # ...into the output
    killed_run(tiles, tmp_path / "b.ome.zarr", 5)
    # --overwrite alone removes it
    code, _, err = run_cli(["fuse", tiles, "-o", tmp_path / "b.ome.zarr", *OPTIONS,
                            "--overwrite"], capsys)
    assert code == 0 and "removed 1 temporary folder" in err, err
    assert leftovers(tmp_path / "b.ome.zarr") == []


def test_resume_is_for_ome_zarr(tmp_path: Path, tiles: Path, capsys) -> None:
    code, _, err = run_cli(["fuse", tiles, "-o", tmp_path / "a.ome.tif", "--backend", "numpy",
                            "--resume"], capsys)
    assert code == 2 and "resume applies to OME-Zarr" in err, err
