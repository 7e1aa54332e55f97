"""Telling whether the GPU backend can run, and saying why not in one line.

``gpu_status`` is driven here through stand-in ``cupy`` modules (no GPU needed): CuPy
missing or failing to import, the CUDA runtime refusing (``CUDARuntimeError``), and a device
present but gpufusion's kernels failing to compile or launch (``CompileException``, NVRTC
missing, ``CUDADriverError``, a wrong result). ``--backend cupy`` must then exit 2 with one
line and ``--backend auto`` fall back to NumPy with a one-line notice; ``--gpus`` with
NVML failing exits 2 with one line. With a usable (emulated) GPU, ``auto`` says it uses it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import zarr

from gpufusion import backends
from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends import gpu_status
from gpufusion.cli import main
from gpufusion.synthetic import make_mosaic

from .conftest import assert_close
from .host_emulation.fake_cupy import emulated_gpu
from .host_emulation.harness import HostKernels, gxx_available
from .host_emulation.strict_cupy import build_strict_cupy
from .tile_files import write_tile_csv


class CUDARuntimeError(RuntimeError):
    """As ``cupy.cuda.runtime.CUDARuntimeError``."""


class CUDADriverError(RuntimeError):
    """As ``cupy.cuda.driver.CUDADriverError``."""


class CompileException(Exception):
    """As ``cupy.cuda.compiler.CompileException`` (its message holds the NVRTC log)."""


class NVMLError(Exception):
    """As ``pynvml.NVMLError``."""


RUNTIME_ERROR = CUDARuntimeError(
    "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime "
    "version\n(driver 12020, runtime 13000)")
COMPILE_ERROR = CompileException(
    "/tmp/tmpk3/downsample.cu(4): catastrophic error: cannot open source file \"cstdint\"\n"
    "1 catastrophic error detected in the compilation of \"downsample.cu\".")
NO_NVRTC = RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot "
                        "open shared object file: No such file or directory\n(see the docs)")
DRIVER_ERROR = CUDADriverError(
    "CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available for execution on the device\n"
    "(sm_120)")


def stand_in_cupy(*, count: int = 1, count_error: Exception | None = None,
                  compile_error: Exception | None = None,
                  launch_error: Exception | None = None,
                  result: int | None = None) -> types.ModuleType:
    """A ``cupy`` whose device count, kernel compilation and launch do as told.

    The trial kernel's launch writes ``result`` into its output (None: the right mean, as
    the NumPy reference computes it). ``cupy.raw_modules`` counts compilations.
    """
    cupy = build_strict_cupy()

    def get_device_count() -> int:
        if count_error is not None:
            raise count_error
        return count

    cupy.cuda.runtime.getDeviceCount = get_device_count
    cupy.cuda.runtime.CUDARuntimeError = CUDARuntimeError
    cupy.cuda.driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)
    cupy.cuda.compiler = types.SimpleNamespace(CompileException=CompileException)
    cupy.raw_modules = 0
    cupy.launch_error = launch_error  # may be changed later (a transient failure)
    reference = cupy.RawModule

    class RawModule:
        def __init__(self, **kwargs) -> None:
            cupy.raw_modules += 1
            self.module = reference(**kwargs)

        def get_function(self, expr: str):
            if compile_error is not None:  # CuPy compiles lazily, here
                raise compile_error
            kernel = self.module.get_function(expr)

            def launch(grid, block, args) -> None:
                if cupy.launch_error is not None:
                    raise cupy.launch_error
                kernel(grid, block, args)
                if result is not None:
                    args[1][...] = result

            return launch

    cupy.RawModule = RawModule
    return cupy


@pytest.fixture(autouse=True)
def fresh_caches():
    """No backend or kernel built by a stand-in outlives its test."""
    caches = (backends.get_backend, ck.downsample_kernel, ck.fuse_kernel)
    for c in caches:
        c.cache_clear()
    yield
    for c in caches:
        c.cache_clear()


@pytest.fixture
def use_cupy(monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in ``cupy`` made by :func:`stand_in_cupy`."""
    def install(**kwargs) -> types.ModuleType:
        cupy = stand_in_cupy(**kwargs)
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        return cupy

    return install


