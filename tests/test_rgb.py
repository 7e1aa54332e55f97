"""RGB and RGBA tiles (issue #13, "RGB tiles").

A colour specimen with exact ground truth is cut into overlapping RGB tiles, written as TIFF
(samples interleaved or planar, stripped or tiled, 8 and 16 bit, JPEG-compressed scanner
style), PNG (RGB and RGBA) and JPEG, and fused per channel with the same transforms. The
outputs are read back with independent readers: zarr, ome-zarr-models and ome-zarr-py
(the napari OME-Zarr reader) for OME-Zarr, tifffile and ome-types for the OME-TIFF.
Registration on the luminance is compared with registering the gray version of the same
mosaic (``skimage.color.rgb2gray``). Bad input: RGB mixed with gray tiles, unsupported
sample counts and colour models, exit 2 with one line naming the file.
"""

from __future__ import annotations

import csv
import pickle
import re
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import ome_types
import pytest
import tifffile
import zarr

from gpufusion.cli import main
from gpufusion.errors import InputError
from gpufusion.pipeline import fuse_to_file
from gpufusion.readers.detect import read_tileset
from gpufusion.readers.rgb import LuminanceSource, SampleSource, open_tile_channels
from gpufusion.synthetic import Specimen, make_mosaic

from .conftest import DATA, missing_real_data

