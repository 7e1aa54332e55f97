"""Intensity matching between tiles: one gain (and optionally one offset) per tile.

Exposure drift, lamp flicker and bleaching across a slide make neighbouring tiles disagree
on the brightness of the pixels they share, and blending turns that into steps at the
seams. :func:`estimate_intensity` measures every overlap and solves for per-tile
corrections such that, for the pixels ``a`` of tile ``i`` and ``b`` of tile ``j`` showing
the same point,

    ``g_i * a + o_i  ~=  g_j * b + o_j``

(the correction :func:`gpufusion.correction.correct_mosaic` applies: ``raw * g + o`` after
flat-field correction). How:

1. **Samples.** For each pair of tiles whose footprints overlap (at the mosaic's positions,
   so at the registered ones after registration), both tiles' windows of the overlap are
   read (tile ``j`` linearly interpolated at the sub-pixel offset; large overlaps sampled
   every ``stride`` px, see :data:`MAX_SAMPLES`) and reduced to block means (``block`` px
   per axis). Pixels that are saturated (at or above ``saturation``:
   the dtype's maximum for integer tiles) or blank (at or below ``background``: the
   dtype's minimum for integer tiles; for flat-field corrected tiles both are tested on
   the raw pixels) in *either* tile are left out of both blocks; a block needs half its
   pixels.
2. **Pairs.** A pair needs ``min_samples`` blocks and a correlation (NCC) of its block
   means of at least ``min_ncc``: an empty, featureless or saturated overlap (or a blank
   tile) says nothing reliable about gains and is dropped.
   ``mode="gain"``: the pair measures ``log g_i - log g_j = median(log b - log a)`` over its
   blocks (a robust ratio). ``mode="gain+offset"``: the pair measures
   ``log g_i - log g_j = log(std(b) / std(a))`` (the slope of ``b`` against ``a`` by
   reduced major axis regression: symmetric in the two tiles, where least squares of ``b``
   on ``a`` would be biased low by the noise in ``a``; after trimming blocks off the pair's
   own straight line by more than 4 robust sigmas), and, once the gains are solved,
   ``o_i - o_j = median(g_j b - g_i a)``.
3. **Solve.** Weighted least squares of those differences over all pairs (weights: block
   counts; the normal equations are the graph Laplacian, solved sparse), per connected
   group of tiles with one tile fixed, then normalised so the group's mean gain is 1 (and
   mean offset 0), or so that ``reference`` keeps gain 1 and offset 0. Gains first (in
   log space), then offsets: two linear solves.
4. **Outliers.** Pairs whose residual (log gain; with offsets also the offset's, relative
   to the pair's intensity) exceeds ``max_residual`` are dropped, worst first and, near
   each other, one per round (a bad pair pulls up its neighbours' residuals too), and the
   system is solved again until none is left.
   Tiles left without a kept pair keep gain 1 and offset 0 and are named in an
   :class:`IntensityWarning`.

A mosaic of one tile, or whose tiles do not overlap, is an :class:`InputError`; overlaps
that exist but are all unusable give the warning and gains of 1.

Examples
--------
>>> from gpufusion.synthetic import make_mosaic
>>> syn = make_mosaic((2, 3), (96, 96), overlap=0.25, gain_spread=0.2, seed=3)
>>> match = estimate_intensity(syn.mosaic())
>>> truth = (1 / syn.gains) / np.mean(1 / syn.gains)   # what undoes the synthetic gains
>>> bool(np.allclose(match.gains, truth, rtol=0.01))
True
>>> print(match.summary())
intensity match (gain): gains 0.879-1.252 over 6 tiles, 8 of 11 overlaps used
"""

from __future__ import annotations

import csv
import itertools
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import spsolve

from .errors import InputError
from .layout import Mosaic

__all__ = ["MODES", "IntensityMatch", "IntensityWarning", "estimate_intensity",
           "gains_path_for", "match_channels", "match_intensities", "solve_intensity",
           "write_gains_csv"]

