"""``--scheduler``: the backend is chosen by the workers, not by the client.

A login node without a GPU submits to GPU workers: ``auto`` must pick CuPy and ``cupy``
must be accepted because every worker has a usable GPU, and the graph must be built on the
client without allocating a CuPy array there. Emulated on the CPU with a real
``distributed.LocalCluster(processes=False)``: its workers are threads of this process that
see the host-emulated device (tests/host_emulation), while the main thread, the client,
is made to have none (``gpu_status`` says no there and any CuPy allocation raises).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from gpufusion import backends, fuse, pipeline
from gpufusion.backends import cuda_kernels as ck
from gpufusion.cli import main
from gpufusion.cluster import resolve_cluster_backend
from gpufusion.errors import InputError
from gpufusion.synthetic import make_mosaic

from .conftest import assert_close
from .host_emulation.fake_cupy import emulated_gpu
from .host_emulation.harness import HostKernels, gxx_available
from .tile_files import write_tile_csv

distributed = pytest.importorskip("distributed")

LOGIN_NODE = "no CUDA device on this login node"


class CUDARuntimeError(RuntimeError):
    """As ``cupy.cuda.runtime.CUDARuntimeError``."""


def on_client() -> bool:
    """The client is the main thread; workers' tasks and ``client.run`` run in others."""
    return threading.current_thread() is threading.main_thread()


@pytest.fixture
def gpu_workers_cpu_client(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch):
    """The emulated device for worker threads only; the client (main thread) has none."""
    if not gxx_available():
        pytest.skip("g++ is not installed")
    host = HostKernels.build(tmp_path_factory.mktemp("host_kernels"),
                             [("uint16", "uint16", 2, "linear", "linear")],
                             [("uint16", "corners"), ("uint8", "corners")])
    with emulated_gpu(host, monkeypatch) as cupy:
        real_status, real_get = backends.gpu_status, backends.get_backend

        def gpu_status() -> tuple[bool, str]:
            return (False, LOGIN_NODE) if on_client() else real_status()

        def get_backend(name: str):
            if name == "cupy" and on_client():
                raise InputError(f"backend cupy: {LOGIN_NODE}")
            return real_get(name)

        def device_only(fn):
            def call(*args, **kwargs):
                if on_client():
                    raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is "
                                           "detected (a CuPy allocation on the client)")
                return fn(*args, **kwargs)
            return call

        monkeypatch.setattr(backends, "gpu_status", gpu_status)
        monkeypatch.setattr(backends, "get_backend", get_backend)
        for name in ("empty", "zeros", "asarray", "ones", "full"):
            monkeypatch.setattr(cupy, name, device_only(getattr(cupy, name)))
        yield cupy


@pytest.fixture
def tile_csv(tmp_path: Path) -> Path:
    syn = make_mosaic((2, 3), (96, 96), overlap=0.2, subpixel=1.0, seed=7)
    return write_tile_csv(tmp_path, syn.tiles, syn.positions)


@pytest.fixture
def cluster():
    with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=2,
                                  dashboard_address=":0") as c:
        yield c


