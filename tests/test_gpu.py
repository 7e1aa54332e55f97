"""The CuPy backend against the NumPy reference, and cluster / benchmark setup.

Tests marked ``gpu`` need a usable CUDA device (``gpufusion.backends.gpu_status()``) and are
skipped otherwise; they run the same seeded random cases as the host-emulation tests
(tests/host_emulation/cases.py) through the real kernels. The unmarked tests check the
cluster and benchmark plumbing that must behave on CPU-only machines too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gpufusion import fuse
from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends import get_backend, gpu_status
from gpufusion.blend import BLEND_MODES, INTERPOLATIONS
from gpufusion.cluster import (
    connect,
    default_threads_per_gpu,
    parse_gpus,
    resolve_cluster_backend,
)
from gpufusion.errors import InputError
from gpufusion.pyramid import downsample_mean2

from .cluster_helpers import (
    compute_counting_fusion_tasks,
    dask_cuda_or_stand_in,
    emulated_device,
    install_fake_dask_cuda,
)
from .conftest import assert_close
from .host_emulation import cases

GPU_OK, GPU_WHY = gpu_status()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason=f"no usable GPU: {GPU_WHY}")


def device_count() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


@pytest.fixture
def cp():
    """The cupy module (only requested by tests that are skipped without a GPU)."""
    import cupy

    return cupy


@pytest.fixture
def backend():
    from gpufusion.backends.cupy_backend import CupyBackend

    return CupyBackend(profile=True)


def gpu_fuse(backend):
    import cupy

    return lambda windows, table, params: cupy.asnumpy(backend.fuse_windows(windows, table,
                                                                            params))


# ---------------------------------------------------------------------- kernel vs reference


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_cupy_backend_matches_reference(backend, layout: str, ndim: int, mode: str,
                                        interpolation: str) -> None:
    differ = 0
    for k, pair in enumerate(cases.DTYPE_PAIRS):
        case = cases.make_case(layout, ndim, mode, interpolation, pair, 31 * k + ndim)
        differ += cases.check_case(case, gpu_fuse(backend))["differ"]
    if mode != "cosine":  # no transcendental: the kernel mirrors the reference exactly
        assert differ == 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_separable_kernel_equals_general_kernel_on_device(backend, cp, ndim: int, mode: str,
                                                          interpolation: str) -> None:
    """On the device, fuse_chunk_separable (per-axis tables) and fuse_chunk give the same
    blocks bit for bit, for every dtype pair and integer or sub-pixel translations. Cosine
    ramps come from NumPy's cos (the tables) and the device's (the general kernel): compared
    within the suite's tolerance."""
    taken = 0
    for k, pair in enumerate(cases.DTYPE_PAIRS):
        for layout in ("translation", "subpixel"):
            case = cases.make_case(layout, ndim, mode, interpolation, pair, 17 * k + ndim)
            for windows, table in cases.chunk_inputs(case):
                if not ck.separable_applies(table):
                    continue
                taken += 1
                sep = cp.asnumpy(backend.fuse_windows(windows, table, case.params,
                                                      "separable"))
                gen = cp.asnumpy(backend.fuse_windows(windows, table, case.params, "general"))
                if mode == "cosine":
                    assert_close(sep, gen)
                else:
                    np.testing.assert_array_equal(sep, gen, err_msg=case.name)
    assert taken > 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("pair", cases.FALLBACK_PAIRS, ids="-".join)
def test_cupy_converted_dtypes_match_reference(backend, pair: tuple[str, str]) -> None:
    for ndim in (2, 3):
        case = cases.make_case("affine", ndim, "cosine", "linear", pair, 5 + ndim)
        cases.check_case(case, gpu_fuse(backend), algorithm="general")


