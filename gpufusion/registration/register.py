"""Register a mosaic: pairwise offsets, global solve, corrected positions and an edge table.

:func:`register_mosaic` runs the whole correction of stage-position errors::

    candidate pairs (nominal footprints overlap)      -> pairwise.candidate_pairs
    -> offset + confidence (NCC) per pair              -> search.search_pairs
                                                          (pairwise.measure_pairs)
       (without max_shift: up to half a tile, binned tiles first, then full resolution;
        pairs at the wall of their range searched again wider)
    -> unreliable pairs searched again within the stage model of their direction
       (the offset the reliable pairs of that direction agree on, as MIST does)
    -> every other pair that overlaps at the preliminary solution (diagonal neighbours)
    -> edges dropped: no match, NCC < min_ncc, beyond the search range or at its wall
    -> weighted least squares + residual rejection     -> solve.solve_positions
    -> corrected Mosaic (``Mosaic.with_affines``), EdgeTable, quality before / after,
       advice in words (``RegistrationResult.advice``)
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..layout import Mosaic, translation_affine
from ..progress import Progress
from ..spatial import overlapping_pairs
from .pairwise import (
    PairMeasurements,
    candidate_pairs,
    check_max_shift,
    default_max_shift,
    measure_pairs,
    resolve_registration_backend,
    translation_positions,
)
from .quality import overlap_ncc, overlapping_tile_pairs
from .search import SearchResult, concat_measurements, replace_rows, search_pairs
from .solve import solve_positions

__all__ = ["EdgeTable", "RegistrationResult", "RegistrationWarning", "register_mosaic"]

#: Edges measured more than this many pixels beyond ``max_shift`` are dropped, as are those
#: whose best match lies on the wall of the search range (``PairMeasurements.at_limit``).
AT_LIMIT = 0.5
#: Edge status values, in the order they are decided.
STATUSES = ("kept", "too_small", "no_match", "low_ncc", "max_shift", "residual")
#: Without ``max_shift``, offsets are searched up to this fraction of the tile per axis.
AUTO_REACH = 0.5
#: Other pairs (diagonal neighbours) join when they overlap at the preliminary solution by
#: at least DIAGONAL_MIN px along every axis and DIAGONAL_FRACTION of the smaller tile; they
#: are searched within DIAGONAL_REACH px of the offset that solution gives.
DIAGONAL_MIN = 32.0
DIAGONAL_FRACTION = 0.004
DIAGONAL_REACH = 4.0
#: Stage model: pairs of one direction are searched again within this many robust standard
#: deviations (1.4826 MAD) of their reliable pairs' median correction, plus MODEL_SLACK px.
MODEL_SIGMAS = 3.0
MODEL_SLACK = 3.0
#: An outlying pair takes the answer found within the model when that matches nearly as
#: well: sparse or smooth content can match almost perfectly at a wrong, far shift where
#: only a sliver (one bright spot, a smooth ramp) is shared. Nearly: an NCC lower by at most
#: MODEL_NCC_MARGIN, and a mismatch ``1 - NCC`` at most twice as large (+ 0.005), so that a
#: near-perfect match (1 - NCC ~ 0) is not traded for a merely good one.
MODEL_NCC_MARGIN = 0.05


class RegistrationWarning(UserWarning):
    """Some tiles could not be registered and were placed from their neighbours."""


@dataclass(frozen=True)
class EdgeTable:
    """One row per candidate pair: what was measured and what the solve made of it.

    Attributes
    ----------
    pairs : ndarray of int64 (m, 2)
        Tile indices ``(i, j)``, ``i < j``.
    nominal : ndarray (m, ndim)
        Nominal offsets ``p_j - p_i`` (index order, pixels).
    shift : ndarray (m, ndim)
        Measured correction of the offset (NaN where nothing was measured).
    ncc : ndarray (m,)
        Confidence: NCC of the overlap at the measured integer shift.
    weight : ndarray (m,)
        Weight in the least-squares solve (0 for dropped edges).
    residual : ndarray (m,)
        ``|x_j - x_i - offset|`` at the registered positions (pixels).
    status : ndarray of str (m,)
        ``kept``; or why the edge was dropped: ``too_small`` (overlap too narrow to
        correlate), ``no_match`` (no variance, e.g. a blank tile, or no overlap at any
        allowed shift), ``low_ncc``, ``max_shift`` (more than ``max_shift`` + 0.5 px, or
        the best match on the wall of the search range: the true shift is probably
        larger),
        ``residual`` (rejected by the solve).
    """

    pairs: np.ndarray
    nominal: np.ndarray
    shift: np.ndarray
    ncc: np.ndarray
    weight: np.ndarray
    residual: np.ndarray
    status: np.ndarray

    @property
    def offset(self) -> np.ndarray:
        """Measured offsets ``t_j - t_i``."""
        return self.nominal + self.shift

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the edges used in the final solve."""
        return self.status == "kept"

    def __len__(self) -> int:
        return len(self.pairs)

    def counts(self) -> dict[str, int]:
        """Number of edges per status (statuses with none left out)."""
        return {s: int(np.sum(self.status == s)) for s in STATUSES if np.any(self.status == s)}


