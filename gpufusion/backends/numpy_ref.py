"""NumPy reference backend: fuse one output chunk from its tile windows.

This is the reference every other backend is tested against, and the CPU fallback. It reads
the flat :class:`~gpufusion.plan.ChunkTable` of one chunk and the pixel windows it names, and
mirrors ``kernels/fuse.cu`` operation for operation:

* the accumulator dtype (:func:`accumulator_dtype`): float32 for 8- and 16-bit integer,
  float16 and float32 tiles; float64 for 32- and 64-bit integer and float64 tiles, whose
  values float32 cannot hold (16777217 would become 16777216). Samples, interpolation
  fractions, weights and sums below are in that dtype;
* coordinates in float64: ``q = offset + M @ l`` (summed over ``j`` in index order);
* a sample is covered when every ``q_d`` lies in the tile's ``[-w0, shape-1-w0]`` (with
  ``COVER_EPS``), and is then clamped into that range;
* linear interpolation: corner ``c`` (bit ``d`` of ``c`` set = upper neighbour along axis
  ``d``) has weight ``prod_d (f_d or 1 - f_d)``, summed over ``c`` ascending;
  nearest: the pixel at ``floor(q + 0.5)``;
* blend weight: product over axes of :func:`gpufusion.blend.ramp_weights`;
* weighted modes accumulate ``num += w * v`` and ``den += w`` in tile order and output
  ``num / den`` (0 where ``den == 0``); in ramp modes a pixel only one tile covers takes that
  tile's sample itself where ``w * v / w`` could differ from it after the cast
  (:func:`keeps_single_samples`); ``max`` keeps the maximum of covered samples;
  ``overlay`` keeps the last covered sample;
* integer outputs are rounded half-to-even (``rint``) and clipped to the dtype's range
  (to the largest accumulator value inside it, for 32- and 64-bit integers).

So a pixel one tile covers at an integer position is that tile's pixel, unchanged, for every
dtype (64-bit integers: while their magnitude is at most 2**53, float64's integer range).

Two algorithms give the same result: ``general`` evaluates every pixel's coordinate (any
affine); ``separable`` handles pure translations with slices (fractions and weights are
per-axis vectors). ``auto`` picks ``separable`` for translation entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..blend import ramp_weights
from ..plan import COVER_EPS, ChunkTable

ALGORITHMS = ("auto", "general", "separable")


@dataclass(frozen=True)
class FusionParams:
    """Everything about a fusion that is the same for all chunks."""

    mode: str
    interpolation: str
    blend_width: tuple[float, ...]
    out_dtype: np.dtype


def accumulator_dtype(tile_dtype: np.dtype | str) -> np.dtype:
    """The dtype tiles of ``tile_dtype`` are sampled, weighted and summed in.

    float32 where it holds every value exactly (8- and 16-bit integers, float16, float32),
    float64 for wider integers and float64.

    Examples
    --------
    >>> accumulator_dtype("uint16").name, accumulator_dtype("int32").name
    ('float32', 'float64')
    """
    dt = np.dtype(tile_dtype)
    wide = dt.itemsize > 4 or (dt.kind in "iu" and dt.itemsize > 2)
    return np.dtype(np.float64 if wide else np.float32)


def integer_bounds(values_dtype: np.dtype | str,
                   dtype: np.dtype | str) -> tuple[np.floating, np.floating]:
    """The clip range of integer ``dtype`` in float ``values_dtype``: the dtype's limits,
    each rounded toward zero to a value of ``values_dtype`` (``float64(2**63 - 1)`` is
    ``2**63``, which would overflow the cast).

    Examples
    --------
    >>> [int(b) for b in integer_bounds("float64", "int64")]
    [-9223372036854775808, 9223372036854774784]
    """
    info = np.iinfo(dtype)
    ftype = np.dtype(values_dtype).type
    lo, hi = ftype(info.min), ftype(info.max)
    if int(hi) > info.max:
        hi = np.nextafter(hi, ftype(0))
    return lo, hi


def keeps_single_samples(mode: str, tile_dtype: np.dtype | str,
                         out_dtype: np.dtype | str) -> bool:
    """Whether pixels that one tile alone covers take its sample ``v`` itself, not the
    normalised ``w * v / w`` (ramp modes only; the kernel takes this as an argument).

    ``w * v / w`` can be an ulp off ``v``: visible in float outputs, and for 64-bit integers
    (up to 2**53 in float64) even after rounding, so ramps would alter single-tile pixels near
    the mosaic's edge. Integer tiles of up to 32 bits into integer outputs skip the
    bookkeeping: at integer positions ``v`` is an integer below 2**32 and the quotient lies
    within 2**-22 of it (float32 up to 2**16, float64 beyond), so ``rint`` restores ``v``.

    Examples
    --------
    >>> keeps_single_samples("linear", "uint16", "uint16")
    False
    >>> keeps_single_samples("linear", "uint16", "float32")
    True
    """
    tile, out = np.dtype(tile_dtype), np.dtype(out_dtype)
    small_integers = tile.kind in "iu" and tile.itemsize <= 4 and out.kind in "iub"
    return mode in ("linear", "cosine") and not small_integers


class _Accumulator:
    """Per-chunk accumulation state for one blend mode, in the accumulator dtype."""

    def __init__(self, shape: tuple[int, ...], mode: str, dtype: np.dtype,
                 keep_single: bool = False) -> None:
        self.mode = mode
        self.one = np.dtype(dtype).type(1)
        if mode in ("max", "overlay"):
            self.val = np.zeros(shape, dtype=dtype)
            self.hit = np.zeros(shape, dtype=bool)
        else:
            self.num = np.zeros(shape, dtype=dtype)
            self.den = np.zeros(shape, dtype=dtype)
        self.keep_single = keep_single and mode in ("linear", "cosine")
        if self.keep_single:  # single-tile pixels keep their sample
            self.val = np.zeros(shape, dtype=dtype)
            self.hit = np.zeros(shape, dtype=bool)
            self.multi = np.zeros(shape, dtype=bool)

    def add(self, where: tuple | np.ndarray, v: np.ndarray, w: np.ndarray | None) -> None:
        """Add samples ``v`` (weights ``w``) at ``where`` (slices, or flat indices into ravel)."""
        if isinstance(where, np.ndarray):
            self._add_flat(where, v, w)
            return
        if self.mode == "overlay":
            self.val[where] = v
            self.hit[where] = True
        elif self.mode == "max":
            cur = self.val[where]
            self.val[where] = np.where(self.hit[where], np.maximum(cur, v), v)
            self.hit[where] = True
        elif w is None:
            self.num[where] += v
            self.den[where] += self.one
        else:
            self.num[where] += w * v
            self.den[where] += w
            if not self.keep_single:
                return
            multi = self.multi[where]
            np.logical_or(multi, self.hit[where], out=multi)
            self.hit[where] = True
            self.val[where] = v

    def _add_flat(self, idx: np.ndarray, v: np.ndarray, w: np.ndarray | None) -> None:
        if self.mode == "overlay":
            self.val.reshape(-1)[idx] = v
            self.hit.reshape(-1)[idx] = True
        elif self.mode == "max":
            val, hit = self.val.reshape(-1), self.hit.reshape(-1)
            val[idx] = np.where(hit[idx], np.maximum(val[idx], v), v)
            hit[idx] = True
        else:
            num, den = self.num.reshape(-1), self.den.reshape(-1)
            if w is None:
                num[idx] += v
                den[idx] += self.one
            else:
                num[idx] += w * v
                den[idx] += w
                if not self.keep_single:
                    return
                hit, multi = self.hit.reshape(-1), self.multi.reshape(-1)
                multi[idx] |= hit[idx]
                hit[idx] = True
                self.val.reshape(-1)[idx] = v

    def result(self) -> np.ndarray:
        """The fused chunk in the accumulator dtype (0 where nothing was covered)."""
        if self.mode in ("max", "overlay"):
            return self.val
        # in place: where den == 0 nothing was added and num is still 0
        np.divide(self.num, self.den, out=self.num, where=self.den > 0)
        if self.keep_single:  # hit and not multi (multi implies hit)
            np.copyto(self.num, self.val, where=np.logical_xor(self.hit, self.multi))
        return self.num


def cast_output(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round half-to-even and clip float ``values`` into ``dtype`` (the dtype policy)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iub":
        lo, hi = integer_bounds(values.dtype, dtype)
        out = np.rint(values)
        np.clip(out, lo, hi, out=out)
        return out.astype(dtype)
    return values.astype(dtype, copy=False)


def fuse_chunk(
    windows: Sequence[np.ndarray],
    table: ChunkTable,
    params: FusionParams,
    algorithm: str = "auto",
) -> np.ndarray:
    """Fuse one output chunk from the tile windows its plan names.

    Parameters
    ----------
    windows : sequence of ndarray
        Pixels of ``table.windows()``, in table order.
    table : ChunkTable
        The chunk's plan entries.
    params : FusionParams
    algorithm : {"auto", "general", "separable"}
        ``separable`` applies to translation entries only (others always use ``general``).

    Returns
    -------
    ndarray of ``params.out_dtype`` and shape ``table.shape``.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: unknown {algorithm!r}; choose one of {ALGORITHMS}")
    tile_dtype = np.dtype(windows[0].dtype if len(windows) else np.float32)
    acc = _Accumulator(table.shape, params.mode, accumulator_dtype(tile_dtype),
                       keeps_single_samples(params.mode, tile_dtype, params.out_dtype))
    grid: list[np.ndarray] | None = None
    for k, win in enumerate(windows):
        if table.translation[k] and algorithm != "general":
            _add_separable(acc, win, table, k, params)
        else:
            if grid is None:
                grid = [g.ravel() for g in np.indices(table.shape, dtype=np.float64)]
            _add_general(acc, win, table, k, params, grid)
    return cast_output(acc.result(), params.out_dtype)


