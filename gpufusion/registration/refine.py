"""Scoring and sub-pixel refinement of integer window shifts (the steps after the FFTs).

Window conventions are those of :mod:`gpufusion.registration.pairwise`: per pair, two
equally shaped windows ``a`` (tile ``i``) and ``b`` (tile ``j``), mean-subtracted and zero
where the tile has no pixels; tile pixels fill the boxes ``[a_lo, a_hi)`` and ``[b_lo, b_hi)``.
A shift ``s`` means ``b(u) ~ a(u + s)``.

* :func:`score` -- NCC of the pixels both tiles fill at integer shifts;
* :func:`hill_climb` -- move to the best neighbouring integer shift until none is better
  (as MIST does after its phase-correlation peaks);
* :func:`quadratic_peak` -- least-squares quadratic through the 3^ndim NCC values around the
  best shift, its maximum as the first sub-pixel estimate;
* :func:`lucas_kanade` -- Gauss-Newton refinement (Lucas & Kanade 1981) of the sub-pixel
  shift on the overlap, both sides normalised to zero mean and unit variance (so gain and
  offset differences between tiles do not matter), ``a`` resampled with the Keys cubic
  convolution kernel (Keys 1981, a = -1/2).

Two algorithms give the same numbers: ``slices`` works pair by pair on NumPy views (fast on
the CPU); ``batched`` works on whole ``(B, *L)`` stacks with index arrays and masks, so a
batch costs a fixed number of array calls on any array module (fast on the GPU).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

#: A shift must leave at least this many shared pixels (and 3 per axis) to be scored.
MIN_SHARED_PIXELS = 64
#: Pixels trimmed from each side of the overlap for Lucas-Kanade (room for the cubic kernel).
LK_MARGIN = 3
#: Gauss-Newton iterations at most, and the step below which they stop.
LK_ITERATIONS = 8
LK_TOLERANCE = 1e-3
ALGORITHMS = ("slices", "batched")


def host(xp: Any, x: Any) -> np.ndarray:
    """``x`` as a NumPy array (copied from the device for CuPy)."""
    return np.asarray(x) if xp is np else xp.asnumpy(x)


def shared_range(s: Any, a_lo: Any, a_hi: Any, b_lo: Any, b_hi: Any, xp: Any = np
                 ) -> tuple[Any, Any]:
    """Window pixels ``u`` in ``[lo, hi)`` where both ``b(u)`` and ``a(u + s)`` hold pixels."""
    return xp.maximum(b_lo, a_lo - s), xp.minimum(b_hi, a_hi - s)


class Batch:
    """One batch of same-shape window pairs and their boxes, on the host and the device.

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy``.
    a_host, b_host : ndarray, shape (B, *L)
        Windows on the host (the ``slices`` algorithm reads these).
    boxes : tuple of 4 ndarray (B, d)
        ``a_lo, a_hi, b_lo, b_hi``.
    s_lo, s_hi : ndarray (B, d)
        Allowed range of the shift.
    algorithm : {"slices", "batched"}
    min_shared : ndarray (B,), optional
        Shared pixels a shift must leave to be scored, per pair (default
        ``MIN_SHARED_PIXELS``; a wide search asks for more, so that a sliver of a few
        shared pixels cannot win by chance).
    """

    def __init__(self, xp: Any, a_host: np.ndarray, b_host: np.ndarray,
                 boxes: tuple[np.ndarray, ...], s_lo: np.ndarray, s_hi: np.ndarray,
                 algorithm: str, min_shared: np.ndarray | None = None) -> None:
        self.xp = xp
        self.a_host, self.b_host = a_host, b_host
        self.a = xp.asarray(a_host)
        self.b = xp.asarray(b_host)
        self.a_lo, self.a_hi, self.b_lo, self.b_hi = boxes
        self.s_lo, self.s_hi = s_lo, s_hi
        self.algorithm = algorithm
        self.shape = tuple(a_host.shape[1:])
        self.min_shared = (np.full(len(a_host), float(MIN_SHARED_PIXELS)) if min_shared is None
                           else np.maximum(np.asarray(min_shared, np.float64), MIN_SHARED_PIXELS))
        #: NCC already computed: (pair, *shift) -> value
        self.cache: dict[tuple[int, ...], float] = {}

    def __len__(self) -> int:
        return len(self.a_host)

    def shared_boxes(self, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shared boxes ``[lo, hi)`` of integer shifts (B, K, d)."""
        bounds = (v[:, None, :] for v in (self.a_lo, self.a_hi, self.b_lo, self.b_hi))
        return shared_range(shifts, *bounds)

    def valid(self, shifts: np.ndarray) -> np.ndarray:
        """(B, K): shifts inside the allowed range that leave enough shared pixels."""
        lo, hi = self.shared_boxes(shifts)
        ext = hi - lo
        ok = np.all(ext >= 3, axis=-1)
        ok &= np.prod(np.maximum(ext, 0), axis=-1) >= self.min_shared[:, None]
        ok &= np.all(shifts >= self.s_lo[:, None, :], axis=-1)
        return ok & np.all(shifts <= self.s_hi[:, None, :], axis=-1)