@dataclass(frozen=True)
class RegistrationResult:
    """Everything :func:`register_mosaic` found.

    Attributes
    ----------
    mosaic : Mosaic
        The input mosaic with corrected translations (a new object).
    positions : ndarray (n, ndim)
        Registered tile positions (index order); ``mosaic.positions()``.
    nominal : ndarray (n, ndim)
        The input (stage) positions.
    edges : EdgeTable
    unregistered : ndarray of int
        Tiles without any kept edge: they keep their nominal position shifted by the mean
        correction of their neighbours (blank or featureless tiles end up here).
    detached : ndarray of int
        Tiles with kept edges in a group not linked to the anchor's: placed the same way.
    anchor : int
        The tile that keeps its nominal position.
    mean_ncc_before, mean_ncc_after : float
        Mean overlap NCC at the nominal and registered positions, over every pair of tiles
        that overlaps in either (diagonal neighbours included;
        :func:`~gpufusion.registration.mean_overlap_ncc`; NaN when not computed).
    max_shift : ndarray (ndim,)
        The ``max_shift`` used, per axis.
    max_residual : float
        The residual threshold used by the solve.
    backend : str
        ``numpy`` or ``cupy``.
    seconds : dict
        Wall times: ``read`` (reading tile windows, part of ``pairwise``), ``pairwise``,
        ``solve``, ``quality``, ``total``.
    advice : tuple of str
        What the registration found out that a user acts on: the overlap the tiles really
        have, pairs searched again wider, why pairs were dropped and what to change.
    """

    mosaic: Mosaic
    positions: np.ndarray
    nominal: np.ndarray
    edges: EdgeTable
    unregistered: np.ndarray
    detached: np.ndarray
    anchor: int
    mean_ncc_before: float
    mean_ncc_after: float
    max_shift: np.ndarray
    max_residual: float
    backend: str
    seconds: dict[str, float] = field(default_factory=dict)
    advice: tuple[str, ...] = ()

    @property
    def corrections(self) -> np.ndarray:
        """``positions - nominal`` (n, ndim)."""
        return self.positions - self.nominal

    @property
    def names(self) -> list[str]:
        """Tile names, in tile order."""
        return [t.name for t in self.mosaic.tiles]

    def summary(self) -> str:
        """A few lines: edges kept and dropped, corrections, quality before and after."""
        from .report import summary_lines

        return "\n".join(summary_lines(self))

    def write_positions_csv(self, path: str | Path,
                            files: Sequence[str | Path] | None = None) -> Path:
        """Write ``file,x,y[,z]`` (see :func:`~gpufusion.registration.write_positions_csv`)."""
        from .report import write_positions_csv

        return write_positions_csv(path, self.positions, files or self.names)

    def write_edges_csv(self, path: str | Path) -> Path:
        """Write the edge table (see :func:`~gpufusion.registration.write_edges_csv`)."""
        from .report import write_edges_csv

        return write_edges_csv(path, self)

    def write_report(self, path: str | Path) -> Path:
        """Write the layout picture (see :func:`~gpufusion.registration.write_report`)."""
        from .report import write_report

        return write_report(path, self)


