"""The one dispatch point between the NumPy reference and the CUDA (CuPy) backend.

Backends are looked up by name; CuPy is imported lazily, only when the ``cupy`` backend is
asked for, so ``import gpufusion`` works on machines without CuPy or without a GPU.

"A GPU is usable" (:func:`gpu_status`) means more than a device being present: CuPy imports,
the CUDA runtime reports a device, and one of gpufusion's own kernels compiles (NVRTC) and
runs on it with the right result. That trial is made once per process (per ``cupy``
module; a failed one is tried again at the next probe), so a machine with a driver but no
NVRTC falls back to NumPy under ``auto`` (and ``--backend cupy`` is refused up front)
instead of failing at the first chunk.
"""

from __future__ import annotations

import functools
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
    (:func:`kernel_trial`, once per process).

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


#: ``id(cupy module) -> module`` of the CuPy modules whose trial kernel ran correctly.
_TRIAL_PASSED: dict[int, Any] = {}


def kernel_trial(cupy: Any) -> tuple[bool, str]:
    """Compile and launch one of gpufusion's kernels on a 2x2 block; check the result.

    Uses ``kernels/downsample.cu`` through the same cached getter and NVRTC options as the
    real work (so the compiled kernel is reused). Any failure (``CompileException`` without
    NVRTC, ``CUDADriverError`` or ``CUDARuntimeError`` at launch, a wrong result) gives
    ``(False, reason)``. A success is remembered per ``cupy`` module (once per process); a
    failure is not, so a transient one (out of memory, a busy device) in a long-lived
    process, such as a Dask worker, is tried again at the next probe.
    """
    from .cupy_backend import downsample_mean2_gpu

    if _TRIAL_PASSED.get(id(cupy)) is cupy:
        return True, "trial kernel ran"
    try:
        block = cupy.asarray(np.array(_TRIAL_BLOCK, dtype=np.uint8))
        result = cupy.asnumpy(downsample_mean2_gpu(block, (2, 2))).tolist()
    except Exception as exc:
        return False, (f"a CUDA device is present but gpufusion's kernels cannot be compiled "
                       f"or run ({one_line(exc)})")
    if result != [[4]]:
        return False, f"a CUDA device is present but a trial kernel returned {result}, not [[4]]"
    _TRIAL_PASSED[id(cupy)] = cupy
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
