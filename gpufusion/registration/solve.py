"""Global solve: tile positions from pairwise offsets by weighted least squares.

Unknowns are the tile positions ``x`` (n, ndim); every kept edge ``(i, j)`` with measured
offset ``o`` and weight ``w`` contributes ``w * |x_j - x_i - o|**2``. The normal equations
are the weighted graph Laplacian ``L x = A^T W o`` (one right-hand side per axis), made
non-singular by fixing one tile per connected component at its nominal position, and
solved with a sparse LU factorisation (``scipy.sparse.linalg.splu``): 10,000 tiles take a
fraction of a second.

Outliers: the solve starts robust -- iteratively reweighted least squares with Cauchy weights
``w / (1 + (2 r / max_residual)**2)`` -- and the edges whose residual ``|x_j - x_i - o|``
still exceeds ``max_residual`` are dropped. Then the plain solve is repeated while an edge
exceeds it, dropping in each round the edges above ``max_residual`` and half the largest
residual that are the worst among the edges sharing a tile with them (one bad edge spreads
residual over its good neighbours).

Components that do not hold the anchor, and tiles left without any kept edge, cannot be
placed by the solve. They keep their relative solution (a lone tile: its nominal position)
and are shifted by the mean correction ``x - nominal`` of their placed neighbours in the
candidate graph, nearest components first; a component with no placed neighbour at all gets
the mean correction of all placed tiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg

from ..errors import InputError
from ..progress import Progress

__all__ = ["SolveResult", "solve_positions"]

#: Reweighting steps of the robust start at most.
ROBUST_ITERATIONS = 30


@dataclass(frozen=True)
class SolveResult:
    """Result of :func:`solve_positions`.

    Attributes
    ----------
    positions : ndarray (n, ndim)
        Solved positions (index order).
    kept : ndarray of bool (m,)
        Edges used by the final solve.
    rejected : ndarray of bool (m,)
        Edges dropped for their residual.
    residual : ndarray (m,)
        ``|x_j - x_i - offset|`` at the solved positions for every edge with a finite
        offset (NaN otherwise).
    component : ndarray of int (n,)
        Connected component of each tile in the graph of kept edges (0 holds the anchor).
    unplaced : ndarray of int
        Tiles whose position came from their neighbours' correction (no kept edge linking
        them to the anchor), ascending.
    anchor : int
        The tile held at its nominal position.
    iterations : int
        Solves run (the robust reweighting steps included).
    seconds : float
    """

    positions: np.ndarray
    kept: np.ndarray
    rejected: np.ndarray
    residual: np.ndarray
    component: np.ndarray
    unplaced: np.ndarray
    anchor: int
    iterations: int
    seconds: float


def solve_positions(
    nominal: np.ndarray,
    pairs: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    usable: np.ndarray | None = None,
    max_residual: float = 2.0,
    anchor: int | None = None,
    max_iterations: int = 100,
    robust: bool = True,
    progress: bool = False,
) -> SolveResult:
    """Tile positions that best agree with the pairwise offsets (see module docs).

    Parameters
    ----------
    nominal : ndarray (n, ndim)
        Nominal (stage) positions; the anchor keeps its own.
    pairs : ndarray of int (m, 2)
        Edges ``(i, j)``.
    offsets : ndarray (m, ndim)
        Measured ``x_j - x_i``; rows with NaN are never used.
    weights : ndarray (m,), optional
        Positive edge weights (default 1).
    usable : ndarray of bool (m,), optional
        Edges allowed in the solve (default: all with finite offsets).
    max_residual : float
        Edges with a larger residual (pixels, Euclidean) are dropped and the solve repeated.
    anchor : int, optional
        Tile held at its nominal position (default: the lowest index of the largest
        component of usable edges).
    max_iterations : int
        Solves of the rejection loop at most.
    robust : bool
        Start with iteratively reweighted least squares (Cauchy weights): edges that
        disagree with the robust solution by more than ``max_residual`` are dropped before
        the rejection loop.
    progress : bool
        Show a ``solving positions`` line on stderr counting the least-squares solves
        (:class:`gpufusion.progress.Progress`).

    Returns
    -------
    SolveResult

    Examples
    --------
    Three tiles in a row, one inconsistent edge:

    >>> import numpy as np
    >>> nominal = np.array([[0.0, 0.0], [0.0, 90.0], [0.0, 180.0]])
    >>> pairs = np.array([[0, 1], [1, 2], [0, 2]])
    >>> offsets = np.array([[0.0, 92.0], [0.0, 91.0], [0.0, 150.0]])
    >>> r = solve_positions(nominal, pairs, offsets, [1.0, 1.0, 0.5], max_residual=1.0)
    >>> r.positions[:, 1].round(2).tolist(), r.kept.tolist()
    ([0.0, 92.0, 183.0], [True, True, False])
    """
    t0 = time.perf_counter()
    nominal = np.asarray(nominal, dtype=np.float64)
    n, d = nominal.shape
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    offsets = np.asarray(offsets, dtype=np.float64).reshape(len(pairs), d)
    m = len(pairs)
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(m)
    finite = np.all(np.isfinite(offsets), axis=1) & np.isfinite(w) & (w > 0)
    kept = finite.copy() if usable is None else (np.asarray(usable, dtype=bool) & finite)
    if not max_residual > 0:
        raise InputError(f"max_residual: must be > 0, got {max_residual}")
    if anchor is not None and not 0 <= anchor < n:
        raise InputError(f"anchor: tile index {anchor} outside [0, {n})")
    rejected = np.zeros(m, dtype=bool)
    iterations = 0
    bar = Progress("solving positions", unit="solves", enabled=progress)  # total unknown ahead
    if robust and kept.any():
        # iteratively reweighted least squares (Cauchy weights, scale max_residual / 2):
        # outliers lose their pull before any edge is judged by its residual
        comp = _components(n, pairs[kept])
        anchor_k = _pick_anchor(comp, anchor)
        x = _least_squares(nominal, pairs[kept], offsets[kept], w[kept], comp, anchor_k)
        bar.update(1)
        for _ in range(ROBUST_ITERATIONS):
            iterations += 1
            res = _residuals(x, pairs[kept], offsets[kept])
            w_eff = w[kept] / (1.0 + (2.0 * res / max_residual) ** 2)
            x_new = _least_squares(nominal, pairs[kept], offsets[kept], w_eff, comp, anchor_k)
            bar.update(1)
            moved = np.abs(x_new - x).max(initial=0.0)
            x = x_new
            if moved < 1e-4:
                break
        drop = kept & (_residuals(x, pairs, offsets) > max_residual)
        kept &= ~drop
        rejected |= drop
    while True:
        iterations += 1
        comp = _components(n, pairs[kept])
        anchor_k = _pick_anchor(comp, anchor)
        x = _least_squares(nominal, pairs[kept], offsets[kept], w[kept], comp, anchor_k)
        bar.update(1)
        res = _residuals(x, pairs, offsets)
        worst = np.max(res[kept], initial=0.0)
        if worst <= max_residual or iterations >= max_iterations:
            break
        drop = _worst_edges(pairs, res, w, kept & (res > max(max_residual, 0.5 * worst)), n)
        kept &= ~drop
        rejected |= drop
    bar.close()
    comp, unplaced = _relabel(comp, anchor_k)
    x = _place_components(x, nominal, comp, pairs)
    return SolveResult(x, kept, rejected, _residuals(x, pairs, offsets), comp, unplaced,
                       int(anchor_k), iterations, time.perf_counter() - t0)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                                    shape=(n, n))
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def _pick_anchor(comp: np.ndarray, anchor: int | None) -> int:
    if anchor is not None:
        return int(anchor)
    sizes = np.bincount(comp)
    largest = int(np.argmax(sizes))  # ties: the component of the lowest tile index
    return int(np.flatnonzero(comp == largest)[0])


def _worst_edges(pairs: np.ndarray, res: np.ndarray, w: np.ndarray, candidates: np.ndarray,
                 n: int) -> np.ndarray:
    """The candidates worse than every candidate sharing a tile with them.

    Worse: larger residual, then smaller weight, then lower index. One bad edge makes its
    neighbours' residuals large too; dropping only local maxima keeps those.
    """
    idx = np.flatnonzero(candidates)
    order = idx[np.lexsort((idx, w[idx], -res[idx]))]
    rank = np.full(len(res), len(res), dtype=np.int64)
    rank[order] = np.arange(len(order))
    best = np.full(n, len(res), dtype=np.int64)
    np.minimum.at(best, pairs[idx, 0], rank[idx])
    np.minimum.at(best, pairs[idx, 1], rank[idx])
    drop = np.zeros(len(res), dtype=bool)
    drop[idx] = (rank[idx] == best[pairs[idx, 0]]) & (rank[idx] == best[pairs[idx, 1]])
    return drop


def _least_squares(nominal: np.ndarray, pairs: np.ndarray, offsets: np.ndarray,
                   w: np.ndarray, comp: np.ndarray, anchor: int) -> np.ndarray:
    """Weighted least squares, the anchor and the first tile of every other component fixed
    at their nominal positions."""
    n = len(nominal)
    x = nominal.copy()
    if len(pairs) == 0:
        return x
    i, j = pairs[:, 0], pairs[:, 1]
    # Laplacian L = A^T W A and right-hand side A^T W o (A: +1 at j, -1 at i)
    lap = scipy.sparse.coo_matrix(
        (np.concatenate([w, w, -w, -w]),
         (np.concatenate([i, j, i, j]), np.concatenate([i, j, j, i]))), shape=(n, n)).tocsr()
    rhs = np.zeros_like(nominal)
    np.add.at(rhs, j, w[:, None] * offsets)
    np.add.at(rhs, i, -w[:, None] * offsets)
    fixed = np.zeros(n, dtype=bool)
    fixed[np.unique(comp, return_index=True)[1]] = True  # first tile of each component
    fixed[comp == comp[anchor]] = False
    fixed[anchor] = True
    free = np.flatnonzero(~fixed)
    if len(free) == 0:
        return x
    rhs_free = rhs[free] - lap[free][:, np.flatnonzero(fixed)] @ nominal[fixed]
    lu = scipy.sparse.linalg.splu(lap[free][:, free].tocsc())
    x[free] = lu.solve(rhs_free)
    return x


def _residuals(x: np.ndarray, pairs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.zeros(0)
    return np.linalg.norm(x[pairs[:, 1]] - x[pairs[:, 0]] - offsets, axis=1)


def _relabel(comp: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """Component labels with the anchor's component as 0; tiles outside it."""
    order = np.unique(comp)
    mapping = np.empty(order.max() + 1, dtype=np.int64)
    rest = [c for c in order if c != comp[anchor]]
    mapping[comp[anchor]] = 0
    mapping[rest] = np.arange(1, len(rest) + 1)
    comp = mapping[comp]
    return comp, np.flatnonzero(comp != 0)


def _place_components(x: np.ndarray, nominal: np.ndarray, comp: np.ndarray,
                      pairs: np.ndarray) -> np.ndarray:
    """Shift every component but 0 by its placed neighbours' mean correction."""
    x = x.copy()
    n_comp = int(comp.max()) + 1
    if n_comp == 1:
        return x
    placed = comp == 0
    i, j = pairs[:, 0], pairs[:, 1]
    waiting = set(range(1, n_comp))
    while waiting:
        correction = x - nominal
        progress = False
        ready = []
        for c in sorted(waiting):
            members = comp == c
            # candidate-graph neighbours of the component that are already placed
            nb = np.concatenate([j[members[i] & placed[j]], i[members[j] & placed[i]]])
            if len(nb):
                ready.append((c, members, correction[nb].mean(axis=0)))
        for c, members, target in ready:
            x[members] += target - correction[members].mean(axis=0)
            placed |= members
            waiting.discard(c)
            progress = True
        if not progress:  # no link to anything placed: the mean correction of all placed
            target = correction[placed].mean(axis=0)
            for c in sorted(waiting):
                members = comp == c
                x[members] += target - correction[members].mean(axis=0)
            break
    return x