def edge_weights(ncc: np.ndarray, overlap: np.ndarray) -> np.ndarray:
    """Least-squares weights: ``r / (1 - r)`` (a signal-to-noise ratio from the NCC ``r``,
    clipped to [0.01, 0.99]) times the overlap's pixel count relative to the median one.

    Examples
    --------
    >>> edge_weights(np.array([0.5, 0.9, 0.9]), np.array([100.0, 100.0, 25.0])).round(2)
    array([1.  , 9.  , 2.25])
    """
    r = np.clip(np.nan_to_num(ncc, nan=0.0), 0.01, 0.99)
    size = np.asarray(overlap, dtype=np.float64)
    if len(size) == 0:
        return size
    return r / (1.0 - r) * size / max(float(np.median(size)), 1.0)


def _overlap_pixels(offsets: np.ndarray, shapes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Pixels two tiles share at their measured offsets (1 where unknown)."""
    si, sj = shapes[pairs[:, 0]], shapes[pairs[:, 1]]
    o = np.nan_to_num(offsets, nan=0.0)
    ext = np.minimum(si, o + sj) - np.maximum(0.0, o)
    return np.prod(np.clip(ext, 1.0, None), axis=1)


def register_mosaic(
    mosaic: Mosaic,
    *,
    max_shift: float | Sequence[float] | None = None,
    backend: str = "auto",
    min_ncc: float = 0.1,
    max_residual: float = 2.0,
    anchor: int | None = None,
    pairs: np.ndarray | None = None,
    quality: bool = True,
    algorithm: str = "auto",
    progress: bool = False,
    diagonals: bool = True,
) -> RegistrationResult:
    """Correct stage-position errors of a translation-only mosaic.

    Parameters
    ----------
    mosaic : Mosaic
        Tiles at their nominal (stage) positions; 2D or 3D, translations only.
    max_shift : float or sequence of float, optional
        Largest expected error of a neighbouring pair's offset, in pixels (one value, or one
        per axis in index order): an upper bound of the search. Per-tile stage errors of up
        to ``E`` px give pair errors of up to ``2 E``. Default: none given, the layout is
        found by itself: offsets up to half a tile (binned tiles first), a wrong nominal
        overlap included. 0 keeps the nominal positions (the edges are only scored).
    backend : {"auto", "numpy", "cupy"}
        ``auto`` uses the GPU when CuPy finds one.
    min_ncc : float
        Edges whose confidence (overlap NCC) is lower are not used.
    max_residual : float
        Edges that disagree with the solution by more than this many pixels are dropped
        and the solve repeated.
    anchor : int, optional
        Tile that keeps its nominal position (default: the first tile of the largest
        group of registered tiles).
    pairs : ndarray of int (m, 2), optional
        Pairs to register (default: :func:`~gpufusion.registration.candidate_pairs` with
        ``max_shift``, or 10 % of the tile without it); other pairs that overlap at the
        preliminary solution (diagonal neighbours) join them (see ``diagonals``).
    quality : bool
        Compute the mean overlap NCC before and after (reads the overlaps once more).
    algorithm : {"auto", "slices", "batched"}
        See :func:`~gpufusion.registration.measure_pairs`.
    progress : bool
        Show one line per stage on stderr: ``registering pairs`` (pair measurements
        done/total, rate, ETA; every pass counted: binned, full resolution, wider, within
        the stage model, diagonal pairs), ``solving positions``, ``scoring overlaps``
        (:mod:`gpufusion.progress`).
    diagonals : bool
        Also measure the pairs that overlap at the preliminary solution but were not
        candidates (diagonal neighbours), weighted by their overlap and NCC like every edge.

    Returns
    -------
    RegistrationResult

    Warns
    -----
    RegistrationWarning
        When tiles are left without a reliable edge (or in a group not linked to the
        anchor), naming them, or when no two tiles overlap.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((2, 2), (128, 128), overlap=0.2, stage_error=3, seed=1)
    >>> res = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=8, backend="numpy")
    >>> err = res.positions - syn.positions
    >>> bool(np.abs(err - err.mean(axis=0)).max() < 0.05)
    True
    >>> res.edges.counts()
    {'kept': 6}
    """
    t0 = time.perf_counter()
    nominal = translation_positions(mosaic)
    n, d = nominal.shape
    auto = max_shift is None
    bound = auto_reach(mosaic) if auto else check_max_shift(max_shift, mosaic)
    name = resolve_registration_backend(backend)
    if not (np.isfinite(min_ncc) and -1 <= min_ncc <= 1):
        raise InputError(f"min_ncc: expected a number in [-1, 1], got {min_ncc}")
    if not (np.isfinite(max_residual) and max_residual > 0):
        raise InputError(f"max_residual: expected a number > 0, got {max_residual}")
    if anchor is not None and not 0 <= anchor < n:
        raise InputError(f"anchor: tile index {anchor} outside [0, {n})")
    if pairs is None:
        pairs = candidate_pairs(mosaic, max_shift=default_max_shift(mosaic) if auto else bound)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    notes: list[str] = []
    # one progress line for every pass (its total grows as passes are added)
    with Progress("registering pairs", unit="pairs", enabled=progress) as bar:
        opts = {"backend": name, "algorithm": algorithm, "progress": bar if progress else False}
        if len(pairs) == 0 or not np.any(bound > 0):  # nothing to search: score the nominal
            meas = measure_pairs(mosaic, pairs, max_shift=bound, **opts)
            found = SearchResult(meas, meas.nominal.copy(),
                                 np.broadcast_to(bound, (len(pairs), d)).copy(),
                                 np.zeros(len(pairs), bool))
        else:
            if auto and diagonals:  # corner pairs: measured once the side pairs place tiles
                pairs = pairs[~_corner_pairs(mosaic, pairs, nominal)]
            found = search_pairs(mosaic, pairs, np.broadcast_to(bound, (len(pairs), d)),
                                 bound, **opts)
            found = _model_search(mosaic, found, bound, min_ncc, notes, opts)
            if diagonals:
                found = _add_diagonals(mosaic, found, bound, min_ncc, max_residual, anchor,
                                       opts)
    meas = found.meas
    status = _classify(meas, found.center, found.reach, min_ncc)
    pairs = meas.pairs
    m = len(pairs)
    weight = edge_weights(meas.ncc, _overlap_pixels(meas.offset, mosaic.tile_shapes, pairs))
    t1 = time.perf_counter()
    solved = solve_positions(nominal, pairs, meas.offset, weight, usable=status == "kept",
                             max_residual=max_residual, anchor=anchor, progress=progress)
    status[solved.rejected] = "residual"
    t2 = time.perf_counter()
    weight = np.where(solved.kept, weight, 0.0)
    positions = solved.positions
    new = mosaic.with_affines([translation_affine(p) for p in positions])
    before = after = float("nan")
    if quality and m:
        # every pair that overlaps before or after, diagonal neighbours included
        scored = np.unique(np.concatenate([overlapping_tile_pairs(mosaic, nominal),
                                           overlapping_tile_pairs(mosaic, positions)]), axis=0)
        with Progress("scoring overlaps", 2 * len(scored), unit="pairs",
                      enabled=progress) as bar:
            before = _nanmean(_counted_ncc(mosaic, scored, nominal, bar))
            after = _nanmean(_counted_ncc(mosaic, scored, positions, bar))
    t3 = time.perf_counter()
    degree = np.bincount(pairs[solved.kept].ravel(), minlength=n) if m else np.zeros(n, int)
    unregistered = np.flatnonzero(degree == 0) if n > 1 else np.zeros(0, np.int64)
    detached = np.setdiff1d(solved.unplaced, unregistered)
    edges = EdgeTable(pairs, meas.nominal, meas.shift, meas.ncc, weight, solved.residual,
                      status.astype(str))
    seconds = {"read": meas.read_seconds, "pairwise": meas.seconds, "solve": t2 - t1,
               "quality": t3 - t2, "total": time.perf_counter() - t0}
    advice = _advice(mosaic, found, edges, bound, auto, min_ncc, max_residual, notes)
    result = RegistrationResult(new, positions, nominal, edges, unregistered, detached,
                                solved.anchor, before, after, bound, float(max_residual), name,
                                seconds, tuple(advice))
    _warn(result, n)
    return result


def auto_reach(mosaic: Mosaic) -> np.ndarray:
    """The search range without ``max_shift``: half the smallest tile along each axis.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> auto_reach(mosaic_from_positions([np.zeros((20, 301))] * 2, [(0, 0), (0, 270)]))
    array([ 10., 150.])
    """
    return np.maximum(np.floor(AUTO_REACH * mosaic.tile_shapes.min(axis=0)), 1.0)


def _reliable(meas: PairMeasurements, min_ncc: float) -> np.ndarray:
    return np.isfinite(meas.ncc) & (meas.ncc >= min_ncc) & ~meas.at_limit


def _directions(nominal: np.ndarray, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Direction class of every pair from its nominal offset: per axis -1, 0 or +1 (apart
    by more than a quarter tile or not), signs flipped so that the first non-zero one is
    +1 (a pair listed the other way round belongs to the same class).

    Returns the class label (m,), the flip (m,) (+1 or -1) and the class directions (k, d).
    """
    q = np.where(np.abs(nominal) > 0.25 * tile, np.sign(nominal), 0.0)
    first = q[np.arange(len(q)), np.argmax(q != 0, axis=1)] if len(q) else np.zeros(0)
    flip = np.where(first < 0, -1.0, 1.0)
    keys, label = np.unique(q * flip[:, None], axis=0, return_inverse=True)
    return label.reshape(-1), flip, keys


