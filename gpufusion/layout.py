"""Layout: tiles, their transforms into the output grid, and the output grid itself.

Conventions (used everywhere in gpufusion):

* Coordinates are in **array index order**: ``(y, x)`` in 2D, ``(z, y, x)`` in 3D. Files that
  write ``x, y[, z]`` (Fiji TileConfiguration, positions CSV) are reversed on reading.
* A tile's affine is an ``(ndim + 1, ndim + 1)`` homogeneous matrix mapping a tile pixel's
  index coordinates to *world* pixel coordinates: ``world = A @ [q, 1]``. A translation by
  ``t`` is the common case: the tile's pixel ``(0, 0)`` lands at ``t``.
* Pixel values sit at integer coordinates (pixel centres). A tile covers the box
  ``[0, shape - 1]`` in its own coordinates.
* The output grid is a box of world pixels: its pixel ``p`` is at world coordinate
  ``origin + p``. By default it is the bounding box of all transformed tiles, with ``origin``
  rounded down to an integer so that integer translations stay integer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .sources import TileSource, as_source

#: Coordinates closer than this to an integer are treated as that integer when deciding
#: the output grid (positions written as 921.0000001 by other tools).
GRID_EPS = 1e-6


@dataclass(frozen=True)
class Tile:
    """One tile: a lazy pixel source and its affine transform to world pixel coordinates."""

    source: TileSource
    affine: np.ndarray
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def ndim(self) -> int:
        return len(self.source.shape)


@dataclass(frozen=True)
class Mosaic:
    """Tiles plus the output grid they are fused into.

    Build one with :func:`mosaic_from_positions` or :func:`mosaic_from_affines` (or
    :func:`gpufusion.readers.mosaic_from_file` for a positions file).

    Attributes
    ----------
    tiles : tuple of Tile
    origin : ndarray of int64, shape (ndim,)
        World coordinate of output pixel 0.
    shape : tuple of int
        Output shape in pixels.
    pixel_size : tuple of float or None
        Physical size of an output pixel per axis (index order), if known.
    unit : str or None
        Unit of ``pixel_size`` (an NGFF unit name such as ``"micrometer"``).
    """

    tiles: tuple[Tile, ...]
    origin: np.ndarray
    shape: tuple[int, ...]
    pixel_size: tuple[float, ...] | None = None
    unit: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.tiles[0].source.dtype)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def tile_shapes(self) -> np.ndarray:
        """``(n, ndim)`` int64 array of tile shapes."""
        if "tile_shapes" not in self._cache:
            self._cache["tile_shapes"] = np.array([t.shape for t in self.tiles], dtype=np.int64)
        return self._cache["tile_shapes"]

    @property
    def affines(self) -> np.ndarray:
        """``(n, ndim+1, ndim+1)`` affines from tile pixels to **output** pixel coordinates."""
        if "affines" not in self._cache:
            shift = np.eye(self.ndim + 1)
            shift[: self.ndim, self.ndim] = -self.origin
            self._cache["affines"] = np.stack([shift @ t.affine for t in self.tiles])
        return self._cache["affines"]

    @property
    def inverse_affines(self) -> np.ndarray:
        """``(n, ndim+1, ndim+1)`` affines from output pixel coordinates to tile pixels."""
        if "inverse_affines" not in self._cache:
            self._cache["inverse_affines"] = np.linalg.inv(self.affines)
        return self._cache["inverse_affines"]

    def tile_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounding boxes of the tiles in output pixel coordinates (``lo``, ``hi`` inclusive)."""
        return transformed_bounds(self.affines, self.tile_shapes)

    def positions(self) -> np.ndarray:
        """``(n, ndim)`` world position of each tile's pixel 0 (the affines' translations)."""
        return np.stack([t.affine[: self.ndim, self.ndim] for t in self.tiles])

    def with_grid(self, origin: Sequence[int], shape: Sequence[int]) -> Mosaic:
        """Return a copy fused into another output grid (e.g. one shared by time points)."""
        return Mosaic(self.tiles, np.asarray(origin, dtype=np.int64).reshape(self.ndim),
                      tuple(int(n) for n in shape), self.pixel_size, self.unit)

    def with_affines(self, affines: Sequence[np.ndarray] | np.ndarray) -> Mosaic:
        """Return a copy whose tiles carry new world affines (the grid is recomputed)."""
        tiles = [Tile(t.source, np.asarray(a, dtype=np.float64), t.name)
                 for t, a in zip(self.tiles, affines, strict=True)]
        return _make_mosaic(tiles, None, None, self.pixel_size, self.unit)