def _add_general(acc: _Accumulator, win: np.ndarray, table: ChunkTable, k: int,
                 params: FusionParams, grid: list[np.ndarray]) -> None:
    """Any affine: evaluate each pixel's window coordinate."""
    ndim = len(table.shape)
    m, off = table.matrix[k], table.offset[k]
    w0, ts, ws = table.win_lo[k], table.tile_shape[k], table.win_shape[k]
    q = []
    for d in range(ndim):
        qd = np.full(grid[0].shape, off[d])
        for j in range(ndim):
            qd = qd + m[d, j] * grid[j]
        q.append(qd)
    lo_cov, hi_cov = -w0.astype(np.float64), (ts - 1 - w0).astype(np.float64)
    cov = np.ones(grid[0].shape, dtype=bool)
    for d in range(ndim):
        cov &= (q[d] >= lo_cov[d] - COVER_EPS) & (q[d] <= hi_cov[d] + COVER_EPS)
    idx = np.flatnonzero(cov)
    if idx.size == 0:
        return
    q = [np.clip(qd[idx], lo_cov[d], hi_cov[d]) for d, qd in enumerate(q)]
    v = _sample(win, q, ws, params.interpolation)
    w = _weights(q, w0, ts, params, accumulator_dtype(win.dtype))
    acc.add(idx, v, w)