def _corner_pairs(mosaic: Mosaic, pairs: np.ndarray, nominal: np.ndarray) -> np.ndarray:
    """Pairs apart along more than one axis (diagonal neighbours) whose tiles both have a
    side neighbour: a wide search of their small corner is unreliable, and the diagonal
    step measures them at the side pairs' solution."""
    tile = mosaic.tile_shapes.min(axis=0).astype(np.float64)
    sep = np.abs(nominal[pairs[:, 1]] - nominal[pairs[:, 0]]) > 0.25 * tile
    corner = np.sum(sep, axis=1) > 1
    sided = np.zeros(len(nominal), dtype=bool)
    sided[pairs[~corner].ravel()] = True
    return corner & sided[pairs[:, 0]] & sided[pairs[:, 1]]


def _model_search(mosaic: Mosaic, found: SearchResult, bound: np.ndarray, min_ncc: float,
                  notes: list[str], opts: dict) -> SearchResult:
    """Search the unreliable and the outlying pairs again within the stage model of their
    direction.

    The model of a direction (as MIST's, Chalfoun et al. 2017, Sci. Rep. 7:4988): the
    median correction of its reliable pairs, and their spread (1.4826 MAD) as the stage
    repeatability. A pair without a reliable match, or whose correction lies farther than
    ``MODEL_SIGMAS`` spreads (+ ``MODEL_SLACK`` px) from that median, is searched again
    within that distance of it. The new answer replaces an unreliable one when it is
    reliable, an outlying one when it also matches nearly as well (see
    ``MODEL_NCC_MARGIN``).
    """
    meas = found.meas
    tile = mosaic.tile_shapes.min(axis=0).astype(np.float64)
    label, flip, _ = _directions(meas.nominal, tile)
    good = _reliable(meas, min_ncc)
    center = np.zeros_like(meas.nominal)
    reach = np.zeros_like(meas.nominal)
    redo = np.zeros(len(meas), dtype=bool)
    for k in np.unique(label):
        members = label == k
        ref = members & good
        if not ref.any():
            continue
        corr = meas.shift[ref] * flip[ref, None]
        med = np.median(corr, axis=0)
        spread = 1.4826 * np.median(np.abs(corr - med), axis=0) if ref.sum() >= 3 else 0.0
        width = np.minimum(MODEL_SIGMAS * spread + MODEL_SLACK, bound)
        off = np.abs(meas.shift * flip[:, None] - med) > width
        todo = members & (~good | np.any(off, axis=1)) & (meas.window[:, 0] > 0)
        center[todo] = meas.nominal[todo] + flip[todo, None] * med
        reach[todo] = width
        redo |= todo
    if not redo.any():
        return found
    idx = np.flatnonzero(redo)
    again = search_pairs(mosaic, meas.pairs[idx], reach[idx], bound, center=center[idx],
                         **opts)
    was_good = good[idx]
    new, old = again.meas.ncc, meas.ncc[idx]
    close = (new >= old - MODEL_NCC_MARGIN) & (1.0 - new <= 2.0 * (1.0 - old) + 0.005)
    better = _reliable(again.meas, min_ncc) & (~was_good | close)
    notes.append(f"{len(idx)} pairs without a reliable match, or far from the offset the "
                 "other pairs of their direction agree on, were searched again around that "
                 f"offset; {int(better.sum())} matched better there")
    take = idx[better]
    meas = replace_rows(meas, take, _rows(again.meas, better))
    meas = dataclasses.replace(meas, seconds=meas.seconds + again.meas.seconds,
                               read_seconds=meas.read_seconds + again.meas.read_seconds)
    c, r, w = found.center.copy(), found.reach.copy(), found.widened.copy()
    c[take], r[take] = again.center[better], again.reach[better]
    w[take] |= again.widened[better]
    return SearchResult(meas, c, r, w)


