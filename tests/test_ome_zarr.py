"""Tests for 2x mean pyramids (gpufusion.pyramid) and the OME-Zarr writer/reader."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v04 import Image as ImageV04
from ome_zarr_models.v05 import Image as ImageV05
from skimage.transform import downscale_local_mean

from gpufusion.errors import InputError
from gpufusion.pyramid import (
    default_level_factors,
    downsample_mean2,
    downsampled_shape,
    fits_in_one_chunk,
    pyramid_factors,
    pyramid_level,
)
from gpufusion.writers import ome_zarr as writer
from gpufusion.writers.ome_zarr import (
    COMPRESSORS,
    format_info,
    read_ome_zarr_info,
    write_ome_zarr,
)

from .writer_helpers import counting_image, leftovers, random_image

# --------------------------------------------------------------------------- references


def reference_mean2(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Independent reference: NaN-pad to whole blocks, ``nanmean`` each block (float64).

    NaN padding makes a partial edge block the mean of the samples it has.
    """
    padded_shape = tuple(n + (n % f) for n, f in zip(a.shape, factors, strict=True))
    padded = np.full(padded_shape, np.nan)
    padded[tuple(slice(0, n) for n in a.shape)] = a
    split = []
    for n, f in zip(padded_shape, factors, strict=True):
        split += [n // f, f]
    means = np.nanmean(padded.reshape(split), axis=tuple(range(1, 2 * a.ndim, 2)))
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        means = np.clip(np.rint(means), info.min, info.max)
    return means.astype(a.dtype)


def reference_pyramid(a: np.ndarray, plan: list[tuple[int, ...]]) -> list[np.ndarray]:
    levels = [a]
    for factors in plan:
        levels.append(reference_mean2(levels[-1], factors))
    return levels




def expected_level_chunks(shape, chunk_shape, plan) -> list[tuple[int, ...]]:
    """Stored chunks per level: level ``k`` has chunks of ``chunk / 2**k`` (one level-0
    block's share, written whole by one task) while on every axis of several chunks the
    halves stay even and >= 64; then chunks of ``chunk``; always clipped to the level."""
    several = [n > c for n, c in zip(shape, chunk_shape, strict=True)]
    block, inline, out, level = tuple(chunk_shape), True, [], tuple(shape)
    for k in range(len(plan) + 1):
        if k:
            f = plan[k - 1]
            level = tuple(-(-n // g) for n, g in zip(level, f, strict=True))
            inline = inline and all(g == 1 or not m or (b % 2 == 0 and b // 2 >= 64)
                                    for g, m, b in zip(f, several, block, strict=True))
            block = tuple(-(-b // g) for b, g in zip(block, f, strict=True))
        unit = block if inline else chunk_shape
        out.append(tuple(min(u, n) for u, n in zip(unit, level, strict=True)))
    return out


def tolerance(dtype: np.dtype) -> dict[str, float]:
    """Integers: exact (means of 2**d integers are exact in float32); floats: ~1e-6."""
    if np.issubdtype(dtype, np.integer):
        return {"rtol": 0, "atol": 0}
    return {"rtol": 1e-6, "atol": 1e-4}






# ----------------------------------------------------------------------- downsample_mean2


@pytest.mark.parametrize("algorithm", ["corners", "pairwise"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize(
    ("shape", "factors"),
    [((37, 51), (2, 2)), ((38, 50), (2, 2)), ((7, 9, 11), (2, 2, 2)), ((5, 8, 9), (1, 2, 2))],
)
def test_downsample_matches_references(shape, factors, dtype, algorithm):
    a = random_image(shape, dtype, seed=sum(shape))
    got = downsample_mean2(a, factors, algorithm=algorithm)
    assert got.dtype == a.dtype
    assert got.shape == tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    # Whole blocks: scikit-image's block mean (it zero-pads partial blocks, so crop them).
    full = tuple(slice(0, n // f) for n, f in zip(shape, factors, strict=True))
    expected = downscale_local_mean(a.astype(np.float64), factors)[full]
    if np.issubdtype(a.dtype, np.integer):
        expected = np.rint(expected)
    np.testing.assert_allclose(got[full], expected, **tolerance(a.dtype))
    # Every sample, odd edges included: NaN-padded block means.
    np.testing.assert_allclose(got, reference_mean2(a, factors), **tolerance(a.dtype))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "uint32", "float32", "float64"])
def test_fast_and_simple_algorithms_agree(dtype):
    rng = np.random.default_rng(7)
    for _ in range(6):
        ndim = int(rng.integers(1, 5))
        shape = tuple(int(n) for n in rng.integers(1, 12, size=ndim))
        factors = tuple(int(f) for f in rng.integers(1, 3, size=ndim))
        a = random_image(shape, dtype, seed=int(rng.integers(1000)))
        fast = downsample_mean2(a, factors, algorithm="corners")
        simple = downsample_mean2(a, factors, algorithm="pairwise")
        if np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(fast, simple)  # exact sums in the accumulator
        else:
            np.testing.assert_allclose(fast, simple, rtol=1e-6, atol=1e-4)


def test_downsample_odd_edges_by_hand():
    a = np.array([[1, 3, 10], [5, 7, 20], [100, 200, 255]], dtype=np.uint8)
    # blocks: [[1,3],[5,7]] -> 4; [[10],[20]] -> 15; [[100,200]] -> 150; [[255]] -> 255
    np.testing.assert_array_equal(downsample_mean2(a, (2, 2)), [[4, 15], [150, 255]])
    np.testing.assert_array_equal(downsample_mean2(a, (1, 2)), [[2, 10], [6, 20], [150, 255]])
    np.testing.assert_array_equal(downsample_mean2(a, (1, 1)), a)


def test_downsample_rounds_half_to_even_and_keeps_extremes():
    half = np.array([[1, 2, 2, 3, 5, 6]], dtype=np.uint16)  # means 1.5, 2.5, 5.5
    np.testing.assert_array_equal(downsample_mean2(half, (1, 2)), [[2, 2, 6]])
    negative = np.array([-3, -2, -4, -5, -32768, -32768], dtype=np.int16)  # -2.5, -4.5, min
    np.testing.assert_array_equal(downsample_mean2(negative, (2,)), [-2, -4, -32768])
    top = np.full((3, 3), np.iinfo(np.uint32).max, dtype=np.uint32)
    np.testing.assert_array_equal(downsample_mean2(top, (2, 2)), np.full((2, 2), top[0, 0]))
    # uint32 averages are exact (float64 accumulation): (2**32 - 1 + 2**32 - 3) / 2
    pair = np.array([2**32 - 1, 2**32 - 3], dtype=np.uint32)
    assert downsample_mean2(pair, (2,))[0] == 2**32 - 2


def test_downsample_float64_precision_and_constant_images():
    a = np.array([1.0, 1.0 + 2**-40, 3.0], dtype=np.float64)
    np.testing.assert_array_equal(downsample_mean2(a, (2,)), [1.0 + 2**-41, 3.0])
    constant = np.full((9, 7, 5), 1234, dtype=np.uint16)
    np.testing.assert_array_equal(downsample_mean2(constant, (2, 2, 2)), 1234)


def test_downsample_rejects_bad_arguments():
    a = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="one entry per axis"):
        downsample_mean2(a, (2,))
    with pytest.raises(ValueError, match="only contain 1 or 2"):
        downsample_mean2(a, (3, 2))
    with pytest.raises(ValueError, match="algorithm 'fancy'"):
        downsample_mean2(a, (2, 2), algorithm="fancy")
    with pytest.raises(TypeError, match="integer or float"):
        downsample_mean2(a.astype(bool), (2, 2))


# -------------------------------------------------------------------------- level planning


def test_pyramid_factors_stop_when_one_chunk_holds_the_level():
    plan = pyramid_factors((1000, 731), (128, 128), ("y", "x"))
    assert plan == [(2, 2)] * 3
    shapes = [(1000, 731)]
    for factors in plan:
        shapes.append(downsampled_shape(shapes[-1], factors))
    assert shapes == [(1000, 731), (500, 366), (250, 183), (125, 92)]
    assert fits_in_one_chunk(shapes[-1], (128, 128), "yx")
    assert not fits_in_one_chunk(shapes[-2], (128, 128), "yx")
    assert pyramid_factors((128, 100), (128, 128), "yx") == []
    assert pyramid_factors((129, 100), (128, 128), "yx") == [(2, 2)]


def test_pyramid_factors_never_reduce_channel_time_or_single_z():
    assert pyramid_factors((2, 3, 300, 200), (1, 1, 128, 128), "tcyx") == [(1, 1, 2, 2)] * 2
    # z shrinks only while it is longer than 1: 5 -> 3 -> 2 -> 1, then stays.
    plan = pyramid_factors((5, 1000, 1000), (64, 128, 128), "zyx")
    assert plan == [(2, 2, 2)] * 3
    plan = pyramid_factors((5, 2000, 2000), (1, 128, 128), "zyx")
    assert [f[0] for f in plan] == [2, 2, 2, 1]
    assert default_level_factors((1, 4, 4), "zyx") == (1, 2, 2)


def test_pyramid_factors_accepts_a_custom_rule():
    def only_x(shape, axes):
        return tuple(2 if a == "x" else 1 for a in axes)

    assert pyramid_factors((100, 1000), (128, 128), "yx", level_factors=only_x) == [(1, 2)] * 3
    with pytest.raises(ValueError, match="same length"):
        pyramid_factors((100, 100), (128,), "yx")


# ---------------------------------------------------------------------- pyramid_level (lazy)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_pyramid_level_matches_reference_with_uneven_chunks(dtype, monkeypatch):
    data = random_image((1000, 731), dtype, seed=3)
    seen: list[tuple[int, ...]] = []
    original = downsample_mean2

    def recording(block, factors):
        seen.append(block.shape)
        return original(block, factors)

    monkeypatch.setattr("gpufusion.pyramid.downsample_mean2", recording)
    low = pyramid_level(da.from_array(data, chunks=128), (2, 2))
    assert low.chunks == ((128,) * 3 + (116,), (128, 128, 110))
    np.testing.assert_allclose(
        low.compute(scheduler="sync"), reference_mean2(data, (2, 2)), **tolerance(data.dtype)
    )
    # One task per output block, each reading one block of at most 2C per axis.
    assert len(seen) == 12
    assert max(s[0] for s in seen) <= 256
    assert max(s[1] for s in seen) <= 256


def test_pyramid_level_3d_with_output_chunks_and_kept_axis():
    data = random_image((2, 9, 40, 33), "uint16", seed=4)
    source = da.from_array(data, chunks=(1, 8, 16, 16))
    low = pyramid_level(source, (1, 2, 2, 2), chunks=(1, 4, 8, 8))
    assert low.shape == (2, 5, 20, 17)
    assert low.chunksize == (1, 4, 8, 8)
    np.testing.assert_array_equal(low.compute(), reference_mean2(data, (1, 2, 2, 2)))
    with pytest.raises(ValueError, match="1 or 2"):
        pyramid_level(source, (2, 2))


# ------------------------------------------------------------------------- write_ome_zarr

CASES = {
    # name: (shape, dtype, axes, chunks, pixel_size, origin)
    "yx-uneven": ((1000, 731), "uint16", ["y", "x"], 128, (0.5, 0.25), (10.0, -3.0)),
    "zyx": ((9, 130, 101), "float32", ["z", "y", "x"], (4, 32, 32), (2.0, 0.5, 0.5), None),
    "cyx": ((2, 150, 97), "uint8", ["c", "y", "x"], 64, (1.5, 1.5), (1.0, 2.0)),
}


def read_levels(out: Path) -> list[np.ndarray]:
    """Level arrays through ome-zarr-py's reader."""
    nodes = list(Reader(parse_url(str(out)))())
    return [np.asarray(level) for level in nodes[0].data]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_write_validates_and_reads_back(tmp_path, case, version):
    shape, dtype, axes, chunks, pixel, origin = CASES[case]
    data = random_image(shape, dtype, seed=len(case))
    image, calls = counting_image(data, chunks if isinstance(chunks, tuple) else 100)
    out = write_ome_zarr(
        image,
        tmp_path / "m.ome.zarr",
        axes=axes,
        pixel_size=pixel,
        origin=origin,
        unit="micrometer",
        ngff_version=version,
        chunks=chunks,
    )
    assert out == tmp_path / "m.ome.zarr"
    assert leftovers(tmp_path, "m.ome.zarr") == []
    (tmp_path / "plain").mkdir()  # the output gets ordinary (umask) permissions, not 0700
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
    # Fusion graph: each block computed exactly once (higher levels read the store).
    assert set(calls.values()) == {1}
    assert len(calls) == image.npartitions

    # Metadata validates with ome-zarr-models (pydantic models of the NGFF spec).
    group = zarr.open_group(str(out), mode="r")
    model = (ImageV04 if version == "0.4" else ImageV05).from_zarr(group)
    datasets = model.datasets[0]

    per_axis = chunks if isinstance(chunks, tuple) else [chunks if a in "zyx" else 1 for a in axes]
    chunk_shape = tuple(min(c, n) for c, n in zip(per_axis, shape, strict=True))
    plan = pyramid_factors(shape, chunk_shape, axes)
    expected = reference_pyramid(data, plan)
    assert len(datasets) == len(expected) == len(plan) + 1
    assert fits_in_one_chunk(expected[-1].shape, chunk_shape, axes)
    assert not fits_in_one_chunk(expected[-2].shape, chunk_shape, axes)

    # Data through ome-zarr-py's reader: level 0 exact, lower levels = reference means.
    levels = read_levels(out)
    assert len(levels) == len(expected)
    np.testing.assert_array_equal(levels[0], data)
    for got, want in zip(levels[1:], expected[1:], strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, **tolerance(want.dtype))

    # Scale/translation keep pixel centres aligned under 2x means.
    pixel_full = iter(pixel)
    origin_full = iter(origin or (0.0,) * len(pixel))
    spatial = [a in "zyx" for a in axes]
    px = [next(pixel_full) if s else 1.0 for s in spatial]
    org = [next(origin_full) if s else 0.0 for s in spatial]
    total = np.ones(len(axes))
    for k, dataset in enumerate(datasets):
        scale, translation = dataset.coordinateTransformations
        if k:
            total *= plan[k - 1]
        np.testing.assert_allclose(scale.scale, np.multiply(px, total))
        np.testing.assert_allclose(
            translation.translation, np.add(org, 0.5 * (total - 1) * np.asarray(px))
        )
        array = group[dataset.path]
        assert array.chunks == expected_level_chunks(shape, chunk_shape, plan)[k]

    # Axes, units and the on-disk flavour.
    axes_meta = model.attributes.multiscales[0].axes if version == "0.4" else None
    if version == "0.5":
        axes_meta = model.attributes.ome.multiscales[0].axes
        assert group.metadata.zarr_format == 3
        assert group["0"].metadata.dimension_names == tuple(axes)
    else:
        assert group.metadata.zarr_format == 2
        assert (out / ".zattrs").is_file()
        assert (out / "0" / ".zarray").read_text().count('"dimension_separator": "/"') == 1
    assert [a.name for a in axes_meta] == axes
    assert [a.unit for a in axes_meta] == ["micrometer" if s else None for s in spatial]
    assert [a.type for a in axes_meta] == [writer.AXIS_TYPES[a] for a in axes]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_write_metadata_without_unit_and_mean_type(tmp_path, version):
    data = random_image((70, 90), "uint16")
    out = write_ome_zarr(
        da.from_array(data, chunks=32), tmp_path / "a.zarr", axes="yx", ngff_version=version
    )
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    if version == "0.5":
        assert attrs["ome"]["version"] == "0.5"
        multiscale = attrs["ome"]["multiscales"][0]
    else:
        multiscale = attrs["multiscales"][0]
        assert multiscale["version"] == "0.4"
    assert multiscale["axes"] == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    assert multiscale["type"] == "mean"
    assert multiscale["metadata"]["method"] == "gpufusion.pyramid.downsample_mean2"
    assert multiscale["name"] == "gpufusion"
    transforms = multiscale["datasets"][1]["coordinateTransformations"]
    assert transforms == [
        {"type": "scale", "scale": [2.0, 2.0]},
        {"type": "translation", "translation": [0.5, 0.5]},
    ]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_every_compressor_round_trips(tmp_path, compressor, version):
    data = random_image((3, 70, 45), "uint16", seed=9) // 64  # compressible
    out = write_ome_zarr(
        da.from_array(data, chunks=(1, 32, 32)),
        tmp_path / "c.zarr",
        axes="zyx",
        chunks=32,
        compressor=compressor,
        ngff_version=version,
    )
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[:], data)
    info = read_ome_zarr_info(out)
    described = info["compressor"]
    if compressor == "none":
        assert described == "none"
    else:
        family, _, cname = compressor.partition("-")  # "blosc-lz4" or "zstd"
        assert described.startswith(f"{family}(")
        assert f"cname={cname}" in described if cname else "level=1" in described


def test_numpy_input_default_chunks_and_sync_scheduler(tmp_path):
    data = random_image((600, 40), "uint8", seed=1)
    out = write_ome_zarr(data, tmp_path / "n.zarr", axes=["y", "x"], scheduler="sync")
    info = read_ome_zarr_info(out)
    # level 1: chunks of half a level-0 chunk (one task's share of it), see the layout
    assert [lv["chunks"] for lv in info["levels"]] == [(512, 40), (256, 20)]
    np.testing.assert_array_equal(read_levels(out)[1], reference_mean2(data, (2, 2)))


def test_progress_bar_is_printed_for_local_schedulers(tmp_path, capsys):
    data = random_image((300, 200), "uint16")
    write_ome_zarr(da.from_array(data, chunks=128), tmp_path / "p.zarr", axes="yx", progress=True)
    assert "\rfusing, writing level" in capsys.readouterr().err  # progress goes to stderr


def test_distributed_client_scheduler(tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    data = random_image((300, 200), "uint16", seed=2)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = write_ome_zarr(
            da.from_array(data, chunks=64),
            tmp_path / "d.zarr",
            axes="yx",
            scheduler=client,
            progress=True,
        )
    levels = read_levels(out)
    np.testing.assert_array_equal(levels[0], data)
    np.testing.assert_array_equal(levels[-1], reference_pyramid(data, [(2, 2)] * 3)[-1])
    assert "writing level" not in capsys.readouterr().err  # no local progress on a cluster
    assert leftovers(tmp_path, "d.zarr") == []


# ---------------------------------------------------------------------------- atomicity


def make_existing(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("old result")
    return path


def test_existing_output_without_overwrite_is_refused_before_computing(tmp_path):
    out = make_existing(tmp_path / "m.zarr")
    image, calls = counting_image(random_image((64, 64), "uint16"), 32)
    with pytest.raises(InputError, match="m.zarr") as excinfo:
        write_ome_zarr(image, out, axes="yx")
    assert "\n" not in str(excinfo.value)
    assert not calls
    assert (out / "keep.txt").read_text() == "old result"
    assert leftovers(tmp_path, "m.zarr") == []


@pytest.mark.parametrize("scheduler", [None, "sync"])
def test_failing_block_leaves_no_output_and_no_temp_dir(tmp_path, scheduler):
    image, calls = counting_image(random_image((256, 256), "uint16"), 32, fail_at=(3, 5))
    with pytest.raises(RuntimeError, match=r"boom in block \(3, 5\)"):
        write_ome_zarr(image, tmp_path / "m.zarr", axes="yx", scheduler=scheduler)
    assert calls[(3, 5)] == 1
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_cleans_up_and_propagates(tmp_path):
    data = random_image((128, 128), "uint16")

    def interrupt(block, block_info=None):
        if block_info[0]["chunk-location"] == (1, 1):
            raise KeyboardInterrupt
        return block

    image = da.from_array(data, chunks=64).map_blocks(interrupt, dtype=data.dtype)
    out = make_existing(tmp_path / "m.zarr")
    with pytest.raises(KeyboardInterrupt):
        write_ome_zarr(image, out, axes="yx", overwrite=True)
    assert (out / "keep.txt").read_text() == "old result"
    assert leftovers(tmp_path, "m.zarr") == []


def test_overwrite_replaces_only_after_success(tmp_path):
    out = make_existing(tmp_path / "m.zarr")
    bad, _ = counting_image(random_image((128, 128), "uint16"), 32, fail_at=(2, 2))
    with pytest.raises(RuntimeError, match="boom"):
        write_ome_zarr(bad, out, axes="yx", overwrite=True)
    assert (out / "keep.txt").read_text() == "old result"
    assert leftovers(tmp_path, "m.zarr") == []

    data = random_image((128, 128), "uint16", seed=5)
    write_ome_zarr(da.from_array(data, chunks=32), out, axes="yx", overwrite=True)
    assert not (out / "keep.txt").exists()
    np.testing.assert_array_equal(read_levels(out)[0], data)
    assert leftovers(tmp_path, "m.zarr") == []


def test_overwrite_replaces_a_plain_file(tmp_path):
    out = tmp_path / "m.zarr"
    out.write_text("not a zarr")
    data = random_image((40, 40), "uint8")
    write_ome_zarr(da.from_array(data, chunks=32), out, axes="yx", overwrite=True)
    np.testing.assert_array_equal(read_levels(out)[0], data)
    assert leftovers(tmp_path, "m.zarr") == []


def test_failed_final_rename_restores_the_old_output(tmp_path, monkeypatch):
    out = make_existing(tmp_path / "m.zarr")
    real_rename = writer.os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name and Path(dst) == out:
            raise OSError("disk says no")
        real_rename(src, dst)

    monkeypatch.setattr(writer.os, "rename", rename)
    with pytest.raises(OSError, match="disk says no"):
        write_ome_zarr(np.ones((40, 40), "uint8"), out, axes="yx", overwrite=True)
    assert (out / "keep.txt").read_text() == "old result"
    assert leftovers(tmp_path, "m.zarr") == []


def test_output_appearing_during_the_write_is_not_replaced(tmp_path):
    out = tmp_path / "m.zarr"

    def squatter(block, block_info=None):
        out.mkdir(exist_ok=True)
        (out / "keep.txt").write_text("someone else")
        return block

    image = da.from_array(np.ones((64, 64), "uint8"), chunks=32).map_blocks(squatter)
    with pytest.raises(InputError, match="already exists"):
        write_ome_zarr(image, out, axes="yx")
    assert (out / "keep.txt").read_text() == "someone else"
    assert leftovers(tmp_path, "m.zarr") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"axes": ["x", "y"]}, "order t, c, z, y, x"),
        ({"axes": ["y"]}, "one name per axis"),
        ({"axes": ["q", "x"]}, "one name per axis"),
        ({"axes": "yx", "pixel_size": [1.0, 0.0]}, "positive numbers"),
        ({"axes": "yx", "pixel_size": [1.0, 2.0, 3.0]}, "one per spatial axis"),
        ({"axes": "yx", "pixel_size": ["a", "b"]}, "need 2 numbers"),
        ({"axes": "yx", "origin": [float("nan"), 0.0]}, "finite numbers"),
        ({"axes": "yx", "unit": "parsnip"}, "not an NGFF space unit"),
        ({"axes": "yx", "compressor": "gzip"}, "not one of"),
        ({"axes": "yx", "ngff_version": "0.6"}, "not one of"),
        ({"axes": "yx", "chunks": [0, 4]}, "positive int"),
    ],
)
def test_bad_options_raise_input_error_before_computing(tmp_path, kwargs, message):
    image, calls = counting_image(random_image((40, 40), "uint8"), 16)
    with pytest.raises(InputError, match=message):
        write_ome_zarr(image, tmp_path / "m.zarr", **kwargs)
    assert not calls
    assert list(tmp_path.iterdir()) == []


def test_bool_images_are_refused(tmp_path):
    with pytest.raises(InputError, match="dtype bool"):
        write_ome_zarr(da.zeros((8, 8), dtype=bool), tmp_path / "b.zarr", axes="yx")


def test_unit_abbreviation_is_normalised(tmp_path):
    out = write_ome_zarr(np.zeros((8, 8), "uint8"), tmp_path / "u.zarr", axes="yx", unit="um")
    assert [a["unit"] for a in read_ome_zarr_info(out)["axes"]] == ["micrometer"] * 2


# --------------------------------------------------------------------------------- info


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_info_describes_a_written_image(tmp_path, version):
    data = random_image((5, 300, 201), "uint16")
    out = write_ome_zarr(
        da.from_array(data, chunks=(5, 128, 128)),
        tmp_path / "i.zarr",
        axes="zyx",
        pixel_size=(2.0, 0.5, 0.5),
        unit="micrometer",
        ngff_version=version,
        name="tiles",
    )
    info = read_ome_zarr_info(out)
    assert info["ngff_version"] == version
    assert info["zarr_format"] == (2 if version == "0.4" else 3)
    assert info["name"] == "tiles"
    assert info["downsampling"] == "mean"
    assert [a["name"] for a in info["axes"]] == ["z", "y", "x"]
    assert [lv["shape"] for lv in info["levels"]] == [(5, 300, 201), (3, 150, 101), (2, 75, 51)]
    assert [lv["chunks"] for lv in info["levels"]] == [(5, 128, 128), (3, 64, 64), (2, 75, 51)]
    assert {lv["dtype"] for lv in info["levels"]} == {"uint16"}
    assert info["levels"][2]["scale"] == [8.0, 2.0, 2.0]
    assert info["levels"][2]["translation"] == [3.0, 0.75, 0.75]
    assert info["compressor"] == "blosc(cname=zstd, clevel=1, shuffle=bitshuffle)"

    text = format_info(info)
    lines = text.splitlines()
    assert lines[0] == str(out)
    assert f"NGFF {version} (Zarr v{info['zarr_format']})" in lines[1]
    assert "axes: z (space, micrometer), y (space, micrometer), x (space, micrometer)" in text
    assert lines[-3].split()[:6] == ["0", "5", "x", "300", "x", "201"]
    assert lines[-1].split()[0] == "2"
    assert "8, 2, 2" in lines[-1] and "3, 0.75, 0.75" in lines[-1]


def test_info_composes_multiscale_wide_transforms(tmp_path):
    out = write_ome_zarr(
        np.zeros((8, 8), "uint8"), tmp_path / "g.zarr", axes="yx", pixel_size=(0.5, 0.5)
    )
    group = zarr.open_group(str(out), mode="r+")
    attrs = group.attrs.asdict()
    attrs["multiscales"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [2.0, 4.0]},
        {"type": "translation", "translation": [1.0, 1.0]},
    ]
    group.attrs.update(attrs)
    level = read_ome_zarr_info(out)["levels"][0]
    assert level["scale"] == [1.0, 2.0]
    assert level["translation"] == [1.0, 1.0]


def test_info_rejects_what_is_not_an_ome_zarr_image(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InputError, match="no Zarr group"):
        read_ome_zarr_info(plain)
    with pytest.raises(InputError, match="no Zarr group"):
        read_ome_zarr_info(tmp_path / "missing.zarr")
    zarr.create_group(str(tmp_path / "bare.zarr"), zarr_format=2)
    with pytest.raises(InputError, match="no 'multiscales' metadata"):
        read_ome_zarr_info(tmp_path / "bare.zarr")
    group = zarr.create_group(str(tmp_path / "broken.zarr"), zarr_format=3)
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": [], "datasets": [{"path": "0", "coordinateTransformations": []}]}],
    }
    with pytest.raises(InputError, match="dataset '0' is missing"):
        read_ome_zarr_info(tmp_path / "broken.zarr")
