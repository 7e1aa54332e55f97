"""CPU benchmarks of the core engine (issue 2). Report, do not assert.

Run: ``python -m pytest benchmarks/bench_fuse.py --benchmark-only``

* in-memory fusion of the demo mosaic (16 tiles of 1024x1024 uint16, 14.4 Mpx output);
* the same fusion streamed to OME-Zarr with its pyramid;
* planning 10,000 tiles into 10,000 output chunks, and building the graph.

Megapixels per second (output pixels) and the peak of Python/NumPy heap allocations during
the run (tracemalloc) go into each result's ``extra_info``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gpufusion import fuse, fuse_to_ome_zarr, mosaic_from_positions, plan_fusion
from gpufusion.fuse import chunk_task_array
from gpufusion.synthetic import make_mosaic


@pytest.fixture(scope="module")
def demo_mosaic():
    return make_mosaic((4, 4), (1024, 1024), overlap=0.1, seed=0).mosaic()


def _record(benchmark, mosaic, peak: int) -> None:
    mpx = float(np.prod(mosaic.shape)) / 1e6
    benchmark.extra_info["output_megapixels"] = round(mpx, 2)
    benchmark.extra_info["Mpx_per_s"] = round(mpx / benchmark.stats.stats.min, 1)
    benchmark.extra_info["peak_alloc_MiB"] = round(peak / 2**20, 1)
    benchmark.extra_info["cpu_count"] = os.cpu_count()


def _peak_of(fn) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_fuse_in_memory(benchmark, demo_mosaic) -> None:
    image = fuse(demo_mosaic, chunks=1024)
    out = np.empty(image.shape, image.dtype)

    def run():
        image.store(out, lock=False, scheduler="threads")

    run()  # warm-up
    benchmark.pedantic(run, rounds=5, iterations=1)
    _record(benchmark, demo_mosaic, _peak_of(run))


def test_fuse_to_ome_zarr_with_pyramid(benchmark, demo_mosaic) -> None:
    tmp = Path(tempfile.mkdtemp())

    def run():
        target = tmp / "bench.ome.zarr"
        fuse_to_ome_zarr(demo_mosaic, target, chunks=1024, overwrite=True)

    run()  # warm-up
    benchmark.pedantic(run, rounds=3, iterations=1)
    _record(benchmark, demo_mosaic, _peak_of(run))
    size = sum(p.stat().st_size for p in (tmp / "bench.ome.zarr").rglob("*") if p.is_file())
    benchmark.extra_info["store_MiB"] = round(size / 2**20, 1)
    shutil.rmtree(tmp)


class _Stub:
    """A tile that only has a shape: planning never reads pixels."""

    shape, dtype, name = (1024, 1024), np.dtype(np.uint16), "stub"

    def read(self, window):  # pragma: no cover - never called
        raise AssertionError


@pytest.fixture(scope="module")
def big_layout():
    rng = np.random.default_rng(0)
    n = 100
    idx = np.stack(np.unravel_index(np.arange(n * n), (n, n)), axis=1)
    pos = idx * 921.6 + rng.uniform(-3, 3, idx.shape)
    pos -= pos.min(axis=0)
    return mosaic_from_positions([_Stub()] * (n * n), pos)


def test_plan_10000_tiles_10000_chunks(benchmark, big_layout) -> None:
    chunk = int(np.ceil(big_layout.shape[0] / 100))
    plan = benchmark(plan_fusion, big_layout, chunk)
    benchmark.extra_info["chunks"] = int(np.prod(plan.numblocks))
    benchmark.extra_info["entries"] = plan.n_entries


def test_graph_10000_chunks(benchmark, big_layout) -> None:
    chunk = int(np.ceil(big_layout.shape[0] / 100))
    plan = plan_fusion(big_layout, chunk)
    tasks = benchmark.pedantic(chunk_task_array, args=(plan, big_layout), rounds=3)
    benchmark.extra_info["tasks"] = int(np.prod(tasks.numblocks))
