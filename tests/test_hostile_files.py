"""Hostile and damaged tile files: every one is a one-line error with exit code 2.

Resource bombs (a header claiming far more pixels than the file holds), files truncated
while a run reads them, pixel types gpufusion cannot fuse, symbolic link loops, damaged
files that make tifffile or czifile warn, non-finite positions and oversized demos: each
ends with exit code 2, exactly one line on stderr naming the file (and line, tile or field),
nothing at OUT and no temporary folder beside it.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpufusion.errors import InputError
from gpufusion.readers.images import clear_tile_cache, open_tile

from .tile_files import write_tile_csv
from .writer_helpers import leftovers, refused


def two_tiles(folder: Path, **imwrite) -> Path:
    """Two 32x32 uint16 TIFF tiles ``t0.tif``, ``t1.tif`` and ``pos.csv`` placing them."""
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 4000, (32, 32), dtype=np.uint16) for _ in range(2)]
    return write_tile_csv(folder, tiles, [(0, 0), (0, 28)], photometric="minisblack", **imwrite)


def set_tags(path: Path, **values: int) -> None:
    """Overwrite integer tags of page 0 in place (e.g. ``ImageWidth=100000``)."""
    with tifffile.TiffFile(path) as tif:
        tags = {name: tif.pages[0].tags[name] for name in values}
    with open(path, "r+b") as fh:
        for name, value in values.items():
            tag = tags[name]
            assert tag.count == 1
            fh.seek(tag.valueoffset)
            fh.write(struct.pack({3: "<H", 4: "<I"}[int(tag.dtype)], value))


# --- resource bombs --------------------------------------------------------------------------


def _plain_bomb(path: Path) -> None:  # uncompressed, one strip: read in place
    tifffile.imwrite(path, np.ones((64, 64), np.uint16), photometric="minisblack")
    set_tags(path, ImageWidth=100000, ImageLength=100000)


def _one_strip_bomb(path: Path) -> None:  # Deflate, one strip where 1563 are needed
    tifffile.imwrite(path, np.ones((64, 64), np.uint16), photometric="minisblack",
                     compression="zlib")
    set_tags(path, ImageWidth=100000, ImageLength=100000)


def _strips_bomb(path: Path) -> None:  # Deflate, 64 strips as claimed, each far too small
    tifffile.imwrite(path, np.ones((64, 64), np.uint16), photometric="minisblack",
                     compression="zlib", rowsperstrip=1)
    set_tags(path, ImageWidth=100000, ImageLength=64 * 1563, RowsPerStrip=1563)


@pytest.mark.parametrize(("make", "says"), [
    (_plain_bomb, "needs 18.6 GiB but the file holds 8.0 KiB of image data"),
    (_one_strip_bomb, "lists 1 StripOffsets and 1 StripByteCounts"),
    (_strips_bomb, "but the file holds"),
])
def test_tiff_claiming_more_pixels_than_it_holds(tmp_path, capsys, make, says):
    pos = two_tiles(tmp_path)
    make(tmp_path / "t1.tif")
    assert (tmp_path / "t1.tif").stat().st_size < 50_000
    before = (tmp_path / "t1.tif").read_bytes()
    out = tmp_path / "out.ome.zarr"
    refused(capsys, ["fuse", pos, "-o", out], out,
                  str(tmp_path / "t1.tif"), "ImageWidth x ImageLength 100000 x", says)
    assert (tmp_path / "t1.tif").read_bytes() == before


def _png(path: Path, width: int, height: int) -> Path:
    """A tiny grayscale PNG whose IHDR claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [100_000, 10_000])  # over Pillow's error / warning limit
def test_png_decompression_bomb(tmp_path, capsys, recwarn, side):
    pos = two_tiles(tmp_path)
    _png(tmp_path / "bomb.png", side, side)
    pos.write_text(pos.read_text().replace("t1.tif", "bomb.png"))
    out = tmp_path / "out.ome.zarr"
    refused(capsys, ["fuse", pos, "-o", out], out,
                  str(tmp_path / "bomb.png"), "decompression bomb", f"{side * side} pixels")
    assert not recwarn.list


# --- a tile truncated during the run ---------------------------------------------------------

