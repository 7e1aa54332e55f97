"""The whole job: bounded memory, channels, metadata carried into the output."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import zarr

from gpufusion import fuse, fuse_to_ome_zarr, make_mosaic
from gpufusion.writers.ome_zarr import read_ome_zarr_info


def test_streaming_to_ome_zarr_never_holds_the_mosaic(tmp_path: Path) -> None:
    syn = make_mosaic((5, 5), (256, 256), overlap=0.1, seed=1)
    mosaic = syn.mosaic()
    full_float = int(np.prod(mosaic.shape)) * 4  # the mosaic as float32 accumulators
    fuse_to_ome_zarr(mosaic, tmp_path / "warm.ome.zarr", chunks=128)  # imports, caches
    tracemalloc.start()
    fuse_to_ome_zarr(mosaic, tmp_path / "m.ome.zarr", chunks=128)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # a materialised uint16 mosaic alone would be 0.5 * full_float
    assert peak < 0.45 * full_float, (peak, full_float)
    level0 = zarr.open_group(str(tmp_path / "m.ome.zarr"), mode="r")["0"][...]
    np.testing.assert_array_equal(level0, fuse(mosaic, chunks=300).compute())


def test_channels_share_the_layout(tmp_path: Path) -> None:
    syn = make_mosaic((2, 2), (64, 64), seed=3)
    ch0 = syn.mosaic()
    ch1 = make_mosaic((2, 2), (64, 64), seed=3).mosaic()
    inverted = type(ch1)(tuple(t.__class__(t.source.__class__(65535 - t.source.array, t.name),
                                           t.affine, t.name) for t in ch1.tiles),
                         ch1.origin, ch1.shape)
    result = fuse_to_ome_zarr([ch0, inverted], tmp_path / "c.ome.zarr", chunks=48,
                              ngff_version="0.5")
    assert result.shape == (2, *ch0.shape)
    img = zarr.open_group(str(tmp_path / "c.ome.zarr"), mode="r")["0"][...]
    np.testing.assert_array_equal(img[0], fuse(ch0, chunks=48).compute())
    covered = syn.coverage(ch0.origin, ch0.shape)
    assert np.abs(img[1][covered].astype(int) + img[0][covered] - 65535).max() <= 1
    info = read_ome_zarr_info(tmp_path / "c.ome.zarr")
    assert [a["name"] for a in info["axes"]] == ["c", "y", "x"]


def test_pixel_size_and_origin_reach_the_metadata(tmp_path: Path) -> None:
    syn = make_mosaic((1, 2), (64, 64), seed=4)
    mosaic = syn.mosaic(positions=syn.positions + [10.0, 20.0], pixel_size=(0.5, 0.25),
                        unit="micrometer")
    fuse_to_ome_zarr(mosaic, tmp_path / "p.ome.zarr", chunks=32)
    ms = zarr.open_group(str(tmp_path / "p.ome.zarr"), mode="r").attrs["multiscales"][0]
    assert ms["axes"][0]["unit"] == "micrometer"
    t0 = ms["datasets"][0]["coordinateTransformations"]
    assert t0[0]["scale"] == [0.5, 0.25]
    assert t0[1]["translation"] == [10 * 0.5, 20 * 0.25]


def test_time_points_become_a_t_axis_in_their_common_grid(tmp_path: Path) -> None:
    syn = make_mosaic((1, 2), (64, 64), seed=6)
    t0 = syn.mosaic()
    t1 = syn.mosaic(positions=syn.positions + [3.0, 5.0])  # the stage drifted by (3, 5)
    result = fuse_to_ome_zarr([[t0, t0], [t1, t1]], tmp_path / "t.ome.zarr", chunks=40)
    assert result.shape == (2, 2, t0.shape[0] + 3, t0.shape[1] + 5)
    img = zarr.open_group(str(tmp_path / "t.ome.zarr"), mode="r")["0"][...]
    a, b = fuse(t0, chunks=40).compute(), fuse(t1, chunks=40).compute()
    np.testing.assert_array_equal(img[0, 1, : a.shape[0], : a.shape[1]], a)
    np.testing.assert_array_equal(img[1, 0, 3:, 5:], b)
    info = read_ome_zarr_info(tmp_path / "t.ome.zarr")
    assert [a["name"] for a in info["axes"]] == ["t", "c", "y", "x"]
