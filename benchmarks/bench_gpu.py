"""GPU benchmarks (pytest-benchmark); skipped without a usable CUDA device.

Run on a GPU machine::

    python -m pytest benchmarks/bench_gpu.py -q -p no:cacheprovider \\
        --benchmark-json=$OUT/bench.json

What is measured, each after an untimed warm-up (kernel compilation, memory pools), with a
device synchronisation inside the timed function:

* ``test_copy_bandwidth``: a device-to-device copy (1 GiB by default), the ceiling a memory-bound
  kernel can approach (bytes read + bytes written per second).
* ``test_fusion_kernel_bandwidth``: the fusion kernel alone over every chunk of a synthetic
  mosaic, packed and resident on the device: effective bandwidth (window bytes read +
  output bytes written, per second) against the copy bandwidth.
* ``test_fusion_tiles_resident_vs_numpy``: the fusion stage with whole tiles resident in
  device memory (descriptors uploaded, windows gathered on the device, kernel) against the
  NumPy backend on all CPU cores (timed once per session, recorded beside the GPU result).
  One launch per block (``fuse_device_windows``).
* ``test_fusion_batched_resident_vs_numpy``: the same with many blocks per launch
  (:mod:`gpufusion.backends.resident`: tiles uploaded once, a block table, one
  ``fuse_blocks_separable`` launch per batch; no window copies), checked against the whole
  NumPy fusion bit for bit; records the speed-up over one launch per block as well.

The whole-slide case (600 tiles from TIFF files to OME-Zarr, CPU and GPU, with a stage
breakdown) is ``benchmarks/bench_wsi.py``.

``extra_info`` records the device name, Mpx/s and GB/s.
Sizes: ``GPUFUSION_BENCH_GRID`` (default ``4x4``) tiles of ``GPUFUSION_BENCH_TILE`` (2048);
copies of ``GPUFUSION_BENCH_COPY_MIB`` (default 1024) MiB.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from gpufusion.backends import gpu_status

GPU_OK, GPU_WHY = gpu_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=f"no usable GPU: {GPU_WHY}")]

GRID = tuple(int(v) for v in os.environ.get("GPUFUSION_BENCH_GRID", "4x4").split("x"))
TILE = int(os.environ.get("GPUFUSION_BENCH_TILE", "2048"))
COPY_BYTES = int(os.environ.get("GPUFUSION_BENCH_COPY_MIB", "1024")) << 20
CHUNK = 1024
ROUNDS = 5


def device_info() -> dict[str, str]:
    from gpufusion.bench import cpu_name, gpu_name

    return {"device": gpu_name(), "cpu": cpu_name()}


def run_timed(benchmark, fn, rounds: int, warmup_rounds: int = 0):
    """``benchmark.pedantic`` returning ``(result, median seconds)``, also when disabled."""
    t0 = time.perf_counter()
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    stats = getattr(benchmark, "stats", None)
    return result, (stats.stats.median if stats else time.perf_counter() - t0)


def event_seconds(fn, repeat: int = 1) -> float:
    """Device time of ``fn()`` (run ``repeat`` times) measured with CUDA events."""
    import cupy

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeat


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth (GB/s, read + written), median of 10 copies."""
    import cupy

    n = COPY_BYTES
    src = cupy.full(n, 7, dtype=np.uint8)
    dst = cupy.empty_like(src)
    cupy.copyto(dst, src)  # warm-up
    times = [event_seconds(lambda: cupy.copyto(dst, src)) for _ in range(10)]
    return 2 * n / float(np.median(times)) / 1e9


@pytest.fixture(scope="module")
def synthetic():
    from gpufusion.synthetic import make_mosaic

    syn = make_mosaic(GRID, (TILE, TILE), overlap=0.1, dtype="uint16", seed=1)
    return syn, syn.mosaic()


@pytest.fixture(scope="module")
def setup(synthetic):
    """Backend, fusion parameters and the plan of the synthetic mosaic."""
    from gpufusion.backends import get_backend
    from gpufusion.fuse import fusion_params
    from gpufusion.plan import plan_fusion

    _, mosaic = synthetic
    return get_backend("cupy"), fusion_params(mosaic), plan_fusion(mosaic, CHUNK)


def chunk_windows(mosaic, table, tiles=None) -> list:
    """The windows of one chunk, from host sources or from device-resident ``tiles``."""
    if tiles is None:
        return [mosaic.tiles[int(i)].source.read(w) for i, w in zip(table.tiles,
                                                                    table.windows(),
                                                                    strict=True)]
    return [tiles[int(i)][w] for i, w in zip(table.tiles, table.windows(), strict=True)]


@pytest.fixture(scope="module")
def numpy_seconds(synthetic) -> float:
    """The NumPy backend on all CPU cores, best of two after a warm-up chunk."""
    import dask

    from gpufusion import fuse

    _, mosaic = synthetic
    image = fuse(mosaic, chunks=CHUNK, backend="numpy")
    with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
        image[:CHUNK, :CHUNK].compute()
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            image.compute()
            best = min(best, time.perf_counter() - t0)
    return best


def test_copy_bandwidth(benchmark, copy_gbps: float) -> None:
    import cupy

    n = COPY_BYTES
    src = cupy.ones(n, dtype=np.uint8)
    dst = cupy.empty_like(src)

    def copy() -> None:
        cupy.copyto(dst, src)
        cupy.cuda.Device().synchronize()

    run_timed(benchmark, copy, ROUNDS, warmup_rounds=1)
    assert int(dst[-1]) == 1
    benchmark.extra_info.update(device_info(), bytes=2 * n, copy_GBps=round(copy_gbps, 1))


