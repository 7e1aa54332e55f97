"""A stand-in for the CuPy APIs the CUDA backend uses, backed by NumPy and the host kernels.

It lets the backend's own code (:mod:`gpufusion.backends.cupy_backend`: dtype choice,
packing, argument tuples, pointer passing, output casts, the cached getters and the dask
graph) run on a CPU-only machine: ``RawModule.get_function`` returns a launcher that calls
the g++-compiled kernel for that name expression; "device" arrays are the strict
:class:`~.strict_cupy.DeviceArray` (no implicit conversion to NumPy, no host arrays mixed
into device operations, ``.data.ptr`` for kernels); streams and events keep CuPy's rules
of which stream work goes on and report uses that would race on a GPU
(:data:`~.strict_cupy.STREAMS`; the kernels themselves run at once). It checks
what CuPy would insist on: kernel arguments are device arrays or NumPy scalars of the
kernel's C types, launch dimensions are tuples, and compile options are the backend's.
NumPy functions on device arrays run on them as CuPy's ``__array_function__`` does (dask
relies on it); the fixtures that use this module switch that on.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from gpufusion.backends import cuda_kernels as ck

from .harness import (
    HostKernels,
    _blocks_symbol,
    _downsample_symbol,
    _fuse_symbol,
    _separable_symbol,
)
from .strict_cupy import (
    NULL_STREAM,
    STREAMS,
    DeviceArray,
    FakeEvent,
    FakeStream,
    build_strict_cupy,
    check_streams,
    current_stream,
    empty_pinned,
)


def build_fake_cupy(host: HostKernels) -> tuple[types.ModuleType, types.ModuleType]:
    """``(cupy, cupyx)`` modules whose kernels run on the host."""
    calls: dict[str, Any] = {}
    for key in host.fuse_keys:
        calls[ck.fuse_name_expression(*key)] = getattr(host.libs["fuse"], _fuse_symbol(key))
        calls[ck.separable_name_expression(*key)] = getattr(host.libs["fuse"],
                                                            _separable_symbol(key))
        calls[ck.blocks_name_expression(*key)] = getattr(host.libs["fuse"], _blocks_symbol(key))
    for key in host.downsample_keys:
        calls[ck.downsample_name_expression(*key)] = getattr(host.libs["downsample"],
                                                             _downsample_symbol(*key))
    cupy = build_strict_cupy()
    cupy.builds = []  # type: ignore[attr-defined]  # name expressions compiled, in order

    def kernel_arg(a: Any) -> int | float:
        if isinstance(a, DeviceArray):
            return a.data.ptr
        if isinstance(a, np.floating):
            return float(a)
        if isinstance(a, np.integer) and a.dtype.itemsize == 8:
            return int(a)
        raise TypeError(f"kernel argument {a!r} ({type(a).__name__}) is not a device array "
                        "or an 8-byte NumPy scalar")

    class RawModule:
        def __init__(self, *, code: str, options: tuple, name_expressions: tuple) -> None:
            assert options == ck.COMPILE_OPTIONS and code in (ck.kernel_source("fuse"),
                                                              ck.kernel_source("downsample"))
            self.exprs = name_expressions

        def get_function(self, expr: str) -> Any:
            assert expr in self.exprs
            cupy.builds.append(expr)  # type: ignore[attr-defined]
            fn = calls[expr]

            def launch(grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0,
                       stream: FakeStream | None = None) -> None:
                assert isinstance(grid, tuple) and isinstance(block, tuple)
                check_streams(expr, args, stream)  # RawKernel: the current stream if None
                fn(grid[0], block[0], *(kernel_arg(a) for a in args))

            return launch

    class Device:
        def __init__(self, device: int | None = None) -> None:
            self.id = 0

        def synchronize(self) -> None:
            STREAMS.synchronize_all()

        def __enter__(self) -> Device:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    FakeStream.null = NULL_STREAM  # type: ignore[attr-defined]
    runtime = types.SimpleNamespace(
        getDevice=lambda: 0, getDeviceCount=lambda: 1,
        memGetInfo=lambda: (64 << 30, 80 << 30),  # (free, total) bytes, as cudaMemGetInfo
        getDeviceProperties=lambda dev: {"name": b"Host emulation"})
    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        Stream=FakeStream, Event=FakeEvent, Device=Device, runtime=runtime,
        get_elapsed_time=lambda a, b: 0.5, get_current_stream=current_stream)
    class MemoryPool:  # the emulated device has no pool: limits are only remembered
        def __init__(self) -> None:
            self.limit = 0

        def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
            self.limit = int(size or 0)

        def get_limit(self) -> int:
            return self.limit

        def free_all_blocks(self) -> None:
            return None

        def used_bytes(self) -> int:
            return 0

    pool = MemoryPool()
    cupy.get_default_memory_pool = lambda: pool  # type: ignore[attr-defined]
    cupy.RawModule = RawModule  # type: ignore[attr-defined]
    cupy.host_emulation = True  # type: ignore[attr-defined]  # tests tell it from a real GPU
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = empty_pinned  # type: ignore[attr-defined]
    return cupy, cupyx


@contextmanager
def emulated_gpu(host: HostKernels, monkeypatch: Any) -> Iterator[types.ModuleType]:
    """For one test: ``cupy``/``cupyx`` replaced by this stand-in (restored by
    ``monkeypatch``), NumPy functions dispatched on device arrays as CuPy's
    ``__array_function__`` does, and the kernel and backend caches cleared before and after.

    The device is probed first, as the first :func:`gpufusion.backends.gpu_status` in a
    process does (its trial kernel needs ``("uint8", "corners")`` among ``host``'s
    downsampling instantiations); the test then starts with no kernel built
    (``cupy.builds`` empty), so it sees only its own compilations and launches.
    """
    from gpufusion.backends import get_backend, gpu_status

    cupy, cupyx = build_fake_cupy(host)
    monkeypatch.setattr(DeviceArray, "dispatch_numpy", True)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    caches = (ck.fuse_kernel, ck.separable_kernel, ck.blocks_kernel, ck.downsample_kernel,
              get_backend)
    for c in caches:
        c.cache_clear()
    ok, why = gpu_status()
    if not ok:
        raise RuntimeError(f"the emulated device is not usable: {why}")
    ck.downsample_kernel.cache_clear()
    cupy.builds.clear()  # type: ignore[attr-defined]
    try:
        yield cupy
    finally:
        for c in caches:
            c.cache_clear()