TILE = (72, 80)  # y, x
STEP = (56, 60)  # 16 and 20 px overlaps
GRID = (2, 3)


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def colour_truth(shape: tuple[int, int], dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """A colour specimen ``(y, x, 3)``: a shared structure (the stain) plus per-channel
    texture, in 5 %..95 % of the dtype's range."""
    hi = np.iinfo(dtype).max
    shared = Specimen.random(2, lo=0.0, hi=1.0, seed=seed).sample((0, 0), shape)
    planes = []
    for c, weight in enumerate((0.5, 0.8, 0.3)):
        own = Specimen.random(2, lo=0.0, hi=1.0, seed=seed + 11 + c).sample((0, 0), shape)
        planes.append((0.05 + 0.9 * (weight * shared + (1 - weight) * own)) * hi)
    return np.rint(np.stack(planes, axis=-1)).astype(dtype)


def grid_positions() -> list[tuple[int, int]]:
    return [(r * STEP[0], c * STEP[1]) for r in range(GRID[0]) for c in range(GRID[1])]


def mosaic_shape() -> tuple[int, int]:
    return ((GRID[0] - 1) * STEP[0] + TILE[0], (GRID[1] - 1) * STEP[1] + TILE[1])


def write(path: Path, tile: np.ndarray, kind: str) -> None:
    """Write one ``(y, x, 3)`` tile as ``kind``."""
    if kind == "tiff":
        tifffile.imwrite(path, tile, photometric="rgb")
    elif kind == "tiff-planar":
        tifffile.imwrite(path, np.moveaxis(tile, -1, 0), photometric="rgb",
                         planarconfig="separate")
    elif kind == "tiff-tiled":  # scanner style: tiled, compressed
        tifffile.imwrite(path, tile, photometric="rgb", tile=(32, 32), compression="zlib")
    elif kind == "tiff-jpeg":  # scanner style: tiled JPEG (YCbCr)
        tifffile.imwrite(path, tile, photometric="rgb", tile=(32, 32), compression="jpeg")
    elif kind == "tiff-rgba":
        alpha = np.random.default_rng(1).integers(0, 256, tile.shape[:2], np.uint8)
        tifffile.imwrite(path, np.dstack([tile, alpha.astype(tile.dtype)]), photometric="rgb",
                         extrasamples=["unassalpha"])
    elif kind == "png-rgba":
        alpha = np.random.default_rng(1).integers(0, 256, tile.shape[:2], np.uint8)
        iio.imwrite(path, np.dstack([tile, alpha]))
    else:  # png, jpg
        iio.imwrite(path, tile, **({"quality": 90} if kind == "jpg" else {}))


SUFFIX = {"png": ".png", "png-rgba": ".png", "jpg": ".jpg"}


def write_tiles(folder: Path, truth: np.ndarray, kind: str, name: str = "pos.csv") -> Path:
    """Cut ``truth`` into the grid's tiles, write them as ``kind`` and a positions CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file,x,y"]
    for k, (y, x) in enumerate(grid_positions()):
        file = f"t{k}{SUFFIX.get(kind, '.tif')}"
        write(folder / file, truth[y:y + TILE[0], x:x + TILE[1]], kind)
        lines.append(f"{file},{x},{y}")
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def ngff_checked(out: Path) -> dict:
    """The OME-Zarr attributes, after validating them with ome-zarr-models."""
    from ome_zarr_models.v04 import Image as ImageV04

    group = zarr.open_group(str(out), mode="r")
    ImageV04.from_zarr(group)
    return dict(group.attrs)


def ome_checked(path: Path) -> ome_types.OME:
    with tifffile.TiffFile(path) as tif:
        return ome_types.from_xml(tif.ome_metadata, validate=True)


# --- reading and fusing -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiff", "tiff-planar", "tiff-tiled", "tiff-rgba", "png",
                                  "png-rgba"])
def test_rgb_tiles_fuse_to_the_truth_per_channel(tmp_path, kind):
    truth = colour_truth(mosaic_shape())
    csv_path = write_tiles(tmp_path / "tiles", truth, kind)
    tiles = read_tileset(csv_path)
    assert tiles.rgb and tiles.channel_names == ["R", "G", "B"] and tiles.n_tiles == 6
    out = tmp_path / "o.ome.zarr"
    assert cli("fuse", csv_path, "-o", out, "--backend", "numpy", "-q") == 0
    fused = zarr.open_array(str(out / "0"), mode="r")[...]
    assert fused.shape == (3, *mosaic_shape()) and fused.dtype == np.uint8
    # integer positions: every pixel is a copy of the truth, or a blend of equal copies;
    # the alpha of RGBA tiles is ignored (random here) and changes nothing
    np.testing.assert_array_equal(fused, np.moveaxis(truth, -1, 0))


def test_sixteen_bit_rgb_tiff_keeps_sixteen_bits(tmp_path):
    truth = colour_truth(mosaic_shape(), "uint16", seed=3)
    assert truth.max() > 255
    csv_path = write_tiles(tmp_path / "tiles", truth, "tiff-planar")
    out = tmp_path / "o.ome.tif"
    assert cli("fuse", csv_path, "-o", out, "--backend", "numpy", "-q") == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.RGB
        assert tif.pages.first.bitspersample == 16
        np.testing.assert_array_equal(tif.series[0].asarray(), truth)


@pytest.mark.parametrize("kind", ["jpg", "tiff-jpeg"])
def test_jpeg_tiles_match_their_decoded_pixels(tmp_path, kind):
    truth = colour_truth(mosaic_shape(), seed=5)
    csv_path = write_tiles(tmp_path / "tiles", truth, kind)
    out = tmp_path / "o.ome.zarr"
    assert cli("fuse", csv_path, "-o", out, "--backend", "numpy", "-q") == 0
    fused = np.moveaxis(zarr.open_array(str(out / "0"), mode="r")[...], 0, -1).astype(int)
    # lossy: near the truth, and exactly each tile's own decoded pixels where only it covers
    assert np.abs(fused - truth).mean() < 3
    count = np.zeros(mosaic_shape(), int)
    for y, x in grid_positions():
        count[y:y + TILE[0], x:x + TILE[1]] += 1
    for k, (y, x) in enumerate(grid_positions()):
        file = tmp_path / "tiles" / f"t{k}{SUFFIX.get(kind, '.tif')}"
        decoded = tifffile.imread(file) if kind == "tiff-jpeg" else iio.imread(file)
        alone = count[y:y + TILE[0], x:x + TILE[1]] == 1
        np.testing.assert_array_equal(fused[y:y + TILE[0], x:x + TILE[1]][alone],
                                      decoded[alone])


def test_sample_sources_are_lazy_picklable_and_share_one_decode(tmp_path):
    from gpufusion.readers.images import clear_tile_cache, tile_cache_info

    tile = colour_truth(TILE)
    write(tmp_path / "t.tif", tile, "tiff-tiled")
    clear_tile_cache()
    channels = open_tile_channels(tmp_path / "t.tif")
    assert [type(c) for c in channels] == [SampleSource] * 3
    assert tile_cache_info().misses == 0  # opening reads the header only
    for c, source in enumerate(channels):
        copy = pickle.loads(pickle.dumps(source))
        np.testing.assert_array_equal(copy.read((slice(3, 9), slice(0, 80, 7))),
                                      tile[3:9, 0:80:7, c])
    assert tile_cache_info().misses == 1  # one decode for the three channels


def test_luminance_is_bt709_as_skimage_computes_it(tmp_path):
    from skimage.color import rgb2gray

    tile = colour_truth(TILE, seed=2)
    write(tmp_path / "t.png", tile, "png")
    lum = LuminanceSource(open_tile_channels(tmp_path / "t.png"), "t")
    window = (slice(5, 40), slice(10, 70))
    np.testing.assert_allclose(lum.read(window) / 255.0, rgb2gray(tile)[window], atol=1e-5)


# --- outputs ------------------------------------------------------------------------------


def test_ome_zarr_has_a_c_axis_of_three_coloured_red_green_blue(tmp_path):
    truth = colour_truth(mosaic_shape())
    csv_path = write_tiles(tmp_path / "tiles", truth, "png")
    out = tmp_path / "o.ome.zarr"
    assert cli("fuse", csv_path, "-o", out, "--backend", "numpy", "-q") == 0
    attrs = ngff_checked(out)
    axes = attrs["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["c", "y", "x"] and axes[0]["type"] == "channel"
    channels = attrs["omero"]["channels"]
    assert [c["label"] for c in channels] == ["R", "G", "B"]
    assert [c["color"] for c in channels] == ["FF0000", "00FF00", "0000FF"]
    # true colour: every channel shown over the dtype's whole range, balance kept
    assert all((c["window"]["start"], c["window"]["end"]) == (0, 255) for c in channels)
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(iter(Reader(parse_url(str(out)))()))  # what napari-ome-zarr reads
    assert node.metadata["channel_names"] == ["R", "G", "B"]
    assert [m[-1] for m in node.metadata["colormap"]] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    np.testing.assert_array_equal(np.asarray(node.data[0]), np.moveaxis(truth, -1, 0))


def test_ome_tiff_is_interleaved_rgb_at_every_level(tmp_path):
    # large enough for two pyramid levels of 512 px TIFF tiles
    global_shape = (600, 560)
    truth = colour_truth(global_shape, seed=7)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    half = (global_shape[0] // 2 + 20, global_shape[1] // 2 + 20)
    lines = ["file,x,y"]
    for k, (y, x) in enumerate([(0, 0), (0, global_shape[1] - half[1]),
                                (global_shape[0] - half[0], 0),
                                (global_shape[0] - half[0], global_shape[1] - half[1])]):
        write(tiles / f"t{k}.tif", truth[y:y + half[0], x:x + half[1]], "tiff")
        lines.append(f"t{k}.tif,{x},{y}")
    (tiles / "pos.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.ome.tif"
    assert cli("fuse", tiles / "pos.csv", "-o", out, "--backend", "numpy", "-q",
               "--pixel-size", 0.25) == 0
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.axes == "YXS" and len(series.levels) == 2
        for k, level in enumerate(series.levels):
            page = level.keyframe
            assert page.photometric == tifffile.PHOTOMETRIC.RGB
            assert page.samplesperpixel == 3
            assert page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            assert level.shape == (global_shape[0] >> k, global_shape[1] >> k, 3)
        level0, level1 = (level.asarray() for level in series.levels)
    np.testing.assert_array_equal(level0, truth)
    means = truth.reshape(300, 2, 280, 2, 3).mean(axis=(1, 3))  # the 2x mean pyramid
    assert np.abs(level1 - means).max() <= 0.5
    model = ome_checked(out)  # schema-valid OME-XML
    pixels = model.images[0].pixels
    assert pixels.size_c == 3 and pixels.interleaved is True
    assert [c.samples_per_pixel for c in pixels.channels] == [3]
    assert pixels.physical_size_x == 0.25
    assert cli("info", out) == 0


def test_info_says_rgb(tmp_path, capsys):
    truth = colour_truth(mosaic_shape())
    csv_path = write_tiles(tmp_path / "tiles", truth, "png")
    capsys.readouterr()
    assert cli("info", csv_path) == 0
    assert "channels: 3 (R, G, B): RGB colour tiles" in capsys.readouterr().out
    out = tmp_path / "o.ome.tif"
    assert cli("fuse", csv_path, "-o", out, "--backend", "numpy", "-q") == 0
    assert cli("info", out, "--preview", tmp_path / "p.png") == 0
    text = capsys.readouterr().out
    assert "channels: 3 (R, G, B): RGB colour, interleaved" in text
    preview = iio.imread(tmp_path / "p.png")
    assert preview.shape == (*mosaic_shape(), 3)
    # colour, not gray: the channels differ as the truth's do
    assert np.abs(preview[..., 0].astype(int) - preview[..., 1]).mean() > 5


def test_rgb_3d_stack_writes_one_rgb_page_per_plane(tmp_path):
    from gpufusion.writers.ome_tiff import write_ome_tiff

    data = np.random.default_rng(0).integers(0, 256, (3, 2, 40, 50), np.uint8)
    out = write_ome_tiff(data, tmp_path / "z.ome.tif", axes=["c", "z", "y", "x"], tile=16,
                         rgb=True, pixel_size=[2.0, 0.5, 0.5], unit="um",
                         origin=[0.0, 0.0, 0.0])
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.axes == "ZYXS" and len(tif.pages) == 2
        pages = [tif.pages[k].aspage() for k in range(2)]  # TiffPage objects, with their tags
        assert all(p.photometric == tifffile.PHOTOMETRIC.RGB for p in pages)
        np.testing.assert_array_equal(series.asarray(), np.moveaxis(data, 0, -1))
        assert [lv.shape for lv in series.levels][-1] == (2, 10, 13, 3)
    pixels = ome_checked(out).images[0].pixels
    assert pixels.size_z == 2 and pixels.channels[0].samples_per_pixel == 3
    with pytest.raises(InputError, match="rgb: needs a c axis of 3"):
        write_ome_tiff(data[:2], tmp_path / "bad.ome.tif", axes=["c", "z", "y", "x"], rgb=True)


def test_three_gray_channels_stay_three_separate_channels(tmp_path, capsys):
    # 3 channels in separate gray files are not RGB, even when named R, G, B
    truth = colour_truth(mosaic_shape())
    lines = ["file,x,y,channel"]
    for c, name in enumerate(["R", "G", "B"]):
        for k, (y, x) in enumerate(grid_positions()):
            tifffile.imwrite(tmp_path / f"c{c}t{k}.tif", truth[y:y + TILE[0], x:x + TILE[1], c])
            lines.append(f"c{c}t{k}.tif,{x},{y},{name}")
    (tmp_path / "pos.csv").write_text("\n".join(lines) + "\n")
    assert not read_tileset(tmp_path / "pos.csv").rgb
    out = tmp_path / "o.ome.tif"
    assert cli("fuse", tmp_path / "pos.csv", "-o", out, "--backend", "numpy", "-q") == 0
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 3 and tif.series[0].axes == "CYX"
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.MINISBLACK
    names = [c.name for c in ome_checked(out).images[0].pixels.channels]
    assert names == ["R", "G", "B"]
    capsys.readouterr()
    assert cli("info", tmp_path / "pos.csv") == 0 and cli("info", out) == 0
    assert "RGB" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory):
    """The fusion kernel compiled for the host (tests/host_emulation), uint8 tiles."""
    from gpufusion.backends import cuda_kernels as ck

    from .host_emulation.harness import HostKernels, gxx_available
    from .kernel_checks import kernel_checks_required

    if not gxx_available():
        if kernel_checks_required():
            pytest.fail("g++ is not installed and the kernel checks are required")
        pytest.skip("g++ is not installed")
    keys = [(*ck.fusion_kernel_dtypes("uint8", "uint8"), 2, "linear", "linear")]
    return HostKernels.build(tmp_path_factory.mktemp("rgb_host"), keys,
                             ck.downsample_instantiations())


@pytest.mark.slow
def test_rgb_on_the_emulated_gpu_writes_the_same_colour_outputs(tmp_path, host, monkeypatch):
    from .host_emulation.fake_cupy import emulated_gpu

    truth = colour_truth(mosaic_shape(), seed=9)
    tiles = read_tileset(write_tiles(tmp_path / "tiles", truth, "png"))
    with emulated_gpu(host, monkeypatch):
        for name in ("o.ome.tif", "o.ome.zarr"):
            fuse_to_file(tiles.mosaics(), tmp_path / name, backend="cupy", rgb=tiles.rgb,
                         channel_names=tiles.channel_names, chunks=64)
    with tifffile.TiffFile(tmp_path / "o.ome.tif") as tif:
        assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.RGB
        np.testing.assert_array_equal(tif.series[0].asarray(), truth)
    fused = zarr.open_array(str(tmp_path / "o.ome.zarr" / "0"), mode="r")[...]
    np.testing.assert_array_equal(fused, np.moveaxis(truth, -1, 0))


def test_api_rgb_flag_needs_three_channels(tmp_path):
    m = make_mosaic((1, 2), (32, 32), dtype="uint8").mosaic()
    with pytest.raises(InputError, match="rgb: needs 3 channels"):
        fuse_to_file([m, m], tmp_path / "o.ome.zarr", rgb=True)


# --- registration -------------------------------------------------------------------------


def stage_mosaic(folder: Path, gray: bool) -> tuple[Path, np.ndarray]:
    """A 3x3 RGB mosaic at sub-pixel true positions, listed at stage positions off by up to
    4 px; ``gray``: its tiles' luminance (skimage's rgb2gray) as float32 TIFFs instead."""
    from skimage.color import rgb2gray

    layout = make_mosaic((3, 3), (96, 96), overlap=0.25, stage_error=4.0, seed=4,
                         dtype="uint8")
    specimens = [Specimen.random(2, lo=20, hi=235, seed=40 + c) for c in range(3)]
    shared = Specimen.random(2, lo=20, hi=235, seed=39)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file,x,y"]
    for k, (p, s) in enumerate(zip(layout.positions, layout.stage_positions, strict=True)):
        rgb = np.stack([0.6 * shared.sample(p, (96, 96)) + 0.4 * spec.sample(p, (96, 96))
                        for spec in specimens], axis=-1)
        rgb = np.rint(rgb).astype(np.uint8)
        if gray:
            tifffile.imwrite(folder / f"t{k}.tif", rgb2gray(rgb).astype(np.float32))
        else:
            tifffile.imwrite(folder / f"t{k}.tif", rgb, photometric="rgb")
        lines.append(f"t{k}.tif,{float(s[1])!r},{float(s[0])!r}")
    (folder / "pos.csv").write_text("\n".join(lines) + "\n")
    return folder / "pos.csv", layout.positions


def registered(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as fh:
        rows = [row for row in csv.DictReader(line for line in fh if not line.startswith("#"))]
    return list(rows[0]), np.array([[float(r["y"]), float(r["x"])] for r in rows])


def errors(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Position errors with the common translation removed (registration fixes none)."""
    d = found - truth
    return np.linalg.norm(d - d.mean(axis=0), axis=1)


