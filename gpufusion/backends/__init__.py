"""The one dispatch point between the NumPy reference and the CUDA (CuPy) backend.

Backends are looked up by name; CuPy is imported lazily, only when the ``cupy`` backend is
asked for, so ``import gpufusion`` works on machines without CuPy or without a GPU.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from ..errors import InputError

BACKENDS = ("auto", "numpy", "cupy")


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


def gpu_status() -> tuple[bool, str]:
    """Whether a CUDA GPU is usable through CuPy, and a one-line reason when it is not."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install 'gpufusion[gpu]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return False, f"no usable CUDA device ({type(exc).__name__}: {exc})".splitlines()[0]
    if n < 1:
        return False, "no CUDA device found"
    return True, f"{n} CUDA device(s)"


@functools.cache
def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``numpy`` or ``cupy``)."""
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
    """Resolve ``auto``: the GPU when usable, else NumPy with a one-line notice."""
    if name not in BACKENDS:
        raise InputError(f"backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name, None
    ok, why = gpu_status()
    if ok:
        try:
            get_backend("cupy")
            return "cupy", f"using the GPU backend ({why})"
        except ImportError:
            return "numpy", "GPU found but the cupy backend is not available; using NumPy"
    return "numpy", f"no GPU: {why}; using the NumPy backend"
