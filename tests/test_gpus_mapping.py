"""``--gpus`` indices count the GPUs this process sees, and the trial kernel runs per device.

CUDA numbers the devices a process sees from 0 in the order of its ``CUDA_VISIBLE_DEVICES``;
a dask-cuda worker is given its own ``CUDA_VISIBLE_DEVICES``, which names devices as the
machine does. So under a scheduler's ``CUDA_VISIBLE_DEVICES=2,3``, ``--gpus 0,1`` must start
workers on physical GPUs 2 and 3, not 0 and 1 (GPUs another job holds). No GPU is needed:
``dask_cuda.LocalCUDACluster`` is the in-process stand-in of tests/cluster_helpers.py, which
records the ``CUDA_VISIBLE_DEVICES`` it is started with.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import zarr

from gpufusion import backends
from gpufusion.backends import cupy_backend
from gpufusion.cli import main
from gpufusion.cluster import connect, worker_devices
from gpufusion.errors import InputError
from gpufusion.synthetic import make_mosaic

from .cluster_helpers import install_fake_dask_cuda
from .tile_files import write_tile_csv

VISIBLE = "CUDA_VISIBLE_DEVICES"
UUID_A = "GPU-5f1e2d3c-aaaa-bbbb-cccc-000000000001"
MIG_B = "MIG-7a0c9e1d-1111-2222-3333-000000000002"


@pytest.fixture
def fake_dask_cuda(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    return install_fake_dask_cuda(monkeypatch)


def started_on(calls: list[dict], gpus: list[int]) -> str:
    """Start local GPU workers on ``gpus``; the ``CUDA_VISIBLE_DEVICES`` dask-cuda got."""
    with connect(gpus=gpus, threads_per_gpu=1) as client:
        assert len(client.nthreads()) == len(gpus)
    return calls[-1]["CUDA_VISIBLE_DEVICES"]


# ---------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(("parent", "gpus", "expected"), [
    (None, [0, 1], "0,1"),  # no parent list: the machine's own indices
    (None, [3], "3"),
    ("2,3", [0, 1], "2,3"),
    ("2,3", [1], "3"),
    ("3,1", [0], "3"),  # the parent's order, not sorted
    (" 5 , 7 ", [1, 0], "7,5"),
    (f"{UUID_A},{MIG_B}", [1], MIG_B),  # UUIDs and MIG instances passed through unchanged
    (f"4,{UUID_A}", [1, 0], f"{UUID_A},4"),
    ("6,7,-1,2", [1], "7"),  # CUDA stops at the first entry it cannot use
], ids=["unset", "unset-one", "parent", "parent-second", "parent-order", "spaces", "mig",
        "mixed", "stops"])
def test_gpus_count_the_devices_this_process_sees(monkeypatch: pytest.MonkeyPatch,
                                                  fake_dask_cuda: list[dict], parent: str | None,
                                                  gpus: list[int], expected: str) -> None:
    if parent is None:
        monkeypatch.delenv(VISIBLE, raising=False)
    else:
        monkeypatch.setenv(VISIBLE, parent)
    assert worker_devices(gpus) == tuple(expected.split(","))
    if parent in (None, "2,3", f"{UUID_A},{MIG_B}"):  # a real (stand-in) start for a few
        assert started_on(fake_dask_cuda, gpus) == expected
        assert fake_dask_cuda[-1]["n_workers"] == len(gpus)


@pytest.mark.parametrize(("parent", "gpus", "match"), [
    ("2,3", [2], r"--gpus: GPU 2 does not exist here: CUDA_VISIBLE_DEVICES='2,3' makes 2 "
                 r"visible \(indices 0\.\.1\)"),
    ("2,3", [0, 5], "GPU 5 does not exist here"),
    (UUID_A, [1], f"CUDA_VISIBLE_DEVICES='{UUID_A}' makes 1 visible"),
    ("", [0], "CUDA_VISIBLE_DEVICES='' hides every GPU from this process"),
    ("-1", [0], "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
    ("1,x,2", [1], "makes 1 visible"),
], ids=["beyond", "one-beyond", "uuid", "empty", "minus-one", "invalid-entry"])
def test_an_index_beyond_the_parent_list_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                    fake_dask_cuda: list[dict], parent: str,
                                                    gpus: list[int], match: str) -> None:
    monkeypatch.setenv(VISIBLE, parent)
    with pytest.raises(InputError, match=match) as exc, connect(gpus=gpus):
        pass
    assert "\n" not in str(exc.value)
    assert fake_dask_cuda == []  # refused before any worker started


@pytest.fixture
def tile_csv(tmp_path: Path) -> Path:
    syn = make_mosaic((2, 2), (40, 40), overlap=0.2, subpixel=1.0, seed=3)
    return write_tile_csv(tmp_path, syn.tiles, syn.positions)


def test_cli_gpus_under_a_parent_list(monkeypatch: pytest.MonkeyPatch, tile_csv: Path,
                                      fake_dask_cuda: list[dict], capsys) -> None:
    """``CUDA_VISIBLE_DEVICES=2,3 gpufusion fuse ... --gpus 0,1`` starts its workers on
    physical GPUs 2 and 3 and writes what the local threads write; ``--gpus 2`` there is
    exit 2 with one line naming the index."""
    monkeypatch.setenv(VISIBLE, "2,3")
    folder = tile_csv.parent
    common = ["fuse", str(tile_csv), "--backend", "numpy", "--chunk", "32"]
    assert main([*common, "-o", str(folder / "local.ome.zarr")]) == 0
    code = main([*common, "-o", str(folder / "gpus.ome.zarr"), "--gpus", "0,1",
                 "--threads-per-gpu", "1"])
    assert code == 0, capsys.readouterr().err
    assert [c["CUDA_VISIBLE_DEVICES"] for c in fake_dask_cuda] == ["2,3"]
    local = zarr.open_group(str(folder / "local.ome.zarr"), mode="r")
    gpus = zarr.open_group(str(folder / "gpus.ome.zarr"), mode="r")
    assert sorted(local.array_keys()) == sorted(gpus.array_keys())
    for key in local.array_keys():
        np.testing.assert_array_equal(gpus[key][...], local[key][...])
    capsys.readouterr()
    assert main([*common, "-o", str(folder / "bad.ome.zarr"), "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpus: GPU 2 does not exist here" in err, err
    assert len(fake_dask_cuda) == 1 and not (folder / "bad.ome.zarr").exists()


def test_device_count_still_bounds_indices_without_a_parent_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``CUDA_VISIBLE_DEVICES`` the check against CuPy's device count remains."""
    install_fake_dask_cuda(monkeypatch, check_devices=True)
    monkeypatch.delenv(VISIBLE, raising=False)
    from gpufusion import cluster

    monkeypatch.setattr(cluster, "_device_count", lambda: 2)
    with pytest.raises(InputError, match=r"GPU 2 does not exist; this machine has 2"), \
            connect(gpus=[0, 2]):
        pass


