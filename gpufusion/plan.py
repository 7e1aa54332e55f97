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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .layout import Mosaic, box_corners
from .spatial import chunk_bounds, chunk_tile_pairs

#: Tolerance of the coverage test, in pixels (absorbs float64 rounding of the affine algebra).
COVER_EPS = 1e-6
#: Translations within this of an integer are snapped to it, so integer placements are exact
#: copies and no coordinate ever lands inside the COVER_EPS band by rounding alone.
SNAP_EPS = 2e-6


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


def normalize_chunks(chunks: int | Sequence[int] | Sequence[Sequence[int]],
                     shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Chunk sizes per axis from an int, one int per axis, or explicit sizes per axis."""
    ndim = len(shape)
    if np.ndim(chunks) == 0:
        chunks = (int(chunks),) * ndim  # type: ignore[arg-type]
    chunks = tuple(chunks)  # type: ignore[arg-type]
    if len(chunks) != ndim:
        raise InputError(f"chunks: expected 1 or {ndim} values, got {len(chunks)}")
    out = []
    for c, n in zip(chunks, shape, strict=True):
        if np.ndim(c) == 0:
            c = int(c)
            if c < 1:
                raise InputError(f"chunk size must be >= 1, got {c}")
            sizes = [c] * (n // c) + ([n % c] if n % c else [])
        else:
            sizes = [int(v) for v in c]
            if min(sizes) < 1 or sum(sizes) != n:
                raise InputError(f"chunks: sizes {sizes} do not add up to the axis length {n}")
        out.append(tuple(sizes))
    return tuple(out)


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


def plan_fusion(mosaic: Mosaic, chunks: int | Sequence[int] | Sequence[Sequence[int]]
                ) -> FusionPlan:
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