def test_registration_on_luminance_matches_the_gray_mosaic(tmp_path):
    rgb_csv, truth = stage_mosaic(tmp_path / "rgb", gray=False)
    gray_csv, _ = stage_mosaic(tmp_path / "gray", gray=True)
    assert cli("register", rgb_csv, "-o", tmp_path / "rgb.csv", "--backend", "numpy", "-q",
               "--max-shift", 10) == 0
    assert cli("register", gray_csv, "-o", tmp_path / "gray.csv", "--backend", "numpy", "-q",
               "--max-shift", 10) == 0
    columns, rgb_found = registered(tmp_path / "rgb.csv")
    _, gray_found = registered(tmp_path / "gray.csv")
    assert columns == ["file", "x", "y"]  # one row per RGB file, no channel column
    _, stage = registered(rgb_csv)
    assert errors(stage, truth).max() > 2  # the stage is off
    assert errors(rgb_found, truth).max() < 0.3  # registration fixes it
    np.testing.assert_allclose(rgb_found, gray_found, atol=0.1)
    # the registered CSV reads back as the RGB set, and fuses
    assert read_tileset(tmp_path / "rgb.csv").rgb


def test_fuse_register_uses_luminance_by_default_or_the_channel_asked(tmp_path):
    import argparse

    from gpufusion.cli.register import register_channels

    rgb_csv, truth = stage_mosaic(tmp_path / "rgb", gray=False)
    tiles = read_tileset(rgb_csv)
    args = argparse.Namespace(reg_channel=None, max_shift=(10.0,), min_ncc=0.1,
                              max_residual=2.0, quiet=True, debug=False, input=str(rgb_csv))
    results: list = []
    moved = register_channels(args, tiles.mosaics(), tiles.channel_names, "numpy", results,
                              rgb=True)
    assert isinstance(results[0].mosaic.tiles[0].source, LuminanceSource)
    assert errors(moved[0].positions(), truth).max() < 0.3
    assert all(np.array_equal(m.positions(), moved[0].positions()) for m in moved)
    args.reg_channel = "G"
    register_channels(args, tiles.mosaics(), tiles.channel_names, "numpy", results, rgb=True)
    assert isinstance(results[1].mosaic.tiles[0].source, SampleSource)
    assert results[1].mosaic.tiles[0].source.sample == 1