# ----------------------------------------------------------------------------------------
# NCC of integer shifts


def ncc_value(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson NCC of two equally shaped arrays (in float64); NaN when either is constant.

    Used for pair scores here and for the quality measure (:mod:`.quality`).
    """
    x = x.astype(np.float64).ravel()
    y = y.astype(np.float64).ravel()
    x -= x.mean()
    y -= y.mean()
    den = np.sqrt(_dot(x, x) * _dot(y, y))
    return float(_dot(x, y) / den) if den > 0 else float("nan")


def score(batch: Batch, shifts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """NCC (B, K) of ``a(u + s)`` and ``b(u)`` over the shared pixels; NaN where not valid.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(size=(40, 40)).astype(np.float32)
    >>> a, b = img[None, :32, :32], img[None, 3:35, 2:34]   # b(u) = a(u + (3, 2))
    >>> box = np.array([[0, 0]]), np.array([[32, 32]])
    >>> bt = Batch(np, a, b, box + box, np.full((1, 2), -9.), np.full((1, 2), 9.), "slices")
    >>> s = np.array([[[3, 2], [0, 0]]])
    >>> np.round(score(bt, s, np.ones((1, 2), bool)), 2)
    array([[1.  , 0.06]])
    """
    out = np.full(valid.shape, np.nan)
    todo = np.zeros(valid.shape, dtype=bool)
    for p, k in zip(*np.nonzero(valid), strict=True):
        key = (int(p), *(int(v) for v in shifts[p, k]))
        if key in batch.cache:
            out[p, k] = batch.cache[key]
        else:
            todo[p, k] = True
    if todo.any():
        new = (_score_slices if batch.algorithm == "slices" else _score_batched)(
            batch, shifts, todo)
        for p, k in zip(*np.nonzero(todo), strict=True):
            out[p, k] = batch.cache[(int(p), *(int(v) for v in shifts[p, k]))] = new[p, k]
    return out


def _score_slices(batch: Batch, shifts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.full(valid.shape, np.nan)
    for p, k in zip(*np.nonzero(valid), strict=True):
        s = shifts[p, k]
        lo, hi = shared_range(s, batch.a_lo[p], batch.a_hi[p], batch.b_lo[p], batch.b_hi[p])
        sb = tuple(slice(int(u0), int(u1)) for u0, u1 in zip(lo, hi, strict=True))
        sa = tuple(slice(int(u0 + v), int(u1 + v)) for u0, u1, v in zip(lo, hi, s, strict=True))
        out[p, k] = ncc_value(batch.a_host[p][sa], batch.b_host[p][sb])
    return out


def _box_mask(xp: Any, shape: tuple[int, ...], lo: Any, hi: Any) -> Any:
    """(B, *shape) boolean mask of the boxes ``[lo, hi)`` (lo, hi: (B, d) device arrays)."""
    d = len(shape)
    mask = None
    for ax, n in enumerate(shape):
        u = xp.arange(n)[None, :]
        ok = ((u >= lo[:, ax, None]) & (u < hi[:, ax, None]))
        ok = ok.reshape((lo.shape[0],) + (1,) * ax + (n,) + (1,) * (d - ax - 1))
        mask = ok if mask is None else mask & ok
    return mask


def _take(xp: Any, x: Any, rows: Any, ax: int, index: Any) -> Any:
    """``out[r, ..., u_ax, ...] = x[rows[r], ..., index[r, u_ax], ...]`` (index: (R, L_ax))."""
    d = x.ndim - 1
    idx: list[Any] = [rows.reshape((-1,) + (1,) * d)]
    for t, n in enumerate(x.shape[1:]):
        shape = (1,) * (1 + t) + (-1,) + (1,) * (d - t - 1)
        if t == ax:
            idx.append(index.reshape((index.shape[0],) + shape[1:]))
        else:
            idx.append(xp.arange(n).reshape(shape))
    return x[tuple(idx)]


def _masked_ncc(xp: Any, x: Any, y: Any, m: Any) -> Any:
    axes = tuple(range(1, x.ndim))
    m = m.astype(xp.float32)
    x, y = x * m, y * m
    cnt = m.sum(axis=axes, dtype=xp.float64)
    sx = x.sum(axis=axes, dtype=xp.float64)
    sy = y.sum(axis=axes, dtype=xp.float64)
    sxy = (x * y).sum(axis=axes, dtype=xp.float64) - sx * sy / cnt
    sxx = (x * x).sum(axis=axes, dtype=xp.float64) - sx * sx / cnt
    syy = (y * y).sum(axis=axes, dtype=xp.float64) - sy * sy / cnt
    den = xp.sqrt(xp.maximum(sxx, 0) * xp.maximum(syy, 0))
    return xp.where(den > 0, sxy / xp.where(den > 0, den, 1), xp.nan)


def _score_batched(batch: Batch, shifts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    xp = batch.xp
    out = np.full(valid.shape, np.nan)
    for k in range(valid.shape[1]):
        rows = np.flatnonzero(valid[:, k])
        if len(rows) == 0:
            continue
        s = shifts[rows, k]
        lo, hi = shared_range(s, batch.a_lo[rows], batch.a_hi[rows], batch.b_lo[rows],
                              batch.b_hi[rows])
        r = xp.asarray(rows)
        x = batch.a[r]
        for ax, n in enumerate(batch.shape):  # integer shift: one gather per axis
            src = xp.clip(xp.arange(n)[None, :] + xp.asarray(s[:, ax, None]), 0, n - 1)
            x = _take(xp, x, xp.arange(len(rows)), ax, src)
        mask = _box_mask(xp, batch.shape, xp.asarray(lo), xp.asarray(hi))
        out[rows, k] = host(xp, _masked_ncc(xp, x, batch.b[r], mask))
    return out


def hill_climb(batch: Batch, s_int: np.ndarray, conf: np.ndarray, steps: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Move each integer shift to its best neighbour (+-1 along one axis) while that raises
    the NCC.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> img = ndi.gaussian_filter(np.random.default_rng(0).normal(size=(60, 60)), 3)
    >>> a, b = img[None, :48, :48], img[None, 4:52, 1:49]   # b(u) = a(u + (4, 1))
    >>> box = np.array([[0, 0]]), np.array([[48, 48]])
    >>> bt = Batch(np, a, b, box + box, np.full((1, 2), -9.), np.full((1, 2), 9.), "slices")
    >>> start = np.array([[1, -2]])
    >>> s, conf = hill_climb(bt, start, score(bt, start[:, None], np.ones((1, 1), bool))[:, 0],
    ...                      20)
    >>> s.tolist(), bool(conf[0] > 0.999)
    ([[4, 1]], True)
    """
    d = s_int.shape[1]
    offsets = np.concatenate([np.eye(d, dtype=np.int64), -np.eye(d, dtype=np.int64)])
    active = np.isfinite(conf)
    rows = np.arange(len(s_int))
    for _ in range(steps):
        if not active.any():
            break
        near = s_int[:, None, :] + offsets[None]
        valid = batch.valid(near) & active[:, None]
        scores = score(batch, near, valid)
        best = np.argmax(np.where(np.isfinite(scores), scores, -np.inf), axis=1)
        top = scores[rows, best]
        better = np.isfinite(top) & (top > conf)
        s_int = np.where(better[:, None], near[rows, best], s_int)
        conf = np.where(better, top, conf)
        active = better
    return s_int, conf


def quadratic_peak(batch: Batch, s_int: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Sub-pixel offset (B, d) in [-1, 1] of the maximum of a quadratic fitted to the NCC.

    The quadratic (with cross terms) is fitted by least squares to the NCC at the 3^d integer
    shifts around ``s_int``; 0 where a neighbour is missing or the fit has no maximum.

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage as ndi
    >>> img = ndi.gaussian_filter(np.random.default_rng(1).normal(size=(64, 64)), 4)
    >>> moved = ndi.shift(img, (-0.3, 0.2), order=3)   # moved(u) = img(u + (0.3, -0.2))
    >>> a, b = img[None, 8:56, 8:56], moved[None, 8:56, 8:56]
    >>> box = np.array([[0, 0]]), np.array([[48, 48]])
    >>> bt = Batch(np, a, b, box + box, np.full((1, 2), -5.), np.full((1, 2), 5.), "slices")
    >>> np.abs(quadratic_peak(bt, np.zeros((1, 2), np.int64), np.ones(1))
    ...        - (0.3, -0.2)).max() < 0.05
    np.True_
    """
    nb, d = s_int.shape
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=d)))
    near = s_int[:, None, :] + offsets[None]
    valid = batch.valid(near) & np.isfinite(conf)[:, None]
    values = score(batch, near, valid)
    terms = [np.ones(len(offsets))] + [offsets[:, t] for t in range(d)]
    pairs = [(t, q) for t in range(d) for q in range(t, d)]
    terms += [offsets[:, t] * offsets[:, q] for t, q in pairs]
    design = np.stack(terms, axis=1).astype(np.float64)
    frac = np.zeros((nb, d))
    ok = np.all(np.isfinite(values), axis=1)
    if not ok.any():
        return frac
    # scale-out: the same numbers whatever else is in the batch (lstsq with many right-hand
    # sides rounds differently with their count), so that pairs measured in batches on
    # several workers give the local result bit for bit (gpufusion.registration.distributed)
    coef = np.einsum("pk,tk->pt", values[ok], np.linalg.pinv(design))  # (n_ok, terms)
    grad = coef[:, 1 : 1 + d]
    hess = np.zeros((len(coef), d, d))
    for c, (t, q) in enumerate(pairs):
        v = coef[:, 1 + d + c]
        if t == q:
            hess[:, t, t] = 2 * v
        else:
            hess[:, t, q] = hess[:, q, t] = v
    # a maximum needs a negative definite Hessian
    neg = np.all(np.linalg.eigvalsh(hess) < 0, axis=1)
    sol = np.zeros_like(grad)
    sol[neg] = np.linalg.solve(hess[neg], -grad[neg][..., None])[..., 0]
    frac[ok] = np.clip(sol, -1.0, 1.0)
    return frac


# ----------------------------------------------------------------------------------------
# Lucas-Kanade refinement


def keys_weights(f: Any, xp: Any = np) -> list[Any]:
    """Keys cubic convolution weights (a = -1/2) of taps -1, 0, 1, 2 for fraction ``f``.

    Examples
    --------
    >>> [round(float(w), 4) for w in keys_weights(np.float64(0.25))]
    [-0.0703, 0.8672, 0.2266, -0.0234]
    """
    f2, f3 = f * f, f * f * f
    return [
        -0.5 * f3 + f2 - 0.5 * f,
        1.5 * f3 - 2.5 * f2 + 1.0,
        -1.5 * f3 + 2.0 * f2 + 0.5 * f,
        0.5 * f3 - 0.5 * f2,
    ]


def lucas_kanade(batch: Batch, s_int: np.ndarray, frac: np.ndarray, ok: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Refine ``s_int + frac`` by Gauss-Newton on the normalised overlap.

    Minimises ``sum (A(u + s) - B(u))**2`` over the shared box (less :data:`LK_MARGIN`), where
    ``A`` and ``B`` are ``a`` and ``b`` normalised to zero mean and unit variance over the
    box; the Jacobian is the central-difference gradient of ``(A + B) / 2`` (symmetric, so
    the estimate does not favour either side). Returns the refined fraction (B, d), within
    ``[-1, 1]``, and a flag (B,) of the pairs where it converged there; elsewhere ``frac``
    is returned unchanged.
    """
    lo, hi = (v[:, 0] for v in batch.shared_boxes(s_int[:, None, :]))
    lo, hi = lo + LK_MARGIN, hi - LK_MARGIN
    ok = ok & np.all(hi - lo >= 5, axis=1)
    frac = frac.copy()
    done = np.zeros(len(frac), dtype=bool)
    active = ok.copy()
    for _ in range(LK_ITERATIONS):
        if not active.any():
            break
        rows = np.flatnonzero(active)
        if batch.algorithm == "slices":
            h, g = _lk_system_slices(batch, rows, s_int, frac, lo, hi)
        else:
            h, g = _lk_system_batched(batch, rows, s_int, frac, lo, hi)
        good = np.linalg.det(h) > 1e-12 * np.maximum(np.trace(h, axis1=1, axis2=2), 1e-30) ** 2
        step = np.zeros_like(g)
        step[good] = np.linalg.solve(h[good], g[good][..., None])[..., 0]
        new = frac[rows] - step
        inside = good & np.all(np.abs(new) <= 1.0, axis=1)
        frac[rows[inside]] = new[inside]
        converged = inside & (np.abs(step).max(axis=1) < LK_TOLERANCE)
        done[rows[converged]] = True
        active[rows[~inside | converged]] = False
    done |= active  # still moving by less than a pixel after the last iteration: keep it
    return frac, done & ok


def _lk_system_slices(batch: Batch, rows: np.ndarray, s_int: np.ndarray, frac: np.ndarray,
                      lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = s_int.shape[1]
    h = np.zeros((len(rows), d, d))
    g = np.zeros((len(rows), d))
    for n, p in enumerate(rows):
        s = s_int[p] + frac[p]
        base = np.floor(s).astype(np.int64)
        f = s - base
        # a resampled at u + s for u in [lo, hi): separable Keys convolution over taps -1..2
        x = batch.a_host[p][tuple(slice(int(lo[p, t] + base[t] - 1), int(hi[p, t] + base[t] + 2))
                                  for t in range(d))].astype(np.float64)
        for t in range(d):
            w = keys_weights(f[t])
            m = int(hi[p, t] - lo[p, t])
            taps = [x[(slice(None),) * t + (slice(k, k + m),)] for k in range(4)]
            x = w[0] * taps[0]
            for k in range(1, 4):
                x += w[k] * taps[k]
        y = batch.b_host[p][tuple(slice(int(lo[p, t]), int(hi[p, t])) for t in range(d))]
        h[n], g[n] = _lk_box_equations(x, y.astype(np.float64))
    return h, g


def _lk_box_equations(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_lk_normal_equations` for one pair whose arrays are exactly the box (NumPy).

    The same sums with slices instead of masks: normalisation over the whole box, central
    differences of ``(x + y) / 2`` and the residual over its interior (box less 1 px).
    """
    d = x.ndim

    def normalised(v: np.ndarray) -> np.ndarray:
        v = v - v.mean()
        return v / np.sqrt(max(float(np.mean(v * v)), 1e-30))

    xn, yn = normalised(x), normalised(y)
    avg = 0.5 * (xn + yn)
    inner = (slice(1, -1),) * d
    grads = []
    for t in range(d):
        up = list(inner)
        down = list(inner)
        up[t], down[t] = slice(2, None), slice(None, -2)
        grads.append(0.5 * (avg[tuple(up)] - avg[tuple(down)]))
    r = (xn - yn)[inner]
    h = np.array([[_dot(grads[t].ravel(), grads[q].ravel()) for q in range(d)]
                  for t in range(d)])
    g = np.array([_dot(grads[t].ravel(), r.ravel()) for t in range(d)])
    return h, g


def _lk_normal_equations(xp: Any, x: Any, y: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """``J^T J`` and ``J^T r`` over the interior (box less 1 px) of normalised ``x``, ``y``.

    ``mask`` (B, *L) marks each pair's box in its padded window (batched path; the slices
    path does the same sums with slices, :func:`_lk_box_equations`).
    """
    d = x.ndim - 1
    axes = tuple(range(1, d + 1))
    m = mask.astype(xp.float64)
    cnt = m.sum(axis=axes, keepdims=True)

    def normalised(v: Any) -> Any:
        v = v * m
        mean = v.sum(axis=axes, keepdims=True) / cnt
        var = ((v - mean * m) ** 2).sum(axis=axes, keepdims=True) / cnt
        return (v - mean) / xp.sqrt(xp.maximum(var, 1e-30))

    xn, yn = normalised(x), normalised(y)
    avg = 0.5 * (xn + yn)
    # interior: central differences need both neighbours inside the box
    inner = m
    grads = []
    for t in range(d):
        ax = 1 + t
        n = x.shape[ax]
        up = xp.take(avg, xp.arange(2, n), axis=ax)
        down = xp.take(avg, xp.arange(0, n - 2), axis=ax)
        pad = [(0, 0)] * x.ndim
        pad[ax] = (1, 1)
        grads.append(xp.pad(0.5 * (up - down), pad))
        m_up = xp.pad(xp.take(m, xp.arange(2, n), axis=ax) * xp.take(m, xp.arange(0, n - 2),
                                                                    axis=ax), pad)
        inner = inner * m_up
    r = (xn - yn) * inner
    h = xp.stack([xp.stack([(grads[t] * grads[q] * inner).sum(axis=axes) for q in range(d)],
                           axis=-1) for t in range(d)], axis=-2)
    g = xp.stack([(grads[t] * r).sum(axis=axes) for t in range(d)], axis=-1)
    return host(xp, h), host(xp, g)


def _lk_system_batched(batch: Batch, rows: np.ndarray, s_int: np.ndarray, frac: np.ndarray,
                       lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xp = batch.xp
    s = s_int[rows] + frac[rows]
    base = np.floor(s).astype(np.int64)
    f = xp.asarray(s - base)
    r = xp.asarray(rows)
    x = batch.a[r].astype(xp.float64)
    local = xp.arange(len(rows))
    for t, n in enumerate(batch.shape):
        u = xp.arange(n)[None, :] + xp.asarray(base[:, t, None])
        w = keys_weights(f[:, t], xp)
        out = 0
        for k in range(4):
            taken = _take(xp, x, local, t, xp.clip(u + (k - 1), 0, n - 1))
            out = out + w[k].reshape((len(rows),) + (1,) * len(batch.shape)) * taken
        x = out
    mask = _box_mask(xp, batch.shape, xp.asarray(lo[rows]), xp.asarray(hi[rows]))
    return _lk_normal_equations(xp, x, batch.b[r].astype(xp.float64), mask)


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    # einsum, not np.dot: a multi-threaded BLAS dot stalls badly on a busy machine
    return float(np.einsum("i,i->", x, y))