def _rows(meas: PairMeasurements, keep: np.ndarray) -> PairMeasurements:
    """The rows ``keep`` of ``meas``."""
    names = ("pairs", "nominal", "shift", "ncc", "peak", "window", "at_limit")
    return dataclasses.replace(meas, **{k: getattr(meas, k)[keep] for k in names})


def _add_diagonals(mosaic: Mosaic, found: SearchResult, bound: np.ndarray, min_ncc: float,
                   max_residual: float, anchor: int | None, opts: dict) -> SearchResult:
    """Measure the other pairs that overlap at the preliminary solution (diagonal
    neighbours), within ``DIAGONAL_REACH`` px of the offset it gives, and append them."""
    meas = found.meas
    nominal = translation_positions(mosaic)
    usable = _classify(meas, found.center, found.reach, min_ncc) == "kept"
    if not usable.any():
        return found
    weight = edge_weights(meas.ncc, _overlap_pixels(meas.offset, mosaic.tile_shapes,
                                                    meas.pairs))
    pre = solve_positions(nominal, meas.pairs, meas.offset, weight, usable=usable,
                          max_residual=max_residual, anchor=anchor)
    shapes = mosaic.tile_shapes.astype(np.float64)
    extra = overlapping_pairs(pre.positions, pre.positions + shapes - 1.0, DIAGONAL_MIN)
    if len(extra) == 0:
        return found
    placed = np.ones(len(nominal), dtype=bool)
    placed[pre.unplaced] = False
    known = {(int(i), int(j)) for i, j in meas.pairs}
    i, j = extra[:, 0], extra[:, 1]
    ext = (np.minimum(pre.positions[i] + shapes[i], pre.positions[j] + shapes[j])
           - np.maximum(pre.positions[i], pre.positions[j]))
    smaller = np.minimum(np.prod(shapes[i], axis=1), np.prod(shapes[j], axis=1))
    keep = (placed[i] & placed[j] & (np.prod(ext, axis=1) >= DIAGONAL_FRACTION * smaller)
            & np.array([(int(a), int(b)) not in known for a, b in extra]))
    extra = extra[keep]
    if len(extra) == 0:
        return found
    center = pre.positions[extra[:, 1]] - pre.positions[extra[:, 0]]
    reach = np.broadcast_to(np.minimum(DIAGONAL_REACH, bound), center.shape).copy()
    diag = measure_pairs(mosaic, extra, max_shift=reach, expected=center,
                         label="registering diagonal pairs", **opts)
    return SearchResult(concat_measurements([meas, diag]),
                        np.concatenate([found.center, center]),
                        np.concatenate([found.reach, reach]),
                        np.concatenate([found.widened, np.zeros(len(extra), bool)]))