def test_fusion_kernel_bandwidth(benchmark, synthetic, setup, copy_gbps: float) -> None:
    import cupy

    _, mosaic = synthetic
    backend, params, plan = setup
    chunks, window_bytes = [], 0
    for idx in np.ndindex(*plan.numblocks):
        if len(plan.chunk(idx)):
            windows = chunk_windows(mosaic, plan.chunk(idx))
            window_bytes += sum(w.nbytes for w in windows)  # read once each, whatever packing
            chunks.append(backend.upload(windows, plan.chunk(idx), params))
    out_bytes = sum(math.prod(c.shape) for c in chunks) * np.dtype(params.out_dtype).itemsize
    moved = window_bytes + out_bytes

    def launch_all() -> None:
        for c in chunks:
            backend.launch(c, params)
        cupy.cuda.Device().synchronize()

    launch_all()  # warm-up: compilation
    kernel_s = float(np.median([event_seconds(lambda: [backend.launch(c, params)
                                                       for c in chunks]) for _ in range(5)]))
    run_timed(benchmark, launch_all, ROUNDS, warmup_rounds=1)
    gbps = moved / kernel_s / 1e9
    benchmark.extra_info.update(
        device_info(), chunks=len(chunks), bytes_moved=int(moved),
        kernel_seconds=kernel_s, fusion_GBps=round(gbps, 1), copy_GBps=round(copy_gbps, 1),
        fraction_of_copy=round(gbps / copy_gbps, 3),
        Mpx_per_s=round(math.prod(mosaic.shape) / kernel_s / 1e6, 1))
    assert gbps > 0


def test_fusion_tiles_resident_vs_numpy(benchmark, synthetic, setup,
                                        numpy_seconds: float) -> None:
    import cupy

    from gpufusion import fuse

    _, mosaic = synthetic
    backend, params, plan = setup
    tiles = [cupy.asarray(t.source.read(tuple(slice(0, n) for n in t.shape)))
             for t in mosaic.tiles]
    tables = [plan.chunk(idx) for idx in np.ndindex(*plan.numblocks)]

    def fuse_resident() -> list:
        blocks = [backend.fuse_device_windows(chunk_windows(mosaic, t, tiles), t, params)
                  for t in tables]
        cupy.cuda.Device().synchronize()
        return blocks

    blocks = fuse_resident()  # warm-up, and a check against the NumPy backend
    first = cupy.asnumpy(blocks[0])
    expected = fuse(mosaic, chunks=CHUNK)[:first.shape[0], :first.shape[1]].compute()
    assert np.abs(first.astype(np.int64) - expected).max() <= 1
    del blocks
    _, gpu_s = run_timed(benchmark, fuse_resident, ROUNDS)
    mpx = math.prod(mosaic.shape) / 1e6
    benchmark.extra_info.update(
        device_info(), megapixels=round(mpx, 1), gpu_Mpx_per_s=round(mpx / gpu_s, 1),
        numpy_seconds=numpy_seconds, numpy_Mpx_per_s=round(mpx / numpy_seconds, 1),
        numpy_threads=os.cpu_count(), speedup=round(numpy_seconds / gpu_s, 1))


def test_fusion_batched_resident_vs_numpy(benchmark, synthetic, setup,
                                          numpy_seconds: float) -> None:
    import cupy

    from gpufusion import fuse
    from gpufusion.backends.resident import fuse_resident, upload_tiles

    _, mosaic = synthetic
    backend, params, plan = setup
    tiles = upload_tiles(mosaic)
    tables = [plan.chunk(idx) for idx in np.ndindex(*plan.numblocks)]

    def fuse_batched() -> list:
        blocks = fuse_resident(tiles, tables, params)
        cupy.cuda.Device().synchronize()
        return blocks

    blocks = fuse_batched()  # warm-up (compilation), and the whole mosaic checked
    expected = fuse(mosaic, chunks=CHUNK).compute()
    for table, block in zip(tables, blocks, strict=True):
        where = tuple(slice(int(a), int(a) + n) for a, n in zip(table.start, table.shape,
                                                               strict=True))
        np.testing.assert_array_equal(cupy.asnumpy(block), expected[where])
    del blocks
    kernel_s = float(np.median([event_seconds(lambda: fuse_resident(tiles, tables, params))
                                for _ in range(5)]))
    _, gpu_s = run_timed(benchmark, fuse_batched, ROUNDS)
    per_block_views = [[tiles.tile(int(i))[w] for i, w in zip(t.tiles, t.windows(),
                                                              strict=True)] for t in tables]

    def per_block() -> None:
        for t, views in zip(tables, per_block_views, strict=True):
            if views:
                backend.fuse_device_windows(views, t, params)
        cupy.cuda.Device().synchronize()

    per_block()
    one_s = min(_wall(per_block) for _ in range(3))
    mpx = math.prod(mosaic.shape) / 1e6
    benchmark.extra_info.update(
        device_info(), megapixels=round(mpx, 1), blocks=len(tables),
        gpu_Mpx_per_s=round(mpx / gpu_s, 1), device_seconds=kernel_s,
        per_block_launch_seconds=one_s, batched_over_per_block=round(one_s / gpu_s, 2),
        numpy_seconds=numpy_seconds, numpy_Mpx_per_s=round(mpx / numpy_seconds, 1),
        numpy_threads=os.cpu_count(), speedup=round(numpy_seconds / gpu_s, 1))


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
