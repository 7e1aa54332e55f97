"""Register a mosaic: pairwise offsets, global solve, corrected positions and an edge table.

:func:`register_mosaic` runs the whole correction of stage-position errors::

    candidate pairs (nominal footprints overlap)      -> pairwise.candidate_pairs
    -> offset + confidence (NCC) per pair              -> pairwise.measure_pairs (NumPy / CuPy)
    -> edges dropped: no match, NCC < min_ncc, |shift| > max_shift + 0.5 or at the limit
    -> weighted least squares + residual rejection     -> solve.solve_positions
    -> corrected Mosaic (``Mosaic.with_affines``), EdgeTable, quality before / after
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..layout import Mosaic, translation_affine
from ..progress import Progress
from .pairwise import (
    PairMeasurements,
    candidate_pairs,
    check_max_shift,
    measure_pairs,
    resolve_registration_backend,
    translation_positions,
)
from .quality import overlap_ncc, overlapping_tile_pairs
from .solve import solve_positions

__all__ = ["EdgeTable", "RegistrationResult", "RegistrationWarning", "register_mosaic"]

#: Edges measured more than this many pixels beyond ``max_shift`` are dropped, as are those
#: whose best match lies on the wall of the search range (``PairMeasurements.at_limit``).
AT_LIMIT = 0.5
#: Edge status values, in the order they are decided.
STATUSES = ("kept", "too_small", "no_match", "low_ncc", "max_shift", "residual")


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
        Wall times: ``pairwise``, ``solve``, ``quality``, ``total``.
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
) -> RegistrationResult:
    """Correct stage-position errors of a translation-only mosaic.

    Parameters
    ----------
    mosaic : Mosaic
        Tiles at their nominal (stage) positions; 2D or 3D, translations only.
    max_shift : float or sequence of float, optional
        Largest expected error of a neighbouring pair's offset, in pixels (one value, or one
        per axis in index order). Per-tile stage errors of up to ``E`` px give pair errors
        of up to ``2 E``. Default: 10 % of the tile size along each axis. 0 keeps the
        nominal positions (the edges are only scored).
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
        ``max_shift``).
    quality : bool
        Compute the mean overlap NCC before and after (reads the overlaps once more).
    algorithm : {"auto", "slices", "batched"}
        See :func:`~gpufusion.registration.measure_pairs`.
    progress : bool
        Show one line per stage on stderr: ``registering pairs`` (pairs done/total, rate,
        ETA), ``solving positions``, ``scoring overlaps`` (:mod:`gpufusion.progress`).

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
    ms = check_max_shift(max_shift, mosaic)
    name = resolve_registration_backend(backend)
    if not (np.isfinite(min_ncc) and -1 <= min_ncc <= 1):
        raise InputError(f"min_ncc: expected a number in [-1, 1], got {min_ncc}")
    if not (np.isfinite(max_residual) and max_residual > 0):
        raise InputError(f"max_residual: expected a number > 0, got {max_residual}")
    if anchor is not None and not 0 <= anchor < n:
        raise InputError(f"anchor: tile index {anchor} outside [0, {n})")
    if pairs is None:
        pairs = candidate_pairs(mosaic, max_shift=ms)
    meas = measure_pairs(mosaic, pairs, max_shift=ms, backend=name, algorithm=algorithm,
                         progress=progress)
    status = _classify(meas, ms, min_ncc)
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
    seconds = {"pairwise": meas.seconds, "solve": t2 - t1, "quality": t3 - t2,
               "total": time.perf_counter() - t0}
    result = RegistrationResult(new, positions, nominal, edges, unregistered, detached,
                                solved.anchor, before, after, ms, float(max_residual), name,
                                seconds)
    _warn(result, n)
    return result


def _classify(meas: PairMeasurements, max_shift: np.ndarray, min_ncc: float) -> np.ndarray:
    """Status of every measured pair before the solve (``kept`` or why not)."""
    status = np.full(len(meas), "kept", dtype=object)
    status[meas.window[:, 0] == 0] = "too_small"
    status[(status == "kept") & ~np.isfinite(meas.ncc)] = "no_match"
    status[(status == "kept") & (meas.ncc < min_ncc)] = "low_ncc"
    # A true shift within max_shift is measured within max_shift + ~0.1 px; one beyond the
    # search range (max_shift + 2 px) leaves the best match on its wall.
    beyond = meas.at_limit | np.any(np.abs(np.nan_to_num(meas.shift)) > max_shift + AT_LIMIT,
                                    axis=1)
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
