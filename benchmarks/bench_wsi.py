"""Whole-slide benchmark (issues 3 and 4): register and fuse ~600 tiles from disk, CPU and GPU.

The seed workload: ``GPUFUSION_WSI_TILES`` (default 600) synthetic tiles of 2048x2048 uint16
with 10 % overlap, written as uncompressed TIFF files with a positions CSV carrying stage
positions off by up to +-``STAGE_ERROR`` px. Each case runs what a user runs, after an
untimed warm-up (one chunk: kernel compilation, memory pools), timed once:

* ``test_whole_slide_fuse[numpy|cupy]``: :func:`gpufusion.fuse_to_file` from the TIFF files
  to an OME-Zarr 0.4 image with its full 2x pyramid (blosc-zstd), the same call as
  ``gpufusion fuse positions.csv -o slide.ome.zarr --backend B``. The CuPy backend builds the
  pyramid on the device (inline), so each block and level leaves the GPU once.
* ``test_whole_slide_register[numpy|cupy]``: :func:`gpufusion.registration.register_mosaic`
  on the same files, as ``gpufusion register positions.csv``; ``extra_info`` has the RMS
  error against the true positions.

The breakdown of a fusion run is measured stage by stage after the end-to-end run, each
stage alone over the whole slide with the same threads (stages overlap in the real run, so
they do not add up to its time), in the order a block flows:

* ``read``: every planned tile window of every chunk read from the TIFF files into memory
  (wall time);
* ``h2d``, ``kernel`` (CuPy only): the backend's own per-stage timers of the end-to-end run,
  device seconds from CUDA events (see :class:`gpufusion.backends.cupy_backend.StageTimes`;
  all its timers are in ``extra_info`` as ``gpu_*``);
* ``fuse``: fusion only, blocks dropped (wall time; for CuPy with a device synchronisation,
  including the host-to-device copies and kernels);
* ``d2h`` (CuPy only): the device-to-host copy of every chunk of every level written
  (the run downsamples on the device, so each leaves the GPU once): each chunk is read
  back from the store and uploaded first (untimed), then only the pipeline's own copy to
  the host (``cupy_backend.to_host``) is timed;
* ``compress``: every chunk of every level encoded with the store's codec;
* ``write``: every chunk of every level, already encoded, stored again into a fresh Zarr
  ``LocalStore`` (one file per chunk, as the run's store writes them; no encoding).

``d2h``, ``compress`` and ``write`` are timed per block on the threads and reported as
thread-seconds divided by the threads. The breakdown is in ``extra_info["stages"]`` (keys
``read_s``, ``gpu_h2d_s``, ``gpu_kernel_s``, ``fuse_s``, ``d2h_s``, ``compress_s``,
``write_s``) and printed after each fusion case.

The image written is checked level by level (:func:`pyramid_check`), against an
independent reference: the NumPy backend's fusion of the same files, and its pyramid made
with the reference :func:`gpufusion.pyramid.downsample_mean2`, at the levels and factors
the store's ``multiscales`` metadata declares. Every pixel of every level is compared
(within 1 DN; exactly for the NumPy backend), and each written level must also be exactly
the 2x mean of the written level above it (a block corrupted on the device after it was
copied, but before it was downsampled, fails this). The result is printed as soon as it
is known, and kept in ``extra_info["pyramid_check"]``. End-to-end times are printed as
soon as they are measured too, so a run cut short by a timeout still leaves them in the
log.

Run (about 3 minutes per 100 tiles on 2 CPU cores; tiles are written once per session)::

    GPUFUSION_WSI_TILES=600 python -m pytest benchmarks/bench_wsi.py -q -p no:cacheprovider \\
        --benchmark-json=wsi.json

``GPUFUSION_WSI_DIR`` keeps the tiles in that folder and reuses them on the next run.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from gpufusion.backends import gpu_status

GPU_OK, GPU_WHY = gpu_status()
WSI_TILES = int(os.environ.get("GPUFUSION_WSI_TILES", "600"))
TILE = 2048
CHUNK = 1024
STAGE_ERROR = 10.0
BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=f"no usable GPU: {GPU_WHY}")]),
]


@dataclass(frozen=True)
class Slide:
    positions_csv: Path  # stage positions (what fuse and register read)
    truth: np.ndarray  # true positions (y, x), index order
    grid: tuple[int, int]
    write_seconds: float


def grid_for(n_tiles: int) -> tuple[int, int]:
    rows = max(1, int(math.sqrt(n_tiles)))
    return rows, -(-n_tiles // rows)


def write_slide(folder: Path, n_tiles: int) -> Slide:
    """``n_tiles`` synthetic tiles as TIFF files, ``positions.csv`` and ``truth.csv``."""
    import tifffile

    from gpufusion.synthetic import make_mosaic

    rows, cols = grid_for(n_tiles)
    folder.mkdir(parents=True, exist_ok=True)
    truth_csv = folder / "truth.csv"
    if truth_csv.exists():  # written by an earlier run with the same tile count
        truth = np.loadtxt(truth_csv, delimiter=",", ndmin=2)
        if len(truth) == n_tiles:
            return Slide(folder / "positions.csv", truth, (rows, cols), 0.0)
    t0 = time.perf_counter()
    syn = make_mosaic((rows, cols), (TILE, TILE), overlap=0.1, dtype="uint16",
                      stage_error=STAGE_ERROR, seed=2)
    lines = ["file,x,y"]
    for k in range(n_tiles):
        tifffile.imwrite(folder / f"tile_{k:04d}.tif", syn.tiles[k])
        y, x = syn.stage_positions[k]
        lines.append(f"tile_{k:04d}.tif,{float(x)!r},{float(y)!r}")
    (folder / "positions.csv").write_text("\n".join(lines) + "\n")
    np.savetxt(truth_csv, syn.positions[:n_tiles], delimiter=",")
    return Slide(folder / "positions.csv", syn.positions[:n_tiles], (rows, cols),
                 time.perf_counter() - t0)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Slide:
    keep = os.environ.get("GPUFUSION_WSI_DIR")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("wsi")
    return write_slide(folder, WSI_TILES)


def machine_info(backend: str) -> dict[str, object]:
    from gpufusion.bench import cpu_name, gpu_name

    info: dict[str, object] = {"cpu": cpu_name(), "threads": os.cpu_count()}
    if backend == "cupy":
        info["device"] = gpu_name()
    return info


def run_once(benchmark, fn):
    """Time ``fn`` once through pytest-benchmark; ``(result, seconds)``, also when disabled."""
    t0 = time.perf_counter()
    result = benchmark.pedantic(fn, rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    return result, (stats.stats.median if stats else time.perf_counter() - t0)


def synchronize(backend: str) -> None:
    if backend == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


# ------------------------------------------------------------------------ stage breakdown


def read_seconds(mosaic) -> float:
    """Read every planned window of every chunk into memory, on dask's threads."""
    from gpufusion.fuse import chunk_task_array
    from gpufusion.plan import plan_fusion

    tasks = chunk_task_array(plan_fusion(mosaic, CHUNK), mosaic)

    def read(cell: np.ndarray) -> np.ndarray:
        nbytes = sum(np.array(w).nbytes for w in cell.reshape(-1)[0].read_windows())
        return np.full((1,) * cell.ndim, nbytes, dtype=np.int64)

    t0 = time.perf_counter()
    tasks.map_blocks(read, dtype=np.int64, meta=np.empty((0, 0), np.int64)).sum().compute()
    return time.perf_counter() - t0


