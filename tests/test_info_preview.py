"""``gpufusion info`` on the OME-TIFF ``fuse`` writes, and ``info --preview`` thumbnails.

Every image here is a real ``gpufusion fuse`` output of tiles cut at integer positions from
a known picture (so the fused image is that picture); levels, shapes and pixel sizes are
checked against tifffile and the OME-XML read independently, previews by reading the PNG
back with Pillow.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from gpufusion.cli import main
from gpufusion.preview import DEFAULT_COLORS

#: The bright square of every test picture, (y0, y1, x0, x1) in level-0 pixels.
SQUARE = (100, 250, 200, 400)
#: A second square (channel 1 only in the two-channel picture).
SQUARE_B = (450, 600, 700, 900)
#: Full picture (y, x); 2x2 tiles of TILE with overlap. Longer than 2 TIFF tiles (512) on x,
#: so the OME-TIFF pyramid has 3 levels: 700x1100, 350x550, 175x275.
SHAPE = (700, 1100)
TILE = (400, 600)


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _picture(squares: list[tuple[int, int, int, int]], depth: int | None = None,
             seed: int = 0) -> np.ndarray:
    """Dim noise (0..99) with bright squares (4000); 3D: the squares only in plane 1."""
    rng = np.random.default_rng(seed)
    plane = rng.integers(0, 100, SHAPE, dtype=np.uint16)
    if depth is None:
        for y0, y1, x0, x1 in squares:
            plane[y0:y1, x0:x1] = 4000
        return plane
    volume = np.repeat(plane[None], depth, axis=0)
    for y0, y1, x0, x1 in squares:
        volume[1, y0:y1, x0:x1] = 4000
    return volume


def _write_tiles(folder: Path, channels: list[np.ndarray]) -> Path:
    """Cut each channel's picture into 2x2 overlapping tiles; one CSV lists them all."""
    ndim = channels[0].ndim
    header = "file,x,y" + (",z" if ndim == 3 else "") + (",channel" if len(channels) > 1 else "")
    rows = [header]
    starts = [(y, x) for y in (0, SHAPE[0] - TILE[0]) for x in (0, SHAPE[1] - TILE[1])]
    for c, picture in enumerate(channels):
        for k, (y, x) in enumerate(starts):
            name = f"c{c}_t{k}.tif"
            tile = picture[..., y:y + TILE[0], x:x + TILE[1]]
            tifffile.imwrite(folder / name, np.ascontiguousarray(tile), photometric="minisblack")
            row = f"{name},{x},{y}" + (",0" if ndim == 3 else "")
            rows.append(row + (f",C{c:02d}" if len(channels) > 1 else ""))
    (folder / "pos.csv").write_text("\n".join(rows) + "\n")
    return folder / "pos.csv"


def _fuse(tmp_path: Path, channels: list[np.ndarray], out_name: str, capsys,
          *extra: str) -> Path:
    tiles = tmp_path / "tiles"
    tiles.mkdir(exist_ok=True)
    csv = _write_tiles(tiles, channels)
    out = tmp_path / out_name
    code, _, err = run_cli(["fuse", csv, "-o", out, "--backend", "numpy", "-q", *extra], capsys)
    assert code == 0, err
    return out