def transformed_bounds(affines: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes of boxes ``[0, shape-1]`` mapped through ``affines``.

    Parameters
    ----------
    affines : ndarray, shape (n, ndim+1, ndim+1)
    shapes : ndarray, shape (n, ndim)

    Returns
    -------
    lo, hi : ndarray, shape (n, ndim)
        Inclusive bounds of the pixel centres, in the affines' output coordinates.
    """
    ndim = shapes.shape[1]
    corners = box_corners(np.zeros_like(shapes, dtype=np.float64), shapes - 1.0)  # (n, 2^d, d)
    mapped = np.einsum("nij,nkj->nki", affines[:, :ndim, :ndim], corners)
    mapped += affines[:, None, :ndim, ndim]
    return mapped.min(axis=1), mapped.max(axis=1)


def box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """All ``2**ndim`` corners of boxes ``[lo, hi]``; ``lo``, ``hi`` of shape (n, ndim)."""
    ndim = lo.shape[1]
    bits = (np.arange(2**ndim)[:, None] >> np.arange(ndim)[None, :]) & 1  # (2^d, d)
    return np.where(bits[None], hi[:, None, :], lo[:, None, :])


def translation_affine(position: Sequence[float]) -> np.ndarray:
    """Homogeneous affine of a translation by ``position`` (index order)."""
    pos = np.asarray(position, dtype=np.float64)
    a = np.eye(pos.size + 1)
    a[:-1, -1] = pos
    return a


def mosaic_from_positions(
    tiles: Sequence[Any],
    positions: Sequence[Sequence[float]] | np.ndarray,
    *,
    names: Sequence[str] | None = None,
    output_shape: Sequence[int] | None = None,
    origin: Sequence[int] | None = None,
    pixel_size: Sequence[float] | None = None,
    unit: str | None = None,
) -> Mosaic:
    """Build a mosaic from tiles placed by translation.

    Parameters
    ----------
    tiles : sequence of array-like or TileSource
        NumPy arrays, dask arrays or :class:`~gpufusion.sources.TileSource` objects, all of
        the same ndim (2 or 3) and dtype.
    positions : array-like, shape (n, ndim)
        World position of each tile's pixel 0, in index order (``y, x`` or ``z, y, x``);
        sub-pixel values are fine.
    names : sequence of str, optional
        Names used in messages (default ``tile0``, ``tile1``, ...).
    output_shape, origin : optional
        An explicit output grid; default: the bounding box of all tiles.
    pixel_size, unit : optional
        Physical pixel size (index order) and its unit, written into the output metadata.

    Examples
    --------
    >>> import numpy as np
    >>> m = mosaic_from_positions([np.ones((4, 5)), np.ones((4, 5))], [(0, 0), (0, 3.5)])
    >>> m.shape
    (4, 8)
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[0] != len(tiles):
        raise InputError(
            f"positions: expected an array of shape ({len(tiles)}, ndim), got {pos.shape}"
        )
    affines = [translation_affine(p) for p in pos]
    return mosaic_from_affines(tiles, affines, names=names, output_shape=output_shape,
                               origin=origin, pixel_size=pixel_size, unit=unit)


def mosaic_from_affines(
    tiles: Sequence[Any],
    affines: Sequence[np.ndarray] | np.ndarray,
    *,
    names: Sequence[str] | None = None,
    output_shape: Sequence[int] | None = None,
    origin: Sequence[int] | None = None,
    pixel_size: Sequence[float] | None = None,
    unit: str | None = None,
) -> Mosaic:
    """Build a mosaic from tiles and affine transforms (tile pixels -> world pixels).

    Parameters
    ----------
    tiles : sequence of array-like or TileSource
    affines : sequence of ndarray, each (ndim+1, ndim+1)
        Homogeneous matrices in index order; the last row must be ``[0, ..., 0, 1]``.

    Other parameters are as for :func:`mosaic_from_positions`.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0.0, -1, 9], [1, 0, 0], [0, 0, 1]])  # 90 degree rotation
    >>> mosaic_from_affines([np.zeros((4, 10))], [a]).shape
    (10, 4)
    """
    if len(tiles) == 0:
        raise InputError("tiles: the tile list is empty")
    if names is None:
        names = [getattr(t, "name", None) or f"tile{i}" for i, t in enumerate(tiles)]
    if len(names) != len(tiles) or len(affines) != len(tiles):
        raise InputError(
            f"tiles: got {len(tiles)} tiles, {len(affines)} transforms and {len(names)} names"
        )
    sources = [as_source(t, str(n)) for t, n in zip(tiles, names, strict=True)]
    out = []
    for src, aff, name in zip(sources, affines, names, strict=True):
        out.append(Tile(src, _check_affine(aff, len(src.shape), name), str(name)))
    return _make_mosaic(out, output_shape, origin, pixel_size, unit)


def _check_affine(affine: Any, ndim: int, name: str) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (ndim + 1, ndim + 1):
        raise InputError(
            f"{name}: transform must be a {ndim + 1}x{ndim + 1} matrix for a {ndim}D tile, "
            f"got shape {a.shape}"
        )
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name}: transform contains NaN or infinite values")
    last = np.zeros(ndim + 1)
    last[-1] = 1
    if not np.allclose(a[-1], last):
        raise InputError(f"{name}: the last row of the transform must be [0, ..., 0, 1]")
    if abs(np.linalg.det(a[:ndim, :ndim])) < 1e-9:
        raise InputError(f"{name}: transform is singular (not invertible)")
    return a