@pytest.mark.gpu
@needs_gpu
def test_resident_paths_match_reference(backend, cp) -> None:
    """Chunks uploaded once, and windows already on the device, give the same blocks."""
    def resident(windows, table, params):
        if not len(table):
            return cp.asnumpy(backend.fuse_windows(windows, table, params))
        out = backend.launch(backend.upload(windows, table, params), params)
        cp.cuda.Device().synchronize()
        return cp.asnumpy(out)

    def device_windows(windows, table, params):
        out = backend.fuse_device_windows([cp.asarray(w) for w in windows], table, params)
        cp.cuda.Device().synchronize()
        return cp.asnumpy(out)

    for fn, pair in [(resident, ("uint16", "uint16")), (device_windows, ("uint8", "float32")),
                     (device_windows, ("float64", "float64"))]:
        case = cases.make_case("affine", 3, "linear", "linear", pair, 21)
        cases.check_case(case, fn, algorithm="general")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_batched_resident_fusion_matches_numpy_on_device(cp, layout: str, ndim: int) -> None:
    """Tiles resident, many blocks per fuse_blocks_separable launch (at most 4 per launch
    here, so several launches): the whole mosaic equals the NumPy fusion, bit for bit for
    translations without cosine ramps."""
    from gpufusion.backends.resident import fuse_on_device

    for k, (mode, interp) in enumerate([("linear", "linear"), ("overlay", "nearest"),
                                        ("average", "linear"), ("max", "nearest"),
                                        ("cosine", "linear")]):
        pair = cases.DTYPE_PAIRS[k % len(cases.DTYPE_PAIRS)]
        case = cases.make_case(layout, ndim, mode, interp, pair, 90 + 7 * k + ndim)
        expected = fuse(case.mosaic, chunks=case.chunks, blend=mode, interpolation=interp,
                        dtype=pair[1]).compute(scheduler="synchronous")
        got = cp.asnumpy(fuse_on_device(case.mosaic, chunks=case.chunks, blend=mode,
                                        interpolation=interp, dtype=pair[1],
                                        max_batch_blocks=4))
        if layout == "affine" or mode == "cosine":
            assert_close(got, expected)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=case.name)


@pytest.mark.gpu
@needs_gpu
def test_fused_dask_array_is_cupy_backed(cp) -> None:
    case = cases.make_case("subpixel", 2, "linear", "linear", ("uint16", "uint16"), 9)
    image = fuse(case.mosaic, chunks=case.chunks, backend="cupy")
    assert isinstance(image._meta, cp.ndarray)
    result = image.compute()
    assert isinstance(result, cp.ndarray)
    expected = fuse(case.mosaic, chunks=case.chunks, backend="numpy").compute()
    assert_close(cp.asnumpy(result), expected)


@pytest.mark.gpu
@needs_gpu
def test_uneven_edge_chunks_do_not_recompile(cp) -> None:
    case = cases.make_case("affine", 2, "cosine", "nearest", ("uint8", "uint8"), 4)
    ck.fuse_kernel.cache_clear()
    image = fuse(case.mosaic, chunks=case.chunks, backend="cupy")
    shapes = {tuple(c[i] for c, i in zip(image.chunks, idx, strict=True))
              for idx in np.ndindex(*image.numblocks)}
    assert len(shapes) >= 3, shapes  # full, ragged-row, ragged-column and corner blocks
    result = cp.asnumpy(image.compute(scheduler="threads"))
    info = ck.fuse_kernel.cache_info()
    assert info.currsize == 1 and info.misses == 1, info
    expected = fuse(case.mosaic, chunks=case.chunks, backend="numpy").compute()
    assert_close(result, expected)


@pytest.mark.gpu
@needs_gpu
def test_stage_times_are_recorded(backend) -> None:
    case = cases.make_case("translation", 3, "max", "linear", ("uint16", "uint16"), 2)
    inputs = cases.chunk_inputs(case)
    fuse_fn = gpu_fuse(backend)
    for windows, table in inputs:
        fuse_fn(windows, table, case.params)
    times = backend.stage_times()
    assert times["chunks"] == len(inputs)
    assert times["pixels"] == sum(int(np.prod(t.shape)) for _, t in inputs)
    assert times["kernel_s"] > 0 and times["h2d_s"] > 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("algorithm", ck.DOWNSAMPLE_ALGORITHMS)
