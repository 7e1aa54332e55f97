"""Sharded OME-Zarr 0.5 (Zarr v3 sharding codec), one shard per block task (issue #12)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import Image as ImageV05

from gpufusion import pipeline
from gpufusion.errors import InputError
from gpufusion.synthetic import make_mosaic
from gpufusion.writers.ome_zarr import chunk_count, write_ome_zarr

from .test_cli import run_cli
from .test_resume import count_block_tasks
from .tile_files import write_tile_csv
from .writer_helpers import random_image


def levels_of(out: Path) -> list[zarr.Array]:
    group = zarr.open_group(str(out), mode="r")
    return [group[d["path"]] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]


def shard_files(array: zarr.Array, out: Path) -> list[Path]:
    return [p for p in (out / array.path / "c").rglob("*") if p.is_file()]


@pytest.mark.parametrize("shape,chunks,shard", [
    ((1000, 731), 128, 512),
    ((3, 700, 520), (1, 64, 64), 256),
    ((130, 300, 260), (16, 64, 64), (128, 128, 128)),
])
def test_sharded_output_validates_and_equals_unsharded(tmp_path: Path, shape, chunks,
                                                       shard) -> None:
    axes = {2: "yx", 3: "cyx" if shape[0] == 3 else "zyx"}[len(shape)]
    data = random_image(shape, "uint16", seed=len(shape))
    options = {"axes": axes, "chunks": chunks, "ngff_version": "0.5", "pyramid": "inline"}
    out = write_ome_zarr(da.from_array(data, chunks=64), tmp_path / "s.ome.zarr",
                         shard=shard, **options)
    plain = write_ome_zarr(da.from_array(data, chunks=64), tmp_path / "p.ome.zarr", **options)
    ImageV05.from_zarr(zarr.open_group(str(out), mode="r"))  # valid NGFF 0.5
    sharded, unsharded = levels_of(out), levels_of(plain)
    assert len(sharded) == len(unsharded) >= 2
    for got, want in zip(sharded, unsharded, strict=True):
        np.testing.assert_array_equal(got[...], want[...])
    level0 = sharded[0]
    expected_shard = tuple(shard if isinstance(shard, tuple) else
                           (shard if a != "c" else 1 for a in axes))
    assert level0.shards == expected_shard
    chunk = chunks if isinstance(chunks, tuple) else tuple(
        chunks if a != "c" else 1 for a in axes)
    assert level0.chunks == chunk
    # one object per shard on disk, fewer than chunks
    n_shards = int(np.prod([-(-n // s) for n, s in zip(shape, expected_shard, strict=True)]))
    assert len(shard_files(level0, out)) == n_shards < level0.nchunks
    # level 1: the halved shards, each still holding whole chunks
    assert sharded[1].shards == tuple(-(-s // 2) if a != "c" else 1
                                      for s, a in zip(expected_shard, axes, strict=True))


def test_each_shard_is_one_task(tmp_path: Path) -> None:
    mosaic = make_mosaic((3, 3), (300, 300), overlap=0.1, seed=2).mosaic()
    with count_block_tasks() as tasks:
        result = pipeline.fuse_to_file(mosaic, tmp_path / "m.ome.zarr", chunks=64, shard=256,
                                       ngff_version="0.5")
    level0 = levels_of(result.path)[0]
    assert level0.shards == (256, 256) and level0.chunks == (64, 64)
    n_shards = int(np.prod([-(-n // 256) for n in result.shape]))
    assert tasks.count == n_shards == len(shard_files(level0, result.path))
    plain = pipeline.fuse_to_file(mosaic, tmp_path / "p.ome.zarr", chunks=64,
                                  ngff_version="0.5")
    for got, want in zip(levels_of(result.path), levels_of(plain.path), strict=True):
        np.testing.assert_array_equal(got[...], want[...])


def test_shard_is_refused_for_ngff_04_and_bad_sizes(tmp_path: Path, capsys) -> None:
    syn = make_mosaic((2, 2), (64, 64), overlap=0.1, seed=3)
    tiles = write_tile_csv(tmp_path, syn.tiles, syn.positions)
    out = tmp_path / "o.ome.zarr"
    base = ["fuse", tiles, "-o", out, "--chunk", "32", "--backend", "numpy"]
    for extra, message in [(["--shard", "64"], "sharding needs NGFF 0.5"),
                           (["--shard", "48", "--ngff", "0.5"], "multiple of the chunk size"),
                           (["--shard", "-2", "--ngff", "0.5"], "shard")]:
        code, _, err = run_cli([*base, *extra], capsys)
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and message in lines[0], err
        assert not out.exists()
    code, _, err = run_cli(["fuse", tiles, "-o", tmp_path / "o.ome.tif", "--shard", "64",
                            "--backend", "numpy"], capsys)
    assert code == 2 and "applies to OME-Zarr" in err, err
    assert not (tmp_path / "o.ome.tif").exists()
    code, _, err = run_cli([*base, "--shard", "64", "--ngff", "0.5"], capsys)
    assert code == 0, err
    assert levels_of(out)[0].shards == (64, 64)
    with pytest.raises(InputError, match="NGFF 0.5"):
        write_ome_zarr(np.zeros((8, 8), "uint8"), tmp_path / "x.zarr", axes="yx", shard=4,
                       chunks=2)


def test_shards_by_default_above_the_chunk_limit(tmp_path: Path, monkeypatch) -> None:
    mosaic = make_mosaic((2, 2), (128, 128), overlap=0.1, seed=4).mosaic()
    count = chunk_count(mosaic.shape, (32, 32), "yx")
    monkeypatch.setattr(pipeline, "SHARD_AUTO_CHUNKS", count - 1)
    big = pipeline.fuse_to_file(mosaic, tmp_path / "a.ome.zarr", chunks=32, ngff_version="0.5")
    assert levels_of(big.path)[0].shards == (64, 64)
    v04 = pipeline.fuse_to_file(mosaic, tmp_path / "b.ome.zarr", chunks=32)
    assert zarr.open_group(str(v04.path), mode="r")["0"].shards is None
    monkeypatch.setattr(pipeline, "SHARD_AUTO_CHUNKS", count)
    small = pipeline.fuse_to_file(mosaic, tmp_path / "c.ome.zarr", chunks=32,
                                  ngff_version="0.5")
    assert levels_of(small.path)[0].shards is None


def test_read_back_writes_the_same_sharded_store(tmp_path: Path) -> None:
    """``pyramid="readback"`` stores whole shards too (one task per shard), the same bytes."""
    from .test_pyramid_inline import assert_same_store

    data = random_image((1000, 731), "uint16", seed=9)
    options = {"axes": "yx", "chunks": 64, "ngff_version": "0.5", "shard": 256}
    inline = write_ome_zarr(da.from_array(data, chunks=100), tmp_path / "i.ome.zarr",
                            pyramid="inline", **options)
    readback = write_ome_zarr(da.from_array(data, chunks=100), tmp_path / "r.ome.zarr",
                              pyramid="readback", **options)
    assert levels_of(readback)[1].shards == (128, 128)
    assert_same_store(inline, readback)
