"""Planning: for every output chunk, the tiles that touch it and the window of each to read.

The plan is computed once, vectorised, before any graph is built; fusion tasks only look up
their own rows. Per (chunk, tile) entry it stores a flat record that the NumPy reference
(:mod:`gpufusion.backends.numpy_ref`) and the CUDA kernel (``kernels/fuse.cu``) read alike.

Offset algebra (written once here)
----------------------------------
Let ``A`` be the tile's affine from tile pixels to output pixels, ``A^-1 = [M | b]`` its
inverse, ``c0`` the chunk's first output pixel and ``w0`` the window's first tile pixel. For a
chunk-local output index ``l`` (``0 <= l < chunk_shape``)::

    tile coordinate    q_tile = M @ (c0 + l) + b
    window coordinate  q      = q_tile - w0 = M @ l + offset,   offset = M @ c0 + b - w0

The window is the box of tile pixels any interpolated sample of the chunk can touch: the
chunk's corners mapped through ``A^-1`` (an affine map sends a box's extremes to its
corners), floored, padded by the interpolation support (one pixel for linear), clipped to
the tile. The tile's pixel centres span ``[0, shape-1]``; in window coordinates that is
``[-w0, shape - 1 - w0]``. A sample is *covered* when ``q`` lies in that range (with a
``COVER_EPS`` tolerance for rounding; covered coordinates are clamped into it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .layout import Mosaic, box_corners
from .spatial import chunk_bounds, chunk_tile_pairs

#: Tolerance of the coverage test, in pixels (absorbs float64 rounding of the affine algebra).
COVER_EPS = 1e-6
#: Translations within this of an integer are snapped to it, so integer placements are exact
#: copies and no coordinate ever lands inside the COVER_EPS band by rounding alone.
SNAP_EPS = 2e-6
#: An output with more than this many pixels per pixel of tile footprint (summed over the
#: tiles) is more than 90 % empty: refused unless ``allow_sparse`` (a mistyped position).
MAX_SPARSITY = 10.0


@dataclass(frozen=True)
class ChunkTable:
    """Everything one fusion task needs besides pixels: the flat per-entry table.

    Entries are sorted by tile index (the ``overlay`` order: the last entry wins).

    Attributes
    ----------
    start : ndarray (ndim,) int64      first output pixel of the chunk
    shape : tuple of int               chunk shape
    tiles : ndarray (k,) int64         tile index of each entry
    win_lo : ndarray (k, ndim) int64   first tile pixel of each window
    win_shape : ndarray (k, ndim) int64
    matrix : ndarray (k, ndim, ndim) float64   linear part ``M`` of the inverse affine
    offset : ndarray (k, ndim) float64         see the module docstring
    tile_shape : ndarray (k, ndim) int64
    translation : ndarray (k,) bool            ``M`` is exactly the identity
    """

    start: np.ndarray
    shape: tuple[int, ...]
    tiles: np.ndarray
    win_lo: np.ndarray
    win_shape: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    tile_shape: np.ndarray
    translation: np.ndarray

    def __len__(self) -> int:
        return len(self.tiles)

    def windows(self) -> list[tuple[slice, ...]]:
        """The tile windows to read, as slices in tile coordinates."""
        return [tuple(slice(int(a), int(a + s)) for a, s in zip(lo, sh, strict=True))
                for lo, sh in zip(self.win_lo, self.win_shape, strict=True)]


@dataclass(frozen=True)
class FusionPlan:
    """Per-chunk tables for a whole mosaic, stored as CSR arrays over the chunk grid.

    Chunk ``i`` (C order over the block grid) owns entries ``ptr[i]:ptr[i+1]``.
    """

    shape: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]
    ptr: np.ndarray
    tiles: np.ndarray
    win_lo: np.ndarray
    win_shape: np.ndarray
    matrix: np.ndarray
    offset: np.ndarray
    tile_shape: np.ndarray
    translation: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numblocks(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.chunks)

    @property
    def n_entries(self) -> int:
        return len(self.tiles)

    def block_id(self, block_index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(block_index), self.numblocks))

    def chunk(self, block_index: Sequence[int]) -> ChunkTable:
        """The table of one chunk, addressed by its block index."""
        i = self.block_id(block_index)
        s = slice(int(self.ptr[i]), int(self.ptr[i + 1]))
        bounds = chunk_bounds(self.chunks)
        start = np.array([b[k] for b, k in zip(bounds, block_index, strict=True)], dtype=np.int64)
        shape = tuple(int(c[k]) for c, k in zip(self.chunks, block_index, strict=True))
        return ChunkTable(start, shape, self.tiles[s], self.win_lo[s], self.win_shape[s],
                          self.matrix[s], self.offset[s], self.tile_shape[s], self.translation[s])


ChunkSpec = int | Sequence[int] | Sequence[Sequence[int]]


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, Sequence | np.ndarray) or isinstance(value, str | bytes) \
        or (isinstance(value, np.ndarray) and value.ndim == 0)


def _chunk_size(value: Any, what: str) -> int:
    """One chunk size: an integer >= 1 (not a bool, not a float such as 1.5)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{what}: expected an integer chunk size >= 1, got {value!r}")
    if int(value) < 1:
        raise InputError(f"{what}: chunk size must be >= 1, got {int(value)}")
    return int(value)


