"""Searching pairs without a known range: binned tiles first, then full resolution, wider
retries (:func:`search_pairs`, used by :func:`~gpufusion.registration.register_mosaic`).

Every measurement goes through :func:`~gpufusion.registration.pairwise.measure_pairs`, one
call per pass over a set of pairs, each pair with its own expected offset and range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layout import Mosaic
from ..progress import Progress
from .pairwise import PairMeasurements, measure_pairs, translation_positions

__all__ = ["SearchResult", "bin_factor", "binned_mosaic", "concat_measurements",
           "replace_rows", "search_pairs"]


#: Binned tiles keep at least this many pixels along an axis (factor a power of 2, <= 8).
BINNED_SIZE = 192
MAX_BIN = 8
#: Ranges above this many pixels along an axis are searched on binned tiles first.
COARSE_ABOVE = 40.0
#: A binned search must leave this fraction of the smaller tile shared (chance slivers).
COARSE_SHARED = 0.02
#: A pair at the wall of its range is searched again with this many times the range, at
#: most WIDEN_STEPS times (never beyond the upper bound).
WIDEN = 4.0
WIDEN_STEPS = 2
#: Wide searches score the aliases of this many phase-correlation peaks: where the tiles
#: share a small part of the window, the true peak need not be the highest.
WIDE_PEAKS = 16


class _BinnedSource:
    """A tile seen as block means of ``factor`` pixels per axis (whole blocks only)."""

    def __init__(self, source: Any, factor: np.ndarray) -> None:
        self.source = source
        self.factor = tuple(int(f) for f in factor)
        self.shape = tuple(int(n) // f for n, f in zip(source.shape, self.factor, strict=True))
        self.dtype = np.dtype(np.float32)
        self.name = source.name

    def read(self, window: tuple[slice, ...]) -> np.ndarray:
        big = tuple(slice(int(w.start) * f, int(w.stop) * f)
                    for w, f in zip(window, self.factor, strict=True))
        x = np.asarray(self.source.read(big), dtype=np.float32)
        split = [v for n, f in zip(x.shape, self.factor, strict=True) for v in (n // f, f)]
        return x.reshape(split).mean(axis=tuple(range(1, 2 * x.ndim, 2)))


def bin_factor(mosaic: Mosaic) -> np.ndarray:
    """Per-axis binning of the first, wide search: a power of 2 (at most ``MAX_BIN``) that
    keeps at least ``BINNED_SIZE`` pixels of the smallest tile.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> bin_factor(mosaic_from_positions([np.zeros((24, 1024))], [(0, 0)])).tolist()
    [1, 4]
    """
    small = mosaic.tile_shapes.min(axis=0).astype(np.float64)
    f = 2.0 ** np.floor(np.log2(np.maximum(small / BINNED_SIZE, 1.0)))
    return np.minimum(f, MAX_BIN).astype(np.int64)


def binned_mosaic(mosaic: Mosaic, factor: np.ndarray,
                  positions: np.ndarray | None = None) -> Mosaic:
    """``mosaic`` with every tile binned by ``factor`` (lazily, per read) and its positions
    divided by it."""
    from ..layout import mosaic_from_positions

    pos = translation_positions(mosaic) if positions is None else positions
    f = np.asarray(factor, dtype=np.int64)
    return mosaic_from_positions([_BinnedSource(t.source, f) for t in mosaic.tiles], pos / f,
                                 names=[t.name for t in mosaic.tiles])


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search_pairs` found: the measurements and where each pair was searched.

    Attributes
    ----------
    meas : PairMeasurements
    center : ndarray (m, ndim)
        Offset each pair's final (full-resolution) search was centred on.
    reach : ndarray (m, ndim)
        Half-width of that search (px): a measured offset beyond ``center +- reach`` is at
        the wall of the range.
    widened : ndarray of bool (m,)
        Pairs searched again with a wider range because their first answer was at its wall.
    """

    meas: PairMeasurements
    center: np.ndarray
    reach: np.ndarray
    widened: np.ndarray