def test_reg_channel_luminance_needs_rgb_tiles(tmp_path, capsys):
    truth = colour_truth(mosaic_shape())
    lines = ["file,x,y"]
    for k, (y, x) in enumerate(grid_positions()):
        tifffile.imwrite(tmp_path / f"t{k}.tif", truth[y:y + TILE[0], x:x + TILE[1], 1])
        lines.append(f"t{k}.tif,{x},{y}")
    (tmp_path / "pos.csv").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = cli("fuse", tmp_path / "pos.csv", "-o", tmp_path / "o.ome.zarr", "--register",
               "--reg-channel", "luminance", "--backend", "numpy", "-q")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--reg-channel luminance" in err and "RGB" in err


# --- bad input ----------------------------------------------------------------------------


def fails(capsys, *args: object) -> str:
    capsys.readouterr()
    code = cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_rgb_mixed_with_gray_tiles_is_refused_naming_one_of_each(tmp_path, capsys):
    truth = colour_truth(mosaic_shape())
    csv_path = write_tiles(tmp_path, truth, "tiff")
    tifffile.imwrite(tmp_path / "t4.tif", truth[:TILE[0], :TILE[1], 0])  # one gray tile
    for command in (["fuse", csv_path, "-o", tmp_path / "o.ome.zarr"],
                    ["register", csv_path, "-o", tmp_path / "r.csv"],
                    ["info", csv_path]):
        err = fails(capsys, *command)
        assert "mixes RGB and grayscale tiles" in err
        assert f"{tmp_path / 't0.tif'} is RGB" in err
        assert f"{tmp_path / 't4.tif'} is grayscale" in err
    assert not (tmp_path / "o.ome.zarr").exists()