#: ``gain``: one multiplicative factor per tile; ``gain+offset``: a factor and an additive
#: offset per tile (for a background or dark level that differs between tiles).
MODES = ("gain", "gain+offset")
#: Pair status values, in the order they are decided.
STATUSES = ("kept", "few_samples", "low_ncc", "residual")
#: Samples further than this many robust sigmas from a pair's own line are trimmed.
_TRIM_SIGMAS = 4.0
#: An overlap is sampled every ``stride`` px per axis, ``stride`` the largest integer keeping
#: at least this many samples (2 for the 205 x 2048 overlaps of 2048-px tiles at 10 %): the
#: block means lose little, the cost of reducing them drops by stride^2.
MAX_SAMPLES = 2**16
#: Largest number of rejection rounds.
_MAX_ROUNDS = 100


class IntensityWarning(UserWarning):
    """Some tiles have no usable overlap and keep their intensities (gain 1, offset 0)."""


@dataclass(frozen=True)
class IntensityMatch:
    """Per-tile corrections found by :func:`estimate_intensity`, and the pairs behind them.

    Attributes
    ----------
    gains, offsets : ndarray of float64 (n,)
        Correction of each tile: ``corrected = raw * gain + offset`` (offsets are 0 in
        ``gain`` mode).
    mode : str
        One of :data:`MODES`.
    names : tuple of str
        Tile names, in tile order.
    pairs : ndarray of int64 (m, 2)
        Overlapping tile pairs ``(i, j)``, ``i < j``.
    samples : ndarray of int64 (m,)
        Usable blocks in each pair's overlap.
    ncc : ndarray (m,)
        Correlation of the pair's block means (NaN when undefined).
    ratio : ndarray (m,)
        The pair's measured gain ratio ``g_i / g_j``: ``exp(median(log b - log a))``.
    residual : ndarray (m,)
        Disagreement of the pair with the solution: its log gain ratio's; with offsets the
        larger of that and its offset difference's relative to the pair's mean intensity
        (NaN where not measured).
    status : ndarray of str (m,)
        One of :data:`STATUSES`.
    unmatched : ndarray of int64
        Tiles without a kept pair (gain 1, offset 0).
    """

    gains: np.ndarray
    offsets: np.ndarray
    mode: str
    names: tuple[str, ...]
    pairs: np.ndarray
    samples: np.ndarray
    ncc: np.ndarray
    ratio: np.ndarray
    residual: np.ndarray
    status: np.ndarray
    unmatched: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the pairs used by the solution."""
        return self.status == "kept"

    def summary(self) -> str:
        """One line: the gain (and offset) range, tiles, overlaps used."""
        n = len(self.gains)
        text = (f"intensity match ({self.mode}): gains {self.gains.min():.3f}-"
                f"{self.gains.max():.3f}")
        if self.mode == "gain+offset":
            text += f", offsets {self.offsets.min():.4g} to {self.offsets.max():.4g}"
        text += f" over {n} tiles, {int(self.kept.sum())} of {len(self.pairs)} overlaps used"
        if len(self.unmatched):
            text += (f"; {len(self.unmatched)} tile(s) without a usable overlap keep their "
                     f"intensities")
        return text

    def record(self) -> dict[str, Any]:
        """A JSON-ready summary (for the output's provenance record)."""
        counts = {s: int(np.sum(self.status == s)) for s in STATUSES}
        record: dict[str, Any] = {
            "mode": self.mode,
            "gains": [round(float(g), 6) for g in self.gains],
            "pairs": counts,
            "unmatched": [self.names[k] for k in self.unmatched],
        }
        if self.mode == "gain+offset":
            record["offsets"] = [round(float(o), 6) for o in self.offsets]
        return record

    def write_csv(self, path: str | Path) -> Path:
        """Write ``tile,gain,offset,pairs_kept`` (one row per tile; :func:`write_gains_csv`).

        Examples
        --------
        >>> import tempfile
        >>> from gpufusion.synthetic import make_mosaic
        >>> syn = make_mosaic((1, 2), (64, 64), overlap=0.25, integer_positions=True, seed=0)
        >>> p = estimate_intensity(syn.mosaic()).write_csv(Path(tempfile.mkdtemp()) / "g.csv")
        >>> print(p.read_text().strip())
        tile,gain,offset,pairs_kept
        tile_0_0,1.000000,0,1
        tile_0_1,1.000000,0,1
        """
        return write_gains_csv(path, [self])

    def apply(self, mosaic: Mosaic) -> Mosaic:
        """``mosaic`` with these gains and offsets applied, through
        :func:`gpufusion.correction.correct_mosaic` (on top of a flat-field correction
        the mosaic's tiles already carry: the gains were measured on the corrected tiles)."""
        from .correction import correct_mosaic

        if len(mosaic.tiles) != len(self.gains):
            raise InputError(f"intensity match: {len(self.gains)} gains for a mosaic of "
                             f"{len(mosaic.tiles)} tiles")
        offsets = self.offsets if self.mode == "gain+offset" else None
        return correct_mosaic(mosaic, gains=self.gains, offsets=offsets)


def gains_path_for(report: str | Path) -> Path:
    """The gains table beside a registration report: ``name.html`` -> ``name.gains.csv``.

    Examples
    --------
    >>> gains_path_for("out/report.html").as_posix()
    'out/report.gains.csv'
    """
    from .registration.report import tagged_sibling

    return tagged_sibling(report, "gains")


def write_gains_csv(path: str | Path, matches: Sequence[IntensityMatch],
                    labels: Sequence[str] | None = None) -> Path:
    """Write every tile's ``gain``, ``offset`` and kept pairs, one row per tile; with
    ``labels`` (one per match: a channel, a time point) a first ``channel`` column."""
    out = Path(path)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([*(["channel"] if labels else []), "tile", "gain", "offset", "pairs_kept"])
        for k, match in enumerate(matches):
            used = np.bincount(match.pairs[match.kept].ravel(), minlength=len(match.gains))
            first = [labels[k]] if labels else []
            for name, g, o, n in zip(match.names, match.gains, match.offsets, used,
                                     strict=True):
                w.writerow([*first, name, f"{g:.6f}", f"{o:.6g}", int(n)])
    return out


def estimate_intensity(
    mosaic: Mosaic,
    *,
    mode: str = "gain",
    positions: np.ndarray | None = None,
    pairs: np.ndarray | None = None,
    block: int = 8,
    saturation: float | None = None,
    background: float | None = None,
    min_samples: int = 8,
    min_ncc: float = 0.2,
    max_residual: float = 0.05,
    reference: int | None = None,
    threads: int | None = None,
) -> IntensityMatch:
    """Per-tile gains (and offsets) that make the overlaps agree (see the module docs).

    Parameters
    ----------
    mosaic : Mosaic
        Translation-only mosaic (the tiles as they will be fused: flat-field corrected
        ones when a flat-field is applied).
    mode : {"gain", "gain+offset"}
    positions : ndarray (n, ndim), optional
        Tile positions to read the overlaps at (default: the mosaic's own).
    pairs : ndarray of int (m, 2), optional
        Pairs to measure (default: every pair overlapping at ``positions``).
    block : int
        Block size in pixels (per axis) of the block means compared; smaller on an axis
        where the overlap is under two blocks.
    saturation, background : float, optional
        Pixels at or above ``saturation`` or at or below ``background`` are left out
        (defaults: the dtype's maximum and minimum for integer tiles, none for floats).
    min_samples : int
        Fewest usable blocks for a pair to count.
    min_ncc : float
        Lowest correlation of a pair's block means for it to count.
    max_residual : float
        Pairs disagreeing with the solution by more than this are dropped: a log gain
        (about a relative gain error); with offsets also the offset error relative to the
        pair's mean intensity.
    reference : int, optional
        Tile that keeps gain 1 and offset 0 (default: the mean gain of each group of
        connected tiles is 1, its mean offset 0).
    threads : int, optional
        Threads reading and reducing the overlaps (default: the CPU count, at most 8).

    Returns
    -------
    IntensityMatch

    Raises
    ------
    InputError
        For an unknown mode, a bad parameter, a mosaic of one tile, tiles that do not
        overlap, or rotated / scaled tiles.
    """
    if mode not in MODES:
        raise InputError(f"intensity match: unknown mode {mode!r}; use one of "
                         f"{', '.join(MODES)}")
    if int(block) < 1 or int(min_samples) < 2:
        raise InputError(f"intensity match: block ({block}) must be >= 1 and min_samples "
                         f"({min_samples}) >= 2")
    n = len(mosaic.tiles)
    if reference is not None and not 0 <= int(reference) < n:
        raise InputError(f"intensity match: reference tile {reference} is not one of the "
                         f"{n} tiles")
    pos = _positions(mosaic, positions)
    if n < 2:
        raise InputError(f"intensity match: needs overlapping tiles; {mosaic.tiles[0].name} "
                         "is the only tile")
    if pairs is None:
        from .registration.quality import overlapping_tile_pairs

        pairs = overlapping_tile_pairs(mosaic, pos)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        raise InputError(f"intensity match: none of the {n} tiles overlap another, so "
                         "there is nothing to match")
    if pairs.min() < 0 or pairs.max() >= n or np.any(pairs[:, 0] == pairs[:, 1]):
        raise InputError(f"intensity match: pairs must join two different tiles of 0..{n - 1}")
    sat, bg = _limits(mosaic.dtype, saturation, background)

    def measure(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _overlap_blocks(mosaic, pos, int(pair[0]), int(pair[1]), int(block), sat, bg)

    workers = max(1, min(len(pairs), os.cpu_count() or 1, 8) if threads is None
                  else int(threads))
    if workers == 1:
        samples = [measure(p) for p in pairs]
    else:  # reads and NumPy's array work release the GIL
        with ThreadPoolExecutor(workers) as pool:
            samples = list(pool.map(measure, pairs))
    return solve_intensity(samples, pairs, n, mode=mode, names=[t.name for t in mosaic.tiles],
                           min_samples=min_samples, min_ncc=min_ncc,
                           max_residual=max_residual, reference=reference)


def match_intensities(mosaic: Mosaic, **kwargs: Any) -> tuple[Mosaic, IntensityMatch]:
    """Estimate the gains (and offsets) of ``mosaic`` and apply them.

    Parameters
    ----------
    mosaic : Mosaic
        The tiles as they will be fused (after flat-field correction, if any: the gains
        are folded into that correction by :func:`gpufusion.correction.correct_mosaic`).
    **kwargs
        Passed to :func:`estimate_intensity` (``mode``, ``reference``, ...).

    Returns
    -------
    (Mosaic, IntensityMatch)
        The corrected mosaic and what was found.

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((2, 1), (96, 96), overlap=0.25, gain_spread=0.2,
    ...                   integer_positions=True, seed=3)
    >>> corrected, match = match_intensities(syn.mosaic())
    >>> dy = int(syn.positions[1, 0])                      # tile 1 lies dy rows below tile 0
    >>> def overlap_ratio(m):                              # mean of tile 1 / tile 0 there
    ...     upper = m.tiles[0].source.read((slice(dy, 96), slice(0, 96)))
    ...     lower = m.tiles[1].source.read((slice(0, 96 - dy), slice(0, 96)))
    ...     return round(float(np.mean(lower) / np.mean(upper)), 2)
    >>> overlap_ratio(syn.mosaic()), overlap_ratio(corrected)
    (0.77, 1.0)
    """
    match = estimate_intensity(mosaic, **kwargs)
    return match.apply(mosaic), match


def match_channels(channels: Sequence[Mosaic], *, notify: Any = None,
                   **kwargs: Any) -> tuple[list[Mosaic], list[IntensityMatch]]:
    """:func:`match_intensities` for each channel on its own (exposure and bleaching
    differ between channels); an :class:`IntensityWarning` goes to ``notify(message)``
    when given (the command line's notices), else it is issued."""
    mosaics, matches = [], []
    for mosaic in channels:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IntensityWarning)
            corrected, match = match_intensities(mosaic, **kwargs)
        for w in caught:
            if issubclass(w.category, IntensityWarning) and notify is not None:
                notify(f"warning: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        mosaics.append(corrected)
        matches.append(match)
    return mosaics, matches


def solve_intensity(
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    pairs: np.ndarray,
    n_tiles: int,
    *,
    mode: str = "gain",
    names: Sequence[str] | None = None,
    min_samples: int = 8,
    min_ncc: float = 0.2,
    max_residual: float = 0.05,
    reference: int | None = None,
) -> IntensityMatch:
    """The global solve of :func:`estimate_intensity` from each pair's block means.

    Parameters
    ----------
    samples : sequence of (a, b)
        Per pair, the block means of tile ``i`` (``a``) and tile ``j`` (``b``) over the
        same blocks of their overlap.
    pairs : ndarray of int (m, 2)
    n_tiles : int

    Other parameters are as for :func:`estimate_intensity`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> scene = rng.uniform(100, 200, 50)
    >>> truth = np.array([1.0, 1.25, 0.8])     # tile k recorded scene / truth[k]
    >>> s = [(scene / truth[i], scene / truth[j]) for i, j in [(0, 1), (1, 2)]]
    >>> m = solve_intensity(s, np.array([[0, 1], [1, 2]]), 3, reference=0)
    >>> m.gains.round(6).tolist()
    [1.0, 1.25, 0.8]
    """
    if mode not in MODES:
        raise InputError(f"intensity match: unknown mode {mode!r}; use one of "
                         f"{', '.join(MODES)}")
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    m = len(pairs)
    names = tuple(names) if names is not None else tuple(f"tile{k}" for k in range(n_tiles))
    count = np.array([len(a) for a, _ in samples], dtype=np.int64)
    ncc = np.array([_ncc(a, b) for a, b in samples])
    ratio = np.array([_log_ratio(a, b) for a, b in samples])
    status = np.full(m, "kept", dtype=object)
    status[count < min_samples] = "few_samples"
    status[(status == "kept") & ~(ncc >= min_ncc)] = "low_ncc"
    if mode == "gain":
        status[(status == "kept") & ~np.isfinite(ratio)] = "few_samples"  # none positive
        log_gain = ratio
        trimmed = None
    else:
        trimmed = [_trim(a, b) if ok else (a, b)
                   for (a, b), ok in zip(samples, status == "kept", strict=True)]
        log_gain = np.array([_log_slope(a, b) for a, b in trimmed])
        status[(status == "kept") & ~np.isfinite(log_gain)] = "few_samples"  # flat overlap
    weight = count.astype(np.float64)
    kept = status == "kept"
    for _ in range(_MAX_ROUNDS):
        labels, anchors, unmatched = _anchors(pairs, kept, n_tiles, reference)
        x = _solve_differences(pairs[kept], log_gain[kept], weight[kept], n_tiles, anchors)
        gains = _normalise(np.exp(x), labels, unmatched, reference, "gain")
        residual = np.log(gains[pairs[:, 0]] / gains[pairs[:, 1]]) - log_gain
        offsets = np.zeros(n_tiles)
        if trimmed is not None:  # with the gains: o_i - o_j = median(g_j b - g_i a)
            diff, scale = _offset_differences(trimmed, pairs, gains)
            o = _solve_differences(pairs[kept], diff[kept], weight[kept], n_tiles, anchors)
            offsets = _normalise(o, labels, unmatched, reference, "offset")
            off_res = (offsets[pairs[:, 0]] - offsets[pairs[:, 1]] - diff) / scale
            residual = np.fmax(np.abs(residual), np.abs(off_res))
        residual = np.where(np.isfinite(residual), residual, np.nan)
        worst = _worst_pairs(pairs, np.abs(np.nan_to_num(residual)), kept, max_residual)
        if not worst.any():
            break
        status[worst] = "residual"
        kept = status == "kept"
    if len(unmatched):
        shown = ", ".join(names[k] for k in unmatched[:10])
        more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
        warnings.warn(f"intensity match: {len(unmatched)} tile(s) have no usable overlap "
                      f"(empty, saturated or featureless) and keep their intensities: "
                      f"{shown}{more}", IntensityWarning, stacklevel=2)
    return IntensityMatch(gains, offsets, mode, names, pairs, count, ncc, np.exp(ratio),
                          residual, status.astype(str), unmatched)


# --- reading the overlaps -----------------------------------------------------------------


def _positions(mosaic: Mosaic, positions: np.ndarray | None) -> np.ndarray:
    d = mosaic.ndim
    for t in mosaic.tiles:
        if not np.allclose(t.affine[:d, :d], np.eye(d), atol=1e-9):
            raise InputError(f"{t.name}: intensity matching needs tiles placed by translation; "
                             "this tile's transform rotates, scales or shears")
    if positions is None:
        return mosaic.positions().astype(np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (len(mosaic.tiles), d):
        raise InputError(f"intensity match: positions of shape {pos.shape}, expected "
                         f"{(len(mosaic.tiles), d)}")
    return pos


def _limits(dtype: np.dtype, saturation: float | None,
            background: float | None) -> tuple[float, float]:
    """Pixels ``>= saturation`` or ``<= background`` are left out."""
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        sat = float(info.max) if saturation is None else float(saturation)
        bg = float(info.min) if background is None else float(background)
    else:
        sat = np.inf if saturation is None else float(saturation)
        bg = -np.inf if background is None else float(background)
    return sat, bg


def _overlap_blocks(mosaic: Mosaic, pos: np.ndarray, i: int, j: int, block: int,
                    sat: float, bg: float) -> tuple[np.ndarray, np.ndarray]:
    """Block means of tiles ``i`` and ``j`` over their overlap, from the pixels valid in
    both; blocks with under half their pixels valid are left out.

    Pixel ``q`` of tile ``i`` is paired with tile ``j`` sampled at ``q - o`` (``o`` the
    sub-pixel offset ``pos_j - pos_i``) by linear interpolation, as
    :func:`gpufusion.registration.overlap_ncc` pairs them; a sample is valid when every
    pixel it interpolates is. Large overlaps are sampled every ``stride`` pixels per axis,
    the largest stride keeping at least :data:`MAX_SAMPLES` samples (blocks keep their size
    in pixels).
    """
    shape_i = np.asarray(mosaic.tiles[i].shape, dtype=np.int64)
    shape_j = np.asarray(mosaic.tiles[j].shape, dtype=np.int64)
    off = pos[j] - pos[i]
    whole = np.floor(off).astype(np.int64)
    frac = off - whole
    frac[frac < 1e-6] = 0.0  # a rounding error above an integer is that integer
    step = (frac > 0).astype(np.int64)
    lo = np.maximum(0, whole + step)
    hi = np.minimum(shape_i, whole + shape_j)
    ext = hi - lo
    if np.any(ext < 1):
        return np.empty(0), np.empty(0)
    stride = max(1, int((float(np.prod(ext)) / MAX_SAMPLES) ** (1.0 / len(ext))))
    a, valid_a = _sampled(mosaic.tiles[i].source, tuple(
        slice(int(p), int(q)) for p, q in zip(lo, hi, strict=True)), np.zeros_like(frac),
        stride, sat, bg)
    b, valid_b = _sampled(mosaic.tiles[j].source, tuple(
        slice(int(p - w - s), int(q - w)) for p, q, w, s in zip(lo, hi, whole, step,
                                                               strict=True)), frac,
        stride, sat, bg)
    valid = valid_a & valid_b
    sizes = [max(1, min(block // stride, int(e) // 2)) for e in a.shape]
    counts = [int(e) // s for e, s in zip(a.shape, sizes, strict=True)]
    crop = tuple(slice(0, c * s) for c, s in zip(counts, sizes, strict=True))
    shape = [v for c, s in zip(counts, sizes, strict=True) for v in (c, s)]
    axes = tuple(range(1, 2 * len(counts), 2))
    v = valid[crop]
    n_valid = v.reshape(shape).sum(axis=axes)
    sum_a = (a[crop] * v).reshape(shape).sum(axis=axes).astype(np.float64)
    sum_b = (b[crop] * v).reshape(shape).sum(axis=axes).astype(np.float64)
    ok = n_valid >= 0.5 * int(np.prod(sizes))
    return sum_a[ok] / n_valid[ok], sum_b[ok] / n_valid[ok]


def _sampled(source: Any, window: tuple[slice, ...], frac: np.ndarray, stride: int,
             sat: float, bg: float) -> tuple[np.ndarray, np.ndarray]:
    """``source``'s pixels of ``window`` every ``stride`` px per axis (float32, 0 where
    invalid) and where they are valid: finite, below ``sat`` and above ``bg`` (for a
    flat-field corrected source, tested on its raw pixels).

    Along an axis with ``frac > 0`` the window holds one pixel more and sample ``k`` is
    interpolated at ``k - frac``: ``(1 - frac) x[k + 1] + frac x[k]`` in window indices,
    valid when both are.
    """
    if hasattr(source, "read_raw") and hasattr(source, "correct"):
        raw = np.asarray(source.read_raw(window))
        values = np.asarray(source.correct(raw, window))
    else:
        raw = values = np.asarray(source.read(window))
    out: Any = 0.0
    valid: Any = True
    choices = [((1, 1.0 - f), (0, f)) if f > 0 else ((0, 1.0),) for f in frac]
    for corner in itertools.product(*choices):
        sel = tuple(slice(start, (None if start or f == 0 else -1), stride)
                    for (start, _), f in zip(corner, frac, strict=True))
        weight = float(np.prod([w for _, w in corner]))
        x = values[sel].astype(np.float32)
        r = raw[sel]
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(x) & (r < sat) & (r > bg)
        out = out + np.float32(weight) * np.where(ok, x, np.float32(0))
        valid = valid & ok
    return np.asarray(out, dtype=np.float32), np.asarray(valid)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    den = np.sqrt(np.sum(da * da) * np.sum(db * db))
    return float(np.sum(da * db) / den) if den > 0 else float("nan")


def _log_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """``median(log b - log a)`` over the blocks where both are positive (NaN if none)."""
    pos = (a > 0) & (b > 0)
    if not pos.any():
        return float("nan")
    return float(np.median(np.log(b[pos]) - np.log(a[pos])))


# --- the global solve ---------------------------------------------------------------------


def _anchors(pairs: np.ndarray, kept: np.ndarray, n: int,
             reference: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of tiles connected by kept pairs: its label per tile, one anchor tile each
    (the reference in its group, else the group's first tile), and the tiles with no kept
    pair."""
    p = pairs[kept]
    graph = sp.coo_matrix((np.ones(len(p)), (p[:, 0], p[:, 1])), shape=(n, n))
    n_groups, labels = connected_components(graph, directed=False)
    used = np.zeros(n, dtype=bool)
    used[p.ravel()] = True
    first = np.full(n_groups, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    if reference is not None:
        first[labels[reference]] = reference
    return labels, first, np.flatnonzero(~used)


def _solve_differences(pairs: np.ndarray, d: np.ndarray, w: np.ndarray, n: int,
                       anchors: np.ndarray) -> np.ndarray:
    """Weighted least squares ``x_i - x_j ~= d`` over ``pairs``, ``x`` 0 at the anchors.

    The normal equations are the graph Laplacian ``L x = A^T W d``; with one tile of each
    connected group fixed, the rest of ``L`` is positive definite (sparse solve).
    """
    i, j = pairs[:, 0], pairs[:, 1]
    lap = sp.coo_matrix((np.concatenate([w, w, -w, -w]),
                         (np.concatenate([i, j, i, j]), np.concatenate([i, j, j, i]))),
                        shape=(n, n)).tocsr()
    rhs = np.bincount(i, w * d, minlength=n) - np.bincount(j, w * d, minlength=n)
    free = np.ones(n, dtype=bool)
    free[anchors] = False
    x = np.zeros(n)
    if free.any():
        x[free] = np.atleast_1d(spsolve(lap[free][:, free].tocsc(), rhs[free]))
    return x


def _normalise(values: np.ndarray, labels: np.ndarray, unmatched: np.ndarray,
               reference: int | None, kind: str) -> np.ndarray:
    """Fix the free scale (gains) or shift (offsets) of each group: the reference tile's
    gain 1 / offset 0 in its group, else the group's mean gain 1 / mean offset 0; tiles
    without a kept pair get gain 1 / offset 0."""
    neutral = 1.0 if kind == "gain" else 0.0
    out = values.astype(np.float64).copy()
    out[unmatched] = neutral
    member = np.ones(len(out), dtype=bool)
    member[unmatched] = False
    for group in np.unique(labels[member]):
        sel = member & (labels == group)
        if reference is not None and labels[reference] == group:
            base = out[reference]
        else:
            base = float(np.mean(out[sel]))
        out[sel] = out[sel] / base if kind == "gain" else out[sel] - base
    return out


def _log_slope(a: np.ndarray, b: np.ndarray) -> float:
    """``log(std(b) / std(a))``: the slope of ``b`` against ``a`` by reduced major axis
    regression (unbiased by noise of similar size in both, unlike least squares of ``b``
    on ``a``); NaN for a flat overlap."""
    if len(a) < 2:
        return float("nan")
    sa, sb = float(np.std(a)), float(np.std(b))
    return float(np.log(sb / sa)) if sa > 0 and sb > 0 else float("nan")


def _offset_differences(samples: Sequence[tuple[np.ndarray, np.ndarray]], pairs: np.ndarray,
                        gains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair ``median(g_j b - g_i a)`` (what ``o_i - o_j`` should be) and its intensity
    scale ``mean(g_i |a| + g_j |b|) / 2`` (for relative residuals)."""
    diff = np.full(len(pairs), np.nan)
    scale = np.ones(len(pairs))
    for k, ((a, b), (i, j)) in enumerate(zip(samples, pairs, strict=True)):
        if len(a):
            diff[k] = float(np.median(gains[j] * b - gains[i] * a))
            scale[k] = max(float(np.mean(gains[i] * np.abs(a) + gains[j] * np.abs(b))) / 2,
                           1e-30)
    return diff, scale


def _trim(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop blocks further than :data:`_TRIM_SIGMAS` robust sigmas from the pair's own line
    ``b = s a + t`` (least squares), keeping at least half of them."""
    if len(a) < 3 or np.ptp(a) <= 0:
        return a, b
    s, t = np.polyfit(a, b, 1)
    r = np.abs(b - (s * a + t))
    sigma = 1.4826 * float(np.median(r))
    keep = r <= _TRIM_SIGMAS * sigma if sigma > 0 else np.ones(len(a), dtype=bool)
    if keep.sum() < max(2, len(a) // 2):
        return a, b
    return a[keep], b[keep]


def _worst_pairs(pairs: np.ndarray, residual: np.ndarray, kept: np.ndarray,
                 max_residual: float) -> np.ndarray:
    """Kept pairs to drop this round: those above ``max_residual``, worst first, skipping
    any pair with a tile next to a pair already chosen (one bad pair also pulls up the
    residuals of the pairs around it, so near each other only the worst goes per round;
    far apart, several go at once)."""
    r = np.where(kept, residual, 0.0)
    drop = np.zeros(len(pairs), dtype=bool)
    over = np.flatnonzero(kept & (r > max_residual))
    if len(over) == 0:
        return drop
    n = int(pairs.max()) + 1
    p = pairs[kept]
    adjacency = sp.coo_matrix((np.ones(2 * len(p)), (p.ravel(), p[:, ::-1].ravel())),
                              shape=(n, n)).tocsr()
    blocked = np.zeros(n, dtype=bool)
    for k in over[np.argsort(-r[over], kind="stable")]:
        i, j = pairs[k]
        if blocked[i] or blocked[j]:
            continue
        drop[k] = True
        for t in (i, j):
            blocked[t] = True
            blocked[adjacency.indices[adjacency.indptr[t]:adjacency.indptr[t + 1]]] = True
    return drop