def _level_rows(text: str) -> list[list[str]]:
    """The rows of the level table ``info`` prints, split on runs of two spaces."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line.split()[:2] == ["level", "shape"])
    return [[cell.strip() for cell in line.strip().split("  ") if cell.strip()]
            for line in lines[start + 1:] if line.strip()[:1].isdigit()]


def _ome_pixels(path: Path) -> ET.Element:
    with tifffile.TiffFile(path) as tif:
        root = ET.fromstring(tif.ome_metadata)
    return next(e for e in root.iter() if e.tag.endswith("}Pixels"))


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        return np.asarray(picture)


@pytest.fixture(scope="module")
def tiff_2d(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiff2d")
    tiles = tmp / "tiles"
    tiles.mkdir()
    csv = _write_tiles(tiles, [_picture([SQUARE])])
    out = tmp / "slide.ome.tif"
    assert main(["fuse", str(csv), "-o", str(out), "--backend", "numpy", "-q",
                 "--pixel-size", "0.25"]) == 0
    return out


# ------------------------------------------------------------------------------- info


def test_info_describes_a_fused_ome_tiff(tiff_2d: Path, capsys) -> None:
    """Today's main treats it as an input tile set; now it is described as an image."""
    code, out, err = run_cli(["info", tiff_2d], capsys)
    assert code == 0, err
    with tifffile.TiffFile(tiff_2d) as tif:
        levels = [tuple(level.shape) for level in tif.series[0].levels]
        tiles = [(level.keyframe.tilelength, level.keyframe.tilewidth)
                 for level in tif.series[0].levels]
        assert tif.pages[0].software.startswith("gpufusion")
    assert levels[0] == SHAPE and len(levels) == 3
    rows = _level_rows(out)
    assert [row[0] for row in rows] == [str(k) for k in range(len(levels))]
    assert [row[1] for row in rows] == [" x ".join(map(str, s)) for s in levels]
    assert [row[2] for row in rows] == [f"{t[0]} x {t[1]}" for t in tiles]
    assert all(row[3] == "uint16" for row in rows)
    pixels = _ome_pixels(tiff_2d)
    size = float(pixels.get("PhysicalSizeX"))
    assert size == 0.25 and pixels.get("PhysicalSizeXUnit", "µm") == "µm"
    assert f"pixel size: {size:g} x {size:g} micrometer (y, x)" in out
    assert [row[-1] for row in rows] == [f"{size * 2**k:g} x {size * 2**k:g}"
                                         for k in range(3)]
    assert "written by gpufusion" in out and "OME-TIFF" in out
    assert "compression: zlib" in out
    assert "axes: y (space, micrometer), x (space, micrometer)" in out
    assert "tiles:" not in out  # not the input tile-set summary


def test_info_two_channels_and_3d(tmp_path: Path, capsys) -> None:
    two = _fuse(tmp_path, [_picture([SQUARE]), _picture([SQUARE_B], seed=1)], "two.ome.tif",
                capsys)
    code, out, err = run_cli(["info", two], capsys)
    assert code == 0, err
    with tifffile.TiffFile(two) as tif:
        levels = [tuple(level.shape) for level in tif.series[0].levels]
        assert tif.series[0].axes == "CYX"
    names = [c.get("Name") for c in _ome_pixels(two) if c.tag.endswith("}Channel")]
    assert levels[0] == (2, *SHAPE)
    assert [row[1] for row in _level_rows(out)] == [" x ".join(map(str, s)) for s in levels]
    shown = [n if n else f"channel {k}" for k, n in enumerate(names or [None, None])]
    assert f"channels: 2 ({', '.join(shown)})" in out
    assert "axes: c (channel), y (space" in out

    (tmp_path / "tiles").rename(tmp_path / "tiles2d")
    vol = _fuse(tmp_path, [_picture([SQUARE], depth=3)], "vol.ome.tif", capsys,
                "--pixel-size", "0.5")
    code, out, err = run_cli(["info", vol], capsys)
    assert code == 0, err
    with tifffile.TiffFile(vol) as tif:
        levels = [tuple(level.shape) for level in tif.series[0].levels]
    assert levels[0] == (3, *SHAPE) and len(levels) == 3
    assert [level[0] for level in levels] == [3, 3, 3]  # OME-TIFF levels keep every plane
    assert [row[1] for row in _level_rows(out)] == [" x ".join(map(str, s)) for s in levels]
    assert "axes: z (space, micrometer), y (space, micrometer), x (space, micrometer)" in out


def test_info_of_a_two_channel_ome_zarr_names_its_channels(tmp_path: Path, capsys) -> None:
    two = _fuse(tmp_path, [_picture([SQUARE]), _picture([SQUARE_B], seed=1)], "two.ome.zarr",
                capsys)
    code, out, err = run_cli(["info", two], capsys)
    assert code == 0, err
    omero = zarr.open_group(str(two), mode="r").attrs["omero"]["channels"]  # read directly
    shown = ", ".join(f"{c['label']} (#{c['color']})" for c in omero)
    assert len(omero) == 2 and f"channels: {shown}" in out