# ---------------------------------------------------------------------- the trial kernel


def two_device_cupy() -> tuple[types.ModuleType, list[int]]:
    """A ``cupy`` with two devices (``cupy.current`` is the current one) and the list of the
    devices the trial kernel was launched on."""
    cupy = types.ModuleType("cupy")
    cupy.current = 0  # type: ignore[attr-defined]
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 2,
                                    getDevice=lambda: cupy.current)  # type: ignore[attr-defined]
    cupy.cuda = types.SimpleNamespace(runtime=runtime)  # type: ignore[attr-defined]
    cupy.asarray = np.asarray  # type: ignore[attr-defined]
    cupy.asnumpy = np.asarray  # type: ignore[attr-defined]
    launched: list[int] = []
    return cupy, launched


@pytest.fixture
def trial_devices(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, list[int]]:
    cupy, launched = two_device_cupy()

    def downsample(block: np.ndarray, factors) -> np.ndarray:  # the trial's kernel
        launched.append(cupy.current)
        return np.rint(block.reshape(1, 2, 1, 2).mean(axis=(1, 3))).astype(block.dtype)

    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(cupy_backend, "downsample_mean2_gpu", downsample)
    monkeypatch.setattr(backends, "_TRIAL_PASSED", {})
    return cupy, launched


def test_trial_kernel_runs_once_per_device(trial_devices) -> None:
    """A process that uses two devices checks each once: the kernel image that loaded on
    device 0 says nothing of device 1 (another architecture, another driver state)."""
    cupy, launched = trial_devices
    for device in (0, 0, 1, 1, 0, 1):
        cupy.current = device
        assert backends.gpu_status() == (True, "2 CUDA device(s)")
    assert launched == [0, 1]


def test_a_failure_on_one_device_leaves_the_other_usable(trial_devices,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cupy, launched = trial_devices
    assert backends.gpu_status()[0]
    cupy.current = 1

    def broken(block, factors):
        launched.append(cupy.current)
        raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available")

    monkeypatch.setattr(cupy_backend, "downsample_mean2_gpu", broken)
    ok, why = backends.gpu_status()
    assert not ok and "CUDA_ERROR_NO_BINARY_FOR_GPU" in why
    cupy.current = 0
    assert backends.gpu_status()[0]  # remembered, not launched again
    assert launched == [0, 1]
