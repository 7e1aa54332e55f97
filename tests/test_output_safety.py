"""Output safety of ``gpufusion fuse`` and ``fuse_to_file`` (issue #10).

Never over an input; ``--overwrite`` replaces only an earlier output of the same kind; the
swap is as atomic as the file system allows and a half-done one is rolled back; folder
readers skip outputs and hidden folders; leftovers of a killed run are named and removed
with ``--overwrite``; SIGTERM cleans up like SIGINT; a full disk is a one-line exit 2.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import gpufusion
import gpufusion.writers.ome_tiff as ome_tiff_writer
import gpufusion.writers.ome_zarr as ome_zarr_writer
from gpufusion.cli import main
from gpufusion.errors import InputError
from gpufusion.readers.detect import read_tileset
from gpufusion.synthetic import make_mosaic

from .test_cli import run_cli
from .test_formats_bigstitcher import write_dataset, write_n5, write_zarr
from .test_formats_ome_tiff import PIXEL_UM, plane_meta
from .test_inputs_cli import one_line
from .tile_files import write_tile_csv

FAST = ["--chunk", "32", "--backend", "numpy"]


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) by relative path, with its bytes."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Hidden entries of ``folder``: temporary folders a run left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_one_error_line(err: str, *parts: object) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpufusion: error: "), err
    for part in parts:
        assert str(part) in lines[0], f"{part!r} not in {lines[0]!r}"


@pytest.fixture
def tile_csv(tmp_path: Path) -> Path:
    """``tiles/pos.csv`` beside two 32x32 OME-TIFF tiles ``t0.tif`` and ``t1.tif``."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    syn = make_mosaic((1, 2), (32, 32), overlap=0.2, seed=1)
    return write_tile_csv(folder, syn.tiles, syn.positions, ome=True)


