"""pytest plugin: run the ``gpu``-marked tests on the host-emulated device.

``python -m pytest -p tests.host_emulation.gpu_plugin -m gpu ...`` puts the strict CuPy
stand-in (:mod:`.fake_cupy`, kernels compiled from ``kernels/*.cu`` by g++ through the shim)
in place of ``cupy`` before the test modules are imported, so ``gpu_status()`` reports a
device and the GPU tests run their own code (fixtures, tolerances, dask graphs, writers)
against it. What this cannot show is anything about a real GPU: timing, memory, streams,
NVRTC-compiled code, dask-cuda. ``tests/test_kernels_host.py`` runs it in CI.

The stream rules of the stand-in (:data:`.strict_cupy.STREAMS`) are strict here: a device
array used on another stream before its own was waited for raises at once; arrays freed
while another stream's use was not waited for are counted in the terminal summary (and
asserted absent by the tests of the writer path).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from gpufusion.backends import cuda_kernels as ck

    from .fake_cupy import build_fake_cupy
    from .harness import HostKernels
    from .strict_cupy import STREAMS, DeviceArray

    build = Path(tempfile.mkdtemp(prefix="gpufusion-host-kernels-"))
    host = HostKernels.build(build, ck.fuse_instantiations(), ck.downsample_instantiations())
    cupy, cupyx = build_fake_cupy(host)
    DeviceArray.dispatch_numpy = True  # as CuPy's __array_function__ (dask relies on it)
    STREAMS.strict = True
    sys.modules["cupy"] = cupy
    sys.modules["cupyx"] = cupyx


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how often device memory was freed while another stream's use of it was not
    waited for (the tests of the writer path assert none; dask's own assembly of a
    device-backed result on the client, ``numpy.concatenate`` on the legacy stream, is
    reported here only)."""
    import gc

    from .strict_cupy import STREAMS

    gc.collect()
    if STREAMS.violations:
        kinds = sorted({v.split(" that uses it")[0].split(" while ")[-1]
                        for v in STREAMS.violations})
        terminalreporter.write_line(f"stream rules: {len(STREAMS.violations)} late free(s), "
                                    f"from: {', '.join(kinds)}")