def test_rgb_mixed_with_gray_in_a_grid_folder(tmp_path, capsys):
    tile = colour_truth(TILE)
    iio.imwrite(tmp_path / "r0-c0.png", tile)
    iio.imwrite(tmp_path / "r0-c1.png", tile[..., 0])
    err = fails(capsys, "fuse", tmp_path, "--grid", "1x2", "-o", tmp_path.parent / "g.ome.zarr")
    assert "r0-c0.png is RGB" in err and "r0-c1.png is grayscale" in err


def png_16bit_rgb(path: Path, shape: tuple[int, int]) -> None:
    """A valid 16-bit RGB PNG (which Pillow reads as 8 bits), written by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + np.full((shape[1], 3), 40000, ">u2").tobytes()
                    for _ in range(shape[0]))
    ihdr = struct.pack(">IIBBBBB", shape[1], shape[0], 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bad_colour_files(folder: Path) -> dict[str, str]:
    """One bad colour file per case: name -> what the message must say."""
    from PIL import Image

    cases = {}
    tile = np.zeros((8, 9, 5), np.uint8)
    tifffile.imwrite(folder / "five.tif", tile, photometric="minisblack", planarconfig="contig")
    cases["five.tif"] = "5 samples per pixel"
    tifffile.imwrite(folder / "two.tif", tile[..., :2], photometric="minisblack",
                     planarconfig="contig")
    cases["two.tif"] = "2 samples per pixel"
    tifffile.imwrite(folder / "rgb5.tif", tile, photometric="rgb",
                     extrasamples=["unspecified", "unspecified"])
    cases["rgb5.tif"] = "RGB TIFF with 5 samples per pixel"
    iio.imwrite(folder / "la.png", tile[..., :2])
    cases["la.png"] = "gray+alpha image"
    Image.new("CMYK", (9, 8)).save(folder / "cmyk.jpg")
    cases["cmyk.jpg"] = "CMYK colour image"
    png_16bit_rgb(folder / "deep.png", (8, 9))
    cases["deep.png"] = "16-bit RGB PNG"
    return cases


def test_unsupported_colour_files_are_refused_clearly(tmp_path, capsys):
    cases = bad_colour_files(tmp_path)
    for name, reason in cases.items():
        with pytest.raises(InputError, match=re.escape(reason)) as excinfo:
            open_tile_channels(tmp_path / name)
        assert str(excinfo.value).startswith(str(tmp_path / name))
        (tmp_path / "pos.csv").write_text(f"file,x,y\n{name},0,0\n")
        err = fails(capsys, "fuse", tmp_path / "pos.csv", "-o", tmp_path / "o.ome.zarr")
        assert name in err and reason in err


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_rgb_tiff_claiming_more_pixels_than_it_holds_is_refused(tmp_path, capsys,
                                                                 compression):
    from .test_hostile_files import set_tags

    tifffile.imwrite(tmp_path / "bomb.tif", colour_truth((64, 64)), photometric="rgb",
                     compression=compression)
    set_tags(tmp_path / "bomb.tif", ImageWidth=100000, ImageLength=100000)
    (tmp_path / "pos.csv").write_text("file,x,y\nbomb.tif,0,0\n")
    err = fails(capsys, "fuse", tmp_path / "pos.csv", "-o", tmp_path / "o.ome.zarr")
    assert "bomb.tif" in err and "TIFF" in err and "100000" in err


def test_rgb_files_with_a_channel_column_are_refused(tmp_path, capsys):
    tile = colour_truth(TILE)
    iio.imwrite(tmp_path / "a.png", tile)
    iio.imwrite(tmp_path / "b.png", tile)
    (tmp_path / "pos.csv").write_text("file,x,y,channel\na.png,0,0,DAPI\nb.png,0,0,GFP\n")
    err = fails(capsys, "fuse", tmp_path / "pos.csv", "-o", tmp_path / "o.ome.zarr")
    assert "RGB tile files in 2 channels" in err


# --- real data ----------------------------------------------------------------------------


def test_tma_4x3_is_grayscale_so_no_real_rgb_set_here():
    # The only brightfield set in ../shared/data is 8-bit grayscale PNG (mode L): it must
    # stay one gray channel. (No real RGB tile set is available to test with.)
    folder = DATA / "tma_4x3"
    if not folder.is_dir():
        missing_real_data(folder)
    tiles = read_tileset(folder, grid="4x3", overlap=0.1, pattern="r{row}-c{col}.png")
    assert not tiles.rgb and tiles.n_channels == 1 and tiles.n_tiles == 12