def run_cli(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def levels(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {k: group[k][...] for k in sorted(group.array_keys())}


def test_cpu_client_sends_cupy_fusion_to_gpu_workers(gpu_workers_cpu_client, cluster,
                                                     tile_csv: Path, capsys) -> None:
    cupy = gpu_workers_cpu_client
    folder = tile_csv.parent
    assert run_cli(["fuse", tile_csv, "-o", folder / "ref.ome.zarr", "--backend", "numpy",
                    "--chunk", "128"], capsys)[0] == 0
    expected = levels(folder / "ref.ome.zarr")
    assert len(expected) >= 2
    with pytest.raises(InputError, match=LOGIN_NODE):  # the client alone cannot
        backends.get_backend("cupy")
    for backend in ("auto", "cupy"):
        out = folder / f"{backend}.ome.zarr"
        cupy.builds.clear()
        ck.fuse_kernel.cache_clear()
        ck.separable_kernel.cache_clear()
        ck.downsample_kernel.cache_clear()
        code, err = run_cli(["fuse", tile_csv, "-o", out, "--backend", backend, "--chunk", "128",
                             "--scheduler", cluster.scheduler_address], capsys)
        assert code == 0, err
        if backend == "auto":
            assert "using the GPU backend on 2 worker(s) (1 CUDA device(s) each)" in err
        assert any(b.startswith("fuse_chunk") for b in cupy.builds)  # fused by the kernel
        assert any(b.startswith("downsample_mean2<") for b in cupy.builds)  # inline level 1
        got = levels(out)
        assert got.keys() == expected.keys()
        for key in expected:
            assert_close(got[key], expected[key])


def test_graph_for_workers_builds_without_cupy_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client without CuPy at all builds the cupy graph (NumPy meta) and the writer's
    device steps; only ``on_workers`` allows it."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    backends.get_backend.cache_clear()
    mosaic = make_mosaic((2, 2), (40, 40)).mosaic()
    image = fuse(mosaic, chunks=32, backend="cupy", on_workers=True)
    assert type(image._meta) is np.ndarray and image.dtype == mosaic.dtype
    import cloudpickle

    tasks = [v for k, v in dict(image.__dask_graph__()).items()
             if str(k[0]).startswith("gpufusion-fuse")]
    assert tasks and all(b"_fuse_block" in cloudpickle.dumps(t) and b"cupy"
                         in cloudpickle.dumps(t) for t in tasks)
    options = pipeline._zarr_pyramid_options("cupy")
    assert options["to_host"].__module__ == "gpufusion.backends.cupy_backend"
    with pytest.raises(InputError, match="backend cupy: CuPy is not installed"):
        fuse(mosaic, chunks=32, backend="cupy")
    with pytest.raises(InputError, match="on_workers"):
        fuse(mosaic, chunks=32, backend="auto", on_workers=True)


def test_worker_without_gpu_refuses_cupy_and_auto_falls_back(cluster, tile_csv: Path,
                                                             capsys, monkeypatch) -> None:
    from gpufusion import cluster as cluster_module

    def probe(dask_worker) -> tuple[bool, str]:
        if dask_worker.name == 1:
            return False, "no usable CUDA device (CUDARuntimeError: cudaErrorNoDevice)"
        return True, "1 CUDA device(s)"

    monkeypatch.setattr(cluster_module, "_probe_worker", probe)
    with distributed.Client(cluster) as client:
        lacking = next(a for a, w in client.scheduler_info()["workers"].items()
                       if w["name"] == 1)
    folder = tile_csv.parent
    address = ["--scheduler", cluster.scheduler_address]
    code, err = run_cli(["fuse", tile_csv, "-o", folder / "c.ome.zarr", "--backend", "cupy",
                         *address], capsys)
    assert code == 2
    assert err.splitlines()[-1] == (f"gpufusion: error: backend cupy: worker {lacking} has no "
                                    "usable GPU: no usable CUDA device (CUDARuntimeError: "
                                    "cudaErrorNoDevice)")
    assert not (folder / "c.ome.zarr").exists()
    code, err = run_cli(["fuse", tile_csv, "-o", folder / "a.ome.zarr", "--backend", "auto",
                         "--chunk", "32", *address], capsys)
    assert code == 0, err
    assert (f"gpufusion: worker {lacking} has no usable GPU (no usable CUDA device "
            "(CUDARuntimeError: cudaErrorNoDevice)); using the NumPy backend") in err
    assert run_cli(["fuse", tile_csv, "-o", folder / "n.ome.zarr", "--backend", "numpy",
                    "--chunk", "32"], capsys)[0] == 0
    for key, value in levels(folder / "n.ome.zarr").items():
        np.testing.assert_array_equal(levels(folder / "a.ome.zarr")[key], value)


def test_probe_failures_and_empty_clusters(monkeypatch) -> None:
    from gpufusion import cluster as cluster_module

    def probe() -> tuple[bool, str]:
        raise ImportError("No module named 'gpufusion'")

    with distributed.LocalCluster(n_workers=0, processes=False,
                                  dashboard_address=":0") as empty, \
            distributed.Client(empty) as client:
        assert resolve_cluster_backend(client, "numpy") == ("numpy", None)
        for name in ("auto", "cupy"):
            with pytest.raises(InputError, match="has no workers"):
                resolve_cluster_backend(client, name)
    monkeypatch.setattr(cluster_module, "_probe_worker", probe)
    with distributed.LocalCluster(n_workers=1, processes=False,
                                  dashboard_address=":0") as one, \
            distributed.Client(one) as client:
        name, message = resolve_cluster_backend(client, "auto")
        assert name == "numpy"
        assert "the GPU probe failed there (ImportError: No module named 'gpufusion')" in message
        with pytest.raises(InputError, match="unknown 'opencl'"):
            resolve_cluster_backend(client, "opencl")


def test_auto_with_gpu_workers_is_resolved_on_them(gpu_workers_cpu_client, cluster,
                                                   tmp_path: Path) -> None:
    """The library call too: ``fuse_to_file(scheduler=client)`` asks the workers."""
    mosaic = make_mosaic((2, 2), (48, 48)).mosaic()
    with distributed.Client(cluster) as client:
        assert resolve_cluster_backend(client, "auto")[0] == "cupy"
        result = pipeline.fuse_to_file(mosaic, tmp_path / "m.ome.zarr", chunks=32,
                                       backend="auto", scheduler=client)
    assert result.backend == "cupy"
    expected = fuse(mosaic, chunks=32).compute()
    assert_close(zarr.open_array(str(tmp_path / "m.ome.zarr" / "0"), mode="r")[...], expected)


def test_graph_for_workers_opens_no_cuda_context_on_a_gpu_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Even where the client has a GPU, ``on_workers`` builds the graph without touching
    CuPy: a probe there would open a CUDA context on a GPU a worker uses."""
    calls = []

    def spy(name: str):
        calls.append(name)
        raise AssertionError("the client probed a backend")

    monkeypatch.setattr(backends, "get_backend", spy)
    monkeypatch.setattr(backends, "gpu_status", lambda: spy("gpu_status"))
    mosaic = make_mosaic((2, 2), (40, 40)).mosaic()
    image = fuse(mosaic, chunks=32, backend="cupy", on_workers=True)
    assert type(image._meta) is np.ndarray and calls == []