def test_downsample_gpu_matches_reference(cp, algorithm: str) -> None:
    from gpufusion.backends.cupy_backend import downsample_mean2_gpu

    rng = np.random.default_rng(3)
    dtypes = [*ck.DOWNSAMPLE_ACCUMULATOR, "float16", "int64"]  # the last two: fallback
    shapes = [(7,), (6, 9), (5, 8, 7), (3, 5, 6, 9), (2, 3, 5, 7, 6), (257, 1023)]
    for dtype in dtypes:
        for shape in shapes:
            for factors in [(2,) * len(shape), (1,) + (2,) * (len(shape) - 1),
                            tuple(1 + (i % 2) for i in range(len(shape)))]:
                dt = np.dtype(dtype)
                if dt.kind in "iu":
                    hi = min(int(np.iinfo(dt).max), 2**40)
                    block = rng.integers(0, hi, size=shape).astype(dt)
                else:
                    block = (rng.standard_normal(shape) * 100).astype(dt)
                expected = downsample_mean2(block, factors, algorithm=algorithm)
                actual = downsample_mean2_gpu(cp.asarray(block), factors, algorithm)
                assert isinstance(actual, cp.ndarray) and actual.dtype == expected.dtype
                tol = {"rtol": 1e-5, "atol": 1e-6} if dt.kind == "f" else {"rtol": 0, "atol": 1}
                np.testing.assert_allclose(cp.asnumpy(actual).astype(np.float64),
                                           expected.astype(np.float64), **tol,
                                           err_msg=f"{dtype} {shape} {factors}")


# ---------------------------------------------------------------------- dask-cuda workers


def file_mosaic(tmp_path: Path, seed: int = 12):
    """A 2D uint16 mosaic whose tiles are TIFF files (tasks read their own windows)."""
    from gpufusion.readers import mosaic_from_file

    from .tile_files import write_tile_csv

    case = cases.make_case("subpixel", 2, "linear", "linear", ("uint16", "uint16"), seed)
    tiles = [t.source.read(tuple(slice(0, n) for n in t.shape)) for t in case.mosaic.tiles]
    return mosaic_from_file(write_tile_csv(tmp_path, tiles, case.mosaic.positions()))


def fuse_on_gpu_workers(mosaic, gpus: list[int]) -> tuple[np.ndarray, Counter]:
    """Fuse with the cupy backend on one dask-cuda worker per GPU; the host result and the
    number of fusion tasks each worker ran."""
    import cupy

    with connect(gpus=gpus) as client:
        assert resolve_cluster_backend(client, "auto")[0] == "cupy"
        image = fuse(mosaic, chunks=8, backend="cupy")
        host = image.map_blocks(cupy.asnumpy, dtype=image.dtype,
                                meta=np.empty((0, 0), image.dtype))
        result, per_worker = compute_counting_fusion_tasks(client, host)
    assert sum(per_worker.values()) == int(np.prod(image.numblocks))
    return result, per_worker


@pytest.mark.gpu
@needs_gpu
def test_one_worker_local_cuda_cluster(tmp_path: Path, monkeypatch) -> None:
    """--gpus 0: one dask-cuda worker fuses every chunk, as the local threads do."""
    dask_cuda_or_stand_in(monkeypatch)
    mosaic = file_mosaic(tmp_path)
    expected = fuse(mosaic, chunks=8, backend="numpy").compute(scheduler="threads")
    result, per_worker = fuse_on_gpu_workers(mosaic, [0])
    assert len(per_worker) == 1, per_worker
    assert_close(result, expected)


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_two_worker_local_cuda_cluster(tmp_path: Path) -> None:
    if device_count() < 2:
        pytest.skip(f"needs 2 GPUs for a 2-worker LocalCUDACluster; this machine has "
                    f"{device_count()}")
    pytest.importorskip("dask_cuda", reason="dask-cuda is not installed")
    mosaic = file_mosaic(tmp_path)
    expected = fuse(mosaic, chunks=8, backend="numpy").compute(scheduler="threads")
    result, per_worker = fuse_on_gpu_workers(mosaic, [0, 1])
    assert len(per_worker) == 2, per_worker
    assert_close(result, expected)