def test_info_of_a_tile_ome_tiff_is_still_the_input_summary(tmp_path: Path, capsys) -> None:
    tile = tmp_path / "tile.ome.tif"
    tifffile.imwrite(tile, np.zeros((32, 32), np.uint16),
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                               "Plane": {"PositionX": [0.0], "PositionY": [0.0]}})
    code, out, err = run_cli(["info", tile], capsys)
    assert code == 0, err
    assert "tiles: 1" in out and "level" not in out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pixels"])
def test_damaged_ome_tiff_is_a_one_line_error_and_no_png(tiff_2d: Path, tmp_path: Path,
                                                         capsys, damage: str) -> None:
    data = bytearray(tiff_2d.read_bytes())
    if damage == "garbage":
        data = bytearray(b"not a tiff at all" * 10)
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # every tile's start zeroed: headers intact, pixel data undecodable
        for offset in range(len(data) // 10, len(data) * 9 // 10, 4096):
            data[offset:offset + 64] = bytes(64)
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(bytes(data))
    png = tmp_path / "bad.png"
    code, _, err = run_cli(["info", bad, "--preview", png], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(bad) in err
    assert not png.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.ome.tif"]  # no temporary PNG left


# ---------------------------------------------------------------------------- preview


def test_preview_of_ome_tiff(tiff_2d: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "p.png"
    code, out, err = run_cli(["info", tiff_2d, "--preview", png], capsys)
    assert code == 0, err
    assert f"preview: {png}" in out
    rgb = _read_png(png)
    with tifffile.TiffFile(tiff_2d) as tif:
        level1 = tif.series[0].levels[1].shape
    # the smallest level whose long side is still >= 512: level 1 (350 x 550)
    assert rgb.shape == (*level1, 3) and rgb.dtype == np.uint8
    y0, y1, x0, x1 = (v // 2 for v in SQUARE)
    assert rgb[y0 + 5:y1 - 5, x0 + 5:x1 - 5].min() == 255  # the bright square: white
    assert rgb[300:, 300:].mean() < 10  # dim noise, far from it: dark
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()  # grey


def test_preview_fits_max_size(tiff_2d: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "small.png"
    code, _, err = run_cli(["info", tiff_2d, "--preview", png, "--preview-size", "200"], capsys)
    assert code == 0, err
    rgb = _read_png(png)
    assert max(rgb.shape[:2]) <= 200 and rgb.shape[2] == 3
    # bright square still bright: block means of the level that fits
    factor = SHAPE[1] / rgb.shape[1]
    cy, cx = ((SQUARE[0] + SQUARE[1]) / 2 / factor, (SQUARE[2] + SQUARE[3]) / 2 / factor)
    assert rgb[int(cy), int(cx)].min() >= 250
    code, _, err = run_cli(["info", tiff_2d, "--preview", tmp_path / "t.png",
                            "--preview-size", "8"], capsys)
    assert code == 2 and "--preview-size" in err and not (tmp_path / "t.png").exists()


def _expected_colors(n: int, given: list) -> list[np.ndarray]:
    return [np.array(given[k] if k < len(given) and given[k] else DEFAULT_COLORS[k])
            for k in range(n)]


def _zarr_colors(path: Path) -> list:
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    omero = attrs.get("ome", attrs).get("omero", {})
    return [tuple(int(c["color"][i:i + 2], 16) for i in (0, 2, 4)) if "color" in c else None
            for c in omero.get("channels", [])]


def _tiff_colors(path: Path) -> list:
    colors = []
    for channel in (c for c in _ome_pixels(path) if c.tag.endswith("}Channel")):
        value = channel.get("Color")
        v = int(value) & 0xFFFFFFFF if value is not None else None
        colors.append(None if v is None else ((v >> 24) & 255, (v >> 16) & 255, (v >> 8) & 255))
    return colors


@pytest.mark.parametrize("output", ["two.ome.tif", "two-04.ome.zarr", "two-05.ome.zarr"])
def test_preview_colours_two_channels(tmp_path: Path, capsys, output: str) -> None:
    extra = ["--ngff", "0.5"] if "05" in output else []
    out = _fuse(tmp_path, [_picture([SQUARE]), _picture([SQUARE_B], seed=1)], output, capsys,
                *extra)
    png = tmp_path / "two.png"
    code, _, err = run_cli(["info", out, "--preview", png], capsys)
    assert code == 0, err
    rgb = _read_png(png).astype(int)
    colors = _expected_colors(2, _tiff_colors(out) if output.endswith(".tif")
                              else _zarr_colors(out))
    scale = SHAPE[1] / rgb.shape[1]
    for (y0, y1, x0, x1), color in zip([SQUARE, SQUARE_B], colors, strict=True):
        cy, cx = int((y0 + y1) / 2 / scale), int((x0 + x1) / 2 / scale)
        np.testing.assert_allclose(rgb[cy, cx], color, atol=8)  # one channel's colour there
    if not any(_tiff_colors(out) if output.endswith(".tif") else _zarr_colors(out)):
        g = rgb[int(175 / scale), int(300 / scale)]
        assert g[1] > 240 and g[0] < 20 and g[2] < 20  # channel 0 alone: green
        m = rgb[int(525 / scale), int(800 / scale)]
        assert m[0] > 240 and m[2] > 240 and m[1] < 20  # channel 1 alone: magenta


def test_preview_3d_is_a_maximum_projection(tmp_path: Path, capsys) -> None:
    vol = _fuse(tmp_path, [_picture([SQUARE], depth=3)], "vol.ome.zarr", capsys,
                "--ngff", "0.5")
    png = tmp_path / "vol.png"
    code, _, err = run_cli(["info", vol, "--preview", png], capsys)
    assert code == 0, err
    rgb = _read_png(png)
    assert max(rgb.shape[:2]) <= 1024
    scale = SHAPE[1] / rgb.shape[1]
    # the square lies in plane 1 only: the projection shows it
    assert rgb[int(175 / scale), int(300 / scale)].min() >= 250
    assert rgb[int(600 / scale), int(1000 / scale)].max() <= 10


def test_preview_to_an_existing_file_needs_overwrite(tiff_2d: Path, tmp_path: Path,
                                                     capsys) -> None:
    png = tmp_path / "p.png"
    png.write_bytes(b"keep me")
    code, _, err = run_cli(["info", tiff_2d, "--preview", png], capsys)
    assert code == 2 and "--overwrite" in err and str(png) in err
    assert png.read_bytes() == b"keep me"
    code, _, err = run_cli(["info", tiff_2d, "--preview", png, "--overwrite"], capsys)
    assert code == 0, err
    assert _read_png(png).shape[2] == 3


@pytest.mark.parametrize("target", ["p.jpg", "inside"])
def test_preview_target_is_checked_before_work(tiff_2d: Path, tmp_path: Path, capsys,
                                               target: str) -> None:
    zarr_out = tmp_path / "img.ome.zarr"
    png = tmp_path / "p.jpg" if target == "p.jpg" else zarr_out / "p.png"
    image = tiff_2d if target == "p.jpg" else zarr_out
    if target == "inside":
        zarr_out.mkdir()
    code, out, err = run_cli(["info", image, "--preview", png], capsys)
    assert code == 2 and "--preview" in err and out == ""
    assert not png.exists()


def test_preview_refuses_an_input_tile_set(tmp_path: Path, capsys) -> None:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    csv = _write_tiles(tiles, [_picture([SQUARE])])
    code, _, err = run_cli(["info", csv, "--preview", tmp_path / "p.png"], capsys)
    assert code == 2 and "not an image" in err
    assert not (tmp_path / "p.png").exists()


def test_preview_of_a_damaged_zarr_chunk_leaves_no_png(tmp_path: Path, capsys) -> None:
    out = _fuse(tmp_path, [_picture([SQUARE])], "img.ome.zarr", capsys)
    # damage every chunk file of every level
    for chunk in (p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.name != "zarr.json"):
        chunk.write_bytes(b"\x00garbage")
    png = tmp_path / "p.png"
    code, _, err = run_cli(["info", out, "--preview", png], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(out) in err
    assert not png.exists() and not list(tmp_path.glob(".p.png*"))


def test_demo_writes_and_prints_a_preview(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["demo", "--out", tmp_path, "--tiles", "2x2", "--tile", "128"],
                             capsys)
    assert code == 0, err
    png = tmp_path / "demo.png"
    assert f"preview: {png}" in out
    rgb = _read_png(png)
    fused = zarr.open_array(str(tmp_path / "demo.ome.zarr" / "0"), mode="r").shape
    assert rgb.shape == (*fused, 3)  # smaller than 512: level 0 as it is
    assert rgb.max() == 255 and rgb.min() == 0  # stretched over the full range


def _rgba(r: int, g: int, b: int) -> int:
    """OME ``Color``: RGBA packed into a signed 32-bit integer."""
    value = (r << 24) | (g << 16) | (b << 8) | 255
    return value - (1 << 32) if value >= 1 << 31 else value


def test_other_pyramidal_ome_tiff_with_channel_colours(tmp_path: Path, capsys) -> None:
    """Any pyramidal OME-TIFF is an image; its OME ``Channel Color`` colours the preview."""
    data = np.zeros((2, 256, 320), np.uint8)
    data[0, :64, :64] = 200
    data[1, -64:, -64:] = 90
    path = tmp_path / "scanner.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(data, subifds=1, tile=(64, 64), photometric="minisblack",
                  metadata={"axes": "CYX", "Channel": {"Name": ["red", "blue"],
                                                       "Color": [_rgba(255, 0, 0),
                                                                 _rgba(0, 0, 255)]}})
        tif.write(data[:, ::2, ::2], subfiletype=1, tile=(64, 64), photometric="minisblack")
    png = tmp_path / "scanner.png"
    code, out, err = run_cli(["info", path, "--preview", png], capsys)
    assert code == 0, err
    assert "not by gpufusion" in out and "channels: 2 (red, blue)" in out
    assert [row[1] for row in _level_rows(out)] == ["2 x 256 x 320", "2 x 128 x 160"]
    assert "pixel size: not given" in out
    rgb = _read_png(png)
    assert rgb.shape == (256, 320, 3)  # both levels are under 512: level 0
    assert rgb[10, 10].tolist() == [255, 0, 0] and rgb[-10, -10].tolist() == [0, 0, 255]
    assert rgb[128, 160].tolist() == [0, 0, 0]


def test_hostile_ome_xml_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bomb.ome.tif"
    xml = ('<?xml version="1.0"?><!DOCTYPE OME [<!ENTITY a "aaaaaaaaaa">'
           '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
           '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">&b;</OME>')
    tifffile.imwrite(path, np.zeros((32, 32), np.uint8), description=xml, software="gpufusion",
                     metadata=None)
    code, _, err = run_cli(["info", path], capsys)
    assert code == 2 and "entity declarations are not allowed" in err and str(path) in err


def test_preview_of_a_pyramidal_rgb_tiff(tmp_path: Path, capsys) -> None:
    """Samples (RGB pixels) are shown as red, green and blue channels."""
    data = np.zeros((256, 320, 3), np.uint8)
    data[:64, :64, 0] = 250
    data[-64:, -64:, 2] = 250
    data[100:150, 100:150] = 250
    path = tmp_path / "rgb.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, subifds=1, tile=(64, 64), photometric="rgb")
        tif.write(data[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    png = tmp_path / "rgb.png"
    code, out, err = run_cli(["info", path, "--preview", png], capsys)
    assert code == 0, err
    assert [row[1] for row in _level_rows(out)] == ["256 x 320 x 3", "128 x 160 x 3"]
    rgb = _read_png(png)
    assert rgb.shape == (256, 320, 3)
    assert rgb[10, 10].tolist() == [255, 0, 0] and rgb[-10, -10].tolist() == [0, 0, 255]
    assert rgb[120, 120].tolist() == [255, 255, 255] and rgb[200, 20].tolist() == [0, 0, 0]
