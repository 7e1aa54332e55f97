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
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .sources import TileSource, as_source

#: Coordinates closer than this to an integer are treated as that integer when deciding
#: the output grid (positions written as 921.0000001 by other tools).
GRID_EPS = 1e-6

#: Largest magnitude of any world or output coordinate, in pixels: every transformed tile
#: corner, the output grid's origin and its far end. Why 2**40: float64 carries 53 bits, so
#: up to 2**40 coordinates are resolved to 2**-12 px (integer positions stay exact and the
#: GRID_EPS/SNAP_EPS tolerances stay meaningful); sums and differences of coordinates
#: (extents up to 2**41) stay exact in float64 and far inside int64, so the output grid is
#: never computed from an overflowed cast; and 2**40 px is 110 km at 0.1 um per pixel, far
#: beyond any stage. Larger values are typos, unit mix-ups or overflowed conversions.
MAX_COORD = 2**40
#: Largest number of output pixels: an element count (and its byte size for float64,
#: ``2**63`` bytes) still fits an int64, as NumPy, dask and the writers compute them.
MAX_PIXELS = 2**60
#: Accepted range of a physical pixel size, in its unit. A pixel of 1 nm to 1 mm lies within
#: 1e-12..1e18 in every NGFF length unit from zeptometre to kilometre; outside 1e-20..1e20
#: a pixel size is a typo or an overflowed conversion (1e-300 from a corrupt OME-XML).
PIXEL_SIZE_RANGE = (1e-20, 1e20)
#: Tile dtype kinds the engine fuses: unsigned and signed integers of 8 to 64 bits and
#: floats of 16 to 64 bits (see gpufusion.backends.numpy_ref for how each accumulates).
SUPPORTED_KINDS = "uif"
#: Axis names in index order, for messages.
AXIS_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}


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
        Unit of ``pixel_size``: an NGFF unit name such as ``"micrometer"`` (abbreviations
        such as ``"nm"`` are turned into it; anything else raises :class:`InputError`).
    """

    tiles: tuple[Tile, ...]
    origin: np.ndarray
    shape: tuple[int, ...]
    pixel_size: tuple[float, ...] | None = None
    unit: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate everything (also for a Mosaic built directly): one choke point before
        planning, so no NaN, overflowed or negative coordinate or size reaches the planner."""
        tiles = tuple(self.tiles)
        if not tiles:
            raise InputError("tiles: the tile list is empty")
        check_tiles(tiles)
        ndim = tiles[0].ndim
        origin, shape = check_grid(self.origin, self.shape, ndim)
        object.__setattr__(self, "tiles", tiles)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "pixel_size",
                           check_pixel_size(self.pixel_size, ndim, tiles[0].name))
        if self.unit is not None:  # an NGFF name ("nm" -> "nanometer"); refused otherwise
            from .units import ngff_unit

            object.__setattr__(self, "unit", ngff_unit(self.unit, "unit"))

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
        """Return a copy fused into another output grid (e.g. one shared by time points).

        Raises
        ------
        InputError
            For a grid that is not ``ndim`` integers each, a size below 1, or a grid beyond
            :data:`MAX_COORD` / :data:`MAX_PIXELS`.
        """
        return Mosaic(self.tiles, origin, shape, self.pixel_size, self.unit)

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
    if len(tiles) == 0:
        raise InputError("tiles: the tile list is empty")
    pos = _float_array(positions, "positions")
    if pos.ndim != 2 or pos.shape[0] != len(tiles) or pos.shape[1] not in (2, 3):
        raise InputError(
            f"positions: expected an array of shape ({len(tiles)}, 2 or 3) (one position per "
            f"tile, index order), got shape {pos.shape}"
        )
    names = _tile_names(tiles, names)
    sources = [as_source(t, n) for t, n in zip(tiles, names, strict=True)]
    for src, name in zip(sources, names, strict=True):
        if len(src.shape) != pos.shape[1]:
            raise InputError(
                f"{name}: position has {pos.shape[1]} coordinates but the tile is "
                f"{len(src.shape)}D (shape {tuple(src.shape)})"
            )
    affines = [translation_affine(p) for p in pos]
    return mosaic_from_affines(sources, affines, names=names, output_shape=output_shape,
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
    names = _tile_names(tiles, names)
    try:
        n_affines = len(affines)
    except TypeError:
        raise InputError(f"affines: expected one matrix per tile, got "
                         f"{type(affines).__name__}") from None
    if n_affines != len(tiles):
        raise InputError(f"tiles: got {len(tiles)} tiles and {n_affines} transforms")
    sources = [as_source(t, n) for t, n in zip(tiles, names, strict=True)]
    out = []
    for src, aff, name in zip(sources, affines, names, strict=True):
        out.append(Tile(src, _check_affine(aff, len(src.shape), name), name))
    return _make_mosaic(out, output_shape, origin, pixel_size, unit)


def _tile_names(tiles: Sequence[Any], names: Sequence[str] | None) -> list[str]:
    """``names`` as strings, or each tile's own ``name`` (``tile0``, ... when it has none)."""
    if names is None:
        return [str(getattr(t, "name", None) or f"tile{i}") for i, t in enumerate(tiles)]
    if isinstance(names, str) or len(names) != len(tiles):
        raise InputError(f"names: expected {len(tiles)} tile names, got {names!r}")
    return [str(n) for n in names]


def _float_array(values: Any, what: str) -> np.ndarray:
    """``values`` as a float64 array; a ragged or non-numeric input is an InputError."""
    if isinstance(values, str | bytes):
        raise InputError(f"{what}: expected numbers, got a string {values!r}")
    try:
        arr = np.asarray(values)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{arr.dtype} values")
        return arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: expected an array of numbers ({exc})") from None


def _check_affine(affine: Any, ndim: int, name: str) -> np.ndarray:
    a = _float_array(affine, f"{name}: transform")
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
    with np.errstate(over="ignore", invalid="ignore"):
        det = np.linalg.det(a[:ndim, :ndim])
    if not abs(det) >= 1e-9:  # also NaN: entries so large that the determinant overflows
        raise InputError(f"{name}: transform is singular (not invertible)")
    return a


def check_tiles(tiles: Sequence[Tile]) -> None:
    """Refuse tiles the engine cannot fuse exactly, naming the tile and the field.

    Checks one ndim (2 or 3) and one supported dtype (:data:`SUPPORTED_KINDS`, at most 64
    bits) for all tiles, positive integer shapes, finite affines of the right shape, and
    every transformed tile corner within :data:`MAX_COORD` pixels (the position first, so a
    mistyped position is named as such).

    Raises
    ------
    InputError
    """
    first = tiles[0]
    if first.ndim not in (2, 3):
        raise InputError(f"{first.name}: tiles must be 2D (YX) or 3D (ZYX), got {first.ndim}D")
    dtype = _tile_dtype(first)
    for t in tiles:
        if t.ndim != first.ndim:
            raise InputError(
                f"{t.name}: tile is {t.ndim}D but {first.name} is {first.ndim}D; "
                "all tiles must have the same number of dimensions"
            )
        if _tile_dtype(t) != dtype:
            raise InputError(
                f"{t.name}: tile dtype {_tile_dtype(t)} differs from "
                f"{first.name} ({dtype}); all tiles must share one dtype"
            )
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                   for n in t.shape):
            raise InputError(f"{t.name}: tile shape {t.shape} is not a tuple of integers")
        if min(t.shape) < 1:
            raise InputError(f"{t.name}: tile is empty (shape {t.shape})")
        if np.shape(t.affine) != (first.ndim + 1,) * 2:
            raise InputError(f"{t.name}: transform must be a {first.ndim + 1}x"
                             f"{first.ndim + 1} matrix, got shape {np.shape(t.affine)}")
    ndim = first.ndim
    affines = np.stack([np.asarray(t.affine, dtype=np.float64) for t in tiles])
    finite = np.all(np.isfinite(affines), axis=(1, 2))
    if not finite.all():
        bad = tiles[int(np.argmin(finite))]
        raise InputError(f"{bad.name}: transform contains NaN or infinite values")
    axes = AXIS_NAMES[ndim]
    position = affines[:, :ndim, ndim]
    far = np.abs(position) > MAX_COORD
    if far.any():
        i, a = (int(v) for v in np.argwhere(far)[0])
        raise InputError(
            f"{tiles[i].name}: position {axes[a]} = {position[i, a]:.6g} px is out of range "
            f"(coordinates must lie within +-2**40 = {MAX_COORD} px); check the position, "
            "transform and pixel size"
        )
    shapes = np.array([t.shape for t in tiles], dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = transformed_bounds(affines, shapes)
    ok = np.isfinite(lo) & np.isfinite(hi) & (np.abs(lo) <= MAX_COORD) \
        & (np.abs(hi) <= MAX_COORD)
    if not ok.all():
        i, a = (int(v) for v in np.argwhere(~ok)[0])
        reach = hi[i, a] if not (np.isfinite(hi[i, a]) and abs(hi[i, a]) <= MAX_COORD) \
            else lo[i, a]
        raise InputError(
            f"{tiles[i].name}: the transformed tile reaches {axes[a]} = {reach:.6g} px, out "
            f"of range (coordinates must lie within +-2**40 = {MAX_COORD} px); check the "
            "transform's scale and the pixel size"
        )


def _tile_dtype(tile: Tile) -> np.dtype:
    try:
        dtype = np.dtype(tile.source.dtype)
    except TypeError:
        raise InputError(f"{tile.name}: tile dtype {tile.source.dtype!r} is not a NumPy "
                         "dtype") from None
    if dtype.kind not in SUPPORTED_KINDS or dtype.itemsize > 8:
        raise InputError(
            f"{tile.name}: tile dtype {dtype} is not supported; tiles must be integers "
            "(8 to 64 bits, signed or unsigned) or floating point (16, 32 or 64 bits)"
        )
    return dtype


def check_grid(origin: Any, shape: Any, ndim: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate an output grid: ``ndim`` integers each, sizes >= 1, within the limits.

    Returns
    -------
    origin : ndarray of int64
    shape : tuple of int

    Raises
    ------
    InputError
        Naming ``origin`` or ``output_shape``: not ``ndim`` integers, a size below 1, a
        coordinate beyond :data:`MAX_COORD` or more than :data:`MAX_PIXELS` pixels.
    """
    org = _integers(origin, ndim, "origin")
    size = _integers(shape, ndim, "output_shape")
    if min(size) < 1:
        raise InputError(f"output_shape: expected {ndim} sizes >= 1, got {tuple(size)}")
    for o, n in zip(org, size, strict=True):
        if abs(o) > MAX_COORD or abs(o + n - 1) > MAX_COORD:
            raise InputError(
                f"output grid: origin {tuple(org)} and shape {tuple(size)} reach beyond "
                f"+-2**40 = {MAX_COORD} px"
            )
    if math.prod(size) > MAX_PIXELS:
        raise InputError(f"output_shape: {tuple(size)} is {math.prod(size):.3g} pixels, more "
                         f"than 2**60 = {MAX_PIXELS:.3g}")
    return np.array(org, dtype=np.int64), tuple(size)


def _integers(values: Any, ndim: int, what: str) -> list[int]:
    """``ndim`` integers (integral floats accepted) as Python ints, else an InputError."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        arr = np.asarray([], dtype=object)
    ok = arr.shape in ((ndim,), (ndim, 1), (1, ndim)) and arr.dtype.kind in "iuf"
    if ok and arr.dtype.kind == "f":
        ok = bool(np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
    if not ok:
        raise InputError(f"{what}: expected {ndim} integers, got {values!r}")
    return [int(v) for v in arr.reshape(-1)]


def check_pixel_size(pixel_size: Any, ndim: int, name: str) -> tuple[float, ...] | None:
    """``pixel_size`` as ``ndim`` floats within :data:`PIXEL_SIZE_RANGE`, or None.

    Raises
    ------
    InputError
        Naming ``name`` (the first tile, for messages) and the pixel size.
    """
    if pixel_size is None:
        return None
    lo, hi = PIXEL_SIZE_RANGE
    try:
        size = tuple(float(p) for p in pixel_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != ndim or not all(lo <= p <= hi for p in size):
        raise InputError(
            f"pixel_size: expected {ndim} numbers within {lo:g}..{hi:g} (a physical pixel "
            f"size), got {pixel_size!r} for {name}"
        )
    return size


def _make_mosaic(
    tiles: list[Tile],
    output_shape: Sequence[int] | None,
    origin: Sequence[int] | None,
    pixel_size: Sequence[float] | None,
    unit: str | None,
) -> Mosaic:
    check_tiles(tiles)  # every corner within MAX_COORD: the casts below cannot overflow
    ndim = tiles[0].ndim
    affines = np.stack([t.affine for t in tiles])
    shapes = np.array([t.shape for t in tiles], dtype=np.int64)
    lo, hi = transformed_bounds(affines, shapes)
    if origin is None:
        org = np.floor(lo.min(axis=0) + GRID_EPS).astype(np.int64)
    else:
        org = np.array(_integers(origin, ndim, "origin"), dtype=np.int64)
    if output_shape is None:
        shape = tuple(int(n) for n in np.floor(hi.max(axis=0) + GRID_EPS).astype(np.int64)
                      - org + 1)
    else:
        shape = tuple(_integers(output_shape, ndim, "output_shape"))
    return Mosaic(tuple(tiles), org, shape, pixel_size, unit)