@pytest.mark.gpu
@needs_gpu
def test_cli_gpus_option_writes_what_numpy_writes(tmp_path: Path, monkeypatch, capsys) -> None:
    """``gpufusion fuse ... --gpus 0 --backend cupy`` to OME-Zarr: every level within 1 DN
    of the local NumPy run's."""
    import zarr

    from gpufusion.cli import main

    dask_cuda_or_stand_in(monkeypatch)
    file_mosaic(tmp_path)
    common = ["fuse", str(tmp_path / "pos.csv"), "--chunk", "16"]
    assert main([*common, "-o", str(tmp_path / "cpu.ome.zarr"), "--backend", "numpy"]) == 0
    code = main([*common, "-o", str(tmp_path / "gpu.ome.zarr"), "--backend", "cupy",
                 "--gpus", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "running on" in err
    cpu = zarr.open_group(str(tmp_path / "cpu.ome.zarr"), mode="r")
    gpu = zarr.open_group(str(tmp_path / "gpu.ome.zarr"), mode="r")
    levels = sorted(cpu.array_keys())
    assert levels == sorted(gpu.array_keys()) and len(levels) >= 2
    for level in levels:
        assert_close(gpu[level][...], cpu[level][...])


def test_fusion_task_counting_on_two_cpu_workers(tmp_path: Path) -> None:
    """The counting the 2-GPU test relies on, proven on a real 2-worker LocalCluster: the
    fusion step is fused with the to-host step after it (no task key names it), yet every
    chunk's fusion task is found, once, and both workers ran some."""
    distributed = pytest.importorskip("distributed")
    mosaic = file_mosaic(tmp_path)
    image = fuse(mosaic, chunks=8, backend="numpy")
    expected = image.compute(scheduler="threads")
    host = image.map_blocks(np.asarray, dtype=image.dtype, meta=np.empty((0, 0), image.dtype))
    with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        result, per_worker = compute_counting_fusion_tasks(client, host)
        workers = set(client.scheduler_info()["workers"])
    assert set(per_worker) == workers and len(workers) == 2, per_worker
    assert sum(per_worker.values()) == int(np.prod(image.numblocks))
    np.testing.assert_array_equal(result, expected)


# ---------------------------------------------------------------------- CPU-only plumbing


def test_connect_without_options_runs_locally() -> None:
    with connect() as client:
        assert client is None


def test_connect_rejects_both_options() -> None:
    with pytest.raises(InputError, match="exclusive"), connect(gpus=[0], scheduler="tcp://x:1"):
        pass


@pytest.mark.parametrize("text", ["", "a", "0,0", "-1"])
def test_parse_gpus_rejects_bad_lists(text: str) -> None:
    with pytest.raises(InputError, match="--gpus"):
        parse_gpus(text)


@pytest.mark.skipif(GPU_OK, reason="checks the failure without a usable GPU")
def test_gpus_without_gpu_is_one_line_input_error() -> None:
    with pytest.raises(InputError, match="--gpus") as exc, connect(gpus=[0]):
        pass
    assert "\n" not in str(exc.value)


def test_unreachable_scheduler_is_one_line_input_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match="cannot connect") as exc, \
            connect(scheduler=f"tcp://127.0.0.1:{port}", timeout=1):
        pass
    assert "\n" not in str(exc.value)


def test_running_scheduler_fuses_like_local_threads() -> None:
    distributed = pytest.importorskip("distributed")
    case = cases.make_case("affine", 2, "linear", "linear", ("uint16", "uint16"), 6)
    expected = fuse(case.mosaic, chunks=case.chunks).compute(scheduler="threads")
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=2,
                                  dashboard_address=":0") as cluster, \
            connect(scheduler=cluster.scheduler_address) as client:
        assert client is not None
        result = fuse(case.mosaic, chunks=case.chunks).compute()
    np.testing.assert_array_equal(result, expected)


