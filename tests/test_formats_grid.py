"""Regular grids with no metadata: the real TMA scan and synthetic folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gpufusion
from gpufusion.errors import InputError
from gpufusion.readers.detect import read_tileset
from gpufusion.readers.grid import natural_key, parse_grid, read_grid
from gpufusion.synthetic import make_mosaic

from .conftest import missing_real_data

TMA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tma_4x3"


def needs(folder: Path) -> Path:
    if not folder.is_dir():
        missing_real_data(folder)
    return folder


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def write_tiles(folder: Path, names, shape=(8, 10)) -> None:
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / name, np.full(shape, k, np.uint8))


def tile_values(ts) -> list[int]:
    return [int(src.read((slice(0, 1), slice(0, 1)))[0, 0]) for src in ts.sources[0]]


# --- the real TMA scan ---------------------------------------------------------------------


def test_tma_nominal_positions_460_8_px_apart():
    ts = read_tileset(needs(TMA), grid="4x3", overlap=0.1, pattern="r{row}-c{col}.png")
    assert ts.n_tiles == 12 and ts.n_channels == 1 and ts.ndim == 2
    assert ts.names[:4] == ["r0-c0.png", "r0-c1.png", "r0-c2.png", "r1-c0.png"]
    rows, cols = np.divmod(np.arange(12), 3)
    np.testing.assert_allclose(ts.positions(), np.stack([rows, cols], axis=1) * 460.8)
    assert ts.sources[0][0].shape == (512, 512) and ts.sources[0][0].dtype == np.uint8
    assert ts.mosaics()[0].shape == (1894, 1433)
    # the nominal columns of the ASHLAR reference file are these positions
    with open(TMA / "DERIVED_ashlar1.20_positions.csv") as fh:
        rows_csv = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    nominal = np.array([[float(r[1]), float(r[2])] for r in rows_csv])
    np.testing.assert_allclose(ts.positions(), nominal, atol=0.05)


def test_tma_without_pattern_counts_the_merged_png_too():
    with pytest.raises(InputError) as excinfo:
        read_tileset(needs(TMA), grid="4x3")
    one_line(excinfo, "tma_4x3", "grid 4x3 needs 12 tiles", "13 image files")


# --- synthetic folders ---------------------------------------------------------------------


def test_natural_sort_raster_and_snake(tmp_path):
    names = [f"t{i}.tif" for i in range(1, 7)]  # t1..t6; natural order, not t1, t10, ...
    write_tiles(tmp_path, names[::-1])  # values: t6 -> 0, ..., t1 -> 5
    raster = read_grid(tmp_path, "2x3", overlap=0.0)
    assert raster.names == names and tile_values(raster) == [5, 4, 3, 2, 1, 0]
    snake = read_grid(tmp_path, "2x3", overlap=0.0, order="snake")
    # row 1 runs right to left: t4 is at (1, 2), t6 at (1, 0)
    assert snake.names == ["t1.tif", "t2.tif", "t3.tif", "t6.tif", "t5.tif", "t4.tif"]
    assert sorted(natural_key(n) for n in ["a10", "a9"]) == [natural_key("a9"), natural_key("a10")]


def test_index_pattern_one_based_with_snake(tmp_path):
    write_tiles(tmp_path, [f"img_{i:03d}.tif" for i in range(1, 5)])
    ts = read_grid(tmp_path, "2x2", overlap=(0.25, 0.5), order="snake",
                   pattern="img_{index:03d}.tif")
    assert ts.names == ["img_001.tif", "img_002.tif", "img_004.tif", "img_003.tif"]
    np.testing.assert_allclose(ts.positions(), [[0, 0], [0, 5], [6, 0], [6, 5]])


def test_row_col_pattern_in_subfolders_one_based(tmp_path):
    write_tiles(tmp_path, [f"row{r}/col{c}.tif" for r in (1, 2) for c in (1, 2, 3)])
    ts = read_grid(tmp_path, (2, 3), overlap=0.5, pattern="row{row}/col{col}.tif",
                   pixel_size=0.65)
    assert ts.names[4] == "row2/col2.tif" and ts.positions()[4].tolist() == [4.0, 5.0]
    assert ts.pixel_size == (0.65, 0.65) and ts.unit == "micrometer"


def test_grid_fuses_to_ground_truth(tmp_path):
    s = make_mosaic((2, 3), (40, 50), overlap=0.2, subpixel=0.0, seed=2)
    for (r, c), tile in zip(np.ndindex(2, 3), s.tiles, strict=True):
        tifffile.imwrite(tmp_path / f"r{r}-c{c}.tif", tile)
    ts = read_tileset(tmp_path, grid="2x3", overlap=0.2, pattern="r{row}-c{col}.tif")
    np.testing.assert_allclose(ts.positions(), s.positions)
    m = ts.mosaics()[0]
    fused = gpufusion.fuse(m, chunks=32).compute()
    np.testing.assert_allclose(fused, s.ground_truth(m.origin, m.shape), atol=1)


# --- bad input -------------------------------------------------------------------------------


def test_count_mismatch_names_both_numbers(tmp_path):
    write_tiles(tmp_path, [f"r{r}-c{c}.tif" for r in range(2) for c in range(2)])
    with pytest.raises(InputError) as excinfo:
        read_grid(tmp_path, "3x2")
    one_line(excinfo, "grid 3x2 needs 6 tiles", "4 image files")
    with pytest.raises(InputError) as excinfo:
        read_grid(tmp_path, "2x3", pattern="r{row}-c{col}.tif")
    one_line(excinfo, "grid 2x3 needs 6 tiles", "4 files match the pattern")


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"grid": "4by3"}, "expected ROWSxCOLS"),
    ({"grid": "0x3"}, ">= 1"),
    ({"grid": "2x2", "overlap": 1.5}, "--overlap"),
    ({"grid": "2x2", "order": "zigzag"}, "--order"),
    ({"grid": "2x2", "pattern": "tile.tif"}, "no {row}, {col} or {index}"),
    ({"grid": "2x2", "pattern": "{index}_{row}.tif"}, "not both"),
    ({"grid": "2x2", "pattern": "r{row}.tif"}, "needs both {row} and {col}"),
])
def test_bad_options(tmp_path, kwargs, expected):
    write_tiles(tmp_path, [f"{i}.tif" for i in range(4)])
    grid = kwargs.pop("grid")
    with pytest.raises(InputError) as excinfo:
        read_grid(tmp_path, grid, **kwargs)
    one_line(excinfo, expected)


def test_two_files_in_one_cell_and_outside_grid(tmp_path):
    write_tiles(tmp_path, ["r0-c0.tif", "r0-c1.tif", "r1-c0.tif", "r01-c0.tif"])
    with pytest.raises(InputError) as excinfo:
        read_grid(tmp_path, "2x2", pattern="r{row}-c{col}.tif")
    one_line(excinfo, "grid cell (row 1, column 0) is already taken")
    (tmp_path / "r01-c0.tif").rename(tmp_path / "r1-c5.tif")
    with pytest.raises(InputError) as excinfo:
        read_grid(tmp_path, "2x2", pattern="r{row}-c{col}.tif")
    one_line(excinfo, "r1-c5.tif", "outside the 2x2 grid")


def test_tiles_of_different_shapes(tmp_path):
    write_tiles(tmp_path, ["a.tif", "b.tif"])
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((9, 10), np.uint8))
    with pytest.raises(InputError) as excinfo:
        read_grid(tmp_path, "1x2")
    one_line(excinfo, "b.tif", "(9, 10) differs from a.tif (8, 10)")


def test_grid_needs_a_folder(tmp_path):
    write_tiles(tmp_path, ["a.tif"])
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "a.tif", grid="1x1")
    one_line(excinfo, "--grid needs a folder")
    assert parse_grid(" 2 x 5 ") == (2, 5)
