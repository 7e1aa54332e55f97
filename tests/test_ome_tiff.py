"""Tests for the pyramidal OME-TIFF writer and anisotropic pyramid planning."""

from __future__ import annotations

import importlib.util
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from skimage.transform import downscale_local_mean

from gpufusion.errors import InputError
from gpufusion.pyramid import pyramid_factors
from gpufusion.writers import ome_tiff
from gpufusion.writers.ome_tiff import COMPRESSIONS, write_ome_tiff
from gpufusion.writers.ome_zarr import read_ome_zarr_info, write_ome_zarr

from .writer_helpers import counting_image, leftovers, random_image

OME_NS = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
HAVE_IMAGECODECS = importlib.util.find_spec("imagecodecs") is not None

# --------------------------------------------------------------------------------- helpers






def read_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def read_pixels_xml(path: Path) -> ET.Element:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff
        root = ET.fromstring(tif.ome_metadata)
    images = root.findall("ome:Image", OME_NS)
    assert len(images) == 1
    return images[0].find("ome:Pixels", OME_NS)


def block_mean_reference(a: np.ndarray, levels: int) -> list[np.ndarray]:
    """scikit-image block means on y/x, on the region where every 2x2 block is full.

    Returns, per level, the reference over the full blocks (rounded for integers).
    """
    refs, current = [], a.astype(np.float64)
    for _ in range(levels):
        factors = (1,) * (a.ndim - 2) + (2, 2)
        full = tuple(slice(0, n // f) for n, f in zip(current.shape, factors, strict=True))
        current = downscale_local_mean(current, factors)[full]
        refs.append(current)
    return refs


def assert_matches_reference(level: np.ndarray, reference: np.ndarray) -> None:
    """Compare the whole-block region of ``level`` with the float64 block-mean reference.

    Deeper levels are means of rounded means, so integers may differ by one per level.
    """
    region = level[tuple(slice(0, n) for n in reference.shape)].astype(np.float64)
    atol = 1.0 if np.issubdtype(level.dtype, np.integer) else 1e-3
    np.testing.assert_allclose(region, reference, rtol=1e-5, atol=atol * 2)




# ------------------------------------------------------------------------ layout and data


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_2d_pyramid_matches_ome_zarr_and_block_means(tmp_path, dtype):
    data = random_image((700, 530), dtype, seed=1)
    image = da.from_array(data, chunks=(200, 160))
    out = write_ome_tiff(
        image, tmp_path / "m.ome.tif", axes="yx", pixel_size=(0.5, 0.5), unit="um", tile=128
    )
    assert leftovers(tmp_path, "m.ome.tif") == []
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 1
        page = tif.pages[0]
        assert (page.tilelength, page.tilewidth) == (128, 128)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.predictor == (1 if dtype == "float32" else 2)
        assert len(page.subifds) == 3
        series = tif.series[0]
        assert series.axes == "YX"
        assert [lv.shape for lv in series.levels] == [(700, 530), (350, 265), (175, 133), (88, 67)]
        assert {lv.dtype for lv in series.levels} == {np.dtype(dtype)}
        sub = series.levels[1].keyframe
        assert sub.subfiletype == 1 and (sub.tilelength, sub.tilewidth) == (128, 128)
        # TIFF resolution tags: pixels per cm, halved at each level.
        assert page.get_resolution() == pytest.approx((20000, 20000))
        assert series.levels[2].keyframe.get_resolution() == pytest.approx((5000, 5000))
    levels = read_levels(out)
    np.testing.assert_array_equal(levels[0], data)

    zarr_out = write_ome_zarr(image, tmp_path / "m.ome.zarr", axes="yx", chunks=128)
    group = zarr.open_group(str(zarr_out), mode="r")
    assert len(read_ome_zarr_info(zarr_out)["levels"]) == len(levels)
    for k, level in enumerate(levels):
        np.testing.assert_array_equal(level, group[str(k)][:])
    for level, reference in zip(levels[1:], block_mean_reference(data, 3), strict=True):
        assert_matches_reference(level, reference)


def test_3d_keeps_every_plane_and_writes_physical_sizes(tmp_path):
    data = random_image((5, 300, 260), "uint16", seed=2)
    out = write_ome_tiff(
        da.from_array(data, chunks=(2, 128, 128)),
        tmp_path / "s.ome.tif",
        axes=["z", "y", "x"],
        pixel_size=(2.0, 0.5, 0.25),
        unit="micrometer",
        origin=(10.0, -1.0, 3.5),
        tile=(64, 128),
    )
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 5  # one page per plane, each with its own SubIFDs
        assert all(len(page.subifds) == 3 for page in tif.pages)
        assert (tif.pages[0].tilelength, tif.pages[0].tilewidth) == (64, 128)
        levels = tif.series[0].levels
        assert tif.series[0].axes == "ZYX"
        shapes = [(5, 300, 260), (5, 150, 130), (5, 75, 65), (5, 38, 33)]  # until 64 x 128
        assert [lv.shape for lv in levels] == shapes
    pixels = read_pixels_xml(out)
    assert pixels.get("SizeZ") == "5" and pixels.get("SizeC") == "1"
    sizes = {a: float(pixels.get(f"PhysicalSize{a}")) for a in "XYZ"}
    assert sizes == {"X": 0.25, "Y": 0.5, "Z": 2.0}
    assert {pixels.get(f"PhysicalSize{a}Unit") for a in "XYZ"} == {"µm"}
    planes = pixels.findall("ome:Plane", OME_NS)
    assert [int(p.get("TheZ")) for p in planes] == [0, 1, 2, 3, 4]
    assert [float(p.get("PositionZ")) for p in planes] == [10.0, 12.0, 14.0, 16.0, 18.0]
    assert {(float(p.get("PositionY")), float(p.get("PositionX"))) for p in planes} == {(-1.0, 3.5)}
    assert {p.get("PositionZUnit") for p in planes} == {"µm"}
    got = read_levels(out)
    np.testing.assert_array_equal(got[0], data)
    for level, reference in zip(got[1:], block_mean_reference(data, 3), strict=True):
        assert_matches_reference(level, reference)


def test_multichannel_volume_with_channel_names(tmp_path):
    data = random_image((3, 4, 200, 150), "uint8", seed=3)
    image = da.from_array(data, chunks=(1, 4, 64, 64))
    out = write_ome_tiff(
        image,
        tmp_path / "c.ome.tif",
        axes="czyx",
        pixel_size=1.5,
        unit="nm",
        channel_names=["DAPI", "GFP", "mCherry"],
        tile=64,
        compression="none",
        name="tissue",
    )
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 12
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
        series = tif.series[0]
        assert series.axes == "CZYX"
        assert [lv.shape for lv in series.levels] == [
            (3, 4, 200, 150),
            (3, 4, 100, 75),
            (3, 4, 50, 38),
        ]
        # Pages run z fastest: page 5 is channel 1, plane 1.
        np.testing.assert_array_equal(tif.pages[5].asarray(), data[1, 1])
    pixels = read_pixels_xml(out)
    assert pixels.get("DimensionOrder") == "XYZCT"
    assert (pixels.get("SizeC"), pixels.get("SizeZ")) == ("3", "4")
    names = [c.get("Name") for c in pixels.findall("ome:Channel", OME_NS)]
    assert names == ["DAPI", "GFP", "mCherry"]
    assert pixels.get("PhysicalSizeZUnit") == "nm" and pixels.get("PhysicalSizeX") == "1.5"
    assert pixels.find("ome:Plane", OME_NS) is None  # no origin given: no positions
    with tifffile.TiffFile(out) as tif:
        assert ET.fromstring(tif.ome_metadata).find("ome:Image", OME_NS).get("Name") == "tissue"
    got = read_levels(out)
    np.testing.assert_array_equal(got[0], data)
    # Same pyramid as OME-Zarr when z is declared a channel-like axis there (never reduced).
    flat = image.reshape(12, 200, 150).rechunk((1, 64, 64))
    zarr_out = write_ome_zarr(flat, tmp_path / "c.ome.zarr", axes="cyx")
    group = zarr.open_group(str(zarr_out), mode="r")
    for k, level in enumerate(got):
        np.testing.assert_array_equal(level.reshape(12, *level.shape[2:]), group[str(k)][:])


def test_time_axis_and_plane_positions_in_page_order(tmp_path):
    data = random_image((2, 3, 2, 100, 90), "uint8", seed=9)
    out = write_ome_tiff(
        data, tmp_path / "t.ome.tif", axes="tczyx", tile=32, pixel_size=(3, 1, 1), origin=(5, 0, 0)
    )
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.axes == "TCZYX"
        assert [lv.shape[-2:] for lv in series.levels] == [(100, 90), (50, 45), (25, 23)]
        np.testing.assert_array_equal(series.asarray(), data)
    planes = read_pixels_xml(out).findall("ome:Plane", OME_NS)
    index = [(int(p.get("TheT")), int(p.get("TheC")), int(p.get("TheZ"))) for p in planes]
    assert index == [tuple(i) for i in np.ndindex(2, 3, 2)]  # z fastest, then c, then t
    assert [float(p.get("PositionZ")) for p in planes] == [5.0, 8.0] * 6


def test_numpy_input_without_metadata_and_a_single_level(tmp_path):
    data = random_image((40, 30), "int16", seed=4)
    out = write_ome_tiff(data, tmp_path / "n.ome.tif", axes="yx", channel_names=["only"])
    with tifffile.TiffFile(out) as tif:
        assert len(tif.series[0].levels) == 1
        assert not tif.pages[0].subifds
        assert tif.pages[0].resolutionunit == tifffile.RESUNIT.NONE
        np.testing.assert_array_equal(tif.asarray(), data)
    pixels = read_pixels_xml(out)
    assert pixels.get("PhysicalSizeX") is None  # no pixel_size given: none written
    assert [c.get("Name") for c in pixels.findall("ome:Channel", OME_NS)] == ["only"]


@pytest.mark.parametrize("compression", sorted(set(COMPRESSIONS) - {"zlib", "none"}))
def test_imagecodecs_compressions_round_trip_or_are_refused(tmp_path, compression):
    data = random_image((100, 100), "uint16", seed=5) // 256
    if not HAVE_IMAGECODECS:
        with pytest.raises(InputError, match="needs the imagecodecs package"):
            write_ome_tiff(data, tmp_path / "z.ome.tif", axes="yx", compression=compression)
        assert list(tmp_path.iterdir()) == []
        return
    out = write_ome_tiff(data, tmp_path / "z.ome.tif", axes="yx", compression=compression)
    np.testing.assert_array_equal(read_levels(out)[0], data)


def test_progress_bars(tmp_path, capsys):
    data = random_image((300, 200), "uint16")
    write_ome_tiff(
        da.from_array(data, chunks=128),
        tmp_path / "p.ome.tif",
        axes="yx",
        tile=64,
        progress=True,
    )
    printed = capsys.readouterr().err  # progress goes to stderr
    assert "\rfusing, staging level 0" in printed  # dask, while staging
    assert "\rwriting TIFF level 0" in printed


def test_distributed_client_scheduler(tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    data = random_image((2, 300, 200), "uint16", seed=8)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = write_ome_tiff(
            da.from_array(data, chunks=(1, 64, 64)),
            tmp_path / "d.ome.tif",
            axes="cyx",
            tile=64,
            scheduler=client,
            progress=True,
        )
    levels = read_levels(out)
    assert [lv.shape for lv in levels] == [(2, 300, 200), (2, 150, 100), (2, 75, 50), (2, 38, 25)]
    np.testing.assert_array_equal(levels[0], data)
    printed = capsys.readouterr().err
    assert "staging level" not in printed  # no local dask progress on a cluster
    assert "\rwriting TIFF level 0" in printed  # the tiles are written here
    assert leftovers(tmp_path, "d.ome.tif") == []


def test_writing_memory_stays_bounded(tmp_path):
    """A 50 Mpx uint8 image (48 MiB) is written with a small fraction of it in memory.

    Memory is one tile row of the level being streamed (so it grows with the width, not the
    height), a few tiles per compression thread, and per staging thread one block of 2 x 2
    chunks with its float32 mean and rounding temporaries (~8 MiB for uint8 here); no level
    is ever held whole. One thread keeps the number of those blocks out of the measurement.
    """
    height, width, chunk = 16384, 3072, 1024

    def pattern(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rows = (np.arange(y0, y1) // 4).astype(np.uint8)
        cols = (np.arange(x0, x1) // 4 * 3).astype(np.uint8)
        return np.add.outer(rows, cols, dtype=np.uint8)  # wraps modulo 256

    image = da.map_blocks(
        pattern, chunks=((chunk,) * (height // chunk), (chunk,) * (width // chunk)), dtype="u1"
    )
    write_ome_tiff(image[:600, :600], tmp_path / "warm-up.ome.tif", axes="yx")  # imports
    with dask.config.set(num_workers=1):
        tracemalloc.start()
        try:
            out = write_ome_tiff(image, tmp_path / "big.ome.tif", axes="yx")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < height * width / 4, f"peak {peak / 2**20:.1f} MiB"  # measured 8.5 MiB
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        # 16384 x 3072 -> ... -> 1024 x 192 -> 512 x 96 (one 512 tile)
        assert [lv.shape for lv in levels] == [(height >> k, width >> k) for k in range(6)]
        corner = levels[0].asarray()[-chunk:, -chunk:]
    location = {None: {"array-location": [(height - chunk, height), (width - chunk, width)]}}
    np.testing.assert_array_equal(corner, pattern(location))


# ---------------------------------------------------------------------------- atomicity


def make_existing(path: Path) -> Path:
    path.write_text("old result")
    return path


def test_existing_output_without_overwrite_is_refused_before_computing(tmp_path):
    out = make_existing(tmp_path / "m.ome.tif")
    image, calls = counting_image(random_image((64, 64), "uint16"), 32)
    with pytest.raises(InputError, match="m.ome.tif") as excinfo:
        write_ome_tiff(image, out, axes="yx")
    assert "\n" not in str(excinfo.value)
    assert not calls
    assert out.read_text() == "old result"
    assert leftovers(tmp_path, "m.ome.tif") == []


@pytest.mark.parametrize("scheduler", [None, "sync"])
def test_failing_block_leaves_no_output_and_no_temp_files(tmp_path, scheduler):
    image, calls = counting_image(random_image((256, 256), "uint16"), 32, fail_at=(3, 5))
    with pytest.raises(RuntimeError, match=r"boom in block \(3, 5\)"):
        write_ome_tiff(image, tmp_path / "m.ome.tif", axes="yx", scheduler=scheduler)
    assert calls[(3, 5)] == 1
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_tiles_keeps_the_old_output(tmp_path, monkeypatch):
    out = make_existing(tmp_path / "m.ome.tif")
    real_tiles = ome_tiff._tiles

    def failing_tiles(level, tile):
        for i, item in enumerate(real_tiles(level, tile)):
            if i == 5:
                raise OSError("disk full")
            yield item

    monkeypatch.setattr(ome_tiff, "_tiles", failing_tiles)
    with pytest.raises(OSError, match="disk full"):
        write_ome_tiff(random_image((256, 256), "uint8"), out, axes="yx", tile=32, overwrite=True)
    assert out.read_text() == "old result"
    assert leftovers(tmp_path, "m.ome.tif") == []


def test_keyboard_interrupt_cleans_up_and_propagates(tmp_path):
    def interrupt(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise KeyboardInterrupt
        return block

    data = random_image((128, 128), "uint16")
    image = da.from_array(data, chunks=64).map_blocks(interrupt, dtype=data.dtype)
    out = make_existing(tmp_path / "m.ome.tif")
    with pytest.raises(KeyboardInterrupt):
        write_ome_tiff(image, out, axes="yx", overwrite=True)
    assert out.read_text() == "old result"
    assert leftovers(tmp_path, "m.ome.tif") == []


def test_overwrite_replaces_only_after_success(tmp_path):
    out = make_existing(tmp_path / "m.ome.tif")
    bad, _ = counting_image(random_image((128, 128), "uint16"), 32, fail_at=(2, 2))
    with pytest.raises(RuntimeError, match="boom"):
        write_ome_tiff(bad, out, axes="yx", overwrite=True)
    assert out.read_text() == "old result"

    data = random_image((128, 128), "uint16", seed=6)
    write_ome_tiff(da.from_array(data, chunks=32), out, axes="yx", overwrite=True)
    np.testing.assert_array_equal(read_levels(out)[0], data)
    assert leftovers(tmp_path, "m.ome.tif") == []


def test_output_appearing_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "m.ome.tif"

    def squatter(block, block_info=None):
        out.write_text("someone else")
        return block

    image = da.from_array(np.ones((64, 64), "uint8"), chunks=32).map_blocks(squatter)
    with pytest.raises(InputError, match="already exists"):
        write_ome_tiff(image, out, axes="yx")
    assert out.read_text() == "someone else"
    assert leftovers(tmp_path, "m.ome.tif") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axes": ["x", "y"]}, "order t, c, z, y, x"),
        ({"axes": ["y"]}, "one name per axis"),
        ({"axes": "yx", "pixel_size": [1.0, -2.0]}, "positive numbers"),
        ({"axes": "yx", "origin": [float("inf"), 0.0]}, "finite numbers"),
        ({"axes": "yx", "unit": "parsnip"}, "not an NGFF space unit"),
        ({"axes": "yx", "tile": 100}, "multiples of 16"),
        ({"axes": "yx", "tile": (0, 16)}, "multiples of 16"),
        ({"axes": "yx", "tile": (16, 16, 16)}, "multiples of 16"),
        ({"axes": "yx", "tile": "big"}, "multiples of 16"),
        ({"axes": "yx", "compression": "gzip"}, "not one of"),
        ({"axes": "yx", "channel_names": ["a", "b"]}, "one per channel"),
        ({"axes": "yx", "channel_names": "a"}, "one per channel"),
    ],
)
def test_bad_options_raise_input_error_before_computing(tmp_path, kwargs, message):
    image, calls = counting_image(random_image((40, 40), "uint8"), 16)
    with pytest.raises(InputError, match=message):
        write_ome_tiff(image, tmp_path / "m.ome.tif", **kwargs)
    assert not calls
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["bool", "int64", "uint64", "float16", "complex64"])
def test_dtypes_ome_cannot_describe_are_refused(tmp_path, dtype):
    with pytest.raises(InputError, match=f"dtype {dtype}"):
        write_ome_tiff(da.zeros((8, 8), dtype=dtype), tmp_path / "b.ome.tif", axes="yx")
    assert list(tmp_path.iterdir()) == []


def test_empty_images_are_refused(tmp_path):
    with pytest.raises(InputError, match="is empty"):
        write_ome_tiff(da.zeros((0, 8), dtype="uint8"), tmp_path / "e.ome.tif", axes="yx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ anisotropic pyramids


def test_anisotropic_plan_keeps_z_until_in_plane_pixels_catch_up():
    shape, chunks = (64, 4096, 4096), (16, 256, 256)
    plan = pyramid_factors(shape, chunks, "zyx", pixel_size=(2.0, 0.5, 0.5))
    assert plan == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    # Isotropic voxels, and z finer than y/x, plan exactly as without pixel sizes.
    isotropic = pyramid_factors(shape, chunks, "zyx")
    assert pyramid_factors(shape, chunks, "zyx", pixel_size=(1.0, 1.0, 1.0)) == isotropic
    assert pyramid_factors(shape, chunks, "zyx", pixel_size=(0.1, 1.0, 1.0)) == isotropic
    # Ratio 1.5 is nearer 1 than 3 (halving z) but not than 0.75: keep z once, then halve.
    plan = pyramid_factors((2, 64, 4096, 4096), (1, 16, 256, 256), "czyx", pixel_size=(1.5, 1, 1))
    assert plan == [(1, 1, 2, 2)] + [(1, 2, 2, 2)] * 3
    # 2D images and axes without z are unaffected; z alone still shrinks to fit one chunk.
    assert pyramid_factors((300, 200), (128, 128), "yx", pixel_size=(1, 9)) == [(2, 2)] * 2
    assert (
        pyramid_factors((64, 1, 1), (16, 256, 256), "zyx", pixel_size=(5, 1, 1)) == [(2, 1, 1)] * 2
    )


def test_anisotropic_plan_rejects_bad_pixel_sizes():
    with pytest.raises(ValueError, match="one positive number per spatial axis"):
        pyramid_factors((8, 64, 64), (8, 16, 16), "zyx", pixel_size=(1.0, 1.0))
    with pytest.raises(ValueError, match="one positive number per spatial axis"):
        pyramid_factors((8, 64, 64), (8, 16, 16), "zyx", pixel_size=(0.0, 1.0, 1.0))


def test_ome_zarr_anisotropic_pyramid(tmp_path):
    data = random_image((6, 256, 256), "uint16", seed=7)
    out = write_ome_zarr(
        da.from_array(data, chunks=(6, 32, 32)),
        tmp_path / "a.ome.zarr",
        axes="zyx",
        pixel_size=(2.0, 0.5, 0.5),
        unit="um",
        anisotropic_pyramid=True,
    )
    info = read_ome_zarr_info(out)
    assert [lv["shape"] for lv in info["levels"]] == [
        (6, 256, 256),
        (6, 128, 128),
        (6, 64, 64),
        (3, 32, 32),
    ]
    assert [lv["scale"] for lv in info["levels"]] == [
        [2.0, 0.5, 0.5],
        [2.0, 1.0, 1.0],
        [2.0, 2.0, 2.0],
        [4.0, 4.0, 4.0],
    ]
    assert info["levels"][3]["translation"] == [1.0, 1.75, 1.75]
    group = zarr.open_group(str(out), mode="r")
    reference = data.astype(np.float64)
    for k, factors in enumerate([(1, 2, 2), (1, 2, 2), (2, 2, 2)], start=1):
        reference = downscale_local_mean(reference, factors)
        assert_matches_reference(group[str(k)][:], reference)
    # The default plan still halves z at every level.
    plain = write_ome_zarr(
        da.from_array(data, chunks=(6, 32, 32)),
        tmp_path / "p.ome.zarr",
        axes="zyx",
        pixel_size=(2.0, 0.5, 0.5),
    )
    assert read_ome_zarr_info(plain)["levels"][1]["shape"] == (3, 128, 128)