def _make_mosaic(
    tiles: list[Tile],
    output_shape: Sequence[int] | None,
    origin: Sequence[int] | None,
    pixel_size: Sequence[float] | None,
    unit: str | None,
) -> Mosaic:
    first = tiles[0]
    if first.ndim not in (2, 3):
        raise InputError(f"{first.name}: tiles must be 2D (YX) or 3D (ZYX), got {first.ndim}D")
    for t in tiles[1:]:
        if t.ndim != first.ndim:
            raise InputError(
                f"{t.name}: tile is {t.ndim}D but {first.name} is {first.ndim}D; "
                "all tiles must have the same number of dimensions"
            )
        if np.dtype(t.source.dtype) != np.dtype(first.source.dtype):
            raise InputError(
                f"{t.name}: tile dtype {np.dtype(t.source.dtype)} differs from "
                f"{first.name} ({np.dtype(first.source.dtype)}); all tiles must share one dtype"
            )
    for t in tiles:
        if min(t.shape) < 1:
            raise InputError(f"{t.name}: tile is empty (shape {t.shape})")
    ndim = first.ndim
    affines = np.stack([t.affine for t in tiles])
    shapes = np.array([t.shape for t in tiles], dtype=np.int64)
    lo, hi = transformed_bounds(affines, shapes)
    if origin is None:
        org = np.floor(lo.min(axis=0) + GRID_EPS).astype(np.int64)
    else:
        org = np.asarray(origin, dtype=np.int64).reshape(ndim)
    if output_shape is None:
        shape = tuple(int(n) for n in np.floor(hi.max(axis=0) + GRID_EPS).astype(np.int64)
                      - org + 1)
    else:
        shape = tuple(int(n) for n in output_shape)
        if len(shape) != ndim or min(shape) < 1:
            raise InputError(f"output_shape: expected {ndim} positive sizes, got {shape}")
    if pixel_size is not None:
        pixel_size = tuple(float(p) for p in pixel_size)
        if len(pixel_size) != ndim or not all(math.isfinite(p) and p > 0 for p in pixel_size):
            raise InputError(f"pixel_size: expected {ndim} positive numbers, got {pixel_size}")
    return Mosaic(tuple(tiles), org, shape, pixel_size, unit)