def _sample(win: np.ndarray, q: list[np.ndarray], ws: np.ndarray, interp: str) -> np.ndarray:
    ndim = len(q)
    adt = accumulator_dtype(win.dtype)
    flat = win.reshape(-1)
    strides = [int(np.prod(ws[d + 1:])) for d in range(ndim)]
    if interp == "nearest":
        lin = np.zeros(q[0].shape, dtype=np.int64)
        for d in range(ndim):
            i = np.clip(np.floor(q[d] + 0.5).astype(np.int64), 0, ws[d] - 1)
            lin += i * strides[d]
        return flat[lin].astype(adt)
    i0, i1, f = [], [], []
    for d in range(ndim):
        fl = np.floor(q[d])
        a = np.clip(fl.astype(np.int64), 0, ws[d] - 1)
        i0.append(a)
        i1.append(np.minimum(a + 1, ws[d] - 1))
        f.append((q[d] - fl).astype(adt))
    corners = []
    for c in range(2**ndim):
        lin = np.zeros(q[0].shape, dtype=np.int64)
        for d in range(ndim):
            up = (c >> (ndim - 1 - d)) & 1
            lin += (i1[d] if up else i0[d]) * strides[d]
        corners.append(flat[lin].astype(adt))
    return lerp_corners(corners, f)