@pytest.fixture
def fake_dask_cuda(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``dask_cuda.LocalCUDACluster`` stood in for by an in-process ``LocalCluster``
    (no GPU here): records the arguments gpufusion starts it with."""
    return install_fake_dask_cuda(monkeypatch)


def test_gpu_workers_get_threads_to_overlap_io(fake_dask_cuda: list[dict]) -> None:
    """One worker per listed GPU, each with several threads (dask-cuda's default is one,
    which would leave the GPU idle while a chunk is read or written)."""
    case = cases.make_case("affine", 2, "linear", "linear", ("uint16", "uint16"), 6)
    expected = fuse(case.mosaic, chunks=case.chunks).compute(scheduler="threads")
    with connect(gpus=[0, 1], threads_per_gpu=3) as client:
        assert sorted(client.nthreads().values()) == [3, 3]
        result = fuse(case.mosaic, chunks=case.chunks).compute()
    np.testing.assert_array_equal(result, expected)
    assert fake_dask_cuda[-1] == {"CUDA_VISIBLE_DEVICES": "0,1", "n_workers": 2,
                                  "threads_per_worker": 3}
    with connect(gpus=[1]) as client:
        assert list(client.nthreads().values()) == [default_threads_per_gpu(1)]
    assert fake_dask_cuda[-1]["CUDA_VISIBLE_DEVICES"] == "1"
    assert default_threads_per_gpu(1) >= 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"threads_per_gpu": 2}, "applies to local GPU workers"),
    ({"gpus": [0], "threads_per_gpu": 0}, "must be >= 1"),
])
def test_threads_per_gpu_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match), connect(**kwargs):
        pass


def test_bench_runs_numpy_and_says_why_gpu_is_skipped() -> None:
    from gpufusion.bench import format_table, run_benchmark

    results, notes = run_benchmark((2, 2), 48, "uint8", 32, ("numpy", "cupy"), 1)
    assert [r.backend for r in results] == (["numpy", "cupy"] if GPU_OK else ["numpy"])
    assert results[0].speedup == 1.0
    assert results[0].megapixels == pytest.approx(fuse_shape_mpx((2, 2), 48))
    if not GPU_OK:
        assert notes == [f"GPU skipped: {GPU_WHY}"]
    assert "Mpx/s" in format_table(results)


def test_bench_cli_without_gpu_says_why(capsys, monkeypatch) -> None:
    from gpufusion import cli

    monkeypatch.setattr(cli, "COMMANDS", tuple(dict.fromkeys((*cli.COMMANDS, "bench"))))
    args = ["bench", "--tiles", "1x2", "--tile", "40", "--chunk", "32", "--repeat", "1"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "numpy" in out and "Mpx/s" in out
    if not GPU_OK:
        assert f"GPU skipped: {GPU_WHY}" in err and "\ncupy" not in out
    assert cli.main([*args, "--plot", "out.jpg"]) == 2
    assert "--plot" in capsys.readouterr().err


def fuse_shape_mpx(tiles: tuple[int, int], tile: int) -> float:
    from gpufusion.synthetic import make_mosaic

    return float(np.prod(make_mosaic(tiles, (tile, tile), dtype="uint8").mosaic().shape)) / 1e6


@pytest.mark.skipif(GPU_OK, reason="checks the failure without a usable GPU")
def test_cupy_backend_without_gpu_is_input_error() -> None:
    with pytest.raises(InputError, match="backend cupy"):
        get_backend("cupy")


def test_kernel_modules_import_without_cupy() -> None:
    """Importing the CUDA modules neither imports CuPy nor compiles anything."""
    code = ("import sys, gpufusion.backends.cupy_backend, gpufusion.backends.cuda_kernels as ck;"
            "import gpufusion.cluster, gpufusion.bench;"
            "print('cupy' in sys.modules, ck.fuse_kernel.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert out.stdout.split() == ["False", "0"]


# --------------------------------------------------- whole pyramid through the task streams


def zarr_levels(path: Path) -> list[np.ndarray]:
    """Every level of an OME-Zarr image, read with zarr-python from the multiscales list."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    multiscales = attrs["ome"]["multiscales"] if "ome" in attrs else attrs["multiscales"]
    return [np.asarray(group[d["path"]][...]) for d in multiscales[0]["datasets"]]


def assert_numpy_pyramid(levels: list[np.ndarray], fused: np.ndarray) -> None:
    """Level 0 equals ``fused`` (the NumPy fusion) and each level equals NumPy's 2x mean of
    the reference level above, exactly (factors from the shapes: 2 where an axis halved)."""
    assert len(levels) >= 3, [lvl.shape for lvl in levels]
    ref = fused
    for k, level in enumerate(levels):
        if k:
            factors = tuple(1 if m == n else 2 for n, m in zip(ref.shape, level.shape,
                                                               strict=True))
            ref = downsample_mean2(ref, factors)
        assert level.dtype == ref.dtype and level.shape == ref.shape, k
        np.testing.assert_array_equal(level, ref, err_msg=f"pyramid level {k}")


def assert_stream_rules_kept() -> None:
    """On the emulated device: no device array was used on, or freed from under, another
    stream in a way that races on a GPU (tests/host_emulation/strict_cupy.py)."""
    if not emulated_device():
        return
    import gc

    from .host_emulation.strict_cupy import STREAMS

    gc.collect()
    assert STREAMS.violations == [], STREAMS.violations[:3]


def reset_stream_rules() -> None:
    if emulated_device():
        from .host_emulation.strict_cupy import STREAMS

        STREAMS.reset()


def pyramid_mosaic(grid: tuple[int, int], tile: int, seed: int):
    from gpufusion.synthetic import make_mosaic

    return make_mosaic(grid, (tile, tile), dtype="uint16", seed=seed).mosaic()


@pytest.mark.gpu
@needs_gpu
def test_cupy_ome_zarr_every_level_equals_numpy_pyramid(tmp_path: Path) -> None:
    """A CuPy fusion to OME-Zarr: every pyramid level (not only level 0's corner) equals the
    NumPy pyramid of the NumPy fusion, bit for bit."""
    from gpufusion import fuse_to_file

    mosaic = pyramid_mosaic((3, 3), 96, seed=5)
    reset_stream_rules()
    fuse_to_file(mosaic, tmp_path / "gpu.ome.zarr", chunks=64, backend="cupy")
    assert_stream_rules_kept()
    expected = fuse(mosaic, chunks=64, backend="numpy").compute()
    assert_numpy_pyramid(zarr_levels(tmp_path / "gpu.ome.zarr"), expected)


@pytest.mark.gpu
@needs_gpu
def test_cupy_pyramid_under_stress_many_threads_small_pool(tmp_path: Path, cp) -> None:
    """A deliberate stress for the stream race of issue #12: 16 threads, many small blocks
    and a small memory pool, so freed device blocks are reused at once; every level of the
    output must still equal the NumPy pyramid of the NumPy fusion."""
    import dask

    from gpufusion import fuse_to_file

    mosaic = pyramid_mosaic((4, 4), 80, seed=17)
    expected = fuse(mosaic, chunks=32, backend="numpy").compute()
    pool = cp.get_default_memory_pool()
    limit = pool.get_limit()
    pool.free_all_blocks()
    pool.set_limit(size=16 << 20)
    reset_stream_rules()
    try:
        for run in range(3):
            path = tmp_path / f"stress{run}.ome.zarr"
            with dask.config.set(scheduler="threads", num_workers=16):
                fuse_to_file(mosaic, path, chunks=32, backend="cupy")
            assert_numpy_pyramid(zarr_levels(path), expected)
        assert_stream_rules_kept()
    finally:
        pool.set_limit(size=limit)
