"""Pairwise registration as Dask tasks (``register --scheduler/--gpus``, ``fuse --register``).

The pairs are measured by the workers of a ``distributed`` cluster, in batches, with the
tiles read there; the solve runs on the client. Every test compares with the same
registration run in one process: the positions and every edge must be equal bit for bit.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gpufusion import mosaic_from_file
from gpufusion.cluster import tune_worker_malloc
from gpufusion.errors import InputError
from gpufusion.registration import distributed as registration_distributed
from gpufusion.registration import measure_pairs, register_mosaic
from gpufusion.registration.distributed import (
    active_cluster,
    measure_pairs_on_cluster,
    on_cluster,
)
from gpufusion.synthetic import make_mosaic

from .cluster_helpers import install_fake_dask_cuda
from .tile_files import write_tile_csv

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def threads_cluster():
    """Two single-threaded workers in this process (threads), for the whole module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        yield cluster


#: Threads that ran a batch of pairs (:func:`_counting_batch`). A module-level function and
#: list: tasks are pickled even for in-process workers, a module function by reference, so
#: the list the workers append to is this one.
BATCH_THREADS: list[str] = []
_REAL_BATCH = registration_distributed._measure_batch


def _counting_batch(*args, **kwargs):
    BATCH_THREADS.append(threading.current_thread().name)
    return _REAL_BATCH(*args, **kwargs)


@pytest.fixture
def batches_run(monkeypatch) -> list[str]:
    """The names of the threads the cluster's pair batches run on (one entry per batch)."""
    BATCH_THREADS.clear()
    monkeypatch.setattr(registration_distributed, "_measure_batch", _counting_batch)
    return BATCH_THREADS


@pytest.fixture
def tiles_on_disk(tmp_path: Path):
    """A 3x3 grid of 96 px TIFF tiles with stage errors, listed in a positions CSV."""
    syn = make_mosaic((3, 3), (96, 96), overlap=0.2, stage_error=4, seed=5)
    return write_tile_csv(tmp_path, syn.tiles, syn.stage_positions), syn


def assert_same_registration(a, b) -> None:
    """Positions and every edge bit for bit (NaN where NaN)."""
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.edges.pairs, b.edges.pairs)
    np.testing.assert_array_equal(a.edges.status, b.edges.status)
    for name in ("shift", "ncc", "weight", "residual"):
        np.testing.assert_array_equal(getattr(a.edges, name), getattr(b.edges, name),
                                      err_msg=name)