def chunk_spec(chunks: ChunkSpec, shape: Sequence[int]) -> list[int | tuple[int, ...]]:
    """Validate ``chunks`` against ``shape`` without expanding it: per axis one chunk size,
    or the explicit sizes of that axis (which must add up to its length).

    Raises
    ------
    InputError
        Naming ``chunks``, for anything but integers >= 1 in one of the accepted forms.
    """
    ndim = len(shape)
    if _is_scalar(chunks):
        return [_chunk_size(chunks, "chunks")] * ndim
    per_axis = list(chunks)  # type: ignore[arg-type]
    if len(per_axis) != ndim:
        raise InputError(f"chunks: expected 1 or {ndim} values, got {len(per_axis)}")
    out: list[int | tuple[int, ...]] = []
    for a, (c, n) in enumerate(zip(per_axis, shape, strict=True)):
        if _is_scalar(c):
            out.append(_chunk_size(c, f"chunks[{a}]"))
            continue
        sizes = tuple(_chunk_size(v, f"chunks[{a}]") for v in c)
        if sum(sizes) != n:
            raise InputError(f"chunks: sizes {list(sizes)} do not add up to the axis length {n}")
        out.append(sizes)
    return out


def count_chunks(chunks: ChunkSpec, shape: Sequence[int]) -> int:
    """Number of output chunks, computed without expanding the chunk sizes."""
    return math.prod(len(c) if isinstance(c, tuple) else -(-int(n) // c)
                     for c, n in zip(chunk_spec(chunks, shape), shape, strict=True))


def normalize_chunks(chunks: ChunkSpec, shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Chunk sizes per axis from an int, one int per axis, or explicit sizes per axis."""
    out = []
    for c, n in zip(chunk_spec(chunks, shape), shape, strict=True):
        if isinstance(c, tuple):
            out.append(c)
        else:
            out.append((c,) * (n // c) + ((n % c,) if n % c else ()))
    return tuple(out)


@dataclass(frozen=True)
class OutputEstimate:
    """The size of a fused output, known before any planning.

    Attributes
    ----------
    pixels : int        output pixels (the grid's volume)
    chunks : int        output chunks
    footprint : float   summed volume of the transformed tiles, in output pixels
    """

    pixels: int
    chunks: int
    footprint: float

    @property
    def sparsity(self) -> float:
        """Output pixels per pixel of tile footprint (10 means the output is 90 % empty)."""
        return self.pixels / self.footprint if self.footprint > 0 else math.inf


def estimate_output(mosaic: Mosaic, chunks: ChunkSpec) -> OutputEstimate:
    """Output size, chunk count and summed tile footprint of ``mosaic`` fused in ``chunks``.

    A tile's footprint is the volume of its transformed box: ``|det M|`` (the affine's linear
    part) times its pixel count, so rotated, scaled and 3D tiles count what they cover in
    output pixels. Overlaps are counted once per tile.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion.layout import mosaic_from_positions
    >>> e = estimate_output(mosaic_from_positions([np.ones((8, 8))] * 2, [(0, 0), (0, 92)]), 50)
    >>> e.pixels, e.chunks, e.footprint, e.sparsity
    (800, 2, 128.0, 6.25)
    """
    n_chunks = count_chunks(chunks, mosaic.shape)
    ndim = mosaic.ndim
    det = np.abs(np.linalg.det(mosaic.affines[:, :ndim, :ndim]))
    footprint = float(np.sum(det * np.prod(mosaic.tile_shapes.astype(np.float64), axis=1)))
    return OutputEstimate(math.prod(mosaic.shape), n_chunks, footprint)


def check_output_size(mosaic: Mosaic, chunks: ChunkSpec,
                      allow_sparse: bool = False) -> OutputEstimate:
    """Refuse an output more than 90 % empty (:data:`MAX_SPARSITY`), before any planning.

    One mistyped position makes the output grid as large as the distance to the stray tile
    (10**10 pixels, thousands of chunks, minutes of writing zeros). Unless ``allow_sparse``,
    such a mosaic is refused with a message that names the tiles farthest from the others
    (distance of each tile's centre from the median centre, in tile sizes), the output size
    and the chunk count.

    Raises
    ------
    InputError
        For ``chunks`` that are not valid, or a sparse output without ``allow_sparse``.
    """
    est = estimate_output(mosaic, chunks)
    if allow_sparse or est.sparsity <= MAX_SPARSITY:
        return est
    shape = " x ".join(str(n) for n in mosaic.shape)
    head = (f"output would be {shape} px ({est.pixels:.3g} px in {est.chunks} chunks) but the "
            f"tiles cover only {100 / est.sparsity:.2g} % of it")
    tail = "or pass --allow-sparse (allow_sparse=True) to fuse it anyway"
    lo, hi = mosaic.tile_bounds()
    box = np.floor(hi.max(axis=0)) - np.floor(lo.min(axis=0)) + 1
    if float(np.prod(box)) <= MAX_SPARSITY * est.footprint:
        # the tiles lie close together: the grid itself was set wider than they are
        raise InputError(
            f"{head}: the output grid (origin {tuple(int(o) for o in mosaic.origin)}) is wider "
            f"than the tiles' bounding box ({' x '.join(str(int(n)) for n in box)} px), as "
            "set by output_shape/origin or Mosaic.with_grid (time points share one grid: a "
            f"tile of another time point lies far away); check the positions, {tail}"
        )
    names = outlying_tiles(mosaic)
    raise InputError(f"{head}; farthest from the others: {', '.join(names)}; check "
                     f"{'its position' if len(names) == 1 else 'their positions'}, {tail}")


def outlying_tiles(mosaic: Mosaic, limit: int = 3) -> list[str]:
    """Names (with distances) of the tiles farthest from the others, farthest first.

    The distance of a tile is the largest per-axis distance of its bounding box's centre from
    the median centre of all tiles, in units of the median tile extent along that axis. The
    farthest tile is listed, then up to ``limit - 1`` more at least half as far.
    """
    lo, hi = mosaic.tile_bounds()
    centre = (lo + hi) / 2
    scale = np.maximum(np.median(hi - lo + 1, axis=0), 1.0)
    dist = np.max(np.abs(centre - np.median(centre, axis=0)) / scale, axis=1)
    order = np.argsort(-dist, kind="stable")
    far = [int(i) for i in order[:limit] if dist[i] >= 0.5 * dist[order[0]]]
    return [f"{mosaic.tiles[i].name} ({dist[i]:.3g} tile sizes from the median position)"
            for i in far]


def snapped_inverse_affines(mosaic: Mosaic) -> tuple[np.ndarray, np.ndarray]:
    """Inverse affines (output -> tile) with exact translations snapped.

    Returns the inverses and a boolean per tile: the linear part is the identity. For those,
    the translation is snapped to the nearest integer when within ``SNAP_EPS``.
    """
    inv = mosaic.inverse_affines.copy()
    n = mosaic.ndim
    eye = np.eye(n)
    is_t = np.all(np.abs(inv[:, :n, :n] - eye) < 1e-12, axis=(1, 2))
    inv[is_t, :n, :n] = eye
    b = inv[is_t, :n, n]
    rb = np.round(b)
    inv[is_t, :n, n] = np.where(np.abs(b - rb) < SNAP_EPS, rb, b)
    return inv, is_t


def plan_fusion(mosaic: Mosaic, chunks: ChunkSpec) -> FusionPlan:
    """Plan the fusion of ``mosaic`` into an output chunked as ``chunks``.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion.layout import mosaic_from_positions
    >>> m = mosaic_from_positions([np.ones((8, 8))] * 2, [(0, 0), (0, 6)])
    >>> p = plan_fusion(m, 7)
    >>> p.numblocks, p.n_entries
    ((2, 2), 8)
    """
    chunks = normalize_chunks(chunks, mosaic.shape)
    ndim = mosaic.ndim
    inv, is_t = snapped_inverse_affines(mosaic)
    shapes = mosaic.tile_shapes
    lo, hi = mosaic.tile_bounds()
    bounds = chunk_bounds(chunks)
    t, blk = chunk_tile_pairs(lo, hi, bounds)

    c0 = np.stack([bounds[a][blk[:, a]] for a in range(ndim)], axis=1).astype(np.float64)
    c1 = np.stack([bounds[a][blk[:, a] + 1] for a in range(ndim)], axis=1) - 1.0
    m = inv[t, :ndim, :ndim]
    b = inv[t, :ndim, ndim]
    q = np.einsum("pij,pkj->pki", m, box_corners(c0, c1)) + b[:, None, :]
    qmin, qmax = q.min(axis=1), q.max(axis=1)
    s = shapes[t].astype(np.float64)
    hit = np.all((qmax >= -COVER_EPS) & (qmin <= s - 1 + COVER_EPS), axis=1)
    t, blk, c0, m, b, qmin, qmax = t[hit], blk[hit], c0[hit], m[hit], b[hit], qmin[hit], qmax[hit]
    win_lo = np.maximum(np.floor(qmin - COVER_EPS), 0).astype(np.int64)
    win_hi = np.minimum(np.floor(qmax + COVER_EPS) + 2, shapes[t]).astype(np.int64)
    offset = np.einsum("pij,pj->pi", m, c0) + b - win_lo

    bid = np.ravel_multi_index(tuple(blk.T), tuple(len(c) for c in chunks)) if len(t) else \
        np.zeros(0, dtype=np.int64)
    order = np.lexsort((t, bid))
    nblocks = int(np.prod([len(c) for c in chunks]))
    ptr = np.zeros(nblocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(bid, minlength=nblocks), out=ptr[1:])
    return FusionPlan(
        shape=tuple(mosaic.shape), chunks=chunks, ptr=ptr, tiles=t[order],
        win_lo=win_lo[order], win_shape=(win_hi - win_lo)[order], matrix=m[order],
        offset=offset[order], tile_shape=shapes[t][order], translation=is_t[t][order],
    )
