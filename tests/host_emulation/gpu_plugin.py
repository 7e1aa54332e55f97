"""pytest plugin: run the ``gpu``-marked tests on the host-emulated device.

``python -m pytest -p tests.host_emulation.gpu_plugin -m gpu ...`` puts the strict CuPy
stand-in (:mod:`.fake_cupy`, kernels compiled from ``kernels/*.cu`` by g++ through the shim)
in place of ``cupy`` before the test modules are imported, so ``gpu_status()`` reports a
device and the GPU tests run their own code (fixtures, tolerances, dask graphs, writers)
against it. What this cannot show is anything about a real GPU: timing, memory, streams,
NVRTC-compiled code, dask-cuda. ``tests/test_kernels_host.py`` runs it in CI.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from gpufusion.backends import cuda_kernels as ck

    from .fake_cupy import build_fake_cupy
    from .harness import HostKernels
    from .strict_cupy import DeviceArray

    build = Path(tempfile.mkdtemp(prefix="gpufusion-host-kernels-"))
    host = HostKernels.build(build, ck.fuse_instantiations(), ck.downsample_instantiations())
    cupy, cupyx = build_fake_cupy(host)
    DeviceArray.dispatch_numpy = True  # as CuPy's __array_function__ (dask relies on it)
    sys.modules["cupy"] = cupy
    sys.modules["cupyx"] = cupyx