def test_cluster_registration_equals_local_and_runs_on_both_workers(threads_cluster,
                                                                    tiles_on_disk) -> None:
    csv, syn = tiles_on_disk
    mosaic = mosaic_from_file(csv)
    local = register_mosaic(mosaic, max_shift=10, backend="numpy")
    with distributed.Client(threads_cluster) as client:
        with distributed.get_task_stream(client) as stream, \
                on_cluster(client, "numpy", pairs_per_task=2) as name:
            assert active_cluster() is not None
            remote = register_mosaic(mosaic, max_shift=10, backend=name)
        assert active_cluster() is None  # only inside the block
    assert_same_registration(remote, local)
    assert remote.backend == "numpy"
    err = remote.positions - syn.positions
    assert np.abs(err - err.mean(axis=0)).max() < 0.05  # and it is right
    tasks = [t for t in stream.data if "register-pairs" in str(t["key"])]
    m = len(local.edges)
    assert len(tasks) >= -(-m // 2)  # ceil(m / 2) batches of 2 pairs, at least once each
    assert len({t["worker"] for t in tasks}) == 2


def test_automatic_search_range_on_the_cluster_equals_local(threads_cluster) -> None:
    """Without ``max_shift`` (binned first search, re-searches, diagonal pairs: every stage
    measures on the workers), stage errors of 12 px: the local result bit for bit."""
    syn = make_mosaic((3, 3), (128, 128), overlap=0.25, stage_error=12, seed=2)
    mosaic = syn.mosaic(syn.stage_positions)
    local = register_mosaic(mosaic, backend="numpy")
    calls = []
    with distributed.Client(threads_cluster) as client, \
            on_cluster(client, "numpy", pairs_per_task=3) as name:
        real = active_cluster().measure  # type: ignore[union-attr]

        def counted(*args, **kwargs):
            calls.append(kwargs.get("label"))
            return real(*args, **kwargs)

        object.__setattr__(active_cluster(), "measure", counted)
        remote = register_mosaic(mosaic, backend=name)
    assert len(calls) >= 2  # more than one stage went to the cluster
    assert_same_registration(remote, local)
    err = remote.positions - syn.positions
    assert np.abs(err - err.mean(axis=0)).max() < 0.05


def test_progress_counts_on_a_shared_line(threads_cluster) -> None:
    import io

    from gpufusion.progress import Progress

    mosaic = make_mosaic((2, 2), (64, 64), overlap=0.25).mosaic()
    out = io.StringIO()
    with distributed.Client(threads_cluster) as client, \
            Progress("registering pairs", unit="pairs", enabled=True, stream=out) as bar:
        bar.add_total(3)
        bar.update(3)  # an earlier pass counted on the same line
        result = measure_pairs_on_cluster(client, mosaic, max_shift=5, progress=bar,
                                          pairs_per_task=1)
    assert (bar.total, bar.done) == (3 + len(result), 3 + len(result)) and len(result) > 1
    assert out.getvalue().count("\n") == 1  # one line, redrawn


def test_batches_cut_per_pair_options_with_the_pairs(threads_cluster) -> None:
    """A per-pair ``max_shift`` and ``expected`` (as the wide search passes them) go with
    their pairs; the result equals one call of measure_pairs, bit for bit."""
    syn = make_mosaic((2, 3), (80, 80), overlap=0.25, stage_error=3, seed=2)
    mosaic = syn.mosaic(syn.stage_positions)
    pairs = np.array([[0, 1], [1, 2], [0, 3], [1, 4], [2, 5], [3, 4], [4, 5]])
    pos = mosaic.positions()
    expected = pos[pairs[:, 1]] - pos[pairs[:, 0]] + np.linspace(-1, 1, 14).reshape(7, 2)
    ms = np.tile([[6.0, 8.0]], (7, 1)) + np.arange(7)[:, None]
    local = measure_pairs(mosaic, pairs, max_shift=ms, expected=expected)
    with distributed.Client(threads_cluster) as client:
        remote = measure_pairs_on_cluster(client, mosaic, pairs, max_shift=ms,
                                          expected=expected, pairs_per_task=3)
    for name in ("pairs", "nominal", "shift", "ncc", "peak", "window", "at_limit"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(local, name),
                                      err_msg=name)


def test_worker_errors_reach_the_client(threads_cluster, tiles_on_disk) -> None:
    csv, _ = tiles_on_disk
    mosaic = mosaic_from_file(csv)
    (csv.parent / "t4.tif").write_bytes(b"not a TIFF any more")
    with distributed.Client(threads_cluster) as client, \
            pytest.raises(InputError, match="t4.tif"), on_cluster(client, "numpy") as name:
        register_mosaic(mosaic, max_shift=10, backend=name)


def test_cluster_without_workers_is_refused() -> None:
    mosaic = make_mosaic((1, 2), (64, 64), overlap=0.25).mosaic()
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        with pytest.raises(InputError, match="no workers"):
            measure_pairs_on_cluster(client, mosaic, max_shift=5)
        with pytest.raises(InputError, match="no workers"), on_cluster(client, "auto"):
            pass


@pytest.mark.slow
def test_worker_processes_read_the_tiles_not_the_client(tiles_on_disk, monkeypatch) -> None:
    """Worker processes (a pickled mosaic of file paths): the client reads no pixel."""
    csv, _ = tiles_on_disk
    mosaic = mosaic_from_file(csv)
    local = register_mosaic(mosaic, max_shift=10, backend="numpy", quality=False)
    source = type(mosaic.tiles[0].source)

    def no_reads_here(self, *args, **kwargs):
        raise AssertionError("the client read tile pixels")

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        monkeypatch.setattr(source, "read", no_reads_here)
        with on_cluster(client, "numpy", pairs_per_task=4) as name:
            remote = register_mosaic(mosaic, max_shift=10, backend=name, quality=False)
        # the nanny started them with MALLOC_TRIM_THRESHOLD_: their malloc was tuned
        tuned = client.run(tune_worker_malloc)
    assert_same_registration(remote, local)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert list(tuned.values()) == [True, True]


def test_malloc_is_tuned_only_in_processes_started_with_a_trim_threshold() -> None:
    """``MALLOC_TRIM_THRESHOLD_`` (distributed's nanny sets it) freezes glibc's mmap
    threshold; only such processes have their thresholds set (on glibc)."""
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        pytest.skip("glibc only")
    code = ("from gpufusion.cluster import tune_worker_malloc as t; "
            "print(t(), t())")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True)
    nanny = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**env, "MALLOC_TRIM_THRESHOLD_": "65536"}, check=True)
    assert (plain.stdout.split(), nanny.stdout.split()) == (["False", "False"], ["True", "True"])