def noise_tiles(folder: Path, size: int, n: int = 2, name: str = "pos.csv") -> Path:
    """``n`` incompressible uint16 tiles in a row (overlap 1/8) and their positions CSV."""
    rng = np.random.default_rng(7)
    data = [rng.integers(0, 65535, (size, size), dtype=np.uint16) for _ in range(n)]
    return write_tile_csv(folder, data, [(0, k * size * 7 // 8) for k in range(n)], name=name)


def earlier_output(path: Path, **options: object) -> Path:
    """An earlier gpufusion output at ``path`` (OME-Zarr folder or OME-TIFF file)."""
    m = gpufusion.mosaic_from_positions([np.full((16, 16), 7, np.uint8)], [(0, 0)])
    gpufusion.fuse_to_file(m, path, chunks=16, **options)
    return path


# ------------------------------------------------------- 1. never over what is read


def _symlinked_csv(csv: Path) -> Path:
    alias = csv.parent.parent / "alias"
    alias.symlink_to(csv.parent, target_is_directory=True)
    return alias / csv.name


OUT_IS_AN_INPUT = {
    "the input folder": (lambda csv: csv.parent, "contains"),
    "the positions csv": (lambda csv: csv, "one of the input files"),
    "a tile": (lambda csv: csv.parent / "t0.tif", "one of the input files"),
    "the csv through a symlink": (_symlinked_csv, "one of the input files"),
}


@pytest.mark.parametrize("case", sorted(OUT_IS_AN_INPUT))
def test_fuse_overwrite_never_replaces_an_input(tile_csv: Path, capsys, case: str) -> None:
    make_out, must_say = OUT_IS_AN_INPUT[case]
    out = make_out(tile_csv)
    folder = tile_csv.parent
    before = snapshot(folder)
    code, _, err = run_cli(["fuse", tile_csv, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, out, must_say)
    assert snapshot(folder) == before
    assert hidden(folder.parent) == [] and hidden(folder) == []


def write_ome_tiff_folder(folder: Path) -> list[np.ndarray]:
    """Two OME-TIFF tiles with stage positions in ``folder``; returns the tiles."""
    folder.mkdir(exist_ok=True)
    syn = make_mosaic((1, 2), (32, 48), overlap=0.2, integer_positions=True, seed=4)
    for k, (tile, pos) in enumerate(zip(syn.tiles, syn.positions, strict=True)):
        tifffile.imwrite(folder / f"tile{k}.ome.tif", tile, metadata={
            "axes": "YX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
            "Plane": plane_meta(pos, 1)})
    return syn.tiles


def test_fuse_refuses_output_inside_the_input_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "experiment"
    write_ome_tiff_folder(folder)
    before = snapshot(folder)
    out = folder / "slide.ome.tif"
    code, _, err = run_cli(["fuse", folder, "-o", out, *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, out, f"is inside the input folder {folder}", "elsewhere")
    assert snapshot(folder) == before and not out.exists()


@pytest.mark.parametrize(("loader", "container"), [
    (write_n5, "dataset.n5"),                   # the N5 container
    (write_zarr, "tiles.ome.zarr/s0-t0.zarr"),  # an OME-Zarr image group the xml reads
])
def test_fuse_never_replaces_a_container_the_dataset_xml_reads(tmp_path: Path, capsys,
                                                               loader, container) -> None:
    syn = make_mosaic((1, 2, 2), (6, 24, 24), overlap=0.25, subpixel=0.0, seed=5)
    tiles = [t[::2] for t in syn.tiles]
    xml = write_dataset(tmp_path, loader(tmp_path, tiles), (syn, tiles))
    out = tmp_path / container
    before = snapshot(out)
    code, _, err = run_cli(["fuse", xml, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, out)
    assert snapshot(out) == before and hidden(out.parent) == []


def test_fuse_to_file_never_replaces_what_its_tiles_read(tmp_path: Path,
                                                        tile_csv: Path) -> None:
    folder = tile_csv.parent
    before = snapshot(folder)
    with pytest.raises(InputError) as excinfo:
        gpufusion.fuse_to_file(gpufusion.mosaic_from_file(tile_csv), folder, overwrite=True,
                               chunks=32)
    one_line(excinfo, f"{folder}: contains {folder / 't0.tif'}, which this run reads")
    assert snapshot(folder) == before
    # a container that a dataset.xml points to, known from the tile sources alone
    syn = make_mosaic((1, 2, 2), (6, 24, 24), overlap=0.25, subpixel=0.0, seed=5)
    scene = (syn, [t[::2] for t in syn.tiles])
    xml = write_dataset(tmp_path, write_zarr(tmp_path, scene[1]), scene)
    group = tmp_path / "tiles.ome.zarr" / "s1-t0.zarr"
    before = snapshot(group)
    with pytest.raises(InputError) as excinfo:
        gpufusion.fuse_to_file(read_tileset(xml).mosaics(), group, overwrite=True, chunks=32)
    one_line(excinfo, f"{group}: contains {group / '0'}, which this run reads")
    assert snapshot(group) == before


def test_fuse_register_reports_never_replace_an_input_or_go_inside_out(tmp_path: Path,
                                                                      capsys) -> None:
    # a positions CSV that "--report r.html" would overwrite with its edge table r.edges.csv
    csv = noise_tiles(tmp_path, 32, name="r.edges.csv")
    before = csv.read_bytes()
    out = tmp_path / "out.ome.zarr"
    argv = ["fuse", csv, "-o", out, "--register", "--overwrite", *FAST]
    code, _, err = run_cli([*argv, "--report", tmp_path / "r.html"], capsys)
    assert code == 2
    assert_one_error_line(err, csv, "one of the input files")
    assert csv.read_bytes() == before and not out.exists()
    earlier_output(out)
    code, _, err = run_cli([*argv, "--report", out / "r.html"], capsys)
    assert code == 2
    assert_one_error_line(err, out / "r.html", "inside the output")
    assert not (out / "r.html").exists()


# ------------------------------- 2. --overwrite replaces only an earlier output of its kind


def _docx_folder(out: Path) -> None:
    out.mkdir()
    (out / "notes.docx").write_bytes(b"PK\x03\x04 thesis")


def _zarr_with_foreign_file(out: Path) -> None:
    earlier_output(out)
    (out / "0" / "notes.txt").write_text("mine")


def _plain_tiff(out: Path) -> None:
    tifffile.imwrite(out, np.zeros((8, 8), np.uint8), ome=False)  # no OME-XML


def _folder_for_a_file(out: Path) -> None:
    out.mkdir()
    (out / "data.bin").write_bytes(b"\x00" * 10)


NOT_AN_EARLIER_OUTPUT = {
    "folder with a docx": ("out.ome.zarr", _docx_folder, "holding notes.docx"),
    "ome-zarr with a foreign file": ("out.ome.zarr", _zarr_with_foreign_file, "notes.txt"),
    "file where a folder goes": ("out.ome.zarr", lambda p: p.write_text("x"), "a file, not"),
    "plain tiff": ("out.ome.tif", _plain_tiff, "a TIFF without OME-XML"),
    "folder where a file goes": ("out.ome.tif", _folder_for_a_file, "a folder, not"),
}


@pytest.mark.parametrize("case", sorted(NOT_AN_EARLIER_OUTPUT))
def test_overwrite_refuses_what_is_not_an_earlier_output(tmp_path: Path, capsys,
                                                         case: str) -> None:
    csv = noise_tiles(tmp_path, 32)
    name, make, must_say = NOT_AN_EARLIER_OUTPUT[case]
    out = tmp_path / name
    make(out)
    before = snapshot(out)
    code, _, err = run_cli(["fuse", csv, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, out, must_say, "--overwrite replaces only")
    assert snapshot(out) == before and hidden(tmp_path) == []


def level0_shape(out: Path) -> tuple[int, ...]:
    if out.is_dir():
        return zarr.open_group(str(out), mode="r")["0"].shape
    with tifffile.TiffFile(out) as tif:
        return tif.pages[0].shape


@pytest.mark.parametrize(("name", "options"), [("out.ome.zarr", {"ngff_version": "0.5"}),
                                               ("out.ome.tif", {})])
def test_overwrite_replaces_an_earlier_output_of_the_same_kind(tmp_path: Path, capsys,
                                                               name: str, options) -> None:
    csv = noise_tiles(tmp_path, 32)
    out = earlier_output(tmp_path / name, **options)
    assert level0_shape(out) == (16, 16)
    code, stdout, err = run_cli(["fuse", csv, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert "fused 2 tiles" in stdout and hidden(tmp_path) == []
    assert level0_shape(out) == (32, 60)


# ------------------------------------------------------ 3. the swap, and a half-done one


def test_a_file_output_is_replaced_by_one_os_replace(tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    csv = noise_tiles(tmp_path, 32)
    out = earlier_output(tmp_path / "out.ome.tif")
    calls: list[tuple[str, str, str]] = []
    real_rename, real_replace = os.rename, os.replace

    def rename(src, dst):
        if out.name in Path(dst).name or out.name in Path(src).name:
            calls.append(("rename", Path(src).name, Path(dst).name))
        real_rename(src, dst)

    def replace(src, dst):
        if out.name in Path(dst).name:
            calls.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_cli(["fuse", csv, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert calls == [("replace", "out.ome.tif", "out.ome.tif")]
    assert level0_shape(out) == (32, 60)


class Crash(BaseException):
    """The process dies: nothing after this point runs (no rollback, no clean-up)."""


def crash_between_the_renames(out: Path, csv: Path, monkeypatch) -> None:
    """Replace ``out`` with ``fuse --overwrite`` and die after the first of its renames."""
    real_rename = os.rename
    seen = []

    def rename(src, dst):
        if Path(src) == out or Path(dst) == out:
            seen.append(dst)
            if len(seen) > 1:  # the new one in, or the rollback: the process is gone
                raise Crash
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Crash):
        main([str(a) for a in ["fuse", csv, "-o", out, "--overwrite", "-q", *FAST]])
    monkeypatch.setattr(os, "rename", real_rename)


def test_a_half_done_swap_is_rolled_back_by_the_next_run(tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    csv = noise_tiles(tmp_path, 32)
    out = earlier_output(tmp_path / "out.ome.zarr")
    before = snapshot(out)
    crash_between_the_renames(out, csv, monkeypatch)
    assert not out.exists() and [p[:18] for p in hidden(tmp_path)] == [".out.ome.zarr.old-"]
    capsys.readouterr()
    code, _, err = run_cli(["fuse", csv, "-o", out, *FAST], capsys)
    notice, error = err.splitlines()
    assert code == 2 and "already exists" in error
    assert "restored the earlier output from .out.ome.zarr.old-" in notice
    assert snapshot(out) == before and hidden(tmp_path) == []
    code, _, err = run_cli(["fuse", csv, "-o", out, "--overwrite", "-q", *FAST], capsys)
    assert code == 0, err
    assert level0_shape(out) == (32, 60)


def test_fuse_to_file_rolls_back_a_half_done_swap_with_a_warning(tmp_path: Path,
                                                                 monkeypatch) -> None:
    from gpufusion.pipeline import OutputRecoveryWarning

    csv = noise_tiles(tmp_path, 32)
    out = earlier_output(tmp_path / "out.ome.zarr")
    before = snapshot(out)
    crash_between_the_renames(out, csv, monkeypatch)
    with pytest.warns(OutputRecoveryWarning, match="restored the earlier output"), \
            pytest.raises(InputError, match="already exists"):
        gpufusion.fuse_to_file(gpufusion.mosaic_from_file(csv), out, chunks=32)
    assert snapshot(out) == before and hidden(tmp_path) == []


# --------------------------------------------- 4. folder readers skip outputs and hidden


def test_ome_tiff_folder_skips_gpufusion_outputs_and_hidden_files(tmp_path: Path,
                                                                  capsys) -> None:
    folder = tmp_path / "experiment"
    write_ome_tiff_folder(folder)
    out = tmp_path / "slide.ome.tif"
    code, stdout, err = run_cli(["fuse", folder, "-o", out, *FAST], capsys)
    assert code == 0 and "fused 2 tiles" in stdout, err
    # an earlier run's output, and a killed run's temporary folder, inside the input folder
    shutil.copy(out, folder / "old-slide.ome.tif")
    (folder / ".x.ome.tif.tmp-0123abcd").mkdir()
    shutil.copy(out, folder / ".x.ome.tif.tmp-0123abcd" / "x.ome.tif")
    shutil.copy(folder / "tile0.ome.tif", folder / ".hidden.ome.tif")
    code, stdout, err = run_cli(["fuse", folder, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 0 and "fused 2 tiles" in stdout, err
    # only outputs left: say so
    only = tmp_path / "only-outputs"
    only.mkdir()
    shutil.copy(out, only / "slide.ome.tif")
    code, _, err = run_cli(["fuse", only, "-o", tmp_path / "x.ome.zarr", *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, only, "1 written by gpufusion, skipped")


def test_grid_folder_skips_gpufusion_outputs_and_hidden_files(tmp_path: Path,
                                                             capsys) -> None:
    folder = tmp_path / "grid"
    folder.mkdir()
    syn = make_mosaic((1, 2), (32, 32), overlap=0.25, integer_positions=True, seed=3)
    for k, tile in enumerate(syn.tiles):
        tifffile.imwrite(folder / f"tile{k}.tif", tile)
    earlier_output(folder / "fused.ome.tif")
    tifffile.imwrite(folder / ".thumbnail.tif", syn.tiles[0])
    argv = ["fuse", folder, "--grid", "1x2", "--overlap", "0.25", *FAST]
    code, stdout, err = run_cli([*argv, "-o", tmp_path / "a.ome.zarr"], capsys)
    assert code == 0 and "fused 2 tiles" in stdout, err
    code, stdout, err = run_cli([*argv, "--pattern", "tile{index}.tif", "-o",
                                 tmp_path / "b.ome.zarr"], capsys)
    assert code == 0 and "fused 2 tiles" in stdout, err


# -------------------------------------------------- 5. leftovers of a killed run


def test_leftover_temporary_folders_are_named_and_removed_with_overwrite(tmp_path: Path,
                                                                        capsys) -> None:
    csv = noise_tiles(tmp_path, 32)
    out = tmp_path / "out.ome.zarr"
    stale = [tmp_path / ".out.ome.zarr.tmp-0123abcd", tmp_path / ".out.ome.zarr.old-89abcdef"]
    for folder in stale:
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "0.0").write_bytes(b"half a chunk")
    unrelated = tmp_path / ".out.ome.zarr.notes"
    unrelated.mkdir()
    code, _, err = run_cli(["fuse", csv, "-o", out, *FAST], capsys)
    assert code == 0, err
    (notice,) = err.splitlines()
    assert str(out) in notice and "--overwrite removes them" in notice
    assert all(folder.name in notice for folder in stale)
    assert all(folder.is_dir() for folder in stale)
    code, _, err = run_cli(["fuse", csv, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 0, err
    (notice,) = err.splitlines()
    assert "removed 2 temporary folders" in notice
    assert hidden(tmp_path) == [unrelated.name]


# ---------------------------------------------------------------- 6. SIGTERM


def test_sigterm_cleans_up_and_exits_143(tmp_path: Path) -> None:
    csv = noise_tiles(tmp_path, 256, n=4)  # ~1000 chunks of 16 px: seconds of work
    out = tmp_path / "out.ome.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufusion", "fuse", str(csv), "-o", str(out), "--chunk", "16",
         "--backend", "numpy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".out.ome.zarr.tmp-") for p in tmp_path.iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary output never appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert err.splitlines()[-1] == ("gpufusion: terminated (SIGTERM); nothing was written at "
                                    "the output path")
    assert not out.exists() and hidden(tmp_path) == []


# ---------------------------------------------------------------- 7. a full disk


def _enospc(filename: str | None) -> OSError:
    if filename is None:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def _fail_zarr_store(with_filename: bool, monkeypatch) -> None:
    def store_levels(sources, group, *args, **kwargs):
        folder = Path(str(group.store.root))
        (folder / "partial").write_bytes(b"half a chunk")
        raise _enospc(str(folder / "partial") if with_filename else None)

    monkeypatch.setattr(ome_zarr_writer, "_store_levels", store_levels)


def _fail_tiff_write(with_filename: bool, monkeypatch) -> None:
    def write_tiff(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\x00 half a TIFF")
        raise _enospc(str(path) if with_filename else None)

    monkeypatch.setattr(ome_tiff_writer, "_write_tiff", write_tiff)


@pytest.mark.parametrize("with_filename", [True, False], ids=["filename", "no-filename"])
@pytest.mark.parametrize("name", ["out.ome.zarr", "out.ome.tif"])
def test_a_full_disk_is_one_line_naming_out(tmp_path: Path, capsys, monkeypatch,
                                            name: str, with_filename: bool) -> None:
    csv = noise_tiles(tmp_path, 32)
    out = tmp_path / name
    fail = _fail_tiff_write if name.endswith(".tif") else _fail_zarr_store
    fail(with_filename, monkeypatch)
    code, _, err = run_cli(["fuse", csv, "-o", out, *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, f"{out}: cannot write: no space left on the device",
                          "the output needs up to about", "nothing was written")
    assert not out.exists() and hidden(tmp_path) == []
    # when the estimate exceeds the free space, the message says how much more is needed
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    code, _, err = run_cli(["fuse", csv, "-o", out, *FAST], capsys)
    assert code == 2
    assert_one_error_line(err, out, "kB more free space is needed", "1 kB is free")
    assert not out.exists() and hidden(tmp_path) == []


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("name", ["out.ome.zarr", "out.ome.tif"])
def test_a_file_size_limit_is_one_line_naming_out(tmp_path: Path, name: str) -> None:
    csv = noise_tiles(tmp_path, 64)  # 8 kB chunks, over a 4 kB limit
    argv = ["gpufusion", "fuse", str(csv), "-o", name, "--compression", "none", "--chunk",
            "64", "--backend", "numpy"]
    proc = _run_python(
        "import resource, runpy, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit get EFBIG\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('gpufusion', run_name='__main__')\n", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, f"{name}: cannot write: the file size limit",
                          "nothing was written")
    assert not (tmp_path / name).exists() and hidden(tmp_path) == []


def _tmpfs_works(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(folder))}"],
                           capture_output=True, check=False, timeout=60)
    return probe.returncode == 0


@pytest.mark.parametrize("name", ["out.ome.zarr", "out.ome.tif"])
def test_a_full_tmpfs_is_one_line_naming_out(tmp_path: Path, name: str) -> None:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if not _tmpfs_works(mount):
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount permissions)")
    csv = noise_tiles(tmp_path, 128)  # about 80 kB uncompressed, on a 64 kB file system
    fuse = shlex.join([sys.executable, "-m", "gpufusion", "fuse", str(csv), "-o",
                       str(mount / name), "--compression", "none", *FAST])
    script = (f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mount))} || exit 97; "
              f"{fuse}; rc=$?; echo \"left: $(ls -A {shlex.quote(str(mount))})\"; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, f"{mount / name}: cannot write: no space left",
                          "more free space is needed", "nothing was written")
    assert proc.stdout.strip() == "left:"  # nothing left on the full file system
