"""No tile pixels travel through the scheduler: fusion tasks read their own windows.

For tiles read from disk, every task of the fusion graph, pickled as the scheduler ships
it, must be far smaller than one tile (it holds a chunk's plan and the tiles' paths), and
all of them together far smaller than the tiles. The same measurement on sources that
hold their pixels must fail, or it would prove nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest

from gpufusion import fuse
from gpufusion.readers import mosaic_from_file
from gpufusion.synthetic import make_mosaic

from .tile_files import write_tile_csv

TILE = 256


def tile_files(folder: Path, compression: str | None) -> Path:
    """A 2x3 grid of 256 x 256 uint16 TIFF tiles and its positions CSV."""
    syn = make_mosaic((2, 3), (TILE, TILE), overlap=0.15, subpixel=1.0, seed=3)
    return write_tile_csv(folder, syn.tiles, syn.positions, compression=compression)


def task_payloads(image) -> dict:
    """Pickled bytes of every task the scheduler would receive for ``image``, optimised as
    ``compute`` does (the fusion step fused with what follows it)."""
    (optimized,) = dask.optimize(image)
    return {key: len(cloudpickle.dumps(task))
            for key, task in dict(optimized.__dask_graph__()).items()}


def check_payloads(mosaic, chunks: int) -> tuple[int, int, int]:
    """``(largest task, all tasks, one tile)`` in bytes for the fused graph (to host)."""
    image = fuse(mosaic, chunks=chunks)
    host = image.map_blocks(np.asarray, dtype=image.dtype, meta=np.empty((0, 0), image.dtype))
    sizes = task_payloads(host)
    assert len(sizes) >= math.prod(image.numblocks)
    tile = min(math.prod(t.shape) * t.source.dtype.itemsize for t in mosaic.tiles)
    return max(sizes.values()), sum(sizes.values()), tile


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tasks_carry_plans_not_pixels(tmp_path: Path, compression: str | None) -> None:
    mosaic = mosaic_from_file(tile_files(tmp_path, compression))
    largest, total, tile = check_payloads(mosaic, chunks=128)
    all_tiles = tile * len(mosaic.tiles)
    assert largest < tile / 4, (largest, tile)
    assert total < all_tiles / 8, (total, all_tiles)


def test_the_check_catches_sources_holding_pixels(tmp_path: Path) -> None:
    """Sources that loaded their pixels eagerly (and so pickle them) fail the same check."""
    mosaic = mosaic_from_file(tile_files(tmp_path, None))
    for t in mosaic.tiles:
        t.source.pixels = np.array(t.source.read(tuple(slice(0, n) for n in t.shape)))
    largest, total, tile = check_payloads(mosaic, chunks=128)
    assert largest >= tile / 4 and total >= tile * len(mosaic.tiles) / 8
