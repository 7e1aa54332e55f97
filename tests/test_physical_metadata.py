"""Physical metadata in the outputs, whatever the input (issue #11, part 2).

Pixel size and ``--unit`` for every input kind, channel names and colours, an unknown pixel
size left out, the pixel size carried through positions files, the image name and the
provenance record. Every output is read back with independent readers: zarr and
ome-zarr-models (NGFF validation), ome-zarr-py, tifffile and ome-types (OME-XML schema
validation).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import ome_types
import pytest
import tifffile
import zarr

import gpufusion
from gpufusion.cli import main
from gpufusion.errors import InputError
from gpufusion.readers.detect import read_tileset
from gpufusion.readers.positions import pixel_size_comment, read_positions, read_tile_configuration
from gpufusion.readers.tileset import MetadataWarning
from gpufusion.registration.report import write_positions_csv
from gpufusion.synthetic import make_mosaic

from .conftest import DATA, missing_real_data
from .tile_files import write_tile_csv

# --- helpers ------------------------------------------------------------------------------


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def fuse_cli(inp: Path, out: Path, *options: object) -> None:
    code = cli("fuse", inp, "-o", out, "--backend", "numpy", "-q", *options)
    assert code == 0


def zattrs(out: Path) -> dict:
    """The group attributes, through zarr (v2 .zattrs or v3 zarr.json)."""
    return dict(zarr.open_group(str(out), mode="r").attrs)


def ngff(out: Path) -> dict:
    """NGFF metadata (0.4 at the top level, 0.5 under ``ome``), after validating it with
    ome-zarr-models."""
    from ome_zarr_models.v04 import Image as ImageV04
    from ome_zarr_models.v05 import Image as ImageV05

    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)
    (ImageV05 if "ome" in attrs else ImageV04).from_zarr(group)
    return attrs.get("ome", attrs)


def ome(path: Path):
    """The OME-XML of an OME-TIFF, validated against the OME schema by ome-types."""
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    return ome_types.from_xml(xml, validate=True), xml


def ome_tiles(folder: Path, sizes_um=(0.5, 0.5), positions_um=((0.0, 0.0), (0.0, 24.0)),
              channels: int = 1, names=None) -> Path:
    """OME-TIFF tiles (64x64, textured) at stage positions (y, x) in micrometres."""
    syn = make_mosaic((1, len(positions_um)), (64, 64), overlap=0.25, subpixel=0.0, seed=3)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (y_um, x_um) in enumerate(positions_um):
        tile = syn.tiles[k % len(syn.tiles)]
        data = np.stack([tile] * channels) if channels > 1 else tile
        meta = {"axes": "CYX" if channels > 1 else "YX", "PhysicalSizeX": sizes_um[-1],
                "PhysicalSizeY": sizes_um[-2],
                "Plane": {"PositionX": [x_um] * channels, "PositionY": [y_um] * channels}}
        if names:
            meta["Channel"] = {"Name": list(names)}
        tifffile.imwrite(folder / f"tile{k}.ome.tif", data, metadata=meta)
    return folder


def plain_csv(folder: Path) -> Path:
    """Plain TIFF tiles (no physical size anywhere) and a positions CSV."""
    syn = make_mosaic((1, 2), (48, 48), overlap=0.25, subpixel=0.0, seed=1)
    return write_tile_csv(folder, syn.tiles, syn.positions)


# --- 1. --unit, for every input kind -------------------------------------------------------


def test_unit_converts_ome_tiff_positions_and_is_written_to_both_outputs(tmp_path):
    tiles = ome_tiles(tmp_path / "tiles")
    # 24 µm apart: 100 px of 240 nm (0.1 px if 240 were taken as micrometres)
    zarr_out, tiff_out = tmp_path / "a.ome.zarr", tmp_path / "a.ome.tif"
    fuse_cli(tiles, zarr_out, "--pixel-size", 240, "--unit", "nm")
    fuse_cli(tiles, tiff_out, "--pixel-size", 240, "--unit", "nm")
    meta = ngff(zarr_out)["multiscales"][0]
    assert [a.get("unit") for a in meta["axes"]] == ["nanometer", "nanometer"]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [240.0, 240.0]
    level0 = zarr.open_array(str(zarr_out / "0"), mode="r")
    assert level0.shape[-1] == 64 + 100
    model, xml = ome(tiff_out)
    pixels = model.images[0].pixels
    assert (pixels.physical_size_x, pixels.physical_size_y) == (240.0, 240.0)
    assert pixels.physical_size_x_unit.value == "nm" and 'PhysicalSizeXUnit="nm"' in xml
    assert (pixels.size_y, pixels.size_x) == level0.shape


def test_without_pixel_size_the_readers_unit_is_kept(tmp_path):
    tiles = ome_tiles(tmp_path / "tiles")
    fuse_cli(tiles, tmp_path / "a.ome.zarr")
    meta = ngff(tmp_path / "a.ome.zarr")["multiscales"][0]
    assert [a.get("unit") for a in meta["axes"]] == ["micrometer"] * 2
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]


def test_unit_alone_converts_the_inputs_pixel_size(tmp_path):
    tiles = ome_tiles(tmp_path / "tiles")
    fuse_cli(tiles, tmp_path / "a.ome.tif", "--unit", "nm")
    pixels = ome(tmp_path / "a.ome.tif")[0].images[0].pixels
    assert pixels.physical_size_x == pytest.approx(500.0)
    assert pixels.physical_size_x_unit.value == "nm"
    assert pixels.size_x == 64 + 48  # positions are unchanged: 24 µm = 48 px of 0.5 µm


def test_unit_alone_without_a_pixel_size_is_refused(tmp_path, capsys):
    csv = plain_csv(tmp_path)
    assert cli("fuse", csv, "-o", tmp_path / "a.ome.zarr", "--unit", "nm", "-q") == 2
    err = capsys.readouterr().err
    assert "--unit" in err and "--pixel-size" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.ome.zarr").exists()


@pytest.mark.parametrize("command", ["fuse", "register"])
def test_unknown_unit_exits_2_naming_the_option_and_the_vocabulary(tmp_path, capsys, command):
    csv = plain_csv(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli(command, csv, "-o", tmp_path / "out.ome.zarr", "--pixel-size", 1, "--unit",
            "banana")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--unit" in err and "'banana'" in err
    assert all(u in err for u in ("micrometer", "nanometer", "millimeter", "angstrom"))


def test_unit_for_csv_and_grid_inputs(tmp_path):
    csv = plain_csv(tmp_path)
    fuse_cli(csv, tmp_path / "c.ome.zarr", "--pixel-size", 240, "--unit", "nm", "--ngff", "0.5")
    meta = ngff(tmp_path / "c.ome.zarr")["multiscales"][0]
    assert [a.get("unit") for a in meta["axes"]] == ["nanometer"] * 2
    grid = tmp_path / "grid"
    grid.mkdir()
    for k in range(2):
        (grid / f"t{k}.tif").write_bytes((tmp_path / f"t{k}.tif").read_bytes())
    fuse_cli(grid, tmp_path / "g.ome.tif", "--grid", "1x2", "--overlap", 0.25,
             "--pixel-size", 0.3, "--unit", "mm")
    pixels = ome(tmp_path / "g.ome.tif")[0].images[0].pixels
    assert pixels.physical_size_x == 0.3 and pixels.physical_size_x_unit.value == "mm"


def test_unit_for_bigstitcher_converts_to_the_datasets_unit(tmp_path):
    from .test_formats_bigstitcher import write_dataset, write_filemap2

    s = make_mosaic((1, 2, 2), (9, 32, 32), overlap=0.25, subpixel=0.0, dtype="uint16", seed=5)
    scene = (s, [t[::2] for t in s.tiles])
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, scene[1]), scene)  # voxels in µm
    in_um = read_tileset(xml, pixel_size=1.0)
    in_nm = read_tileset(xml, pixel_size=1000, unit="nm")
    np.testing.assert_allclose(in_nm.affines, in_um.affines)  # the same resampling
    assert in_nm.pixel_size == (1000.0,) * 3 and in_nm.unit == "nanometer"
    out = tmp_path / "v.ome.zarr"
    fuse_cli(xml, out, "--pixel-size", 1000, "--unit", "nm")
    meta = ngff(out)["multiscales"][0]
    assert [a.get("unit") for a in meta["axes"]][-3:] == ["nanometer"] * 3
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"][-3:] == [1000.0] * 3


def test_unit_for_czi(tmp_path):
    czi = DATA / "czi_2tiles" / "mosaic_test.czi"
    if not czi.is_file():
        missing_real_data(czi)
    pytest.importorskip("czifile")
    ts = read_tileset(czi, pixel_size=240, unit="nm")
    assert ts.pixel_size == (240.0, 240.0) and ts.unit == "nanometer"
    assert read_tileset(czi).unit == "micrometer"


def test_mosaic_unit_is_checked_and_normalised():
    tiles = [np.zeros((8, 8), np.uint8)] * 2
    m = gpufusion.mosaic_from_positions(tiles, [(0, 0), (0, 6)], pixel_size=(1, 1), unit="nm")
    assert m.unit == "nanometer"
    with pytest.raises(InputError, match="banana.*not an NGFF space unit"):
        gpufusion.mosaic_from_positions(tiles, [(0, 0), (0, 6)], pixel_size=(1, 1),
                                        unit="banana")


# --- 2. channel names and colours ----------------------------------------------------------


def test_channel_names_and_colours_in_both_outputs(tmp_path):
    tiles = ome_tiles(tmp_path / "tiles", channels=2, names=["DAPI", "GFP"])
    zarr_out, tiff_out = tmp_path / "a.ome.zarr", tmp_path / "a.ome.tif"
    fuse_cli(tiles, zarr_out)
    fuse_cli(tiles, tiff_out)
    omero = ngff(zarr_out)["omero"]
    assert [c["label"] for c in omero["channels"]] == ["DAPI", "GFP"]
    assert [c["color"] for c in omero["channels"]] == ["00FF00", "FF00FF"]
    data = zarr.open_array(str(zarr_out / "0"), mode="r")[...]
    for k, channel in enumerate(omero["channels"]):
        window = channel["window"]
        assert window["min"] == 0 and window["max"] == 65535  # the dtype's range
        assert data[k].min() <= window["start"] < window["end"] <= data[k].max()
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(zarr_out)))()))
    assert node.metadata["channel_names"] == ["DAPI", "GFP"]
    model, _ = ome(tiff_out)
    channels = model.images[0].pixels.channels
    assert [c.name for c in channels] == ["DAPI", "GFP"]
    assert [c.color.as_rgb_tuple()[:3] for c in channels] == [(0, 255, 0), (255, 0, 255)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_api_channel_names_validated_and_written(tmp_path, version):
    syn = make_mosaic((1, 2), (48, 48), overlap=0.25, seed=2)
    channels = [syn.mosaic()] * 3
    with pytest.raises(InputError, match="channel_names.*2 name.*3 channel"):
        gpufusion.fuse_to_file(channels, tmp_path / "x.ome.zarr", channel_names=["a", "b"])
    out = gpufusion.fuse_to_file(channels, tmp_path / "a.ome.zarr", chunks=32,
                                 ngff_version=version, channel_names=["r", "g", "b"]).path
    attrs = zattrs(out)
    omero = (attrs["ome"] if version == "0.5" else attrs)["omero"]
    assert [c["label"] for c in omero["channels"]] == ["r", "g", "b"]
    assert [c["color"] for c in omero["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert ngff(out)["omero"] == omero  # validates


def test_single_channel_default_colour_is_white(tmp_path):
    syn = make_mosaic((1, 2), (48, 48), overlap=0.25, seed=2)
    out = gpufusion.fuse_to_file(syn.mosaic(), tmp_path / "a.ome.tif", chunks=32).path
    (channel,) = ome(out)[0].images[0].pixels.channels
    assert channel.color.as_rgb_tuple()[:3] == (255, 255, 255)


# --- 3. an unknown pixel size stays unknown -------------------------------------------------


def test_unknown_pixel_size_is_left_out(tmp_path):
    csv = plain_csv(tmp_path)
    fuse_cli(csv, tmp_path / "a.ome.tif")
    fuse_cli(csv, tmp_path / "a.ome.zarr")
    model, xml = ome(tmp_path / "a.ome.tif")
    pixels = model.images[0].pixels
    assert pixels.physical_size_x is None and pixels.physical_size_y is None
    assert "PhysicalSize" not in xml and "PositionXUnit" not in xml
    meta = ngff(tmp_path / "a.ome.zarr")["multiscales"][0]
    assert all("unit" not in a for a in meta["axes"])
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]


def test_api_mosaic_with_a_unit_but_no_pixel_size_writes_no_unit(tmp_path):
    tiles = [np.full((16, 16), 7, np.uint8)] * 2
    m = gpufusion.mosaic_from_positions(tiles, [(0, 0), (0, 12)], unit="micrometer")
    out = gpufusion.fuse_to_file(m, tmp_path / "a.ome.tif").path
    assert "PhysicalSize" not in ome(out)[1]


# --- 4. the pixel size through positions files ---------------------------------------------


def test_positions_comment_round_trip(tmp_path):
    syn = make_mosaic((1, 2), (48, 48), overlap=0.25, seed=2)
    for k, tile in enumerate(syn.tiles):
        tifffile.imwrite(tmp_path / f"t{k}.tif", tile)
    files = [tmp_path / "t0.tif", tmp_path / "t1.tif"]
    csv = write_positions_csv(tmp_path / "p.csv", syn.positions, files,
                              pixel_size=(0.25, 0.2405), unit="um")
    assert csv.read_text().splitlines()[0] == "# pixel_size (x, y): 0.2405 0.25 micrometer"
    table = read_positions(csv)
    assert table.pixel_size == (0.25, 0.2405) and table.unit == "micrometer"
    txt = tmp_path / "TileConfiguration.txt"
    comment = pixel_size_comment((2.0, 0.5, 0.5), "nm")
    assert comment == "# pixel_size (x, y, z): 0.5 0.5 2 nanometer"
    txt.write_text("dim = 2\n# pixel_size: 0.5 nm\nt0.tif; ; (0, 0)\nt1.tif; ; (36, 0)\n")
    table = read_positions(txt)
    assert table.pixel_size == (0.5, 0.5) and table.unit == "nanometer"
    out = tmp_path / "a.ome.zarr"
    fuse_cli(txt, out)
    meta = ngff(out)["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    assert meta["axes"][0]["unit"] == "nanometer"
    fuse_cli(csv, tmp_path / "b.ome.tif", "--pixel-size", 3)  # the command line wins
    assert ome(tmp_path / "b.ome.tif")[0].images[0].pixels.physical_size_x == 3.0


@pytest.mark.parametrize("line", ["# pixel_size (x, y): 1 2 3 micrometer",
                                  "# pixel_size: 1 banana", "# pixel_size: -1",
                                  "# pixel_size (y, x): 1 2"])
def test_bad_pixel_size_comment_names_the_line(tmp_path, line):
    csv = plain_csv(tmp_path)
    csv.write_text(line + "\n" + csv.read_text())
    with pytest.raises(InputError, match=rf"{csv.name}:1: .*pixel_size"):
        read_positions(csv)


def test_tiles_own_metadata_gives_the_pixel_size_when_all_agree(tmp_path):
    tiles = ome_tiles(tmp_path, sizes_um=(0.3, 0.3))
    csv = tmp_path / "p.csv"
    csv.write_text("file,x,y\ntile0.ome.tif,0,0\ntile1.ome.tif,48,0\n")
    ts = read_tileset(csv)
    assert ts.pixel_size == (0.3, 0.3) and ts.unit == "micrometer"
    tifffile.imwrite(tiles / "tile1.ome.tif", np.zeros((64, 64), np.uint16),
                     metadata={"axes": "YX", "PhysicalSizeX": 0.6, "PhysicalSizeY": 0.6})
    with pytest.warns(MetadataWarning, match="different pixel sizes"):
        assert read_tileset(csv).pixel_size is None
    tifffile.imwrite(tiles / "tile1.ome.tif", np.zeros((64, 64), np.uint16))  # no OME-XML
    with pytest.warns(MetadataWarning, match="1 of 2 tile files give a pixel size"):
        assert read_tileset(csv).pixel_size is None


def test_disagreeing_tiles_give_a_notice_and_no_pixel_size(tmp_path, capsys):
    tiles = ome_tiles(tmp_path, sizes_um=(0.3, 0.3))
    tifffile.imwrite(tiles / "tile1.ome.tif", np.zeros((64, 64), np.uint16),
                     metadata={"axes": "YX", "PhysicalSizeX": 0.6, "PhysicalSizeY": 0.6})
    csv = tmp_path / "p.csv"
    csv.write_text("file,x,y\ntile0.ome.tif,0,0\ntile1.ome.tif,48,0\n")
    assert cli("fuse", csv, "-o", tmp_path / "a.ome.tif", "--backend", "numpy") == 0
    assert "different pixel sizes" in capsys.readouterr().err
    assert ome(tmp_path / "a.ome.tif")[0].images[0].pixels.physical_size_x is None


def test_register_then_fuse_keeps_the_pixel_size(tmp_path):
    syn = make_mosaic((2, 2), (96, 96), overlap=0.25, stage_error=1.5, seed=4)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for k, (tile, (y, x)) in enumerate(zip(syn.tiles, syn.stage_positions, strict=True)):
        tifffile.imwrite(folder / f"tile{k}.ome.tif", tile,
                         metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                                   "Plane": {"PositionX": [x * 0.25], "PositionY": [y * 0.25]}})
    csv = tmp_path / "r.csv"
    assert cli("register", folder, "-o", csv, "--backend", "numpy", "-q") == 0
    assert csv.read_text().startswith("# pixel_size (x, y): 0.25 0.25 micrometer\n")
    csv.write_text(csv.read_text().split("\n", 1)[1])  # without the line: the tiles say it
    for out in (tmp_path / "a.ome.tif", tmp_path / "b.ome.tif"):
        fuse_cli(csv, out)
        assert ome(out)[0].images[0].pixels.physical_size_x == 0.25
    # a Fiji TileConfiguration output carries it too, as a comment line Fiji skips
    fiji = tmp_path / "TileConfiguration.registered.txt"
    assert cli("register", folder, "-o", fiji, "--backend", "numpy", "-q") == 0
    assert "# pixel_size (x, y): 0.25 0.25 micrometer" in fiji.read_text().splitlines()
    table = read_tile_configuration(fiji)
    assert table.pixel_size == (0.25, 0.25) and table.unit == "micrometer"


def test_real_leica_register_then_fuse_keeps_0_2405(tmp_path):
    folder = DATA / "leica_2tiles"
    if not folder.is_dir():
        missing_real_data(folder)
    csv = tmp_path / "r.csv"
    assert cli("register", folder, "-o", csv, "--backend", "numpy", "-q") == 0
    out = tmp_path / "leica.ome.tif"
    fuse_cli(csv, out)
    model, _ = ome(out)
    pixels = model.images[0].pixels
    assert pixels.physical_size_x == pytest.approx(0.2405, abs=1e-6)
    assert pixels.physical_size_x_unit.value == "µm"
    assert [c.name for c in pixels.channels] == ["C00", "C01"]


# --- 5. image name -------------------------------------------------------------------------


def test_image_name_after_the_input_or_name_option(tmp_path):
    tiles = ome_tiles(tmp_path / "leica_run")
    fuse_cli(tiles, tmp_path / "a.ome.zarr")
    assert ngff(tmp_path / "a.ome.zarr")["multiscales"][0]["name"] == "leica_run"
    fuse_cli(tiles, tmp_path / "b.ome.tif", "--name", "slide 7")
    assert ome(tmp_path / "b.ome.tif")[0].images[0].name == "slide 7"
    syn = make_mosaic((1, 2), (48, 48), overlap=0.25, seed=2)
    out = gpufusion.fuse_to_file(syn.mosaic(), tmp_path / "api.ome.zarr", chunks=32).path
    assert ngff(out)["multiscales"][0]["name"] == "api"
    out = gpufusion.fuse_to_file(syn.mosaic(), tmp_path / "n.ome.tif", name="mine").path
    assert ome(out)[0].images[0].name == "mine"


# --- 6. provenance -------------------------------------------------------------------------


def test_provenance_with_registration_in_both_outputs(tmp_path, monkeypatch):
    tiles = ome_tiles(tmp_path / "tiles", positions_um=((0, 0), (0, 12), (12, 0), (12, 12)))
    zarr_out, tiff_out = tmp_path / "a.ome.zarr", tmp_path / "a.ome.tif"
    argv = ["fuse", str(tiles), "-o", str(zarr_out), "--register", "--ngff", "0.5",
            "--backend", "numpy", "-q"]
    monkeypatch.setattr(sys, "argv", ["gpufusion", *argv])  # as the console script runs
    assert main() == 0
    zarr_0_4 = tmp_path / "b.ome.zarr"  # main(argv) records its argv, not the process's
    assert main(["fuse", str(tiles), "-o", str(zarr_0_4), "-q"]) == 0
    assert zattrs(zarr_0_4)["gpufusion"]["command"] == shlex.join(
        ["gpufusion", "fuse", str(tiles), "-o", str(zarr_0_4), "-q"])
    attrs = zattrs(zarr_out)
    ngff(zarr_out)  # the free attribute beside "ome" keeps the metadata valid
    record = attrs["gpufusion"]
    assert record["version"] == gpufusion.__version__
    assert record["command"] == shlex.join(["gpufusion", *argv])
    assert record["input"] == str(tiles.absolute())
    assert record["parameters"]["blend"] == "linear" and record["tiles"] == 4
    registration = record["registration"]
    assert registration["tiles"] == 4 and registration["pairs"] >= 4
    assert registration["kept"] + sum(registration["dropped"].values()) == registration["pairs"]
    assert isinstance(registration["advice"], list)  # the summary's notes, in words
    assert {"read", "pairwise", "solve", "quality"} <= set(registration["seconds"])
    fuse_cli(tiles, tiff_out, "--register")
    model, _ = ome(tiff_out)
    (annotation,) = model.structured_annotations.map_annotations
    assert annotation.namespace == "gpufusion"
    values = dict(annotation.value)
    assert values["version"] == gpufusion.__version__ and "fuse" in values["command"]
    assert json.loads(values["registration"])["tiles"] == 4
    assert model.images[0].annotation_refs[0].id == annotation.id


def test_api_provenance(tmp_path):
    syn = make_mosaic((1, 2), (48, 48), overlap=0.25, seed=2)
    out = gpufusion.fuse_to_file(syn.mosaic(), tmp_path / "a.ome.zarr", chunks=32,
                                 blend="cosine", provenance={"experiment": "e1"}).path
    record = zattrs(out)["gpufusion"]
    assert record["call"] == "gpufusion.fuse_to_file" and record["experiment"] == "e1"
    assert record["parameters"]["blend"] == "cosine" and record["parameters"]["chunks"] == 32