def fuse_seconds(mosaic, backend: str) -> float:
    """Fusion alone over the whole slide, blocks dropped (synchronised for CuPy)."""
    from gpufusion import fuse

    def drop(block) -> np.ndarray:
        if backend == "cupy":
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        return np.zeros((1,) * block.ndim, dtype=np.int64)

    image = fuse(mosaic, chunks=CHUNK, backend=backend)
    t0 = time.perf_counter()
    image.map_blocks(drop, dtype=np.int64, chunks=(1, 1),
                     meta=np.empty((0, 0), np.int64)).sum().compute()
    synchronize(backend)
    return time.perf_counter() - t0


def d2h_seconds(store: Path) -> float:
    """Device-to-host copies of every chunk of every level written: thread-seconds / threads.

    The run copies level 0 and every level it downsampled on the device to the host once
    per chunk. Here each chunk is read back from ``store`` and uploaded (untimed), and only
    the pipeline's own copy to the host (``cupy_backend.to_host``: into the thread's pinned
    buffer, then out of it) is timed, after a stream synchronisation.
    """
    import cupy

    from gpufusion.backends.cupy_backend import to_host

    def copy(block: np.ndarray) -> np.ndarray:
        device = cupy.asarray(block)
        stream = cupy.cuda.get_current_stream()
        stream.synchronize()  # the upload is done: time the copy alone
        t0 = time.perf_counter()
        host = to_host(device)
        stream.synchronize()
        seconds = time.perf_counter() - t0
        assert host.shape == block.shape
        return np.full((1,) * block.ndim, seconds)

    spent, tasks = 0.0, 0
    for array in device_levels(store):
        stored = da.from_zarr(array)
        spent += float(stored.map_blocks(copy, dtype=np.float64, chunks=(1,) * stored.ndim,
                                         meta=np.empty((0,) * stored.ndim)).sum().compute())
        tasks += stored.npartitions
    return per_thread(spent, tasks)