_TRUNCATE_DURING_RUN = """
import os, sys
import gpufusion.readers.images as images
from gpufusion.cli import main

cls = images.MemmapTiffSource  # the class that reads uncompressed tiles in place
original = cls.read
reads = []

def read(self, window):
    pixels = original(self, window)
    reads.append(window)
    if len(reads) == 1:  # the run has started reading: another program cuts the file
        os.truncate(self.path, 1000)
    return pixels

cls.read = read
sys.exit(main(sys.argv[1:]))
"""


def test_tile_truncated_while_the_run_reads_it(tmp_path):
    """Reads never memory-map a tile: a cut file is exit 2 naming it, not a SIGBUS (135)."""
    tile = np.random.default_rng(1).integers(0, 60000, (256, 256), dtype=np.uint16)
    pos = write_tile_csv(tmp_path, [tile], [(0, 0)], photometric="minisblack")
    out = tmp_path / "out.ome.zarr"
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_TRUNCATE_DURING_RUN), "fuse", str(pos), "-o",
         str(out), "--chunk", "32", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert str(tmp_path / "t0.tif") in lines[0] and "truncated" in lines[0]
    assert not out.exists() and leftovers(tmp_path, "out.ome.zarr") == ["pos.csv", "t0.tif"]


def test_in_place_reads_match_the_file_and_stop_at_its_end(tmp_path):
    """Window reads (steps, reversed, 3D, big-endian) equal tifffile's; a cut file is named."""
    data = np.random.default_rng(2).integers(0, 60000, (3, 40, 50), dtype=np.uint16)
    path = tmp_path / "be.tif"
    tifffile.imwrite(path, data, byteorder=">", photometric="minisblack")
    src = open_tile(path)
    for window in [(slice(None), slice(3, 17), slice(5, 9)), (slice(2, 0, -1), slice(None),
                   slice(None, None, 7)), (slice(None, None, 2), slice(39, 2, -5), slice(1, 2)),
                   (slice(1, 1), slice(None), slice(None))]:
        got = src.read(window)
        assert got.dtype.isnative and not got.flags.writeable
        np.testing.assert_array_equal(got, data[window])
    path.write_bytes(path.read_bytes()[:6000])  # same tile, cut after it was opened
    clear_tile_cache()
    with pytest.raises(InputError, match="changed since it was opened"):
        src.read((slice(None), slice(None), slice(None)))


# --- pixel types -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_unsupported_pixel_types_are_named_with_the_accepted_list(tmp_path, capsys, dtype):
    pos = two_tiles(tmp_path)
    tifffile.imwrite(tmp_path / "t1.tif", np.zeros((32, 32), dtype))
    out = tmp_path / "out.ome.zarr"
    refused(capsys, ["fuse", pos, "-o", out], out, str(tmp_path / "t1.tif"),
                  f"pixel type {dtype} not supported",
                  "expected one of uint8, uint16, uint32, uint64, int8, int16, int32, int64")


# --- symbolic link loops ---------------------------------------------------------------------


def test_symlink_loop_as_input(tmp_path, capsys):
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    out = tmp_path / "out.ome.zarr"
    refused(capsys, ["fuse", loop, "-o", out], out, str(loop), "symbolic link loop")


@pytest.mark.parametrize("config", ["pos.csv", "TileConfiguration.txt"])
def test_symlink_loop_as_a_tile(tmp_path, capsys, config):
    two_tiles(tmp_path)
    (tmp_path / "t1.tif").unlink()
    (tmp_path / "t1.tif").symlink_to(tmp_path / "t1.tif")
    (tmp_path / "TileConfiguration.txt").write_text(
        "dim = 2\nt0.tif; ; (0.0, 0.0)\nt1.tif; ; (28.0, 0.0)\n")
    out = tmp_path / "out.ome.zarr"
    refused(capsys, ["fuse", tmp_path / config, "-o", out], out,
                  f"{tmp_path / config}:3:", "'t1.tif'", "symbolic link loop")


def test_symlink_loop_opened_as_a_tile(tmp_path):
    loop = tmp_path / "loop.tif"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="symbolic link loop") as excinfo:
        open_tile(loop)
    assert str(loop) in str(excinfo.value) and "\n" not in str(excinfo.value)


# --- third-party noise -----------------------------------------------------------------------