def lerp_corners(corners: list, f: list) -> np.ndarray:
    """Nested linear interpolation of ``2**ndim`` corner values, last axis first.

    ``corners[c]`` is the value at the corner whose bit ``ndim-1-d`` selects the upper
    neighbour along axis ``d``; each step is ``(1 - f) * lower + f * upper`` in the dtype of
    ``f`` (the accumulator's), which is exact when ``f == 0``. The kernels evaluate the same
    expression.
    """
    one = np.asarray(f[0]).dtype.type(1)
    vals = corners
    for d in range(len(f) - 1, -1, -1):
        vals = [(one - f[d]) * vals[2 * i] + f[d] * vals[2 * i + 1]
                for i in range(len(vals) // 2)]
    return vals[0]


def _weights(q: list[np.ndarray], w0: np.ndarray, ts: np.ndarray,
             params: FusionParams, acc_dtype: np.dtype) -> np.ndarray | None:
    if params.mode not in ("linear", "cosine"):
        return None
    w = None
    for d, qd in enumerate(q):
        wd = ramp_weights(qd + w0[d], float(ts[d]), params.blend_width[d], params.mode,
                          dtype=acc_dtype)
        w = wd if w is None else w * wd
    return w


def _add_separable(acc: _Accumulator, win: np.ndarray, table: ChunkTable, k: int,
                   params: FusionParams) -> None:
    """Pure translation: per-axis coordinates, slices instead of gathers."""
    ndim = len(table.shape)
    off = table.offset[k]
    w0, ts = table.win_lo[k], table.tile_shape[k]
    adt = accumulator_dtype(win.dtype)
    out_sl, src_sl, fracs, wvecs = [], [], [], []
    for d in range(ndim):
        q = off[d] + np.arange(table.shape[d], dtype=np.float64)
        lo_cov, hi_cov = float(-w0[d]), float(ts[d] - 1 - w0[d])
        ok = np.flatnonzero((q >= lo_cov - COVER_EPS) & (q <= hi_cov + COVER_EPS))
        if ok.size == 0:
            return
        a, b = int(ok[0]), int(ok[-1]) + 1
        q = np.clip(q[a:b], lo_cov, hi_cov)
        out_sl.append(slice(a, b))
        wvecs.append(_axis_weights(q + w0[d], ts[d], params, d, adt))
        if params.interpolation == "nearest":
            i = np.floor(q + 0.5).astype(np.int64)
            src_sl.append(slice(int(i[0]), int(i[-1]) + 1))
            fracs.append(None)
            continue
        fl = np.floor(q)
        i0 = fl.astype(np.int64)
        frac = (q - fl).astype(adt)
        if not (np.all(frac == frac[0]) and np.all(np.diff(i0) == 1)):
            # rounding made the fraction vary along the axis: take the general path
            grid = [g.ravel() for g in np.indices(table.shape, dtype=np.float64)]
            _add_general(acc, win, table, k, params, grid)
            return
        f = frac[0] if frac[0] != 0 else None
        src_sl.append(slice(int(i0[0]), int(i0[-1]) + 1 + (f is not None)))
        fracs.append(f)
    val = win[tuple(src_sl)]
    if all(f is None for f in fracs) or not (val.dtype == adt or (
            val.dtype.kind in "iu" and val.dtype.itemsize <= 2)):
        # samples are in the accumulator dtype before any arithmetic, as in the general
        # path and the kernel (8/16-bit integers convert exactly inside the first lerp,
        # saving a pass)
        val = val.astype(adt)
    one = adt.type(1)
    for d in range(ndim - 1, -1, -1):  # last axis first, as lerp_corners
        f = fracs[d]
        if f is None:
            continue
        lower = [slice(None)] * ndim
        upper = [slice(None)] * ndim
        lower[d], upper[d] = slice(0, -1), slice(1, None)
        val = (one - f) * val[tuple(lower)] + f * val[tuple(upper)]
    w = None
    if wvecs[0] is not None:
        for d in range(ndim):
            shape = [1] * ndim
            shape[d] = -1
            wd = wvecs[d].reshape(shape)
            w = wd if w is None else w * wd
    acc.add(tuple(out_sl), val, w)


def _axis_weights(t: np.ndarray, size: int, params: FusionParams, d: int,
                  acc_dtype: np.dtype) -> np.ndarray | None:
    if params.mode not in ("linear", "cosine"):
        return None
    return ramp_weights(t, float(size), params.blend_width[d], params.mode, dtype=acc_dtype)
