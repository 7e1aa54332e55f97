"""Pairwise registration: offsets of overlapping tiles, batched over many pairs.

For each candidate pair ``(i, j)`` the nominal overlap box, widened by ``max_shift`` on every
side, is cut from both tiles (zero where a tile has no pixels, each tile's part
mean-subtracted) and rounded up to an FFT-friendly shape. With ``a`` the window of tile ``i``
and ``b`` that of tile ``j``, the shift ``s`` with ``b(u) ~ a(u + s)`` gives the offset::

    t_j - t_i = s + start_i - start_j        (start_* = window origins in tile pixels)

and the pair's *shift* (its correction) is that offset minus the nominal one. The expected
``s`` is ~0, so the overlap sits in the middle of both windows.

Where white noise dominates a window's pixel-to-pixel differences (smooth content imaged
with noise; :func:`_noise_share`), both windows are smoothed alike by a Gaussian of up to
``SMOOTH_SIGMA`` px before the steps below (see the constants' comment); sharp or clean
content is used as read.

Per batch of same-shape windows (one ``(B, *L)`` array; on CuPy every step is a few batched
calls, on NumPy the same code runs through ``scipy.fft``):

1. Phase correlation (Kuglin & Hines 1975): Hann window, real FFTs, normalised cross-power
   spectrum ``A conj(B) / |A conj(B)|``, inverse FFT. The surface is periodic in ``L``, so
   a peak ``c`` stands for every translation ``c + k L``. Only peaks with an alias inside the
   allowed range ``nominal +- (max_shift + 2)`` count; the ``n_peaks`` highest are kept.
   (The 2 px beyond ``max_shift`` let a shift of up to ``max_shift`` be climbed to and
   refined; a pair whose best match lies on the wall of the range is flagged ``at_limit``:
   its true shift is probably larger.)
2. Every alias of those peaks inside the range (the wrap-around alternatives MIST tests,
   Chalfoun et al. 2017, Sci. Rep. 7:4988) is scored by the normalised cross-correlation
   (NCC) of the pixels both tiles fill at that shift; the best one is then moved to its best
   neighbour while the NCC rises (MIST's hill climbing). Its NCC is the pair's confidence.
3. Sub-pixel: the maximum of a quadratic fitted to the 3^ndim NCC values around the best
   integer shift, refined by Gauss-Newton (Lucas-Kanade) on the normalised overlap
   (:mod:`gpufusion.registration.refine`). On smooth, low-texture content the
   phase-correlation peak is broad and biased; these two steps are not.

A search may be centred on any expected offset (``expected``, per pair) with its own range
(``max_shift`` per pair and axis); "nominal" above then means that offset.
:func:`gpufusion.registration.search.search_pairs` runs the search without a known range:
tiles binned first (phase correlation of nearly whole tiles, shifts up to half a tile),
then full resolution within a few binned pixels of that answer, and pairs whose answer is at
the wall of their range searched again wider.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage

from ..backends import BACKENDS, gpu_status
from ..errors import InputError
from ..layout import Mosaic
from ..progress import Progress
from ..spatial import overlapping_pairs
from .refine import ALGORITHMS as ALGORITHM_NAMES
from .refine import (
    Batch,
    hill_climb,
    host,
    lucas_kanade,
    quadratic_peak,
    score,
    shared_range,
)

__all__ = [
    "PairMeasurements",
    "candidate_pairs",
    "default_max_shift",
    "measure_pairs",
    "translation_positions",
]

#: Pairs that cannot overlap by this much along every axis (nominal overlap + max_shift)
#: are not correlated.
MIN_WINDOW = 8
#: The search for a pair's shift reaches this many pixels beyond ``max_shift``.
SEARCH_BEYOND = 2.0
#: Steps of NCC hill climbing at most (or the width of the search range, if larger).
CLIMB_STEPS = 64
#: Noisy pairs: both windows are smoothed by a Gaussian of up to this sigma (px) before NCC
#: scoring, hill climbing and sub-pixel refinement, ramped in as the noise share of the
#: pixel-to-pixel differences (:func:`_noise_share`, the larger of the two windows') goes
#: from NOISE_SHARE[0] to NOISE_SHARE[1]. Pixel noise is independent from one shift to the
#: next, so where it dominates the differences it makes the NCC surface jagged (the climb
#: stops on a noise bump, the quadratic fits noise) and the Lucas-Kanade gradients noisy;
#: smoothing both windows alike keeps their offset. Tiles with sharp detail (noise share
#: well below 0.5) are left as they are: there, low-pass weighting lets shading differences
#: between the tiles pull the offset. (Phase correlation is whitened: smoothing cancels.)
SMOOTH_SIGMA = 2.0
NOISE_SHARE = (0.7, 0.9)
NOISE_SAMPLES = 2**14
ALGORITHMS = ("auto", *ALGORITHM_NAMES)


@dataclass(frozen=True)
class PairMeasurements:
    """What pairwise registration measured for each candidate pair.

    Attributes
    ----------
    pairs : ndarray of int64, shape (m, 2)
        Tile indices ``(i, j)``, ``i < j``.
    nominal : ndarray of float64, shape (m, ndim)
        Nominal offsets ``p_j - p_i`` (index order).
    shift : ndarray of float64, shape (m, ndim)
        Measured correction of each offset: measured offset = ``nominal + shift``. NaN where
        nothing could be measured (window too small, no candidate with enough shared pixels).
    ncc : ndarray of float64, shape (m,)
        Confidence: NCC of the shared pixels at the chosen integer shift, in ``[-1, 1]``;
        NaN where a window has no variance (blank tile) or nothing was measured.
    peak : ndarray of float64, shape (m,)
        Height of the highest allowed phase-correlation peak (1 for a perfect, noise-free
        match of the whole windows; NaN where not computed).
    window : ndarray of int64, shape (m, ndim)
        Shape of the correlated windows (0 where the pair was too small).
    at_limit : ndarray of bool, shape (m,)
        The best match lies on the wall of the search range (``max_shift`` + 2 px): the
        NCC still rose towards larger shifts, so the true shift is probably beyond
        ``max_shift``.
    backend : str
        ``numpy`` or ``cupy``.
    seconds : float
        Wall time of the measurement.
    read_seconds : float
        Part of ``seconds`` spent reading the windows from the tiles.
    """

    pairs: np.ndarray
    nominal: np.ndarray
    shift: np.ndarray
    ncc: np.ndarray
    peak: np.ndarray
    window: np.ndarray
    at_limit: np.ndarray
    backend: str
    seconds: float
    read_seconds: float = 0.0

    @property
    def offset(self) -> np.ndarray:
        """Measured offsets ``t_j - t_i`` (nominal + shift)."""
        return self.nominal + self.shift

    def __len__(self) -> int:
        return len(self.pairs)


def translation_positions(mosaic: Mosaic) -> np.ndarray:
    """World positions of the tiles of a translation-only mosaic.

    Raises
    ------
    InputError
        If a tile's affine has a linear part other than the identity (registration
        corrects translations only).

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> m = mosaic_from_positions([np.zeros((8, 8))] * 2, [(0, 0), (0, 6.5)])
    >>> translation_positions(m).tolist()
    [[0.0, 0.0], [0.0, 6.5]]
    """
    d = mosaic.ndim
    for t in mosaic.tiles:
        if not np.allclose(t.affine[:d, :d], np.eye(d), atol=1e-9):
            raise InputError(
                f"{t.name}: registration corrects translations only; this tile's transform "
                "rotates, scales or shears"
            )
    return mosaic.positions().astype(np.float64)


def default_max_shift(mosaic: Mosaic) -> np.ndarray:
    """The default ``max_shift``: 10 % of the smallest tile's size along each axis.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> m = mosaic_from_positions([np.zeros((20, 300))] * 2, [(0, 0), (0, 270)])
    >>> default_max_shift(m).tolist()
    [2.0, 30.0]
    """
    return np.maximum(np.floor(0.1 * mosaic.tile_shapes.min(axis=0)), 1.0)


def candidate_pairs(
    mosaic: Mosaic,
    *,
    max_shift: float | Sequence[float] = 0.0,
    min_overlap: float = 8.0,
    min_overlap_fraction: float = 0.02,
    positions: np.ndarray | None = None,
) -> np.ndarray:
    """Pairs of tiles whose footprints overlap enough to be registered.

    A pair qualifies when its footprints at ``positions`` (default: the mosaic's own)
    overlap, or come within ``max_shift`` of overlapping, by more than ``min_overlap``
    pixels along every axis (``nominal overlap + max_shift > min_overlap``), and the
    overlap -- each extent taken as at least ``min_overlap``, and where the tiles only
    touch or leave a gap along one axis (and overlap along the others), as ``max_shift``
    there -- holds at
    least ``min_overlap_fraction`` of the smaller tile's pixels. The fraction keeps the
    side neighbours of a grid (10 % overlap: 10 % of the tile) and drops the diagonal ones
    (1 %), whose small corner overlaps give unreliable shifts.

    Parameters
    ----------
    mosaic : Mosaic
    max_shift : float or sequence of float
        Expected error of a pair's offset (pixels, per axis or for all): pairs whose
        nominal overlap is that much too small still count.
    min_overlap : float
        Minimum overlap in pixels along each axis.
    min_overlap_fraction : float
        Minimum overlap volume as a fraction of the smaller tile.
    positions : ndarray, shape (n, ndim), optional

    Returns
    -------
    ndarray of int64, shape (m, 2)
        ``(i, j)`` with ``i < j``, sorted.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> pos = [(0, 0), (0, 90), (90, 0), (90, 96)]
    >>> m = mosaic_from_positions([np.zeros((100, 100))] * 4, pos)
    >>> candidate_pairs(m).tolist()
    [[0, 1], [0, 2], [1, 3]]
    >>> candidate_pairs(m, max_shift=10).tolist()   # tiles 2 and 3 may overlap by 14 px
    [[0, 1], [0, 2], [1, 3], [2, 3]]
    """
    pos = translation_positions(mosaic) if positions is None else np.asarray(positions, float)
    shapes = mosaic.tile_shapes.astype(np.float64)
    grow = np.broadcast_to(np.asarray(max_shift, dtype=np.float64), (mosaic.ndim,)) / 2
    lo, hi = pos, pos + shapes - 1.0
    pairs = overlapping_pairs(lo - grow, hi + grow, min_overlap)
    if len(pairs) == 0:
        return pairs
    i, j = pairs[:, 0], pairs[:, 1]
    ext = np.minimum(hi[i], hi[j]) - np.maximum(lo[i], lo[j]) + 1.0
    # tiles that only touch (or leave a gap) along one axis, and overlap along the others,
    # may overlap by max_shift there; a grid's diagonal neighbours (gaps along two axes)
    # are not widened, so they stay out
    rows = np.arange(len(pairs))
    narrow = np.argmin(ext, axis=1)
    gap = np.sum(ext < min_overlap, axis=1) == 1  # touching along one axis only
    ext[rows[gap], narrow[gap]] = 2 * grow[narrow[gap]]
    ext = np.minimum(np.maximum(ext, min_overlap), np.minimum(shapes[i], shapes[j]))
    volume = np.prod(ext, axis=1)
    smaller = np.minimum(np.prod(shapes[i], axis=1), np.prod(shapes[j], axis=1))
    return pairs[volume >= min_overlap_fraction * smaller]


# ----------------------------------------------------------------------------------------
# Backend: the array module and its FFTs (CuPy imported lazily, only when asked for)


class _Ops:
    """Array module and FFTs of one backend (``scipy.fft`` on all cores, or ``cupy.fft``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "cupy":
            import cupy

            self.xp: Any = cupy
            self._fft: Any = cupy.fft
        else:
            self.xp = np
            self._fft = None

    def rfftn(self, x: Any, axes: tuple[int, ...]) -> Any:
        if self._fft is None:
            return scipy.fft.rfftn(x, axes=axes, workers=-1)
        return self._fft.rfftn(x, axes=axes)

    def irfftn(self, x: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
        if self._fft is None:
            return scipy.fft.irfftn(x, s=shape, axes=axes, workers=-1)
        return self._fft.irfftn(x, s=shape, axes=axes)


def resolve_registration_backend(backend: str) -> str:
    """``numpy`` or ``cupy`` for ``auto|numpy|cupy`` (``auto``: the GPU when usable).

    Examples
    --------
    >>> resolve_registration_backend("numpy")
    'numpy'
    """
    if backend not in BACKENDS:
        raise InputError(f"backend: unknown {backend!r}; choose one of {', '.join(BACKENDS)}")
    # --- scale-out hook: inside distributed.on_cluster the workers' backend (resolved there)
    from .distributed import active_cluster

    if active_cluster() is not None:
        return active_cluster().backend  # type: ignore[union-attr]
    # --- end of the scale-out hook
    if backend == "numpy":
        return "numpy"
    ok, why = gpu_status()
    if ok:
        return "cupy"
    if backend == "cupy":
        raise InputError(f"backend cupy: {why}")
    return "numpy"


# ----------------------------------------------------------------------------------------
# Window planning


@dataclass(frozen=True)
class _Windows:
    """Where each pair's two windows lie (window coordinates: ``u`` in ``[0, shape)``)."""

    start_i: np.ndarray  # (m, d) int64: window pixel u is pixel start_i + u of tile i
    start_j: np.ndarray  # (m, d) int64: likewise in tile j
    shape: np.ndarray  # (m, d) int64: common window shape (0 when the overlap is too small)
    a_lo: np.ndarray  # (m, d) int64: tile i's pixels fill [a_lo, a_hi) of its window
    a_hi: np.ndarray
    b_lo: np.ndarray  # (m, d) int64: tile j's pixels fill [b_lo, b_hi) of its window
    b_hi: np.ndarray
    s_lo: np.ndarray  # (m, d) float: allowed range of the window shift s
    s_hi: np.ndarray


def _plan_windows(pos: np.ndarray, shapes: np.ndarray, pairs: np.ndarray,
                  max_shift: np.ndarray, expected: np.ndarray | None = None) -> _Windows:
    """One world box per pair: the nominal overlap widened by ``max_shift`` on every side.

    Both tiles are cut to that box (zero outside a tile), so the expected window shift is
    ~0 and the overlap sits in the middle of both windows, where the apodising window
    keeps it; the length is rounded up to an FFT-friendly size. ``max_shift`` is one value
    per axis (d,) or per pair and axis (m, d); ``expected`` (m, d), the offsets
    ``t_j - t_i`` to centre the search on (default: the nominal ``pos[j] - pos[i]``).
    """
    i, j = pairs[:, 0], pairs[:, 1]
    pi = pos[i]
    pj = pos[j] if expected is None else pi + expected
    ni, nj = shapes[i], shapes[j]
    lo = np.maximum(pi, pj)  # nominal overlap box (world pixel centres)
    hi = np.minimum(pi + ni - 1, pj + nj - 1)
    margin = np.ceil(max_shift).astype(np.int64)
    length = np.round(hi - lo).astype(np.int64) + 1 + 2 * margin  # lo > hi: a gap
    # too small: the tiles cannot share MIN_WINDOW pixels along an axis at any allowed shift
    too_small = np.any(np.round(hi - lo) + 1 + max_shift < MIN_WINDOW, axis=1)
    length[too_small] = 0
    fast = {int(n): scipy.fft.next_fast_len(int(n), real=True) if n > 0 else 0
            for n in np.unique(length)}
    padded = np.vectorize(fast.__getitem__, otypes=[np.int64])(length)
    extra = (padded - length) // 2
    si = np.round(lo - pi).astype(np.int64) - margin - extra
    sj = np.round(lo - pj).astype(np.int64) - margin - extra
    s0 = (pj - pi) + sj - si  # window shift when the nominal offset is right (|s0| < 1)
    tol = SEARCH_BEYOND
    return _Windows(
        si, sj, padded,
        np.clip(-si, 0, padded), np.clip(ni - si, 0, padded),
        np.clip(-sj, 0, padded), np.clip(nj - sj, 0, padded),
        s0 - max_shift - tol, s0 + max_shift + tol,
    )


def _read_window(mosaic: Mosaic, tile: int, start: np.ndarray, shape: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Tile pixels in window ``[start, start + shape)``, mean-subtracted, zero outside."""
    out = np.zeros(tuple(int(n) for n in shape), dtype=np.float32)
    inner = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    window = tuple(slice(int(s + a), int(s + b)) for s, a, b in zip(start, lo, hi, strict=True))
    if all(b > a for a, b in zip(lo, hi, strict=True)):
        pixels = np.asarray(mosaic.tiles[tile].source.read(window), dtype=np.float32)
        out[inner] = pixels - pixels.mean(dtype=np.float64)
    return out


def _noise_share(x: np.ndarray) -> float:
    """Share of white noise in the pixel-to-pixel differences of ``x``, about 0 (smooth or
    sharp content, no noise) to 1 (noise only).

    The noise variance comes from the median absolute second difference (robust to sparse
    sharp detail; ``var = 6 sigma**2`` for white noise), the total from the mean squared
    first difference (``2 sigma**2`` + the content's), summed over the axes; each axis from
    lines spread over ``x``, about NOISE_SAMPLES values.
    """
    noise = total = 0.0
    for ax in range(x.ndim if x.size else 0):
        if x.shape[ax] < 3:
            continue
        step = max(1, int((x.size / NOISE_SAMPLES) ** (1 / max(x.ndim - 1, 1))))
        lines = x[tuple(slice(None) if t == ax else slice(None, None, step)
                        for t in range(x.ndim))]
        d1 = np.diff(lines, axis=ax)
        d2 = np.diff(d1, axis=ax)
        noise += 2.0 * (1.4826 * float(np.median(np.abs(d2)))) ** 2 / 6.0
        total += float(np.mean(np.square(d1, dtype=np.float64)))
    return noise / total if total > 0 else 0.0


def _smooth(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed ``pixels`` (truncated at 3 sigma). Beyond their edges the pixels are
    continued by point reflection (``2 x[0] - x[k]``), exact for a linear ramp, so the edges
    of a tile inside the overlap bias no shared pixel to first order."""
    r = int(3.0 * sigma + 0.5)
    pad = [(min(r, n - 1), min(r, n - 1)) for n in pixels.shape]
    x = np.pad(pixels, pad, mode="reflect", reflect_type="odd")
    x = scipy.ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3.0)
    return x[tuple(slice(u, u + n) for (u, _), n in zip(pad, pixels.shape, strict=True))]


# ----------------------------------------------------------------------------------------
# Batched steps (xp = numpy or cupy)


def _hann_stack(xp: Any, x: Any) -> Any:
    """Multiply a window stack (B, *L) by a separable Hann window over ``L``."""
    shape = x.shape[1:]
    for ax, n in enumerate(shape):
        w = np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2
        x = x * xp.asarray(w.astype(np.float32)).reshape((n,) + (1,) * (len(shape) - ax - 1))
    return x


def _phase_correlation(ops: _Ops, a: Any, b: Any) -> Any:
    """Phase-correlation surface (B, *L) of Hann-windowed stacks: peak at ``s`` mod ``L``."""
    xp = ops.xp
    axes = tuple(range(1, a.ndim))
    r = ops.rfftn(_hann_stack(xp, a), axes) * xp.conj(ops.rfftn(_hann_stack(xp, b), axes))
    mag = xp.abs(r)
    floor = mag.max(axis=axes, keepdims=True) * np.float32(1e-7) + np.float32(1e-30)
    r = r / xp.maximum(mag, floor)
    return ops.irfftn(r.astype(xp.complex64), a.shape[1:], axes)


def _allowed_mask(xp: Any, batch: Batch) -> Any:
    """(B, *L) mask of the surface indices ``c`` with an alias ``c + k L`` in the allowed
    range that leaves both tiles at least 3 shared pixels along every axis.

    Peaks elsewhere are artefacts (e.g. where the edges of the two tiles' pixels meet).
    """
    shape = batch.shape
    mask = None
    for ax, n in enumerate(shape):
        c = np.arange(n, dtype=np.float64)[None, :, None]
        k = np.arange(-2, 3)[None, None, :]  # |s| <= L + 1: aliases k in -2..2 suffice
        s = c + k * n  # (1, L, 5)
        lo, hi = (v[:, ax, None, None] for v in (batch.s_lo, batch.s_hi))
        u0, u1 = shared_range(s, *(v[:, ax, None, None] for v in
                                   (batch.a_lo, batch.a_hi, batch.b_lo, batch.b_hi)))
        ok = np.any((s >= lo) & (s <= hi) & (u1 - u0 >= 3), axis=2)  # (B, L)
        ok = ok.reshape((len(ok),) + (1,) * ax + (n,) + (1,) * (len(shape) - ax - 1))
        mask = ok if mask is None else mask & ok
    return xp.asarray(mask)


def _top_peaks(xp: Any, surface: Any, mask: Any, n_peaks: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_peaks`` highest allowed maxima: indices (B, n, d) and heights (B, n).

    The 3^d neighbourhood (with wrap-around) of each peak is removed before the next.
    """
    nb, shape = surface.shape[0], surface.shape[1:]
    s = xp.where(mask, surface, -np.inf).reshape(nb, -1)
    bidx = xp.arange(nb)
    offsets = xp.asarray(np.array(list(itertools.product((-1, 0, 1), repeat=len(shape)))))
    strides = xp.asarray(np.cumprod((1,) + shape[:0:-1])[::-1].copy())  # C-order strides
    idx, val = [], []
    for _ in range(n_peaks):
        flat = xp.argmax(s, axis=1)
        val.append(s[bidx, flat])
        coords = xp.stack(xp.unravel_index(flat, shape), axis=1)  # (B, d)
        idx.append(coords)
        around = (coords[:, None, :] + offsets[None]) % xp.asarray(shape)
        s[bidx[:, None], (around * strides).sum(axis=-1)] = -np.inf
    peaks = np.stack([host(xp, c) for c in idx], axis=1).astype(np.int64)
    heights = np.stack([host(xp, v) for v in val], axis=1).astype(np.float64)
    return peaks, heights


def _aliases(peaks: np.ndarray, heights: np.ndarray, batch: Batch) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Integer shifts to score: the aliases ``c + k L`` of every peak in the allowed range.

    Returns shifts (B, K, d) and validity (B, K).
    """
    nb, npk, d = peaks.shape
    per_axis = []
    for ax in range(d):
        n = batch.shape[ax]
        c = peaks[:, :, ax].astype(np.float64)  # (B, P)
        k0 = np.ceil((batch.s_lo[:, None, ax] - c) / n)
        per_axis.append(c[..., None] + (k0[..., None] + np.arange(3)) * n)  # (B, P, 3)
    combos = list(itertools.product(range(3), repeat=d))
    shifts = np.stack([np.stack([per_axis[ax][..., q] for ax, q in enumerate(combo)], -1)
                       for combo in combos], axis=2).reshape(nb, -1, d).astype(np.int64)
    valid = batch.valid(shifts) & np.repeat(np.isfinite(heights), len(combos), axis=1)
    used = valid.any(axis=0)  # keep only the columns some pair uses
    return shifts[:, used], valid[:, used]


# ----------------------------------------------------------------------------------------


def measure_pairs(
    mosaic: Mosaic,
    pairs: np.ndarray | None = None,
    *,
    max_shift: float | Sequence[float] | np.ndarray | None = None,
    expected: np.ndarray | None = None,
    backend: str = "numpy",
    n_peaks: int = 2,
    algorithm: str = "auto",
    batch_pixels: int | None = None,
    progress: bool | Progress = False,
    label: str = "registering pairs",
    min_shared_fraction: float | np.ndarray = 0.0,
) -> PairMeasurements:
    """Measure the offset of every candidate pair (see the module docs for the method).

    Every pair is measured on its own, so any subset of pairs (a slice of ``pairs`` with the
    matching rows of ``max_shift`` and ``expected``) can be measured separately, e.g. in
    batches on several workers, and the rows put back together.

    Parameters
    ----------
    mosaic : Mosaic
        Translation-only mosaic at its nominal (stage) positions.
    pairs : ndarray of int, shape (m, 2), optional
        Pairs to measure (default: :func:`candidate_pairs` with ``max_shift``).
    max_shift : float, sequence of float or ndarray (m, ndim), optional
        Largest expected error of a pair's offset, in pixels, for all axes, per axis, or
        per pair and axis (then ``pairs`` must be given) (default :func:`default_max_shift`).
        With per-tile stage errors of up to ``E``, pairs can be off by ``2 E``. 0 measures
        nothing and scores the offsets searched around.
    expected : ndarray (m, ndim), optional
        Offsets ``t_j - t_i`` to search around (default: the nominal ones). ``shift`` is
        still reported against the nominal offsets.
    backend : {"numpy", "cupy", "auto"}
    n_peaks : int
        Phase-correlation peaks whose aliases are scored by NCC.
    algorithm : {"auto", "slices", "batched"}
        How shifts are scored and refined (same result; ``auto``: ``slices`` on NumPy,
        ``batched`` on CuPy).
    batch_pixels : int, optional
        Window pixels per batch (default 2**23 on NumPy, 2**26 on CuPy).
    progress : bool or Progress
        Show a ``label`` line on stderr (pairs done/total, rate, ETA; counted per batch;
        :class:`gpufusion.progress.Progress`); or count on this open line (its total grows
        by the pairs measured here).
    label : str
        What the progress line calls this step.
    min_shared_fraction : float or ndarray (m,)
        A shift must leave this fraction of the smaller tile's pixels shared (at least
        ``refine.MIN_SHARED_PIXELS``); wide searches use it against chance matches of slivers.

    Returns
    -------
    PairMeasurements

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> syn = make_mosaic((1, 2), (128, 128), overlap=0.2, stage_error=4, seed=3)
    >>> m = measure_pairs(syn.mosaic(syn.stage_positions), max_shift=10)
    >>> true = syn.positions[1] - syn.positions[0]
    >>> bool(abs(m.offset[0] - true).max() < 0.05), bool(m.ncc[0] > 0.9)
    (True, True)
    """
    # --- scale-out hook: inside distributed.on_cluster, measured by the cluster's workers
    from .distributed import active_cluster

    if (cluster := active_cluster()) is not None:
        return cluster.measure(mosaic, pairs, max_shift=max_shift, expected=expected,
                               n_peaks=n_peaks, algorithm=algorithm, batch_pixels=batch_pixels,
                               progress=progress, label=label,
                               min_shared_fraction=min_shared_fraction)
    # --- end of the scale-out hook
    t0 = time.perf_counter()
    pos = translation_positions(mosaic)
    d = mosaic.ndim
    per_pair = max_shift is not None and np.ndim(max_shift) == 2
    if per_pair and pairs is None:
        raise InputError("max_shift: one row per pair needs the pairs")
    ms = None if per_pair else check_max_shift(max_shift, mosaic)
    if pairs is None:
        pairs = candidate_pairs(mosaic, max_shift=ms)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= len(mosaic)
                       or np.any(pairs[:, 0] == pairs[:, 1])):
        raise InputError(f"pairs: expected pairs of two different tile indices in "
                         f"[0, {len(mosaic)})")
    if algorithm not in ALGORITHMS:
        raise InputError(f"algorithm: unknown {algorithm!r}; choose one of "
                         f"{', '.join(ALGORITHMS)}")
    if n_peaks < 1:
        raise InputError(f"n_peaks: must be >= 1, got {n_peaks}")
    name = resolve_registration_backend(backend)
    ops = _Ops(name)
    if algorithm == "auto":
        algorithm = "batched" if name == "cupy" else "slices"
    budget = batch_pixels or (2**26 if name == "cupy" else 2**23)

    m = len(pairs)
    ms = _pair_max_shift(max_shift if per_pair else ms, mosaic, pairs)
    nominal = pos[pairs[:, 1]] - pos[pairs[:, 0]] if m else np.zeros((0, d))
    if expected is not None:
        expected = np.asarray(expected, dtype=np.float64)
        if expected.shape != (m, d) or not np.all(np.isfinite(expected)):
            raise InputError(f"expected: need finite offsets of shape ({m}, {d}), got "
                             f"shape {expected.shape}")
    shift = np.full((m, d), np.nan)
    ncc = np.full(m, np.nan)
    peak = np.full(m, np.nan)
    at_limit = np.zeros(m, dtype=bool)
    shapes = mosaic.tile_shapes
    win = _plan_windows(pos, shapes, pairs, ms, expected)
    smaller = np.minimum(np.prod(shapes[pairs[:, 0]], axis=1),
                         np.prod(shapes[pairs[:, 1]], axis=1)).astype(np.float64)
    min_shared = np.broadcast_to(np.asarray(min_shared_fraction, np.float64) * smaller, (m,))
    read_seconds = 0.0
    groups: dict[tuple[int, ...], list[int]] = {}
    for p in np.flatnonzero(win.shape[:, 0] > 0):
        groups.setdefault(tuple(int(v) for v in win.shape[p]), []).append(int(p))
    todo = sum(len(g) for g in groups.values())
    if isinstance(progress, Progress):  # a line shared by several measurements: count on it
        progress.add_total(todo)
        line: Any = contextlib.nullcontext(progress)
    else:
        line = Progress(label, todo, unit="pairs", enabled=progress)
    with line as bar:
        for shape, members in groups.items():
            per_batch = max(1, budget // int(np.prod(shape)))
            for k in range(0, len(members), per_batch):
                idx = np.asarray(members[k : k + per_batch])
                t_read = time.perf_counter()
                batch = _load_batch(ops, mosaic, pairs, win, idx, algorithm, min_shared[idx])
                read_seconds += time.perf_counter() - t_read
                if np.any(ms[idx] > 0):
                    s, conf, height, wall = _register_batch(ops, batch, n_peaks)
                    at_limit[idx] = wall
                else:  # nothing may move: score the nominal offsets only
                    s = (batch.s_lo + batch.s_hi) / 2  # the nominal window shift, |s| < 1
                    near = np.round(s).astype(np.int64)[:, None, :]
                    conf = score(batch, near, batch.valid(near))[:, 0]
                    height = np.full(len(idx), np.nan)
                # t_j - t_i = s + start_i - start_j; shift = that minus the nominal offset
                shift[idx] = s + win.start_i[idx] - win.start_j[idx] - nominal[idx]
                ncc[idx] = conf
                peak[idx] = height
                bar.update(len(idx))
    shift[~np.isfinite(ncc)] = np.nan
    return PairMeasurements(pairs, nominal, shift, ncc, peak, win.shape, at_limit, name,
                            time.perf_counter() - t0, read_seconds)


def _pair_max_shift(max_shift: Any, mosaic: Mosaic, pairs: np.ndarray) -> np.ndarray:
    """``max_shift`` as one row per pair (m, d): per-axis values repeated, or a per-pair
    array checked (finite, >= 0, below both tiles' sizes)."""
    m, d = len(pairs), mosaic.ndim
    ms = np.asarray(max_shift, dtype=np.float64)
    if ms.ndim < 2:
        return np.broadcast_to(ms.reshape(-1)[:d] if ms.size == d else ms, (m, d)).copy()
    if ms.shape != (m, d) or not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise InputError(f"max_shift: expected finite numbers >= 0 of shape ({m}, {d}), got "
                         f"shape {ms.shape}")
    shapes = mosaic.tile_shapes
    if m and np.any(ms >= np.maximum(shapes[pairs[:, 0]], shapes[pairs[:, 1]])):
        raise InputError("max_shift: a pair's search range is not below the tile size")
    return ms


def _load_batch(ops: _Ops, mosaic: Mosaic, pairs: np.ndarray, win: _Windows, idx: np.ndarray,
                algorithm: str, min_shared: np.ndarray | None = None) -> Batch:
    a = np.stack([_read_window(mosaic, pairs[p, 0], win.start_i[p], win.shape[p], win.a_lo[p],
                               win.a_hi[p]) for p in idx])
    b = np.stack([_read_window(mosaic, pairs[p, 1], win.start_j[p], win.shape[p], win.b_lo[p],
                               win.b_hi[p]) for p in idx])
    for k, p in enumerate(idx):
        a_box = tuple(slice(int(u), int(v)) for u, v in zip(win.a_lo[p], win.a_hi[p], strict=True))
        b_box = tuple(slice(int(u), int(v)) for u, v in zip(win.b_lo[p], win.b_hi[p], strict=True))
        share = max(_noise_share(a[k][a_box]), _noise_share(b[k][b_box]))
        lo, hi = NOISE_SHARE
        sigma = SMOOTH_SIGMA * float(np.clip((share - lo) / (hi - lo), 0.0, 1.0))
        if sigma > 0:
            a[k][a_box] = _smooth(a[k][a_box], sigma)
            b[k][b_box] = _smooth(b[k][b_box], sigma)
    boxes = (win.a_lo[idx], win.a_hi[idx], win.b_lo[idx], win.b_hi[idx])
    return Batch(ops.xp, a, b, boxes, win.s_lo[idx], win.s_hi[idx], algorithm, min_shared)


def _register_batch(ops: _Ops, batch: Batch, n_peaks: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Window shifts ``s`` (B, d), NCC (B,), peak heights (B,) and whether the best match
    lies on the wall of the search range (B,) for one batch."""
    xp = ops.xp
    nb, d = len(batch), len(batch.shape)
    surface = _phase_correlation(ops, batch.a, batch.b)
    mask = _allowed_mask(xp, batch)
    peaks, heights = _top_peaks(xp, surface, mask, n_peaks)
    del surface, mask
    shifts, valid = _aliases(peaks, heights, batch)
    s_int = np.zeros((nb, d), np.int64)
    conf = np.full(nb, np.nan)
    if shifts.shape[1]:
        scores = score(batch, shifts, valid)
        best = np.argmax(np.where(np.isfinite(scores), scores, -np.inf), axis=1)
        s_int = shifts[np.arange(nb), best]
        conf = scores[np.arange(nb), best]
    # a wide range may need a longer climb (smooth content: a broad, rising NCC surface)
    reach = float(np.max(batch.s_hi - batch.s_lo, initial=0.0))
    s_int, conf = hill_climb(batch, s_int, conf, max(CLIMB_STEPS, int(reach)))
    ok = np.isfinite(conf)
    frac = quadratic_peak(batch, s_int, conf)
    frac, _ = lucas_kanade(batch, s_int, frac, ok)
    frac[~ok] = np.nan
    # the climb stopped because its next step would leave the allowed range
    wall = ok & np.any((s_int + 1 > batch.s_hi) | (s_int - 1 < batch.s_lo), axis=1)
    return s_int + frac, conf, heights[:, 0], wall


def check_max_shift(max_shift: float | Sequence[float] | None, mosaic: Mosaic) -> np.ndarray:
    """Validate ``max_shift`` and broadcast it to one value per axis (index order).

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> m = mosaic_from_positions([np.zeros((8, 8))], [(0, 0)])
    >>> check_max_shift(3, m).tolist()
    [3.0, 3.0]
    >>> thin = mosaic_from_positions([np.zeros((4, 64, 64))], [(0, 0, 0)])
    >>> check_max_shift(20, thin).tolist()   # one number: capped along z
    [3.0, 20.0, 20.0]
    """
    if max_shift is None:
        return default_max_shift(mosaic)
    try:
        ms = np.asarray(max_shift, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        ms = np.array([np.nan])
    if ms.size == 1:
        ms = np.repeat(ms, mosaic.ndim)
    if ms.size != mosaic.ndim or not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise InputError(
            f"max_shift: expected a finite number >= 0 or {mosaic.ndim} of them, got "
            f"{max_shift!r}"
        )
    largest = mosaic.tile_shapes.max(axis=0) if len(mosaic) else np.full(mosaic.ndim, np.inf)
    if np.size(max_shift) == 1 and mosaic.ndim == 3:
        # one number for every axis: capped along z, where stacks are often thin
        ms[0] = min(ms[0], max(largest[0] - 1, 0))
    too_big = np.flatnonzero(ms >= largest)
    if len(too_big):
        ax = int(too_big[0])
        name = "zyx"[3 - mosaic.ndim + ax]
        raise InputError(
            f"max_shift: {ms[ax]:g} px along {name} is not below the tile size "
            f"({int(largest[ax])} px); tiles that far off their stage position share no "
            "pixels with their neighbours"
        )
    return ms