def test_tifffile_warning_about_a_corrupt_tag_is_one_line(tmp_path, capsys, caplog):
    pos = two_tiles(tmp_path, software="gpufusion tests")
    path = tmp_path / "t1.tif"
    with tifffile.TiffFile(path) as tif:
        tag_offset = tif.pages[0].tags["Software"].offset
    data = bytearray(path.read_bytes())
    data[tag_offset + 2: tag_offset + 4] = struct.pack("<H", 99)  # no such TIFF data type
    path.write_bytes(bytes(data))
    out = tmp_path / "out.ome.zarr"
    with caplog.at_level(logging.WARNING):
        refused(capsys, ["fuse", pos, "-o", out], out, str(path), "damaged TIFF",
                      "tag 305", "invalid data type 99")
    assert not [r for r in caplog.records if r.name == "tifffile"]


def _damaged_czi(data_dir: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray((data_dir / "czi_2tiles" / "mosaic_test.czi").read_bytes())
    if how == "directory id":  # the directory segment's id turned into garbage bytes
        directory = struct.unpack("<q", data[32 + 52: 32 + 60])[0]
        data[directory: directory + 16] = b"ZISRAWJUNK\xff\xfe\x00\x01\x02\x03"
    elif how == "pending update":  # the writer never finished the file
        data[32 + 68: 32 + 72] = struct.pack("<i", 1)
    else:  # cut inside the second tile's pixels
        data = data[: len(data) // 2]
    path = tmp_path / "damaged.czi"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("how", "says"), [
    # czifile 2019.x warns "unknown segment type", 2026.10+ raises "invalid CziSegment ID"
    ("directory id", r"damaged CZI file: "),
    ("pending update", "damaged CZI file: file is pending update"),
    ("truncated", "CZI file is truncated"),
])
def test_damaged_czi_is_one_line(data_dir, tmp_path, capsys, recwarn, how, says):
    pytest.importorskip("czifile")
    path = _damaged_czi(data_dir, tmp_path, how)
    out = tmp_path / "out.ome.zarr"
    line = refused(capsys, ["fuse", path, "-o", out], out, str(path), says)
    assert line.isascii()  # czifile's raw bytes are escaped, never printed
    if how == "directory id":
        assert "ZISRAWJUNK\\xff\\xfe" in line
    assert not recwarn.list  # czifile's warnings do not escape either


# --- positions -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999"])
def test_non_finite_position_names_file_line_and_tile(tmp_path, capsys, value):
    pos = two_tiles(tmp_path)
    pos.write_text(pos.read_text().replace("t1.tif,28.0", f"t1.tif,{value}"))
    (tmp_path / "TileConfiguration.txt").write_text(
        f"dim = 2\nt0.tif; ; (0.0, 0.0)\nt1.tif; ; (1.0, {value})\n")
    out = tmp_path / "out.ome.zarr"
    refused(capsys, ["fuse", pos, "-o", out], out,
                  f"{pos}:3:", "tile 't1.tif'", "x is not finite")
    refused(capsys, ["fuse", tmp_path / "TileConfiguration.txt", "-o", out], out,
                  f"{tmp_path / 'TileConfiguration.txt'}:3:", "tile 't1.tif'", "y is not finite")


def test_non_finite_transform_names_the_tile():
    from gpufusion.readers.tileset import tileset_from_positions

    tiles = [np.zeros((4, 4), np.uint8)] * 3
    with pytest.raises(InputError, match=r"src\.csv: tile 'b' has a non-finite position"):
        tileset_from_positions(tiles, np.array([[0, 0], [0, np.nan], [0, 3.0]]),
                               ["a", "b", "c"], Path("src.csv"))


# --- demo bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "says"), [
    (["--tile", "100000"], "--tile: 100000 px is above the demo's limit (8192 px per side)"),
    (["--tiles", "300x300"], "--tiles: 300x300 is 90000 tiles, above the demo's limit of 1024"),
    (["--tiles", "20x20", "--tile", "1024"], "400 Mpx of tiles, above the demo's limit"),
])
def test_demo_size_is_bounded(tmp_path, capsys, argv, says):
    out = tmp_path / "demo"
    refused(capsys, ["demo", "--out", out, *argv], out, says, "in memory")