def _classify(meas: PairMeasurements, center: np.ndarray, reach: np.ndarray,
              min_ncc: float) -> np.ndarray:
    """Status of every measured pair before the solve (``kept`` or why not)."""
    status = np.full(len(meas), "kept", dtype=object)
    status[meas.window[:, 0] == 0] = "too_small"
    status[(status == "kept") & ~np.isfinite(meas.ncc)] = "no_match"
    status[(status == "kept") & (meas.ncc < min_ncc)] = "low_ncc"
    # A true offset within the search range is measured within it + ~0.1 px; one beyond the
    # range (reach + 2 px) leaves the best match on its wall.
    off = np.abs(np.nan_to_num(meas.offset - center))
    beyond = meas.at_limit | np.any(off > reach + AT_LIMIT, axis=1)
    status[(status == "kept") & beyond] = "max_shift"
    return status


def _counted_ncc(mosaic: Mosaic, pairs: np.ndarray, positions: np.ndarray, bar: Progress,
                 step: int = 16) -> np.ndarray:
    """:func:`overlap_ncc` of ``pairs``, ``step`` pairs at a time, counted on ``bar``."""
    if not bar.enabled:
        return overlap_ncc(mosaic, pairs, positions)
    parts = [np.zeros(0)]
    for k in range(0, len(pairs), step):
        parts.append(overlap_ncc(mosaic, pairs[k : k + step], positions))
        bar.update(len(parts[-1]))
    return np.concatenate(parts)


