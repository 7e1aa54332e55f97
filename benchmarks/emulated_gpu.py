"""Run a Python module or script with the host-emulated CUDA device in place of CuPy.

The ``--dry-run`` of ``benchmarks/gpu_session.sh`` runs every Python step through this::

    python benchmarks/emulated_gpu.py -m pytest -m gpu tests/
    python benchmarks/emulated_gpu.py benchmarks/gpu_probe.py probe

Before the step starts, ``cupy`` and ``cupyx`` are replaced by the strict stand-in of
``tests/host_emulation`` (kernels compiled from ``kernels/*.cu`` by g++ for the CPU, as
``tests/host_emulation/gpu_plugin.py`` does for pytest), so ``gpu_status()`` reports a
device and the GPU code paths run. The compiled kernels are kept in
``$GPUFUSION_HOST_KERNELS`` (default ``$TMPDIR/gpufusion-host-kernels``) and reused while
the kernel sources are unchanged. Nothing measured under it is a GPU's timing.
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install() -> None:
    """Put the emulated ``cupy``/``cupyx`` in ``sys.modules``."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # for tests.host_emulation
    from gpufusion.backends import cuda_kernels as ck
    from tests.host_emulation.fake_cupy import build_fake_cupy
    from tests.host_emulation.harness import HostKernels
    from tests.host_emulation.strict_cupy import DeviceArray

    build = Path(os.environ.get("GPUFUSION_HOST_KERNELS")
                 or Path(tempfile.gettempdir()) / "gpufusion-host-kernels")
    build.mkdir(parents=True, exist_ok=True)
    host = HostKernels.build(build, ck.fuse_instantiations(), ck.downsample_instantiations())
    cupy, cupyx = build_fake_cupy(host)
    DeviceArray.dispatch_numpy = True  # as CuPy's __array_function__ (dask relies on it)
    sys.modules["cupy"] = cupy
    sys.modules["cupyx"] = cupyx


def main(argv: list[str]) -> None:
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit("usage: emulated_gpu.py -m MODULE [ARGS...] | SCRIPT [ARGS...]")
    install()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