@pytest.fixture
def tile_csv(tmp_path: Path) -> Path:
    syn = make_mosaic((2, 2), (48, 48), overlap=0.2, subpixel=1.0, seed=4)
    return write_tile_csv(tmp_path, syn.tiles, syn.positions)


def run_cli(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------- gpu_status


def _broken_package(root: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed ``cupy`` package whose import fails as ``body`` makes it."""
    import importlib

    (root / "cupy").mkdir(parents=True)
    (root / "cupy" / "__init__.py").write_text(body)
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def test_cupy_missing_and_cupy_broken_are_told_apart(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # not installed
    assert gpu_status() == (False, "CuPy is not installed (pip install 'gpufusion[gpu]')")
    monkeypatch.undo()
    _broken_package(tmp_path / "a", 'raise ImportError("libcudart.so.13: cannot open shared '
                    'object file: No such file or directory")\n', monkeypatch)
    assert gpu_status() == (False, "CuPy is installed but cannot be imported (ImportError: "
                                   "libcudart.so.13: cannot open shared object file: No such "
                                   "file or directory)")
    monkeypatch.undo()
    _broken_package(tmp_path / "b", "import gpufusion_missing_dependency\n", monkeypatch)
    ok, why = gpu_status()
    assert not ok and why.startswith("CuPy is installed but cannot be imported "
                                     "(ModuleNotFoundError: No module named "
                                     "'gpufusion_missing_dependency'")


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"count_error": RUNTIME_ERROR},
     "no usable CUDA device (CUDARuntimeError: cudaErrorInsufficientDriver: CUDA driver "
     "version is insufficient for CUDA runtime version)"),
    ({"count": 0}, "no CUDA device found"),
    ({"compile_error": COMPILE_ERROR},
     "a CUDA device is present but gpufusion's kernels cannot be compiled or run "
     "(CompileException: /tmp/tmpk3/downsample.cu(4): catastrophic error: cannot open "
     "source file \"cstdint\")"),
    ({"compile_error": NO_NVRTC},
     "a CUDA device is present but gpufusion's kernels cannot be compiled or run "
     "(RuntimeError: CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot "
     "open shared object file: No such file or directory)"),
    ({"launch_error": DRIVER_ERROR},
     "a CUDA device is present but gpufusion's kernels cannot be compiled or run "
     "(CUDADriverError: CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available for "
     "execution on the device)"),
    ({"result": 0}, "a CUDA device is present but a trial kernel returned [[0]], not [[4]]"),
], ids=["runtime-error", "no-device", "compile-error", "no-nvrtc", "driver-error", "wrong"])
def test_gpu_status_says_why_in_one_whole_line(use_cupy, kwargs: dict, expected: str) -> None:
    use_cupy(**kwargs)
    assert gpu_status() == (False, expected)


def test_trial_kernel_runs_once_per_process(use_cupy) -> None:
    cupy = use_cupy()
    assert gpu_status() == (True, "1 CUDA device(s)")
    assert gpu_status() == (True, "1 CUDA device(s)")
    assert cupy.raw_modules == 1
    ck.downsample_kernel.cache_clear()  # the trial result itself is kept
    assert gpu_status()[0] and cupy.raw_modules == 1


def test_a_failed_trial_is_tried_again(use_cupy) -> None:
    """A transient failure (out of memory, a busy device) does not mark a long-lived
    process, e.g. a Dask worker, GPU-less for good; success is kept."""
    cupy = use_cupy(launch_error=CUDARuntimeError("cudaErrorMemoryAllocation: out of memory"))
    assert gpu_status()[0] is False
    cupy.launch_error = None
    assert gpu_status() == (True, "1 CUDA device(s)")
    cupy.launch_error = CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")
    assert gpu_status() == (True, "1 CUDA device(s)")  # not launched again


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("kwargs", [
    {"count_error": RUNTIME_ERROR}, {"compile_error": COMPILE_ERROR},
    {"compile_error": NO_NVRTC}, {"launch_error": DRIVER_ERROR}],
    ids=["runtime-error", "compile-error", "no-nvrtc", "driver-error"])
def test_unusable_gpu_cupy_exits_2_and_auto_falls_back(use_cupy, tile_csv: Path, capsys,
                                                       kwargs: dict) -> None:
    use_cupy(**kwargs)
    why = gpu_status()[1]
    out = tile_csv.parent / "out.ome.zarr"
    code, err = run_cli(["fuse", tile_csv, "-o", out, "--backend", "cupy"], capsys)
    assert code == 2 and err == f"gpufusion: error: backend cupy: {why}\n"
    assert not out.exists()
    code, err = run_cli(["fuse", tile_csv, "-o", out, "--backend", "auto", "--chunk", "32"],
                        capsys)
    assert code == 0, err
    assert err == f"gpufusion: no usable GPU: {why}; using the NumPy backend\n"
    reference = tile_csv.parent / "ref.ome.zarr"
    assert run_cli(["fuse", tile_csv, "-o", reference, "--backend", "numpy", "--chunk", "32"],
                   capsys)[0] == 0
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[...],
                                  zarr.open_array(str(reference / "0"), mode="r")[...])


def test_gpus_with_nvml_failing_is_one_line_exit_2(tile_csv: Path, capsys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    class LocalCUDACluster:
        def __init__(self, **kwargs) -> None:
            raise NVMLError("Driver Not Loaded\nnvmlInit failed")

    monkeypatch.setitem(sys.modules, "cupy", None)  # the device count cannot be told
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(NVMLError=NVMLError))
    monkeypatch.setitem(sys.modules, "dask_cuda",
                        types.SimpleNamespace(LocalCUDACluster=LocalCUDACluster))
    out = tile_csv.parent / "out.ome.zarr"
    code, err = run_cli(["fuse", tile_csv, "-o", out, "--gpus", "0,1"], capsys)
    assert code == 2
    assert err == ("gpufusion: error: --gpus 0,1: could not start the GPU workers "
                   "(NVMLError: Driver Not Loaded)\n")
    assert not out.exists()


# ---------------------------------------------------------------------- a usable GPU


@pytest.fixture
def fake_gpu(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """The host-emulated device (tests/host_emulation), with the kernels these tests use."""
    if not gxx_available():
        pytest.skip("g++ is not installed")
    host = HostKernels.build(tmp_path_factory.mktemp("host_kernels"),
                             [("uint16", "uint16", 2, "linear", "linear")],
                             [("uint16", "corners"), ("uint8", "corners")])
    with emulated_gpu(host, monkeypatch) as cupy:
        yield cupy


def test_auto_with_a_usable_gpu_says_so(fake_gpu, tile_csv: Path, capsys) -> None:
    out = tile_csv.parent / "out.ome.zarr"
    code, err = run_cli(["fuse", tile_csv, "-o", out, "--backend", "auto", "--chunk", "32"],
                        capsys)
    assert code == 0, err
    assert err == "gpufusion: using the GPU backend (1 CUDA device(s))\n"
    assert any(b.startswith("fuse_chunk") for b in fake_gpu.builds)  # it did
    reference = tile_csv.parent / "ref.ome.zarr"
    assert run_cli(["fuse", tile_csv, "-o", reference, "--backend", "numpy", "--chunk", "32"],
                   capsys)[0] == 0
    assert_close(zarr.open_array(str(out / "0"), mode="r")[...],
                 zarr.open_array(str(reference / "0"), mode="r")[...])