def _nanmean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _named(names: list[str], tiles: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(names[k] for k in tiles[:limit])
    return shown + (f" and {len(tiles) - limit} more" if len(tiles) > limit else "")


def _warn(result: RegistrationResult, n: int) -> None:
    if n > 1 and len(result.edges) == 0:
        warnings.warn("registration: no two tiles overlap enough to register (more than 8 px "
                      "along every axis); the positions are unchanged",
                      RegistrationWarning, stacklevel=3)
        return
    names = result.names
    parts = []
    limited = int(np.sum(result.edges.status == "max_shift"))
    if limited > 0.1 * len(result.edges):  # a few are spurious matches of small overlaps
        ms = ", ".join(f"{v:g}" for v in result.max_shift[::-1])
        parts.append(f"{limited} of {len(result.edges)} pairs matched best at or beyond the "
                     f"max_shift limit ({ms} px, x,y[,z]) and were dropped; the stage error "
                     "may be larger than max_shift allows")
    if len(result.unregistered):
        parts.append(f"{len(result.unregistered)} of {n} tiles have no reliable overlap "
                     f"({_named(names, result.unregistered)})")
    if len(result.detached):
        parts.append(f"{len(result.detached)} tiles form groups not linked to the rest "
                     f"({_named(names, result.detached)})")
    if parts:
        tail = ("; they keep their nominal layout, moved by the mean correction of their "
                "neighbours") if len(result.unregistered) or len(result.detached) else ""
        warnings.warn(f"registration: {'; '.join(parts)}{tail}",
                      RegistrationWarning, stacklevel=3)


def _axis_name(ax: int, ndim: int) -> str:
    return "zyx"[3 - ndim + ax]


def _advice(mosaic: Mosaic, found: SearchResult, edges: EdgeTable, bound: np.ndarray,
            auto: bool, min_ncc: float, max_residual: float, notes: list[str]) -> list[str]:
    """Sentences a user acts on: the overlap found, retries, why pairs were dropped."""
    out: list[str] = []
    meas = found.meas
    if len(meas) == 0:
        return out
    tile = mosaic.tile_shapes.min(axis=0).astype(np.float64)
    d = len(tile)
    label, _, keys = _directions(meas.nominal, tile)
    kept = edges.status == "kept"
    for k, key in enumerate(keys):  # side neighbours along one axis: the overlap they have
        if np.count_nonzero(key) != 1:
            continue
        ax = int(np.flatnonzero(key)[0])
        sel = (label == k) & kept
        if not sel.any():
            continue
        nom = 1.0 - float(np.median(np.abs(meas.nominal[sel, ax]))) / tile[ax]
        true = 1.0 - float(np.median(np.abs(meas.offset[sel, ax]))) / tile[ax]
        # a systematic difference (all pairs alike), not random stage errors
        corr = np.abs(meas.offset[sel, ax]) - np.abs(meas.nominal[sel, ax])
        spread = 1.4826 * float(np.median(np.abs(corr - np.median(corr))))
        if (abs(true - nom) >= 0.02 and abs(true - nom) * tile[ax] >= 4.0
                and abs(float(np.median(corr))) > 3.0 * spread):
            out.append(f"the nominal overlap along {_axis_name(ax, d)} looks like {true:.0%}, "
                       f"not {nom:.0%}: for a --grid input use --overlap {true:.2f}")
    widened = int(found.widened.sum())
    if widened:
        reach = ", ".join(f"{v:g}" for v in found.reach[found.widened].max(axis=0)[::-1])
        out.append(f"stage errors look larger than the first search range: {widened} pairs "
                   f"matched at its edge and were searched again with up to {reach} px "
                   "(x,y[,z])")
    out.extend(notes)
    counts = edges.counts()
    ms = ", ".join(f"{v:g}" for v in bound[::-1])
    if counts.get("max_shift"):
        if auto:
            out.append(f"{counts['max_shift']} pairs matched best at the edge of the search "
                       f"range (up to {ms} px, half a tile) and were dropped: their tiles may "
                       "not overlap at all")
        else:
            out.append(f"{counts['max_shift']} pairs matched best at or beyond --max-shift "
                       f"({ms} px) and were dropped: the stage error looks larger; give a "
                       "larger --max-shift, or none to search up to half a tile")
    if counts.get("low_ncc"):
        out.append(f"{counts['low_ncc']} pairs matched poorly (overlap NCC below --min-ncc "
                   f"{min_ncc:g}) and were dropped: little structure in the overlap "
                   "(background, blur), or tiles that do not overlap where their positions say")
    if counts.get("no_match"):
        out.append(f"{counts['no_match']} pairs had nothing to match (a blank or constant "
                   "overlap) and were dropped")
    if counts.get("too_small"):
        out.append(f"{counts['too_small']} pairs overlap by too few pixels to correlate")
    residual = edges.status == "residual"
    corner = np.sum(np.abs(meas.nominal) > 0.25 * tile, axis=1) > 1
    if np.any(residual & corner):
        out.append(f"{int(np.sum(residual & corner))} corner (diagonal) pairs disagreed with "
                   f"the side pairs by more than --max-residual {max_residual:g} px and were "
                   "left out: lens distortion bends the tile corners, or the corner holds "
                   "too little to match")
    if np.any(residual & ~corner):
        out.append(f"{int(np.sum(residual & ~corner))} pairs disagreed with the others by "
                   f"more than --max-residual {max_residual:g} px and were left out (a false "
                   "match, or lens distortion); a larger --max-residual keeps them")
    return out
