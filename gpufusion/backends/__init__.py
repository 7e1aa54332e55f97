"""The one dispatch point between the NumPy reference and the CUDA (CuPy) backend.

Backends are looked up by name; CuPy is imported lazily, only when the ``cupy`` backend is
asked for, so ``import gpufusion`` works on machines without CuPy or without a GPU.

"A GPU is usable" (:func:`gpu_status`) means more than a device being present: CuPy imports,
the CUDA runtime reports a device, and one of gpufusion's own kernels compiles (NVRTC) and
runs on it with the right result. That trial is made once per device (per ``cupy`` module
and current device; a failed one is tried again at the next probe), so a machine with a
driver but no NVRTC falls back to NumPy under ``auto`` (and ``--backend cupy`` is refused
up front) instead of failing at the first chunk.

:func:`task_scope` wraps one whole dask task on a backend (fuse a block, downsample its
pyramid levels, copy each to the host): nothing for NumPy; for CuPy, the task's one CUDA
stream (see :mod:`gpufusion.backends.cupy_backend` for why that is race-free).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from ..errors import InputError

BACKENDS = ("auto", "numpy", "cupy")

#: The trial block (uint8) whose 2x2 mean, 4, the trial kernel must return.
_TRIAL_BLOCK = ((1, 3), (5, 7))


class Backend(Protocol):
    """What the fusion graph needs from a backend."""

    name: str

    def empty_meta(self, ndim: int, dtype: np.dtype) -> Any:
        """A zero-size array of the backend's array type (dask ``meta``)."""
        ...

    def fuse_task(self, task: Any, params: Any, algorithm: str = "auto") -> Any:
        """Fuse one :class:`~gpufusion.fuse.ChunkTask` into an output block."""
        ...


class NumpyBackend:
    """The reference backend (CPU)."""

    name = "numpy"

    def empty_meta(self, ndim: int, dtype: np.dtype) -> np.ndarray:
        return np.empty((0,) * ndim, dtype=dtype)

    def fuse_task(self, task: Any, params: Any, algorithm: str = "auto") -> np.ndarray:
        from .numpy_ref import fuse_chunk

        return fuse_chunk(task.read_windows(), task.table, params, algorithm=algorithm)


@contextlib.contextmanager
def task_scope(name: str) -> Iterator[Any]:
    """Run one whole task (fuse a block, downsample it, copy the levels to the host) in it.

    ``numpy``: does nothing (yields ``None``). ``cupy``: the task's work is ordered on the
    calling thread's one non-blocking CUDA stream (made current; yielded), which is
    synchronised when the block exits, also on an exception; see
    :func:`gpufusion.backends.cupy_backend.task_scope`. Nested scopes share the outer one.

    Parameters
    ----------
    name : {"numpy", "cupy"}
        The backend the task runs on (resolved, not ``auto``).

    Examples
    --------
    >>> with task_scope("numpy") as stream:
    ...     print(stream)
    None
    """
    if name == "numpy":
        yield None
    elif name == "cupy":
        from .cupy_backend import task_scope as cupy_task_scope

        with cupy_task_scope() as stream:
            yield stream
    else:
        raise InputError(f"backend: unknown {name!r} for a task; choose numpy or cupy")


def one_line(exc: BaseException) -> str:
    """``"Type: message"`` cut to its first line (CUDA and NVRTC messages run over several).

    Examples
    --------
    >>> one_line(RuntimeError("cudaErrorNoDevice: no device\\nmore detail"))
    'RuntimeError: cudaErrorNoDevice: no device'
    """
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def gpu_status() -> tuple[bool, str]:
    """Whether gpufusion can run CUDA kernels here, and a one-line reason.

    Checks, in order: CuPy imports (not installed, or installed but failing to import, are
    told apart), the CUDA runtime reports a device, and a trial kernel compiles and runs
    on the current device (:func:`kernel_trial`, once per device).

    Returns
    -------
    (bool, str)
        ``(True, "1 CUDA device(s)")`` or ``(False, reason)``, the reason one line.
    """
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name == "cupy":
            return False, "CuPy is not installed (pip install 'gpufusion[gpu]')"
        return False, f"CuPy is installed but cannot be imported ({one_line(exc)})"
    except Exception as exc:  # ImportError of a CUDA library, or anything its import raises
        return False, f"CuPy is installed but cannot be imported ({one_line(exc)})"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return False, f"no usable CUDA device ({one_line(exc)})"
    if n < 1:
        return False, "no CUDA device found"
    ok, why = kernel_trial(cupy)
    if not ok:
        return False, why
    return True, f"{n} CUDA device(s)"


#: ``(id(cupy module), device id) -> module`` of the devices whose trial kernel ran
#: correctly (the module kept, so that a reused ``id`` of another module cannot match).
_TRIAL_PASSED: dict[tuple[int, int], Any] = {}


def kernel_trial(cupy: Any) -> tuple[bool, str]:
    """Compile and launch one of gpufusion's kernels on a 2x2 block; check the result.

    Uses ``kernels/downsample.cu`` through the same cached getter and NVRTC options as the
    real work (so the compiled kernel is reused). Any failure (``CompileException`` without
    NVRTC, ``CUDADriverError`` or ``CUDARuntimeError`` at launch, a wrong result) gives
    ``(False, reason)``. The trial runs on the current device; a success is remembered per
    ``cupy`` module and device (a process that switches devices, ``with
    cupy.cuda.Device(1):``, tries each one once: a kernel image that loads on one device
    need not load on another of a different architecture); a failure is not remembered,
    so a transient one (out of memory, a busy device) in a long-lived process, such as a
    Dask worker, is tried again at the next probe.
    """
    from .cupy_backend import downsample_mean2_gpu

    try:
        key = (id(cupy), int(cupy.cuda.runtime.getDevice()))
    except Exception as exc:  # CUDARuntimeError: no current device
        return False, f"no usable CUDA device ({one_line(exc)})"
    if _TRIAL_PASSED.get(key) is cupy:
        return True, "trial kernel ran"
    try:
        block = cupy.asarray(np.array(_TRIAL_BLOCK, dtype=np.uint8))
        result = cupy.asnumpy(downsample_mean2_gpu(block, (2, 2))).tolist()
    except Exception as exc:
        return False, (f"a CUDA device is present but gpufusion's kernels cannot be compiled "
                       f"or run ({one_line(exc)})")
    if result != [[4]]:
        return False, f"a CUDA device is present but a trial kernel returned {result}, not [[4]]"
    _TRIAL_PASSED[key] = cupy
    return True, "trial kernel ran"


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``numpy`` or ``cupy``).

    Raises
    ------
    InputError
        For ``cupy`` when :func:`gpu_status` says no (one line, with the reason).
    """
    if name == "numpy":
        return NumpyBackend()
    if name == "cupy":
        ok, why = gpu_status()
        if not ok:
            raise InputError(f"backend cupy: {why}")
        from .cupy_backend import CupyBackend  # type: ignore[import-not-found]

        return CupyBackend()
    raise InputError(f"backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(name: str) -> tuple[str, str | None]:
    """Resolve ``auto``: the GPU when usable, else NumPy with a one-line notice.

    ``numpy`` and ``cupy`` are returned as given (``cupy`` is checked by
    :func:`get_backend`).

    Examples
    --------
    >>> resolve_backend("numpy")
    ('numpy', None)
    """
    if name not in BACKENDS:
        raise InputError(f"backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name, None
    ok, why = gpu_status()
    if ok:
        get_backend("cupy")
        return "cupy", f"using the GPU backend ({why})"
    return "numpy", f"no usable GPU: {why}; using the NumPy backend"
