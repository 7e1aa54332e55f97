"""A reference-free quality measure of tile positions: NCC of the overlapping pixels.

Every pair of tiles whose footprints overlap at the scored positions is compared, side
neighbours and the small corner overlaps of diagonal neighbours alike. For a pair
``(i, j)`` at positions ``x_i``, ``x_j`` the offset ``o = x_j - x_i`` is kept sub-pixel:
pixel ``q`` of tile ``i`` is compared with tile ``j`` sampled at ``q - o`` by (multi)linear
interpolation, over every ``q`` whose sample point lies inside tile ``j`` (no
extrapolation). The Pearson correlation of those pixel pairs (normalised cross-correlation,
both sides mean-subtracted) is the pair's score: 1 for a perfect match, ~0 for unrelated
content, NaN when the tiles share fewer than 2 pixels along an axis or one side is
constant. The mean over the pairs where it is defined is the figure a report gives.

This is the definition behind the reference figures quoted for ``tma_4x3`` (its 29
overlapping pairs: 17 side and 12 diagonal neighbours): 0.054 at the nominal 10 % grid and
0.253 at the ASHLAR 1.20 positions (``tests/test_register.py`` checks both).
"""

from __future__ import annotations

import numpy as np

from ..layout import Mosaic
from ..spatial import overlapping_pairs
from .pairwise import translation_positions
from .refine import ncc_value

__all__ = ["mean_overlap_ncc", "overlap_ncc", "overlapping_tile_pairs"]


def overlapping_tile_pairs(mosaic: Mosaic, positions: np.ndarray | None = None) -> np.ndarray:
    """Pairs ``(i, j)``, ``i < j``, of tiles whose footprints share >= 2 pixels on every axis.

    Parameters
    ----------
    mosaic : Mosaic
        Translation-only mosaic.
    positions : ndarray (n, ndim), optional
        Tile positions (default: the mosaic's own).

    Returns
    -------
    ndarray of int64 (m, 2)

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((2, 2), (64, 64), overlap=0.25, integer_positions=True, seed=0)
    >>> overlapping_tile_pairs(syn.mosaic()).tolist()  # diagonal neighbours included
    [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    """
    pos = translation_positions(mosaic) if positions is None else np.asarray(positions, float)
    hi = pos + mosaic.tile_shapes.astype(np.float64) - 1.0
    return overlapping_pairs(pos, hi, min_overlap=1.0)


def overlap_ncc(
    mosaic: Mosaic,
    pairs: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """NCC of the overlapping pixels of each pair at its sub-pixel relative offset.

    Parameters
    ----------
    mosaic : Mosaic
        Translation-only mosaic.
    pairs : ndarray of int (m, 2), optional
        Default: :func:`overlapping_tile_pairs` at ``positions``.
    positions : ndarray (n, ndim), optional
        Positions to score (default: the mosaic's own).

    Returns
    -------
    ndarray of float64 (m,)

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((1, 2), (64, 64), overlap=0.25, integer_positions=True, seed=0)
    >>> overlap_ncc(syn.mosaic()).round(3).tolist()
    [1.0]
    """
    pos = translation_positions(mosaic) if positions is None else np.asarray(positions, float)
    if pairs is None:
        pairs = overlapping_tile_pairs(mosaic, pos)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    shapes = mosaic.tile_shapes.astype(np.int64)
    out = np.full(len(pairs), np.nan)
    for k, (i, j) in enumerate(pairs):
        o = pos[j] - pos[i]
        whole = np.floor(o).astype(np.int64)
        frac = o - whole
        frac[frac < 1e-9] = 0.0  # an offset a rounding error above an integer is that integer
        step = (frac > 0).astype(np.int64)
        # q (tile i) samples tile j at q - o = (q - whole) - frac: between pixels
        # q - whole - 1 and q - whole when frac > 0, so both must lie inside tile j
        lo = np.maximum(0, whole + step)
        hi = np.minimum(shapes[i], whole + shapes[j])
        if np.any(hi - lo < 2):
            continue
        a = mosaic.tiles[i].source.read(tuple(slice(int(p), int(q)) for p, q in
                                              zip(lo, hi, strict=True)))
        b = mosaic.tiles[j].source.read(tuple(slice(int(p - w - s), int(q - w)) for p, q, w, s in
                                              zip(lo, hi, whole, step, strict=True)))
        out[k] = ncc_value(np.asarray(a), _shift_linear(np.asarray(b, dtype=np.float64), frac))
    return out


def mean_overlap_ncc(
    mosaic: Mosaic,
    pairs: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> float:
    """Mean of :func:`overlap_ncc` over the pairs where it is defined (NaN if none).

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((2, 2), (64, 64), overlap=0.25, integer_positions=True, seed=0)
    >>> round(mean_overlap_ncc(syn.mosaic()), 3)
    1.0
    """
    values = overlap_ncc(mosaic, pairs, positions)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _shift_linear(b: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Sample ``b`` at ``k - frac`` per axis (``0 <= frac < 1``), dropping the first pixel
    along each axis with ``frac > 0``: ``(1 - f) b[k] + f b[k - 1]``."""
    for axis, f in enumerate(frac):
        if f > 0:
            cur = b[(slice(None),) * axis + (slice(1, None),)]
            prev = b[(slice(None),) * axis + (slice(None, -1),)]
            b = (1.0 - f) * cur + f * prev
    return b
