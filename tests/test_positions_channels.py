"""Positions CSV with a ``channel`` column: one file per channel per tile, fused into c."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import gpufusion
from gpufusion.cli import main
from gpufusion.cli.inputs import tileset_from_args
from gpufusion.errors import InputError
from gpufusion.readers.detect import read_tileset
from gpufusion.readers.positions import (
    PositionTable,
    positions_format,
    read_positions,
    read_positions_csv,
    read_tile_configuration,
)
from gpufusion.readers.tileset import tileset_from_positions
from gpufusion.synthetic import make_mosaic

from .conftest import missing_real_data
from .test_inputs_cli import args_for
from .test_readers import assert_input_error as one_line

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LEICA = DATA / "leica_2tiles" / "experiment--test"


@pytest.fixture
def two_channels(tmp_path: Path) -> Path:
    """2x2 synthetic uint16 tiles in two channels (c1 = inverted c0, so they differ).

    Writes ``pos.csv`` (both channels, grouped by channel), ``mixed.csv`` (the same rows
    interleaved tile by tile, channel column first and capitalised), and ``c0.csv`` /
    ``c1.csv`` (one channel each, no channel column).
    """
    syn = make_mosaic((2, 2), (48, 56), overlap=0.2, subpixel=1.0, seed=5)
    per_channel: dict[str, list[str]] = {"DAPI": [], "GFP": []}
    mixed = ["Channel , file, y, x"]
    for k, (tile, (y, x)) in enumerate(zip(syn.tiles, syn.positions, strict=True)):
        for c, (name, data) in enumerate((("DAPI", tile), ("GFP", 65535 - tile))):
            tifffile.imwrite(tmp_path / f"t{k}_c{c}.tif", data.astype(np.uint16))
            per_channel[name].append(f"t{k}_c{c}.tif,{float(x)!r},{float(y)!r}")
            mixed.append(f" {name} ,t{k}_c{c}.tif,{float(y)!r},{float(x)!r}")
    rows = [f"{row},{name}" for name, lines in per_channel.items() for row in lines]
    (tmp_path / "pos.csv").write_text("file,x,y,channel\n" + "\n".join(rows) + "\n")
    (tmp_path / "mixed.csv").write_text("\n".join(mixed) + "\n")
    for c, lines in enumerate(per_channel.values()):
        (tmp_path / f"c{c}.csv").write_text("file,x,y\n" + "\n".join(lines) + "\n")
    return tmp_path


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pos.csv", "mixed.csv"])
def test_two_channel_csv_reads_to_a_two_channel_tileset(two_channels: Path, name: str):
    table = read_positions(two_channels / name)
    assert table.channels is not None and len(table) == 8
    assert list(table.channel_rows()) == ["DAPI", "GFP"]
    ts = tileset_from_args(args_for(str(two_channels / name)))
    assert (ts.n_channels, ts.n_tiles) == (2, 4)
    assert ts.channel_names == ["DAPI", "GFP"]
    for c in range(2):
        for t in range(4):
            assert Path(ts.sources[c][t].path) == (two_channels / f"t{t}_c{c}.tif").resolve()
    # tiles are named after their first channel's file, like multi-channel OME-TIFF tiles
    assert [Path(n).name for n in ts.names] == [f"t{t}_c0.tif" for t in range(4)]
    single = read_positions(two_channels / "c0.csv")
    np.testing.assert_array_equal(ts.positions(), single.positions)
    assert [m.tiles[0].name for m in ts.mosaics()] == [f"{ts.names[0]} [DAPI]",
                                                  f"{ts.names[0]} [GFP]"]


def test_channel_csv_through_every_csv_route(two_channels: Path):
    text = (two_channels / "pos.csv").read_text()
    (two_channels / "pos.txt").write_text(text)  # sniffed as CSV by its header
    assert positions_format(two_channels / "pos.txt") == "csv"
    for argv in (["pos.csv"], ["pos.txt"], ["pos.txt", "--format", "csv"],
                 ["pos.csv", "--pixel-size", "0.5"]):
        ts = tileset_from_args(args_for(str(two_channels / argv[0]), *argv[1:]))
        assert ts.n_channels == 2 and ts.n_tiles == 4, argv
    ts = tileset_from_args(args_for(str(two_channels / "pos.csv"), "--pixel-size", "0.5"))
    assert ts.pixel_size == (0.5, 0.5) and ts.unit == "micrometer"


def test_python_readers_see_the_channels(two_channels: Path):
    from gpufusion.readers import mosaic_from_file

    ts = read_tileset(two_channels / "pos.csv")
    assert (ts.n_channels, ts.n_tiles, ts.channel_names) == (2, 4, ["DAPI", "GFP"])
    assert read_tileset(two_channels / "pos.csv", channel="GFP").n_tiles == 4
    with pytest.raises(InputError, match="lists 2 channels"):
        mosaic_from_file(two_channels / "pos.csv")  # never blends channels together
    assert len(mosaic_from_file(two_channels / "c0.csv")) == 4


def test_without_channel_column_nothing_changes(two_channels: Path):
    table = read_positions_csv(two_channels / "c0.csv")
    assert table.channels is None
    assert table.channel_rows() == {"channel 0": [0, 1, 2, 3]}
    ts = tileset_from_args(args_for(str(two_channels / "c0.csv")))
    assert ts.channel_names == ["channel 0"] and ts.n_tiles == 4
    assert read_tileset(two_channels / "c0.csv").channel_names == ["channel 0"]


def test_position_table_stays_positional_and_checks_channels():
    table = PositionTable([Path("/a.tif")], np.zeros((1, 2)), 2, Path("/p.csv"))
    assert table.channels is None and table.source == Path("/p.csv")
    two = PositionTable([Path("/a"), Path("/b")], np.zeros((2, 2)), 2, Path("/p.csv"),
                        ["x", "y"])
    assert two.channel_rows() == {"x": [0], "y": [1]}
    with pytest.raises(ValueError, match="2 channel values for 1 files"):
        PositionTable([Path("/a.tif")], np.zeros((1, 2)), 2, Path("/p.csv"), ["a", "b"])
    with pytest.raises(ValueError, match="different tile counts"):
        PositionTable([Path("/a"), Path("/b"), Path("/c")], np.zeros((3, 2)), 2,
                      Path("/p.csv"), ["a", "a", "b"])


def test_tile_configuration_reader_has_no_channels(tmp_path: Path):
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(tmp_path / name, np.zeros((4, 4), np.uint8))
    (tmp_path / "t.txt").write_text("dim = 2\na.tif; ; (0, 0)\nb.tif; ; (3, 0)\n")
    assert read_tile_configuration(tmp_path / "t.txt").channels is None
    assert positions_format(tmp_path / "t.txt") == "tileconfig"
    ts = tileset_from_args(args_for(str(tmp_path / "t.txt")))
    assert ts.n_channels == 1 and ts.n_tiles == 2


# --- fusing ----------------------------------------------------------------------------------


def test_fusing_channels_equals_fusing_each_channel_alone(two_channels: Path):
    ts = tileset_from_args(args_for(str(two_channels / "pos.csv")))
    for c, mosaic in enumerate(ts.mosaics()):
        alone = gpufusion.mosaic_from_file(two_channels / f"c{c}.csv")
        got = gpufusion.fuse(mosaic, chunks=32, backend="numpy").compute()
        want = gpufusion.fuse(alone, chunks=32, backend="numpy").compute()
        assert got.shape == want.shape and got.dtype == want.dtype == np.uint16
        np.testing.assert_array_equal(got, want)
    fused = [gpufusion.fuse(m, chunks=32, backend="numpy").compute() for m in ts.mosaics()]
    assert not np.array_equal(fused[0], fused[1])


def test_cli_fuses_every_channel_into_c(two_channels: Path, capsys):
    out = two_channels / "both.ome.zarr"
    assert main(["fuse", str(two_channels / "pos.csv"), "-o", str(out), "--backend",
                 "numpy", "--chunk", "32", "-q"]) == 0, capsys.readouterr().err
    both = zarr.open_group(str(out), mode="r")["0"][...]
    assert both.ndim == 3 and both.shape[0] == 2
    for c in range(2):
        alone_out = two_channels / f"c{c}.ome.zarr"
        assert main(["fuse", str(two_channels / f"c{c}.csv"), "-o", str(alone_out),
                     "--backend", "numpy", "--chunk", "32", "-q"]) == 0
        alone = np.squeeze(zarr.open_group(str(alone_out), mode="r")["0"][...])
        np.testing.assert_array_equal(both[c], alone)
    mixed_out = two_channels / "mixed.ome.zarr"
    assert main(["fuse", str(two_channels / "mixed.csv"), "-o", str(mixed_out),
                 "--backend", "numpy", "--chunk", "32", "-q"]) == 0
    np.testing.assert_array_equal(zarr.open_group(str(mixed_out), mode="r")["0"][...], both)


# --- bad channel columns -----------------------------------------------------------------------

CHANNEL_BAD = [
    # 3 tiles per channel; line 7 = tile 2 of C01
    ("file,x,y,channel\na0.tif,0,0,C00\na1.tif,5,0,C00\na2.tif,10,0,C00\n"
     "b0.tif,0,0,C01\nb1.tif,5,0,C01\nb2.tif,10.5,0,C01\n", 7,
     "channel 'C01' tile 2 is at (x, y) = (10.5, 0.0) but channel 'C00' puts it at "
     "(10.0, 0.0); every channel of a tile needs the same position"),
    # 1e-6 px is the tolerance: 2e-6 is too much (also in z)
    ("file,x,y,z,channel\na0.tif,0,0,0,C00\nb0.tif,0,0,0.000002,C01\n", 3,
     "channel 'C01' tile 0 is at (x, y, z) = (0.0, 0.0, 2e-06)"),
    ("file,x,y,channel\na0.tif,0,0,C00\na1.tif,5,0,C00\nb0.tif,0,0,C01\n", 3,
     "channel 'C00' lists 2 tiles but channel 'C01' lists 1, so tile 1 of 'C00' has no "
     "match; every channel needs the same number of tiles"),
    ("file,x,y,channel\na0.tif,0,0,C00\nb0.tif,0,0,C01\nb1.tif,5,0,C01\n", 4,
     "channel 'C01' lists 2 tiles but channel 'C00' lists 1"),
    ("file,x,y,channel\na0.tif,0,0,C00\n\n# comment\nb0.tif,0,0,  \n", 5,
     "empty channel value for tile 'b0.tif'"),
    ("file,x,y,channel\na0.tif,0,0,C00\nb0.tif,0,0,\"\"\n", 3, "empty channel value"),
    ("file,channel,x,y,CHANNEL\na0.tif,C00,0,0,C00\n", 1, "column 'channel' appears 2 times"),
    ("file,x,y,channel\na0.tif,0,0,C00\na0.tif,0,0,C01\n", 3, "listed twice (lines 2 and 3)"),
]


@pytest.mark.parametrize(("text", "line", "reason"), CHANNEL_BAD)
def test_channel_errors_name_the_line(tmp_path: Path, capsys, text: str, line: int,
                                      reason: str):
    for name in ("a0", "a1", "a2", "b0", "b1", "b2"):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.zeros((4, 4, 4) if "z" in text
                                                            else (4, 4), np.uint8))
    path = tmp_path / "pos.csv"
    path.write_text(text)
    with pytest.raises(InputError) as excinfo:
        read_positions(path)
    one_line(excinfo, f"pos.csv:{line}: ", reason)
    out = tmp_path / "out.ome.zarr"
    assert main(["fuse", str(path), "-o", str(out), "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert f"pos.csv:{line}: " in err and reason in err
    assert not out.exists()


def test_tileset_from_positions_checks_channels():
    tiles = [np.zeros((4, 4), np.uint8)] * 3
    pos = np.array([[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    with pytest.raises(InputError) as excinfo:
        tileset_from_positions(tiles, pos, ["a", "b", "c"], Path("p.csv"),
                               channels=["A", "A", "B"])
    one_line(excinfo, "p.csv: channel 'B' has 1 tiles but channel 'A' has 2")
    with pytest.raises(InputError) as excinfo:
        tileset_from_positions(tiles[:2], pos[:2], ["a", "b"], Path("p.csv"),
                               channels=["A", "B"])
    one_line(excinfo, "channel 'B' tile 0 (b)", "needs the same position")
    with pytest.raises(InputError) as excinfo:
        tileset_from_positions(tiles[:2], pos[:2], ["a", "b"], Path("p.csv"), channels=["A"])
    one_line(excinfo, "1 channel values for 2 tile files")


# --- real data: the Leica OME-TIFF export round-trips through a channel CSV ----------------------


def test_leica_folder_and_channel_csv_fuse_identically(tmp_path: Path, capsys):
    if not LEICA.is_dir():
        missing_real_data(LEICA)
    ts = read_tileset(LEICA)
    assert (ts.n_channels, ts.n_tiles) == (2, 2)
    rows = ["file,x,y,channel"]
    for c, name in enumerate(ts.channel_names):
        for t, (y, x) in enumerate(ts.positions()):
            rows.append(f"{ts.sources[c][t].path},{float(x)!r},{float(y)!r},{name}")
    csv_path = tmp_path / "positions.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    from_csv = tileset_from_args(args_for(str(csv_path)))
    assert from_csv.channel_names == ts.channel_names == ["C00", "C01"]
    np.testing.assert_array_equal(from_csv.positions(), ts.positions())
    size = repr(ts.pixel_size[0])
    outs = {}
    for key, argv in (("folder", [str(LEICA)]), ("csv", [str(csv_path), "--pixel-size", size])):
        out = tmp_path / f"{key}.ome.zarr"
        code = main(["fuse", *argv, "-o", str(out), "--backend", "numpy", "-q"])
        assert code == 0, capsys.readouterr().err
        outs[key] = zarr.open_group(str(out), mode="r")["0"][...]
    assert outs["folder"].shape[0] == 2 and outs["folder"].shape == outs["csv"].shape
    np.testing.assert_array_equal(outs["csv"], outs["folder"])
    assert not np.array_equal(outs["folder"][0], outs["folder"][1])