def device_levels(store: Path) -> list:
    """The levels the run made on the device and copied to the host: level 0 and the
    levels each block task downsampled itself, stored in chunks of exactly the block's
    contribution (level-0 chunk halved k times, at least ``inline_min_chunk``); the
    coarser levels were read back and downsampled on the CPU (gpufusion.writers.ome_zarr)."""
    from gpufusion.writers.ome_zarr import inline_min_chunk

    arrays = level_arrays(store)
    first = tuple(arrays[0].chunks)
    smallest = inline_min_chunk(first)
    out = [arrays[0]]
    for k, array in enumerate(arrays[1:], start=1):
        halved = tuple(-(-c // 2**k) if c > 1 else 1 for c in first)
        if tuple(array.chunks) != halved or min(c for c in halved if c > 1) < smallest:
            break
        out.append(array)
    return out


def threads() -> int:
    return dask.config.get("num_workers", None) or os.cpu_count() or 1


def per_thread(thread_seconds: float, tasks: int) -> float:
    """Thread-seconds spread over the threads that could run ``tasks`` at once."""
    return thread_seconds / max(1, min(threads(), tasks))


def level_arrays(store: Path) -> list:
    """The Zarr arrays of every level of the OME-Zarr image at ``store``."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return [array for _, array in sorted(group.arrays(), key=lambda kv: int(kv[0]))]


def compress_seconds(store: Path) -> float:
    """Encode every chunk of every level with its codec: thread-seconds / threads."""
    from numcodecs import get_codec

    spent, tasks = 0.0, 0
    for array in level_arrays(store):
        codec = get_codec(array.metadata.to_dict()["compressor"])
        stored = da.from_zarr(array)

        def encode(block: np.ndarray, codec=codec) -> np.ndarray:
            data = np.ascontiguousarray(block)
            t0 = time.perf_counter()
            codec.encode(data)
            return np.full((1,) * block.ndim, time.perf_counter() - t0)

        spent += float(stored.map_blocks(encode, dtype=np.float64, chunks=(1,) * stored.ndim,
                                         meta=np.empty((0,) * stored.ndim)).sum().compute())
        tasks += stored.npartitions
    return per_thread(spent, tasks)


def chunk_keys(store: Path) -> list[str]:
    """Store keys of every encoded chunk of every level (metadata documents left out)."""
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json")


def write_seconds(store: Path, scratch: Path) -> float:
    """Store every encoded chunk again into a fresh Zarr ``LocalStore``: thread-seconds /
    threads. Each chunk's bytes are read (untimed, from the page cache) and then only
    ``LocalStore.set`` is timed: the run's write of a chunk once it is compressed."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    keys = chunk_keys(store)
    target = LocalStore(str(scratch))
    buffer = default_buffer_prototype().buffer

    def put(key: str) -> float:
        data = buffer.from_bytes((store / key).read_bytes())
        t0 = time.perf_counter()
        sync(target.set(key, data))
        return time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(max_workers=threads()) as pool:
            spent = sum(pool.map(put, keys))
        assert chunk_keys(scratch) == keys
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return per_thread(spent, len(keys))


# --------------------------------------------------------------------- the pyramid check


def level_factors(store: Path) -> list[tuple[int, ...]]:
    """Per level after the first, the factor on each axis, from the ``multiscales`` metadata
    (NGFF 0.4 or 0.5): the ratio of each level's scale to the level above."""
    import zarr

    attrs = zarr.open_group(str(store), mode="r").attrs.asdict()
    multiscale = attrs.get("ome", attrs).get("multiscales")[0]
    scales = [np.array(next(t["scale"] for t in d["coordinateTransformations"]
                            if t["type"] == "scale"), dtype=np.float64)
              for d in multiscale["datasets"]]
    factors = [tuple(int(v) for v in np.rint(b / a)) for a, b in itertools.pairwise(scales)]
    assert all(set(f) <= {1, 2} for f in factors), f"factors {factors} are not 1 or 2"
    return factors


def halve(image: da.Array, factors: tuple[int, ...]) -> da.Array:
    """The reference 2x mean of a dask image, blockwise with every block boundary even (so
    each output sample sees the same 2x2 window as in the whole array)."""
    from gpufusion.pyramid import downsample_mean2

    def even(sizes: tuple[int, ...], f: int) -> tuple[int, ...]:
        if f == 1 or all(n % 2 == 0 for n in sizes[:-1]):
            return sizes
        size = max(sizes) + max(sizes) % 2
        total = sum(sizes)
        return (size,) * (total // size) + ((total % size,) if total % size else ())

    image = image.rechunk(tuple(even(c, f) for c, f in zip(image.chunks, factors,
                                                           strict=True)))
    chunks = tuple(tuple(-(-n // f) for n in c) for c, f in zip(image.chunks, factors,
                                                               strict=True))
    return image.map_blocks(downsample_mean2, factors, chunks=chunks, dtype=image.dtype)


def pyramid_check(store: Path, mosaic, chunk: int = CHUNK) -> list[dict[str, object]]:
    """Every level of the OME-Zarr image at ``store`` against the NumPy pyramid of the
    NumPy fusion of ``mosaic``; one dict per level.

    ``max_diff`` and ``differing`` (pixels) compare the level with the reference level;
    ``self_consistent`` says whether the level (after the first) is exactly the reference
    2x mean of the written level above it. One dask computation: the reference fusion is
    computed once, streamed block by block.
    """
    from gpufusion import fuse

    written = [da.from_zarr(a) for a in level_arrays(store)]
    factors = level_factors(store)
    assert len(factors) == len(written) - 1, (len(factors), len(written))
    reference = [fuse(mosaic, chunks=chunk, backend="numpy")]
    for f in factors:
        reference.append(halve(reference[-1], f))
    measures = []
    for k, (got, want) in enumerate(zip(written, reference, strict=True)):
        assert got.shape == want.shape, f"level {k}: shape {got.shape}, expected {want.shape}"
        diff = abs(got.astype(np.int64) - want.rechunk(got.chunks).astype(np.int64))
        below = (got == halve(written[k - 1], factors[k - 1]).rechunk(got.chunks)).all() \
            if k else da.from_array(np.True_)
        measures.append((diff.max(), (diff > 0).sum(), below))
    results = dask.compute(*measures)
    return [{"level": k, "shape": list(written[k].shape), "max_diff": int(m),
             "differing": int(n), "self_consistent": bool(c)}
            for k, (m, n, c) in enumerate(results)]


def format_check(backend: str, levels: list[dict[str, object]]) -> str:
    """One line: per level, the largest difference from the NumPy pyramid."""
    parts = [f"{lv['level']}: max {lv['max_diff']} ({lv['differing']} px)"
             + ("" if lv["self_consistent"] else " NOT the 2x mean of the level above")
             for lv in levels]
    return f"pyramid check [{backend}] vs NumPy pyramid of the NumPy fusion: " + \
        "; ".join(parts)


#: The printed breakdown, in the order a block flows: (key in ``stages``, label).
BREAKDOWN = (("read_s", "read"), ("gpu_h2d_s", "h2d"), ("gpu_kernel_s", "kernel"),
             ("fuse_s", "fuse"), ("d2h_s", "d2h"), ("compress_s", "compress"),
             ("write_s", "write"))


def format_breakdown(backend: str, seconds: float, stages: dict[str, float]) -> str:
    """One line: the end-to-end time and each stage alone (absent stages left out)."""
    parts = [f"{label} {stages[key]:.3f} s" for key, label in BREAKDOWN if key in stages]
    return f"whole slide [{backend}] {seconds:.2f} s end to end; stages alone: " + \
        ", ".join(parts)


# ------------------------------------------------------------------------------ the cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_slide_fuse(benchmark, slide: Slide, backend: str, tmp_path,
                          capsys) -> None:
    import zarr

    from gpufusion import fuse, fuse_to_file
    from gpufusion.backends import get_backend
    from gpufusion.readers import mosaic_from_file

    mosaic = mosaic_from_file(slide.positions_csv)
    impl = get_backend(backend)
    fuse(mosaic, chunks=CHUNK, backend=backend)[:CHUNK, :CHUNK].compute()  # warm-up
    if backend == "cupy":
        import cupy

        from gpufusion.backends.cupy_backend import downsample_mean2_gpu

        downsample_mean2_gpu(cupy.zeros((64, 64), dtype=mosaic.dtype), (2, 2))
        impl.profile = True
        impl.reset_stage_times()
    out = tmp_path / "slide.ome.zarr"

    def run():
        result = fuse_to_file(mosaic, out, chunks=CHUNK, backend=backend, overwrite=True)
        synchronize(backend)
        return result

    result, seconds = run_once(benchmark, run)
    mpx = math.prod(result.shape) / 1e6
    with capsys.disabled():  # now: a timeout later in this case still leaves it in the log
        print(f"\nwhole slide [{backend}] {seconds:.2f} s end to end ({mpx:.0f} Mpx, "
              f"{mpx / seconds:.0f} Mpx/s, {len(slide.truth)} tiles)", flush=True)
    store_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    benchmark.extra_info.update(
        machine_info(backend), backend=backend, tiles=len(slide.truth), grid=list(slide.grid),
        output_shape=list(result.shape), megapixels=round(mpx, 1),
        seconds=round(seconds, 2), Mpx_per_s=round(mpx / seconds, 1),
        tile_GB=round(len(slide.truth) * TILE * TILE * 2 / 1e9, 2),
        store_GB=round(store_bytes / 1e9, 2), tiff_write_seconds=round(slide.write_seconds, 1))
    stages = {}
    if backend == "cupy":
        stages = {f"gpu_{k}": round(v, 3) for k, v in impl.stage_times().items()}
        impl.profile = False
    # the image written is the fusion and its pyramid: every level against the NumPy
    # pyramid of a fresh NumPy fusion (before the stage breakdown: it matters more)
    level0 = zarr.open_array(str(out / "0"), mode="r")
    assert tuple(level0.shape) == tuple(result.shape) == tuple(mosaic.shape)
    check = pyramid_check(out, mosaic)
    benchmark.extra_info["pyramid_check"] = check
    with capsys.disabled():
        print(format_check(backend, check), flush=True)
    stages["read_s"] = round(read_seconds(mosaic), 3)
    stages["fuse_s"] = round(fuse_seconds(mosaic, backend), 3)
    if backend == "cupy":
        stages["d2h_s"] = round(d2h_seconds(out), 3)
    stages["compress_s"] = round(compress_seconds(out), 3)
    stages["write_s"] = round(write_seconds(out, tmp_path / "write_again"), 3)
    benchmark.extra_info["stages"] = stages
    with capsys.disabled():
        print(format_breakdown(backend, seconds, stages), flush=True)
    tolerance = 0 if backend == "numpy" else 1  # the tolerance table's 1 DN for uint16
    assert len(check) >= 2, "no pyramid was written"
    for level in check:
        assert level["self_consistent"], f"level {level['level']} is not the 2x mean above it"
        assert level["max_diff"] <= tolerance, f"level {level['level']}: {level}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_slide_register(benchmark, slide: Slide, backend: str) -> None:
    from gpufusion.readers import mosaic_from_file
    from gpufusion.registration import candidate_pairs, measure_pairs, register_mosaic

    mosaic = mosaic_from_file(slide.positions_csv)
    max_shift = 2 * STAGE_ERROR + 5
    pairs = candidate_pairs(mosaic, max_shift=max_shift)
    measure_pairs(mosaic, pairs[:2], max_shift=max_shift, backend=backend)  # warm-up

    def run():
        result = register_mosaic(mosaic, max_shift=max_shift, backend=backend)
        synchronize(backend)
        return result

    result, seconds = run_once(benchmark, run)
    err = result.positions - slide.truth
    err -= err.mean(axis=0)
    rms = float(np.sqrt(np.mean(np.sum(err**2, axis=1))))
    benchmark.extra_info.update(
        machine_info(backend), backend=backend, tiles=len(slide.truth), pairs=len(pairs),
        seconds=round(seconds, 2), pairs_per_s=round(len(pairs) / result.seconds["pairwise"], 1),
        stage_seconds={k: round(v, 2) for k, v in result.seconds.items()},
        rms_error_px=round(rms, 4), mean_ncc_before=round(result.mean_ncc_before, 4),
        mean_ncc_after=round(result.mean_ncc_after, 4))
    assert rms <= 0.1