def search_pairs(
    mosaic: Mosaic,
    pairs: np.ndarray,
    reach: np.ndarray,
    bound: np.ndarray,
    *,
    center: np.ndarray | None = None,
    backend: str = "numpy",
    algorithm: str = "auto",
    progress: bool | Progress = False,
) -> SearchResult:
    """Measure ``pairs`` within ``center +- reach`` (per pair and axis), coarse to fine.

    Ranges above ``COARSE_ABOVE`` px are first searched on tiles binned by
    :func:`bin_factor` (phase correlation of nearly whole tiles, cheap), then the pair is
    measured at full resolution within a few binned pixels of that answer. A pair whose
    full-resolution answer lies at the wall of its range is searched again with ``WIDEN``
    times the range (at full resolution, up to ``bound`` per axis) before it is given up.
    """
    pos = translation_positions(mosaic)
    m, d = len(pairs), mosaic.ndim
    nominal = pos[pairs[:, 1]] - pos[pairs[:, 0]] if m else np.zeros((0, d))
    center = nominal.copy() if center is None else np.asarray(center, np.float64).copy()
    reach = np.minimum(np.asarray(reach, np.float64), bound).copy()
    f = bin_factor(mosaic)
    coarse = np.any(reach > COARSE_ABOVE, axis=1) & np.any(f > 1)
    seconds = read = 0.0
    if coarse.any():
        idx = np.flatnonzero(coarse)
        small = binned_mosaic(mosaic, f, pos)
        limit = small.tile_shapes.min(axis=0) - 1
        c = measure_pairs(small, pairs[idx], max_shift=np.minimum(np.ceil(reach[idx] / f),
                                                                    limit),
                          expected=center[idx] / f, backend=backend, algorithm=algorithm,
                          n_peaks=WIDE_PEAKS, progress=progress,
                          min_shared_fraction=COARSE_SHARED,
                          label=f"registering pairs (binned {'x'.join(map(str, f[::-1]))})")
        seconds, read = c.seconds, c.read_seconds
        ok = np.isfinite(c.ncc) & ~c.at_limit
        center[idx[ok]] = c.offset[ok] * f
        # found: within a few binned pixels; not found: a moderate range around the centre
        reach[idx] = np.where(ok[:, None], 2.0 * f + 2.0, np.minimum(reach[idx], COARSE_ABOVE))
    wide = np.any(reach > COARSE_ABOVE, axis=1)
    meas = measure_pairs(mosaic, pairs, max_shift=reach, expected=center, backend=backend,
                         algorithm=algorithm, progress=progress,
                         n_peaks=WIDE_PEAKS if wide.any() else 2,
                         min_shared_fraction=np.where(wide, COARSE_SHARED, 0.0))
    seconds += meas.seconds
    read += meas.read_seconds
    widened = np.zeros(m, dtype=bool)
    for _ in range(WIDEN_STEPS):
        wall = meas.at_limit & np.any(reach < bound, axis=1)
        if not wall.any():
            break
        idx = np.flatnonzero(wall)
        widened[idx] = True
        reach[idx] = np.minimum(reach[idx] * WIDEN, bound)
        again = measure_pairs(mosaic, pairs[idx], max_shift=reach[idx], expected=center[idx],
                              backend=backend, algorithm=algorithm, progress=progress,
                              label="searching wider", n_peaks=WIDE_PEAKS,
                              min_shared_fraction=COARSE_SHARED)
        seconds += again.seconds
        read += again.read_seconds
        meas = replace_rows(meas, idx, again)
    meas = dataclasses.replace(meas, seconds=seconds, read_seconds=read)
    return SearchResult(meas, center, reach, widened)


def replace_rows(meas: PairMeasurements, idx: np.ndarray,
                 new: PairMeasurements) -> PairMeasurements:
    """``meas`` with rows ``idx`` taken from ``new`` (measured for ``meas.pairs[idx]``)."""
    fields = {}
    for name in ("shift", "ncc", "peak", "window", "at_limit"):
        arr = getattr(meas, name).copy()
        arr[idx] = getattr(new, name)
        fields[name] = arr
    return dataclasses.replace(meas, **fields)


def concat_measurements(parts: Sequence[PairMeasurements]) -> PairMeasurements:
    """One :class:`PairMeasurements` of several, rows in order (times added up)."""
    first = parts[0]
    arrays = {name: np.concatenate([getattr(p, name) for p in parts])
              for name in ("pairs", "nominal", "shift", "ncc", "peak", "window", "at_limit")}
    return dataclasses.replace(first, seconds=sum(p.seconds for p in parts),
                               read_seconds=sum(p.read_seconds for p in parts), **arrays)
