"""CPU benchmarks of the writers (issue 5): pyramidal OME-TIFF next to OME-Zarr. Report only.

Run: ``python -m pytest benchmarks/bench_write.py --benchmark-only``

The image is the demo mosaic (16 tiles of 1024x1024 uint16, 3792 x 3791 = 14.4 Mpx), either

* ``array``: fused once beforehand, so the numbers are the writer's own (level 0 stored,
  pyramid computed and stored, compression, metadata, atomic rename), or
* ``fused``: the lazy fusion graph, so the fusion runs inside the write, as in
  ``gpufusion fuse``.

Writers: OME-TIFF with its default zlib compression and uncompressed (which shows what the
compression costs), OME-Zarr NGFF 0.4 (Zarr v2) and 0.5 (Zarr v3) with their default
blosc-zstd. Every write makes the full pyramid. Each result's ``extra_info`` has the level-0
megapixels per second of the best round, the output size and the peak of Python/NumPy heap
allocations (tracemalloc) during one write. The machine may be shared: read the best round.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from gpufusion import fuse
from gpufusion.synthetic import make_mosaic
from gpufusion.writers.ome_tiff import write_ome_tiff
from gpufusion.writers.ome_zarr import write_ome_zarr

CHUNK = 1024
ROUNDS = 5

WRITERS: dict[str, Callable[[da.Array, Path], Path]] = {
    "ome-tiff-zlib": lambda image, out: write_ome_tiff(
        image, out, axes="yx", unit="um", pixel_size=(0.5, 0.5)
    ),
    "ome-tiff-none": lambda image, out: write_ome_tiff(
        image, out, axes="yx", unit="um", pixel_size=(0.5, 0.5), compression="none"
    ),
    "ome-zarr-0.4": lambda image, out: write_ome_zarr(
        image, out, axes="yx", unit="um", pixel_size=(0.5, 0.5), ngff_version="0.4"
    ),
    "ome-zarr-0.5": lambda image, out: write_ome_zarr(
        image, out, axes="yx", unit="um", pixel_size=(0.5, 0.5), ngff_version="0.5"
    ),
}


@pytest.fixture(scope="module")
def fused_graph() -> da.Array:
    mosaic = make_mosaic((4, 4), (1024, 1024), overlap=0.1, seed=0).mosaic()
    return fuse(mosaic, chunks=CHUNK)


@pytest.fixture(scope="module")
def fused_array(fused_graph: da.Array) -> da.Array:
    return da.from_array(fused_graph.compute(), chunks=CHUNK)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("source", ["array", "fused"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_write_pyramid(benchmark, tmp_path, request, writer: str, source: str) -> None:
    image = request.getfixturevalue(f"fused_{'array' if source == 'array' else 'graph'}")
    suffix = ".ome.tif" if writer.startswith("ome-tiff") else ".ome.zarr"
    out = tmp_path / f"bench{suffix}"
    write = WRITERS[writer]

    def fresh():  # untimed: each round writes a new output, as a user's run would
        _remove(out)
        return (image, out), {}

    write(*fresh()[0])  # warm-up: imports, codec set-up, page cache
    benchmark.pedantic(write, setup=fresh, rounds=ROUNDS, iterations=1)

    _remove(out)
    tracemalloc.start()
    write(image, out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mpx = float(np.prod(image.shape)) / 1e6
    benchmark.extra_info["source"] = source
    benchmark.extra_info["megapixels"] = round(mpx, 2)
    benchmark.extra_info["Mpx_per_s"] = round(mpx / benchmark.stats.stats.min, 1)
    benchmark.extra_info["MB_per_s"] = round(image.nbytes / 1e6 / benchmark.stats.stats.min, 1)
    benchmark.extra_info["output_MiB"] = round(_size(out) / 2**20, 1)
    benchmark.extra_info["peak_alloc_MiB"] = round(peak / 2**20, 1)
    benchmark.extra_info["cpu_count"] = os.cpu_count()
