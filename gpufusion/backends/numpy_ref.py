"""NumPy reference backend: fuse one output chunk from its tile windows.

This is the reference every other backend is tested against, and the CPU fallback. It reads
the flat :class:`~gpufusion.plan.ChunkTable` of one chunk and the pixel windows it names, and
mirrors ``kernels/fuse.cu`` operation for operation:

* coordinates in float64: ``q = offset + M @ l`` (summed over ``j`` in index order);
* a sample is covered when every ``q_d`` lies in the tile's ``[-w0, shape-1-w0]`` (with
  ``COVER_EPS``), and is then clamped into that range;
* linear interpolation: corner ``c`` (bit ``d`` of ``c`` set = upper neighbour along axis
  ``d``) has weight ``prod_d (f_d or 1 - f_d)`` in float32, summed over ``c`` ascending;
  nearest: the pixel at ``floor(q + 0.5)``;
* blend weight: product over axes of :func:`gpufusion.blend.ramp_weights` (float32);
* weighted modes accumulate ``num += w * v`` and ``den += w`` in float32 in tile order and
  output ``num / den`` (0 where ``den == 0``); ``max`` keeps the maximum of covered samples;
  ``overlay`` keeps the last covered sample;
* integer outputs are rounded half-to-even (``rint``) and clipped to the dtype's range.

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


class _Accumulator:
    """Per-chunk accumulation state for one blend mode (float32)."""

    def __init__(self, shape: tuple[int, ...], mode: str) -> None:
        self.mode = mode
        if mode in ("max", "overlay"):
            self.val = np.zeros(shape, dtype=np.float32)
            self.hit = np.zeros(shape, dtype=bool)
        else:
            self.num = np.zeros(shape, dtype=np.float32)
            self.den = np.zeros(shape, dtype=np.float32)

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
            self.den[where] += np.float32(1)
        else:
            self.num[where] += w * v
            self.den[where] += w

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
                den[idx] += np.float32(1)
            else:
                num[idx] += w * v
                den[idx] += w

    def result(self) -> np.ndarray:
        """The fused chunk as float32 (0 where nothing was covered)."""
        if self.mode in ("max", "overlay"):
            return self.val
        # in place: where den == 0 nothing was added and num is still 0
        np.divide(self.num, self.den, out=self.num, where=self.den > 0)
        return self.num


def cast_output(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round half-to-even and clip float32 ``values`` into ``dtype`` (the dtype policy)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iub":
        info = np.iinfo(dtype)
        out = np.rint(values)
        np.clip(out, info.min, info.max, out=out)
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
    acc = _Accumulator(table.shape, params.mode)
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
    w = _weights(q, w0, ts, params)
    acc.add(idx, v, w)


def _sample(win: np.ndarray, q: list[np.ndarray], ws: np.ndarray, interp: str) -> np.ndarray:
    ndim = len(q)
    flat = win.reshape(-1)
    strides = [int(np.prod(ws[d + 1:])) for d in range(ndim)]
    if interp == "nearest":
        lin = np.zeros(q[0].shape, dtype=np.int64)
        for d in range(ndim):
            i = np.clip(np.floor(q[d] + 0.5).astype(np.int64), 0, ws[d] - 1)
            lin += i * strides[d]
        return flat[lin].astype(np.float32)
    i0, i1, f = [], [], []
    for d in range(ndim):
        fl = np.floor(q[d])
        a = np.clip(fl.astype(np.int64), 0, ws[d] - 1)
        i0.append(a)
        i1.append(np.minimum(a + 1, ws[d] - 1))
        f.append((q[d] - fl).astype(np.float32))
    corners = []
    for c in range(2**ndim):
        lin = np.zeros(q[0].shape, dtype=np.int64)
        for d in range(ndim):
            up = (c >> (ndim - 1 - d)) & 1
            lin += (i1[d] if up else i0[d]) * strides[d]
        corners.append(flat[lin].astype(np.float32))
    return lerp_corners(corners, f)


def lerp_corners(corners: list, f: list) -> np.ndarray:
    """Nested linear interpolation of ``2**ndim`` corner values, last axis first.

    ``corners[c]`` is the value at the corner whose bit ``ndim-1-d`` selects the upper
    neighbour along axis ``d``; each step is ``(1 - f) * lower + f * upper`` in float32, which
    is exact when ``f == 0``. The kernels evaluate the same expression.
    """
    one = np.float32(1)
    vals = corners
    for d in range(len(f) - 1, -1, -1):
        vals = [(one - f[d]) * vals[2 * i] + f[d] * vals[2 * i + 1]
                for i in range(len(vals) // 2)]
    return vals[0]


def _weights(q: list[np.ndarray], w0: np.ndarray, ts: np.ndarray,
             params: FusionParams) -> np.ndarray | None:
    if params.mode not in ("linear", "cosine"):
        return None
    w = None
    for d, qd in enumerate(q):
        wd = ramp_weights(qd + w0[d], float(ts[d]), params.blend_width[d], params.mode)
        w = wd if w is None else w * wd
    return w


def _add_separable(acc: _Accumulator, win: np.ndarray, table: ChunkTable, k: int,
                   params: FusionParams) -> None:
    """Pure translation: per-axis coordinates, slices instead of gathers."""
    ndim = len(table.shape)
    off = table.offset[k]
    w0, ts = table.win_lo[k], table.tile_shape[k]
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
        wvecs.append(_axis_weights(q + w0[d], ts[d], params, d))
        if params.interpolation == "nearest":
            i = np.floor(q + 0.5).astype(np.int64)
            src_sl.append(slice(int(i[0]), int(i[-1]) + 1))
            fracs.append(None)
            continue
        fl = np.floor(q)
        i0 = fl.astype(np.int64)
        frac = (q - fl).astype(np.float32)
        if not (np.all(frac == frac[0]) and np.all(np.diff(i0) == 1)):
            # rounding made the fraction vary along the axis: take the general path
            grid = [g.ravel() for g in np.indices(table.shape, dtype=np.float64)]
            _add_general(acc, win, table, k, params, grid)
            return
        f = frac[0] if frac[0] != 0 else None
        src_sl.append(slice(int(i0[0]), int(i0[-1]) + 1 + (f is not None)))
        fracs.append(f)
    val = win[tuple(src_sl)]
    if all(f is None for f in fracs) or val.dtype.itemsize > 2 and val.dtype != np.float32:
        # samples are float32 before any arithmetic, as in the general path and the kernel
        # (8/16-bit integers convert exactly inside the first lerp, saving a pass)
        val = val.astype(np.float32)
    one = np.float32(1)
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


def _axis_weights(t: np.ndarray, size: int, params: FusionParams, d: int) -> np.ndarray | None:
    if params.mode not in ("linear", "cosine"):
        return None
    return ramp_weights(t, float(size), params.blend_width[d], params.mode)
