"""Input options of the CLI and format detection: every input kind through one entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gpufusion
from gpufusion.cli.inputs import INPUT_HELP, add_input_options, tileset_from_args
from gpufusion.errors import InputError
from gpufusion.readers.detect import FORMATS, detect_format, read_tileset

from .conftest import missing_real_data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAMBER = DATA / "leica_2tiles" / "experiment--test" / "slide--S00" / "chamber--U00--V00"


def needs(path: Path) -> Path:
    if not path.exists():
        missing_real_data(path)
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpufusion fuse")
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("--pixel-size", type=float, default=None)
    p.add_argument("--unit", default="micrometer")
    add_input_options(p)
    return p


def args_for(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_options_parse():
    a = args_for("in", "--format", "grid", "--grid", "4x3", "--overlap", "0.15", "--order",
                 "snake", "--pattern", "r{row}-c{col}.png", "--timepoint", "2",
                 "--illumination", "all")
    assert (a.format, a.grid, a.overlap, a.order, a.pattern, a.timepoint, a.illumination) == (
        "grid", "4x3", 0.15, "snake", "r{row}-c{col}.png", 2, "all")
    d = args_for("in")
    assert (d.format, d.grid, d.overlap, d.order, d.timepoint, d.illumination) == (
        None, None, None, "raster", None, None)
    assert args_for("in", "--illumination", "1").illumination == 1
    assert set(FORMATS) == {"tileconfig", "csv", "ome-tiff", "bigstitcher", "czi", "grid"}


@pytest.mark.parametrize(("argv", "expected"), [
    (["--grid", "4by3"], "expected ROWSxCOLS"),
    (["--overlap", "1.5"], "must be in [0, 1)"),
    (["--overlap", "lots"], "expected a fraction"),
    (["--timepoint", "-1"], "must be >= 0"),
    (["--illumination", "left"], "expected an integer"),
    (["--format", "lif"], "invalid choice"),
])
def test_bad_option_values_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as excinfo:
        args_for("in", *argv)
    assert excinfo.value.code == 2
    assert expected in capsys.readouterr().err


def test_tile_configuration_leica_nominal(tmp_path):
    ts = tileset_from_args(args_for(str(needs(CHAMBER / "TileConfiguration.txt")),
                                    "--pixel-size", "0.2405"))
    assert detect_format(CHAMBER / "TileConfiguration.txt") == "tileconfig"
    assert (ts.n_tiles, ts.n_channels) == (2, 1)
    np.testing.assert_allclose(ts.positions(), [[0, 0], [921, 0]])
    assert ts.pixel_size == (0.2405, 0.2405) and ts.unit == "micrometer"
    assert ts.names[1].endswith("X00--Y01--T00--Z00--C01.ome.tif")


def test_csv_with_unit_and_fuse(tmp_path):
    tiles = [np.full((6, 8), v, np.uint16) for v in (100, 300)]
    for k, tile in enumerate(tiles):
        tifffile.imwrite(tmp_path / f"t{k}.tif", tile)
    (tmp_path / "pos.csv").write_text("file,x,y\nt0.tif,0,0\nt1.tif,5,1\n")
    ts = tileset_from_args(args_for(str(tmp_path / "pos.csv"), "--pixel-size", "2",
                                    "--unit", "nanometer"))
    assert ts.pixel_size == (2.0, 2.0) and ts.unit == "nanometer"
    m = ts.mosaics()[0]
    assert m.shape == (7, 13) and m.pixel_size == (2.0, 2.0)
    fused = gpufusion.fuse(m, chunks=8, blend="overlay").compute()
    assert fused[0, 0] == 100 and fused[6, 12] == 300


def test_every_kind_detected_from_input(tmp_path):
    assert detect_format(needs(DATA / "czi_2tiles" / "mosaic_test.czi")) == "czi"
    assert detect_format(DATA / "leica_2tiles") == "ome-tiff"
    assert detect_format(DATA / "tma_4x3", grid="4x3") == "grid"
    assert detect_format(DATA / "bigstitcher_xml" / "bigstitcher_6.xml") == "bigstitcher"
    ome = next((DATA / "leica_2tiles").rglob("*C00.ome.tif"))
    assert detect_format(ome) == "ome-tiff"


def test_czi_and_ome_tiff_through_args():
    pytest.importorskip("czifile")
    czi = tileset_from_args(args_for(str(needs(DATA / "czi_2tiles" / "mosaic_test.czi"))))
    assert czi.positions().tolist() == [[0.0, 0.0], [0.0, 832.0]]
    leica = tileset_from_args(args_for(str(DATA / "leica_2tiles"), "--timepoint", "0"))
    assert (leica.n_tiles, leica.n_channels) == (2, 2)


def test_grid_through_args():
    ts = tileset_from_args(args_for(str(needs(DATA / "tma_4x3")), "--grid", "4x3",
                                    "--pattern", "r{row}-c{col}.png", "--order", "snake"))
    assert ts.n_tiles == 12 and ts.positions()[5].tolist() == pytest.approx([460.8, 921.6])


# --- options that do not apply, unknown inputs ---------------------------------------------------


def test_options_that_do_not_apply(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    (tmp_path / "pos.csv").write_text("file,x,y\na.tif,0,0\n")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", grid="2x2")
    one_line(excinfo, "--grid needs a folder")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", format="csv", overlap=0.2)
    one_line(excinfo, "apply only to --format grid")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", illumination=1)
    one_line(excinfo, "--illumination applies only to BigStitcher")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", timepoint=3)
    one_line(excinfo, "--timepoint must be 0")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path, format="grid")
    one_line(excinfo, "needs --grid ROWSxCOLS")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", format="lif")
    one_line(excinfo, "unknown format 'lif'")


def test_unknown_and_missing_inputs(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "nothing-here")
    one_line(excinfo, "nothing-here", "no such file or folder")
    (tmp_path / "other.xml").write_text("<?xml version='1.0'?><Project/>")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "other.xml")
    one_line(excinfo, "other.xml", "not a BigStitcher/BigDataViewer dataset.xml")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "notes.txt")
    one_line(excinfo, "notes.txt:1", "unrecognised positions file")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    (tmp_path / "pos.csv").write_text("file,x,y\na.tif,0,0\n")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", format="tileconfig")
    one_line(excinfo, "pos.csv", "dim")


def test_channel_selection_on_single_channel_input(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    (tmp_path / "pos.csv").write_text("file,x,y\na.tif,0,0\n")
    assert read_tileset(tmp_path / "pos.csv", channel=0).n_channels == 1
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "pos.csv", channel=1)
    one_line(excinfo, "channel 1 does not exist", "1 channel(s)")
