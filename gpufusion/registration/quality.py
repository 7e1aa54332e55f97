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

from dataclasses import dataclass

import numpy as np

from ..layout import Mosaic
from ..spatial import overlapping_pairs
from .pairwise import translation_positions
from .refine import ncc_value

__all__ = ["PositionCheck", "check_positions", "mean_overlap_ncc", "overlap_ncc",
           "overlapping_tile_pairs"]

#: check_positions: pairs checked at most; a pair counts as matched at NCC >= CHECK_MATCH,
#: and as off when it matches CHECK_OFF px (or 1.5 binned pixels) or more away from where
#: it is placed, better there by CHECK_GAIN in NCC (see PositionCheck.looks_off).
CHECK_PAIRS = 6
CHECK_MATCH = 0.3
CHECK_OFF = 4.0
CHECK_GAIN = 0.1
#: Fewest (binned) pixels two windows must share at their best match for the position
#: check to count it.
CHECK_SHARED = 2048


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


@dataclass(frozen=True)
class PositionCheck:
    """What :func:`check_positions` found.

    Attributes
    ----------
    pairs : ndarray of int (k, 2)
        The pairs checked.
    off : ndarray (k,)
        How far each pair's best match lies from its given offset (px, Euclidean; NaN where
        it did not match).
    ncc_given, ncc_best : ndarray (k,)
        Overlap NCC (on binned tiles) at the given offset and at the best match.
    off_px : float
        Median of ``off`` over the matched pairs (NaN when none matched).
    looks_off : bool
        The positions are clearly off: at least half the pairs match at least ``CHECK_OFF``
        px (or 1.5 binned pixels) away, and better there by ``CHECK_GAIN`` in NCC (or by
        half of what their NCC as placed misses to 1).
    seconds : float
    beyond : bool
        Some pairs matched best at the edge of the range checked (10 % of the tile): the
        positions may be off by more than ``off_px``.
    """

    pairs: np.ndarray
    off: np.ndarray
    ncc_given: np.ndarray
    ncc_best: np.ndarray
    off_px: float
    looks_off: bool
    seconds: float
    beyond: bool = False

    def message(self) -> str:
        """One line for a user (empty when the positions look right)."""
        if not self.looks_off:
            return ""
        matched = np.isfinite(self.off)
        more = " or more" if self.beyond else ""
        return (f"positions look off by ~{self.off_px:.0f} px{more}: the overlaps of "
                f"{int(matched.sum())} of {len(self.pairs)} checked pairs correlate at "
                f"{np.nanmedian(self.ncc_given[matched]):.2f} (NCC) as placed and at "
                f"{np.median(self.ncc_best[matched]):.2f} when aligned; add --register")


def check_positions(mosaic: Mosaic, *, max_pairs: int = CHECK_PAIRS) -> PositionCheck:
    """A quick check of given positions: do a few overlaps agree where the tiles are placed?

    Up to ``max_pairs`` side-neighbour pairs spread over the mosaic are registered on tiles
    binned to ~200 px (:func:`~gpufusion.registration.search.bin_factor`) within 10 % of
    the tile (:func:`~gpufusion.registration.pairwise.measure_pairs`), and their overlap
    NCC at the given offset compared with the NCC at the best match. Cheap: only the
    overlap strips of those pairs are read.

    Raises
    ------
    InputError
        For tiles that are not placed by translations alone.

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((2, 2), (256, 256), overlap=0.15, stage_error=12, seed=0)
    >>> check_positions(syn.mosaic()).looks_off           # the true positions
    False
    >>> check_positions(syn.mosaic(syn.stage_positions)).looks_off
    True
    """
    import time

    from .pairwise import candidate_pairs, default_max_shift, measure_pairs
    from .search import COARSE_SHARED, bin_factor, binned_mosaic

    t0 = time.perf_counter()
    pos = translation_positions(mosaic)
    pairs = candidate_pairs(mosaic, max_shift=default_max_shift(mosaic))
    tile = mosaic.tile_shapes.min(axis=0).astype(np.float64)
    if len(pairs):  # side neighbours (apart along one axis), spread over the mosaic
        sep = np.abs(pos[pairs[:, 1]] - pos[pairs[:, 0]]) > 0.25 * tile
        pairs = pairs[np.sum(sep, axis=1) <= 1]
    if len(pairs) > max_pairs:
        pairs = pairs[np.unique(np.linspace(0, len(pairs) - 1, max_pairs).round().astype(int))]
    f = bin_factor(mosaic)
    small = binned_mosaic(mosaic, f, pos)
    k = len(pairs)
    off = np.full(k, np.nan)
    wall = np.zeros(k, dtype=bool)
    given = np.full(k, np.nan)
    best = np.full(k, np.nan)
    if k:
        reach = np.maximum(np.floor(default_max_shift(mosaic) / f), 1.0)
        reach = np.minimum(reach, small.tile_shapes.min(axis=0) - 1)
        meas = measure_pairs(small, pairs, max_shift=reach, min_shared_fraction=COARSE_SHARED)
        given = overlap_ncc(small, pairs)
        best = meas.ncc
        # A match counts only over at least CHECK_SHARED pixels shared by the two windows at
        # the shift found, and well above chance: the best of N candidate shifts over n
        # pixels of pure noise correlates at about sqrt(2 ln N / n) (the maximum of N
        # near-Gaussian NCC values of variance 1/n). Small overlaps of noise-like content
        # (where a chance match of 0.3 is common) never warn.
        shared = np.prod(np.clip(meas.window - np.abs(np.nan_to_num(meas.shift)), 0, None),
                         axis=1).astype(np.float64)
        n_shifts = float(np.prod(2 * reach + 1))
        chance = np.sqrt(2.0 * np.log(max(n_shifts, 2.0)) / np.maximum(shared, 1.0))
        ok = (np.isfinite(best) & (shared >= CHECK_SHARED)
              & (best >= np.maximum(CHECK_MATCH, 3.0 * chance)))
        # a match on the wall of the range: off by that much at least
        off[ok] = np.linalg.norm(meas.shift[ok] * f, axis=1)
        wall = ok & meas.at_limit
    matched = np.isfinite(off)
    off_px = float(np.median(off[matched])) if matched.any() else float("nan")
    # a pair is off: its best match lies far, and matches clearly better than as placed (by
    # CHECK_GAIN, or by half what is missing to 1 for smooth content that correlates well
    # even when misplaced)
    placed = np.nan_to_num(given, nan=-1.0)
    better = best - placed >= np.minimum(CHECK_GAIN, 0.5 * (1.0 - placed))
    far = matched & (np.nan_to_num(off) >= max(CHECK_OFF, 1.5 * float(f.max()))) & better
    looks_off = bool(k > 0 and 2 * int(far.sum()) >= k)
    return PositionCheck(pairs, off, given, best, off_px, looks_off, time.perf_counter() - t0,
                         bool(np.any(wall & far)))
