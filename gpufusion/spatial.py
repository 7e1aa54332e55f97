"""Vectorised box queries: which tiles touch which output chunks, which tiles overlap.

No Python loop runs over tiles x chunks: the chunk grid is regular per axis (possibly with
uneven sizes), so each tile's bounding box maps to a range of chunk indices per axis with
``searchsorted``, and the ranges are expanded to (tile, chunk) pairs with ``repeat``.
Tile-tile overlaps use a sweep along the first axis, then a full box test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def chunk_bounds(chunks: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Chunk boundaries per axis: ``[0, c0, c0+c1, ..., size]``."""
    return [np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in chunks]


def chunk_tile_pairs(
    lo: np.ndarray, hi: np.ndarray, bounds: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """All (tile, chunk) pairs whose boxes intersect.

    Parameters
    ----------
    lo, hi : ndarray, shape (n, ndim)
        Inclusive tile boxes in output pixel coordinates (may be fractional).
    bounds : list of ndarray
        Chunk boundaries per axis (see :func:`chunk_bounds`).

    Returns
    -------
    tiles : ndarray of int64, shape (p,)
    blocks : ndarray of int64, shape (p, ndim)
        Block (chunk grid) index of each pair.

    Examples
    --------
    >>> lo, hi = np.array([[0.0, 0.0]]), np.array([[9.0, 4.0]])
    >>> t, b = chunk_tile_pairs(lo, hi, chunk_bounds([(5, 5), (5, 5)]))
    >>> b.tolist()
    [[0, 0], [1, 0]]
    """
    n, ndim = lo.shape
    first = np.empty((n, ndim), dtype=np.int64)
    count = np.empty((n, ndim), dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    for a, b in enumerate(bounds):
        nb = len(b) - 1
        # a pixel p belongs to chunk k when b[k] <= p < b[k+1]
        start = np.searchsorted(b, np.floor(lo[:, a]), side="right") - 1
        stop = np.searchsorted(b, np.floor(hi[:, a]), side="right") - 1
        keep &= (stop >= 0) & (start <= nb - 1)
        start = np.clip(start, 0, nb - 1)
        stop = np.clip(stop, 0, nb - 1)
        first[:, a] = start
        count[:, a] = np.maximum(stop - start + 1, 0)
    count[~keep] = 0
    per_tile = count.prod(axis=1)
    tiles = np.repeat(np.arange(n, dtype=np.int64), per_tile)
    # rank of each pair within its tile, unravelled over that tile's block ranges
    rank = np.arange(len(tiles), dtype=np.int64) - np.repeat(np.cumsum(per_tile) - per_tile,
                                                               per_tile)
    blocks = np.empty((len(tiles), ndim), dtype=np.int64)
    cnt = count[tiles]
    for a in range(ndim - 1, -1, -1):
        blocks[:, a] = first[tiles, a] + rank % cnt[:, a]
        rank //= cnt[:, a]
    return tiles, blocks


def overlapping_pairs(lo: np.ndarray, hi: np.ndarray, min_overlap: float = 0.0) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of boxes that overlap by more than ``min_overlap`` px.

    Boxes are inclusive ``[lo, hi]`` in pixel-centre coordinates; the overlap along an axis
    counts pixels, ``min(hi_i, hi_j) - max(lo_i, lo_j) + 1``, and must exceed ``min_overlap``
    on every axis.

    Examples
    --------
    >>> lo = np.array([[0.0, 0.0], [0.0, 90.0], [0.0, 300.0]])
    >>> overlapping_pairs(lo, lo + 99).tolist()
    [[0, 1]]
    """
    n = lo.shape[0]
    order = np.argsort(lo[:, 0], kind="stable")
    slo = lo[order, 0]
    # candidates for i: later boxes (in sweep order) starting before i ends
    end = np.searchsorted(slo, hi[order, 0] + 1.0 - min_overlap, side="left")
    start = np.arange(n) + 1
    cnt = np.maximum(end - start, 0)
    a = np.repeat(np.arange(n), cnt)
    b = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(start, cnt)
    i, j = order[a], order[b]
    ext = np.minimum(hi[i], hi[j]) - np.maximum(lo[i], lo[j]) + 1.0
    ok = np.all(ext > min_overlap, axis=1)
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)[ok]
    if len(pairs):
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return pairs.astype(np.int64).reshape(-1, 2)