def _tuned_here() -> int:
    """On a worker: whether a task of this process has called tune_worker_malloc yet."""
    return tune_worker_malloc.cache_info().currsize


def test_fusion_tasks_on_worker_processes_tune_malloc(tmp_path) -> None:
    """Fusion to OME-Zarr on a worker process started by distributed's nanny (with
    MALLOC_TRIM_THRESHOLD_): its block tasks set glibc's thresholds (measured 1.6x faster,
    benchmarks/RESULTS.md); the pixels are those of a local run."""
    import distributed
    import zarr

    from gpufusion import fuse_to_file

    mosaic = make_mosaic((2, 2), (64, 64), seed=3).mosaic()
    fuse_to_file(mosaic, tmp_path / "local.ome.zarr", chunks=32, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        assert list(client.run(_tuned_here).values()) == [0]
        fuse_to_file(mosaic, tmp_path / "remote.ome.zarr", chunks=32, scheduler=client,
                     progress=False)
        assert list(client.run(_tuned_here).values()) == [1]
    local = zarr.open_group(tmp_path / "local.ome.zarr", mode="r")["0"][...]
    remote = zarr.open_group(tmp_path / "remote.ome.zarr", mode="r")["0"][...]
    np.testing.assert_array_equal(remote, local)


@pytest.mark.slow
def test_gpu_workers_measure_with_cupy_for_a_client_without_gpu(threads_cluster,
                                                                monkeypatch) -> None:
    """Workers with a (stand-in) GPU, a client without: ``auto`` resolves to CuPy on the
    workers, the pairs are measured there with CuPy, and the result is the one-process CuPy
    result bit for bit (and the NumPy one within 0.01 px: float32 on the device)."""
    from gpufusion import backends
    from gpufusion.registration import pairwise

    from .host_emulation.strict_cupy import STATS, build_strict_cupy

    syn = make_mosaic((2, 3), (96, 96), overlap=0.2, stage_error=4, seed=7)
    mosaic = syn.mosaic(syn.stage_positions)
    reference = register_mosaic(mosaic, max_shift=10, backend="numpy")
    monkeypatch.setitem(sys.modules, "cupy", build_strict_cupy())
    local = register_mosaic(mosaic, max_shift=10, backend="cupy")
    real = backends.gpu_status

    def login_node() -> tuple[bool, str]:
        on_client = threading.current_thread() is threading.main_thread()
        return (False, "no CUDA device on this login node") if on_client else real()

    monkeypatch.setattr(backends, "gpu_status", login_node)
    monkeypatch.setattr(pairwise, "gpu_status", login_node)
    with pytest.raises(InputError, match="login node"):
        register_mosaic(mosaic, max_shift=10, backend="cupy")  # no GPU here
    STATS.clear()
    with distributed.Client(threads_cluster) as client, \
            on_cluster(client, "auto", pairs_per_task=5) as name:
        assert name == "cupy"
        remote = register_mosaic(mosaic, max_shift=10, backend=name)
    assert remote.backend == "cupy" and STATS["fft"] > 0
    assert_same_registration(remote, local)
    np.testing.assert_allclose(remote.positions, reference.positions, atol=1e-2)


# ------------------------------------------------------------------------------------------
# command line


def test_cli_register_on_a_scheduler_writes_the_local_result(threads_cluster, tiles_on_disk,
                                                             tmp_path: Path,
                                                             batches_run) -> None:
    from gpufusion.cli import main

    csv, _ = tiles_on_disk
    common = ["--max-shift", "10", "--backend", "numpy", "-q"]
    assert main(["register", str(csv), "-o", str(tmp_path / "here.csv"), *common]) == 0
    assert batches_run == []
    address = threads_cluster.scheduler_address
    assert main(["register", str(csv), "-o", str(tmp_path / "there.csv"), *common,
                 "--scheduler", address]) == 0
    assert batches_run and threading.main_thread().name not in batches_run
    assert (tmp_path / "there.csv").read_text() == (tmp_path / "here.csv").read_text()
    assert (tmp_path / "there.edges.csv").read_text() == \
        (tmp_path / "here.edges.csv").read_text()


def test_cli_register_gpus_starts_one_worker_per_gpu(tiles_on_disk, tmp_path: Path,
                                                     monkeypatch, batches_run) -> None:
    """``--gpus 0,1``: a (stand-in) LocalCUDACluster on those GPUs measures the pairs."""
    from gpufusion.cli import main

    csv, _ = tiles_on_disk
    calls = install_fake_dask_cuda(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    common = ["--max-shift", "10", "--backend", "numpy", "-q"]
    assert main(["register", str(csv), "-o", str(tmp_path / "here.csv"), *common]) == 0
    assert main(["register", str(csv), "-o", str(tmp_path / "gpus.csv"), *common,
                 "--gpus", "0,1"]) == 0
    assert [c["CUDA_VISIBLE_DEVICES"] for c in calls] == ["0,1"] and batches_run
    assert calls[0]["n_workers"] == 2
    assert (tmp_path / "gpus.csv").read_text() == (tmp_path / "here.csv").read_text()


def test_cli_fuse_register_on_a_scheduler(threads_cluster, tiles_on_disk, tmp_path: Path,
                                          batches_run) -> None:
    """``fuse --register --scheduler``: the registration too runs on the cluster, and the
    fused image is the one fused after a local registration."""
    import zarr

    from gpufusion.cli import main

    csv, _ = tiles_on_disk
    common = ["--register", "--max-shift", "10", "--backend", "numpy", "--chunk", "64", "-q"]
    assert main(["fuse", str(csv), "-o", str(tmp_path / "here.ome.zarr"), *common]) == 0
    assert batches_run == []
    assert main(["fuse", str(csv), "-o", str(tmp_path / "there.ome.zarr"), *common,
                 "--scheduler", threads_cluster.scheduler_address]) == 0
    here = zarr.open_array(str(tmp_path / "here.ome.zarr" / "0"), mode="r")[...]
    there = zarr.open_array(str(tmp_path / "there.ome.zarr" / "0"), mode="r")[...]
    np.testing.assert_array_equal(there, here)
    assert batches_run and threading.main_thread().name not in batches_run


def test_the_hook_forwards_every_option_of_measure_pairs(monkeypatch) -> None:
    """Inside ``on_cluster``, ``measure_pairs`` hands every one of its options to the
    cluster (an option added to it but not to its scale-out hook would be lost there)."""
    import inspect

    from gpufusion.registration.distributed import _ACTIVE, ClusterRegistration

    seen: dict = {}

    class Recording(ClusterRegistration):
        def measure(self, mosaic, pairs=None, *, backend="", **options):
            seen.update(options, pairs=pairs)
            return "measured on the cluster"

    token = _ACTIVE.set(Recording(client=None, backend="cupy"))
    try:
        assert measure_pairs("a mosaic", [[0, 1]]) == "measured on the cluster"
    finally:
        _ACTIVE.reset(token)
    wanted = set(inspect.signature(measure_pairs).parameters) - {"mosaic", "backend"}
    assert wanted <= set(seen)
