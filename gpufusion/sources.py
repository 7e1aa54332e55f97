"""Tile sources: lazy, picklable handles on the pixels of one tile.

A fusion task reads only the tile windows its output chunk needs, so every tile is held
as a *source* rather than an array. A source has ``shape``, ``dtype`` and ``name`` and a
``read(window)`` method returning a NumPy array for a tuple of slices. Sources must be
cheap to pickle (they travel to dask workers): file sources hold a path, not pixels.

Sources defined here wrap arrays the caller already has (NumPy or dask); file-backed
sources live in :mod:`gpufusion.readers.images`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import InputError

Window = tuple[slice, ...]


@runtime_checkable
class TileSource(Protocol):
    """What the planner and the fusion tasks need from a tile."""

    shape: tuple[int, ...]
    dtype: np.dtype
    name: str

    def read(self, window: Window) -> np.ndarray:
        """Return the pixels in ``window`` (a tuple of slices, one per axis) as NumPy."""
        ...


class ArraySource:
    """A tile held in memory as a NumPy array (or anything ``np.asarray`` accepts)."""

    def __init__(self, array: Any, name: str = "array") -> None:
        try:
            self.array = np.asarray(array)
        except (TypeError, ValueError) as exc:  # ragged nested lists, unconvertible objects
            raise InputError(f"{name}: not an array of pixels ({exc})") from None
        self.shape = tuple(int(n) for n in self.array.shape)
        self.dtype = self.array.dtype
        self.name = name

    def read(self, window: Window) -> np.ndarray:
        return self.array[window]

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class DaskSource:
    """A tile held as a dask array; each window is computed inside the fusion task.

    The window is computed with the synchronous scheduler, so a fusion task never
    re-enters the scheduler that runs it.
    """

    def __init__(self, array: Any, name: str = "dask-array") -> None:
        if not all(isinstance(n, int | np.integer) or math.isfinite(n) for n in array.shape):
            raise InputError(
                f"{name}: dask array of unknown shape {tuple(array.shape)} (NaN chunk sizes); "
                "call .compute_chunk_sizes() on it first"
            )
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.name = name

    def read(self, window: Window) -> np.ndarray:
        return np.asarray(self.array[window].compute(scheduler="synchronous"))

    def __repr__(self) -> str:
        return f"DaskSource({self.name!r}, shape={self.shape}, dtype={self.dtype})"


def as_source(obj: Any, name: str) -> TileSource:
    """Wrap a NumPy array, a dask array or an existing source as a :class:`TileSource`."""
    if isinstance(obj, TileSource) and not isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "dask") and hasattr(obj, "chunks"):
        return DaskSource(obj, name=name)
    return ArraySource(obj, name=name)
