"""Flat-field and dark-field profiles: estimated from the tiles, loaded from and saved to TIFF.

Estimation (``--flatfield auto``, ``gpufusion flatfield``)
-----------------------------------------------------------
Model, as in BaSiC (Peng et al. 2017, "A BaSiC tool for background and shading correction
of optical microscopy images", Nat. Commun. 8:14836): each tile ``t`` is
``I_t(x) = S(x) * T_t(x) + D``, with ``S`` a smooth flat-field shared by all tiles, ``T_t``
the specimen under tile ``t`` and ``D`` a constant dark level. ``log S`` is one 2D
polynomial of total degree ``degree`` (default 4; Legendre polynomials on the tile scaled to
[-1, 1]; vignetting is close to ``1 - c r^2 - d r^4``), fitted by weighted least squares
with Tukey-biweight reweighting to two groups of equations, each group carrying half the
weight (:data:`TILE_SHARE`):

1. **overlaps** (:func:`_overlap_rows`): where neighbouring translated tiles ``i``, ``j``
   share a region, both see the same specimen, so for each block of ``4f x 4f`` pixels
   (``f = ceil(tile side / size)``) ``log(a - D) - log(b - D) = log S(p_a) - log S(p_b)``
   with ``a``, ``b`` the two tiles' block means and ``p_a``, ``p_b`` the block's centre in
   each tile: the specimen cancels exactly (up to position errors, which add noise), so
   these rows see the shading alone. Up to ``max_pairs`` pairs, evenly spaced in the list.
   They only reach the tile's margins;
2. **statistics across tiles** (:func:`_tile_statistics_rows`, the BaSiC idea): the
   specimen under pixel ``x`` changes from tile to tile but its distribution does not
   depend on ``x``, so ``log(median_t I_t(x) - D) = log S(x) + const``. Up to ``max_tiles``
   tiles (evenly spaced; of 3D tiles a few planes each) are reduced by ``f x f`` block means;
   blocks whose local texture (standard deviation over ``4f x 4f``) exceeds
   ``texture_limit`` times the median texture (tissue edges, debris, the cores of a tissue
   array) are left out of the median. These rows pin the tile's interior: with overlaps
   alone, the corrected tiles of ``tma_4x3`` had bright centres.

The dark level (``darkfield=True``) is the ``D`` that makes the overlaps most nearly
multiplicative: ``a - D = (S_a / S_b)(b - D)`` holds for every block of a pair only at the
true ``D``, so the residual scale of the overlap fit is minimised over ``D`` (a grid on
``[0, 0.9 x the 1st percentile of the blocks]``, then golden-section search). Without
overlaps it is the intercept of the smooth median against the smooth interquartile range
across pixels (both affine in ``S``; the IQR without ``D``), 0 where the shading varies by
less than :data:`MIN_SHADING`. A known dark level (a number) is taken off instead.

Why not BaSiCPy: it pulls JAX (about 600 MB of wheels) for its low-rank-plus-sparse solve;
this runs in NumPy in about 3 s for 600 tiles on 2 shared cores (``benchmarks/
bench_flatfield.py``), meets the accuracy the tests ask on synthetic truth (flat-field within
2 % RMS; 0.5 % measured) and on ``tma_4x3`` (overlap steps 7.6x smaller), and needs no new
dependency. What BaSiC does and this does not: a spatially varying dark-field (here a
constant), per-image baseline drift (``--intensity-match`` takes exposure drift between
tiles), and shading sharper than a degree-4 polynomial.

Files
-----
A profile file is a TIFF of float values: ``(y, x)`` for every channel (and every plane of
3D tiles), ``(c, y, x)`` one per channel, ``(z, y, x)`` one per plane of 3D tiles, or
``(c, z, y, x)``. A 3D file for 3D tiles is a z stack when its length is the tiles' z size,
else one profile per channel. A flat-field is normalised to mean 1 when loaded (per
channel), as BaSiC and ASHLAR users expect (their profiles are often so already); a
dark-field is used as is, in the tiles' units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .correction import Profile, check_darkfield, check_flatfield
from .errors import InputError
from .layout import Mosaic

#: Default number of tiles the estimator looks at (per channel).
MAX_TILES = 200
#: Default longest side, in pixels, of the reduced tiles the statistics are taken on.
ESTIMATE_SIZE = 128
#: Default total degree of the smooth polynomial fit.
DEGREE = 4
#: Blocks whose local texture (standard deviation) exceeds this multiple of the median
#: texture over all sampled blocks are left out of the per-pixel statistics.
TEXTURE_LIMIT = 1.5
#: Default number of overlapping tile pairs whose shared regions join the fit.
MAX_PAIRS = 400
#: Fewest tiles the statistics across tiles alone (no overlaps) estimate a flat-field from:
#: a median over fewer images keeps the specimen's own slow variations.
MIN_TILES_WITHOUT_OVERLAPS = 8
#: With overlaps, the share of the per-pixel statistics across the tiles in the joint fit
#: (the overlaps' is 1): they pin the tile's interior, where no overlap reaches.
TILE_SHARE = 0.5
#: Below this relative variation of the flat-field, the dark level is not identifiable.
MIN_SHADING = 0.05


@dataclass
class EstimatedProfiles:
    """The result of :func:`estimate_profiles` for one channel.

    Attributes
    ----------
    flatfield : ndarray, float32
        ``(y, x)`` of the tiles, mean 1.
    darkfield : ndarray, float32
        ``(y, x)``, constant (the estimated dark level ``dark``).
    dark : float
    sources : str
        What the fit used: overlap blocks of neighbouring tiles and tile images, e.g.
        ``"1719 overlap blocks and 12 tile images"``.
    fit : tuple
        ``(coef, shape, factor, blocks)`` of :func:`flat_from_fit`.
    """

    flatfield: np.ndarray
    darkfield: np.ndarray
    dark: float
    sources: str
    fit: tuple | None = None

    def profiles(self, label: str = "auto", darkfield: bool = False) -> tuple[Any, Any]:
        """``(flat, dark)`` as :class:`~gpufusion.correction.Profile` objects that pickle as
        their fit and dark level (small tasks for dask workers); ``dark`` None unless
        ``darkfield``."""
        from .correction import Profile

        flat = Profile(self.flatfield, label, None if self.fit is None else ("fit", *self.fit))
        dark = Profile(self.darkfield, label, ("constant", self.dark, self.darkfield.shape)) \
            if darkfield else None
        return flat, dark


def block_grid(shape: tuple[int, ...], size: int = ESTIMATE_SIZE) -> tuple[int, tuple[int, int]]:
    """The block factor ``f = ceil(max(y, x) / size)`` and the ``(y, x)`` extent the
    estimate uses (whole blocks of ``4 f``); refuses tiles under ``8 f`` pixels."""
    h, w = shape[-2:]
    f = max(1, math.ceil(max(h, w) / size))
    g = 4 * f
    hh, ww = (h // g) * g, (w // g) * g
    if hh < 2 * g or ww < 2 * g:
        raise InputError(f"flatfield auto: tiles of {tuple(shape)} are too small to estimate a "
                         "profile from")
    return f, (hh, ww)


def sample_tiles(mosaic: Mosaic, max_tiles: int = MAX_TILES, size: int = ESTIMATE_SIZE,
                 planes_per_tile: int = 4) -> tuple[np.ndarray, np.ndarray, int]:
    """Reduced tile images for the estimate, with their texture.

    Returns ``(means, texture, f)``: ``(n, h, w)`` float64 block means of ``f x f`` pixels,
    ``f = ceil(max(y, x) / size)`` (the last partial blocks are dropped), and per block the
    standard deviation of the pixels of its ``4f x 4f`` neighbourhood block (the local
    texture: tissue, debris). Tiles are taken evenly spaced in the tile list; of 3D tiles up
    to ``planes_per_tile`` evenly spaced planes each.
    """
    if max_tiles < 1:
        raise InputError(f"max_tiles: need at least 1, got {max_tiles}")
    tiles = mosaic.tiles
    shape = tiles[0].shape
    if any(t.shape != shape for t in tiles):
        raise InputError("flatfield auto: the tiles have different shapes "
                         f"({tiles[0].name}: {shape}); the estimate needs one tile shape")
    f, (hh, ww) = block_grid(shape, size)
    g = 4 * f
    picks = np.unique(np.linspace(0, len(tiles) - 1, min(max_tiles, len(tiles))).round()
                      .astype(int))
    means, texture = [], []
    for i in picks:
        src = tiles[int(i)].source
        read = getattr(src, "read_raw", src.read)
        if len(shape) == 2:
            planes = [np.asarray(read((slice(0, hh), slice(0, ww))))]
        else:
            zs = np.unique(np.linspace(0, shape[0] - 1, min(planes_per_tile, shape[0]))
                           .round().astype(int))
            planes = [np.asarray(read((slice(int(z), int(z) + 1), slice(0, hh),
                                       slice(0, ww))))[0] for z in zs]
        for p in planes:
            p = p.astype(np.float64)
            means.append(p.reshape(hh // f, f, ww // f, f).mean(axis=(1, 3)))
            tex = p.reshape(hh // g, g, ww // g, g).std(axis=(1, 3))
            texture.append(np.repeat(np.repeat(tex, 4, axis=0), 4, axis=1))
    return np.stack(means), np.stack(texture), f


def _poly_basis(n: int, degree: int) -> np.ndarray:
    """Legendre-like powers of ``u`` in [-1, 1] at ``n`` points: ``(n, degree + 1)``."""
    u = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return np.stack([np.polynomial.legendre.legval(u, np.eye(degree + 1)[k])
                     for k in range(degree + 1)], axis=1)


def _terms(degree: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]


def fit_smooth(values: np.ndarray, degree: int = DEGREE, iterations: int = 4,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Coefficients ``C`` (``(degree + 1, degree + 1)``) of a robust 2D polynomial fit.

    ``values`` is a 2D map (NaN where unknown); the fit is ``sum C[i, j] P_i(u) P_j(v)`` over
    total degree ``i + j <= degree`` (Legendre polynomials on [-1, 1] along each axis), by
    least squares with ``weights`` (default 1), reweighted with Tukey's biweight
    (``iterations`` times; scale 4.685 x 1.4826 x MAD) so outlying pixels do not bend it.
    """
    h, w = values.shape
    by, bx = _poly_basis(h, degree), _poly_basis(w, degree)
    terms = _terms(degree)
    design = np.stack([np.outer(by[:, i], bx[:, j]).ravel() for i, j in terms], axis=1)
    y = values.ravel()
    prior = np.ones_like(y) if weights is None else np.asarray(weights, float).ravel().copy()
    prior[~np.isfinite(y)] = 0.0
    y = np.where(np.isfinite(y), y, 0.0)
    robust = np.ones_like(y)
    coef = np.zeros(len(terms))
    for _ in range(iterations):
        sw = np.sqrt(prior * robust)
        coef = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)[0]
        resid = (y - design @ coef)[prior > 0]
        scale = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        if not scale > 0:
            break
        r = (y - design @ coef) / (4.685 * scale)
        robust = np.where(np.abs(r) < 1, (1 - r**2) ** 2, 0.0)
    out = np.zeros((degree + 1, degree + 1))
    for (i, j), c in zip(terms, coef, strict=True):
        out[i, j] = c
    return out


def eval_smooth(coef: np.ndarray, shape: tuple[int, int], factor: int = 1,
                blocks: tuple[int, int] | None = None) -> np.ndarray:
    """Evaluate a :func:`fit_smooth` fit made on a map of ``blocks`` block means of
    ``factor x factor`` pixels (default: ``shape // factor``) on the pixel grid ``shape``
    (block centres map to the same points)."""
    degree = coef.shape[0] - 1
    blocks = blocks or (shape[0] // factor, shape[1] // factor)
    axes = []
    for n, nb in zip(shape, blocks, strict=True):
        # pixel p lies at block coordinate (p - (factor - 1) / 2) / factor; the fit's u
        # spans [-1, 1] over block centres 0 .. nb - 1
        b = (np.arange(n) - (factor - 1) / 2) / factor
        u = 2 * b / max(nb - 1, 1) - 1
        axes.append(np.stack([np.polynomial.legendre.legval(u, np.eye(degree + 1)[k])
                              for k in range(degree + 1)], axis=1))
    return axes[0] @ coef @ axes[1].T


def masked_quantiles(stack: np.ndarray, keep: np.ndarray,
                     qs: tuple[float, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-pixel quantiles ``qs`` (0..1, linear interpolation) over axis 0 of ``stack``,
    using only the samples where ``keep``; NaN where none. Returns (quantiles, counts)."""
    values = np.where(keep, stack, np.nan)
    values.sort(axis=0)  # NaN last
    count = keep.sum(axis=0)
    out = []
    for q in qs:
        pos = q * np.maximum(count - 1, 0)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, np.maximum(count - 1, 0))
        a = np.take_along_axis(values, lo[None], axis=0)[0]
        b = np.take_along_axis(values, hi[None], axis=0)[0]
        val = a + (pos - lo) * (b - a)
        out.append(np.where(count > 0, val, np.nan))
    return out, count


def _legendre_at(u: np.ndarray, degree: int) -> np.ndarray:
    """``P_0..P_degree`` at points ``u``: ``(len(u), degree + 1)``."""
    return np.stack([np.polynomial.legendre.legval(u, np.eye(degree + 1)[k])
                     for k in range(degree + 1)], axis=1)


def _design(py: np.ndarray, px: np.ndarray, factor: int, blocks: tuple[int, int],
            degree: int) -> np.ndarray:
    """Rows of the 2D polynomial basis (:func:`_terms` order) at tile pixel coordinates."""
    axes = []
    for p, nb in ((py, blocks[0]), (px, blocks[1])):
        u = 2 * ((p - (factor - 1) / 2) / factor) / max(nb - 1, 1) - 1
        axes.append(_legendre_at(u, degree))
    return np.stack([axes[0][:, i] * axes[1][:, j] for i, j in _terms(degree)], axis=1)


def _overlap_rows(mosaic: Mosaic, factor: int, blocks: tuple[int, int], degree: int,
                  max_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overlap equations ``log S(p_a) - log S(p_b) = log(a - D) - log(b - D)``:
    ``(design, a, b)``.

    For pairs of overlapping translated 2D tiles (at most ``max_pairs``, evenly spaced in the
    pair list), the shared region is cut into blocks of ``4 * factor`` pixels; ``a``, ``b``
    are the two tiles' block means at the same place, ``p_a``, ``p_b`` its centre in each
    tile, and a design row is the basis at ``p_a`` less the basis at ``p_b``. The specimen
    cancels, so these rows see the shading (and the dark level ``D``) alone.
    """
    from .spatial import overlapping_pairs

    empty = np.zeros((0, len(_terms(degree)))), np.zeros(0), np.zeros(0)
    if mosaic.ndim != 2 or max_pairs < 1:
        return empty
    aff = mosaic.affines
    if not np.allclose(aff[:, :2, :2], np.eye(2)):
        return empty
    lo, hi = mosaic.tile_bounds()
    pairs = overlapping_pairs(lo, hi, min_overlap=8 * factor)
    if len(pairs) == 0:
        return empty
    pairs = pairs[np.unique(np.linspace(0, len(pairs) - 1, min(max_pairs, len(pairs)))
                            .round().astype(int))]
    g = 4 * factor
    shape = np.array(mosaic.tiles[0].shape)
    rows, va, vb = [], [], []
    for i, j in pairs:
        d = np.round(aff[j, :2, 2] - aff[i, :2, 2]).astype(int)
        a0 = np.maximum(0, d)
        a1 = np.minimum(shape, d + shape)
        n = (a1 - a0) // g
        if (n < 1).any():
            continue
        a1 = a0 + n * g
        win_a = tuple(slice(int(s0), int(s1)) for s0, s1 in zip(a0, a1, strict=True))
        win_b = tuple(slice(int(s0 - dd), int(s1 - dd))
                      for s0, s1, dd in zip(a0, a1, d, strict=True))
        src_a, src_b = mosaic.tiles[int(i)].source, mosaic.tiles[int(j)].source
        a = np.asarray(getattr(src_a, "read_raw", src_a.read)(win_a), np.float64)
        b = np.asarray(getattr(src_b, "read_raw", src_b.read)(win_b), np.float64)
        a = a.reshape(n[0], g, n[1], g).mean(axis=(1, 3)).ravel()
        b = b.reshape(n[0], g, n[1], g).mean(axis=(1, 3)).ravel()
        cy, cx = np.meshgrid(a0[0] + g * np.arange(n[0]) + (g - 1) / 2,
                             a0[1] + g * np.arange(n[1]) + (g - 1) / 2, indexing="ij")
        py, px = cy.ravel(), cx.ravel()
        rows.append(_design(py, px, factor, blocks, degree)
                    - _design(py - d[0], px - d[1], factor, blocks, degree))
        va.append(a)
        vb.append(b)
    if not rows:
        return empty
    return np.concatenate(rows), np.concatenate(va), np.concatenate(vb)


def _wls(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least squares by the normal equations (the Legendre basis on [-1, 1] keeps
    them well conditioned; ``lstsq``'s SVD costs ~10x more here)."""
    xw = design * weights[:, None]
    gram = xw.T @ design
    gram[np.diag_indices_from(gram)] += 1e-12 * max(float(np.trace(gram)), 1e-300)
    return np.linalg.solve(gram, xw.T @ y)


def _robust_lstsq(design: np.ndarray, y: np.ndarray,
                  iterations: int = 5) -> tuple[np.ndarray, float]:
    """Least squares reweighted with Tukey's biweight (``iterations`` times; scale
    4.685 x 1.4826 x MAD): the coefficients and the robust scale of the residuals."""
    weights = np.ones_like(y)
    coef = np.zeros(design.shape[1])
    scale = 0.0
    for _ in range(iterations):
        coef = _wls(design, y, weights)
        resid = y - design @ coef
        scale = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        if not scale > 0:
            break
        z = resid / (4.685 * scale)
        weights = np.where(np.abs(z) < 1, (1 - z**2) ** 2, 0.0)
    return coef, scale


def _overlap_fit(design: np.ndarray, a: np.ndarray, b: np.ndarray,
                 dark: float) -> tuple[np.ndarray, float, int]:
    """:func:`_robust_lstsq` of the overlap equations at dark level ``dark``: coefficients,
    residual scale and the number of usable rows (both block means above ``dark``)."""
    ok = (a > dark) & (b > dark)
    if ok.sum() < 2 * design.shape[1]:
        return np.zeros(design.shape[1]), np.inf, int(ok.sum())
    coef, scale = _robust_lstsq(design[ok], np.log(a[ok] - dark) - np.log(b[ok] - dark))
    return coef, scale, int(ok.sum())


def _overlap_dark(design: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The constant dark level that makes the overlaps most nearly multiplicative: the ``D``
    minimising the residual scale of :func:`_overlap_fit` (``a - D = (S_a / S_b)(b - D)``
    holds for every block of a pair only at the true ``D``), searched on ``[0, 0.9 x the
    1st percentile of the block means]`` (a grid of 17, then golden-section refinement)."""
    top = 0.9 * float(np.percentile(np.minimum(a, b), 1))
    if not top > 0:
        return 0.0

    def cost(d: float) -> float:
        return _overlap_fit(design, a, b, d)[1]

    grid = np.linspace(0.0, top, 17)
    costs = [cost(float(d)) for d in grid]
    k = int(np.argmin(costs))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(14):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if cost(m1) <= cost(m2):
            hi = m2
        else:
            lo = m1
    return float(0.5 * (lo + hi))


def estimate_profiles(mosaic: Mosaic, *, darkfield: bool | float = False,
                      max_tiles: int = MAX_TILES, size: int = ESTIMATE_SIZE,
                      degree: int = DEGREE, texture_limit: float = TEXTURE_LIMIT,
                      max_pairs: int = MAX_PAIRS) -> EstimatedProfiles:
    """Estimate one channel's flat-field (and, with ``darkfield=True``, a constant dark
    level; a number: that known dark level) from its tiles.

    See the module docstring for the method. Raw pixels are used when the tiles are already
    corrected sources.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion import mosaic_from_positions
    >>> yy, xx = np.mgrid[:64, :64] / 63 - 0.5
    >>> flat = 1 - 0.6 * (yy**2 + xx**2)
    >>> rng = np.random.default_rng(0)
    >>> tiles = [(flat * rng.uniform(500, 1500, (64, 64)) + 100).astype(np.uint16)
    ...          for _ in range(40)]
    >>> m = mosaic_from_positions(tiles, [(0, 70 * i) for i in range(40)])
    >>> est = estimate_profiles(m, darkfield=True)
    >>> bool(np.sqrt(np.mean((est.flatfield / (flat / flat.mean()) - 1) ** 2)) < 0.02)
    True
    >>> bool(abs(est.dark - 100) < 30)
    True
    """
    shape = mosaic.tiles[0].shape[-2:]
    factor, (hh, ww) = block_grid(mosaic.tiles[0].shape, size)
    blocks = (hh // factor, ww // factor)
    n_terms = len(_terms(degree))
    design, a, b = _overlap_rows(mosaic, factor, blocks, degree, max_pairs)
    dark: float | None
    if isinstance(darkfield, bool):
        dark = _overlap_dark(design, a, b) if darkfield and len(a) >= 8 * n_terms else 0.0
    else:
        dark = float(darkfield)
    stack, texture, _ = sample_tiles(mosaic, max_tiles, size)
    groups: list[tuple[np.ndarray, np.ndarray, float]] = []
    method: list[str] = []
    overlap_ok = (a > dark) & (b > dark)
    if overlap_ok.sum() >= 8 * n_terms:
        groups.append((design[overlap_ok],
                       np.log(a[overlap_ok] - dark) - np.log(b[overlap_ok] - dark), 1.0))
        method.append(f"{int(overlap_ok.sum())} overlap blocks")
    if isinstance(darkfield, bool) and darkfield and not groups:
        dark = None  # no overlaps to find it from: from the statistics across the tiles
    if not groups and len(stack) < MIN_TILES_WITHOUT_OVERLAPS:
        raise InputError(f"flatfield auto: {len(stack)} tile(s) and no usable overlaps between "
                         "them are too few to tell the shading from the specimen (needs "
                         f"{MIN_TILES_WITHOUT_OVERLAPS} tiles, or overlapping ones); give a "
                         "profile file instead (--flatfield FILE)")
    rows = _tile_statistics_rows(stack, texture, factor, blocks, degree, texture_limit, dark)
    dark = rows[2]
    if len(rows[1]):
        groups.append((rows[0], rows[1], TILE_SHARE if groups else 1.0))
        method.append(f"{len(stack)} tile images")
    if not groups:
        raise InputError("flatfield auto: the tiles carry no signal to estimate a "
                         "flat-field from (all-dark tiles?)")
    coef = _joint_fit(groups)
    c = np.zeros((degree + 1, degree + 1))
    for (i, j), v in zip(_terms(degree), coef, strict=True):
        c[i, j] = v
    fit = (c, tuple(shape), factor, tuple(blocks))
    return EstimatedProfiles(flat_from_fit(*fit), np.full(shape, dark, dtype=np.float32), dark,
                             " and ".join(method), fit)


def flat_from_fit(coef: np.ndarray, shape: tuple[int, int], factor: int,
                  blocks: tuple[int, int]) -> np.ndarray:
    """The flat-field of a fit of ``log S`` (:func:`estimate_profiles`): float32, mean 1."""
    log_flat = eval_smooth(np.asarray(coef, np.float64), tuple(shape), factor, tuple(blocks))
    flat = np.exp(log_flat - log_flat.max())
    return (flat / flat.mean()).astype(np.float32)


def _tile_statistics_rows(stack: np.ndarray, texture: np.ndarray, factor: int,
                          blocks: tuple[int, int], degree: int, texture_limit: float,
                          dark: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """The BaSiC-style equations ``log S(x) + k = log(median_t I_t(x) - D)`` over the
    reduced pixels (blocks of strong local texture left out of the median): ``(design, y,
    D)``; ``dark`` None estimates ``D`` from the median and the interquartile range."""
    keep = texture <= texture_limit * float(np.median(texture))
    (q25, med, q75), count = masked_quantiles(stack, keep, (0.25, 0.5, 0.75))
    if dark is None:
        dark = _dark_level(med, q75 - q25, count, degree)
    level = med - dark
    ok = np.isfinite(level) & (level > 0) & (count > 0)
    yy, xx = np.nonzero(ok)
    py, px = factor * yy + (factor - 1) / 2, factor * xx + (factor - 1) / 2
    return _design(py, px, factor, blocks, degree), np.log(level[ok]), dark


def _joint_fit(groups: list[tuple[np.ndarray, np.ndarray, float]],
               iterations: int = 5) -> np.ndarray:
    """Least squares over groups of rows ``(design, y, share)``: within a group rows are
    weighted by Tukey's biweight (scale 4.685 x 1.4826 x MAD of the group's residuals),
    and each group's weights sum to its ``share``; re-estimated ``iterations`` times."""
    design = np.concatenate([g[0] for g in groups])
    y = np.concatenate([g[1] for g in groups])
    label = np.concatenate([np.full(len(g[1]), k) for k, g in enumerate(groups)])
    robust = np.ones_like(y)
    coef = np.zeros(design.shape[1])
    for _ in range(iterations):
        weights = np.zeros_like(y)
        for k, g in enumerate(groups):
            sel = label == k
            weights[sel] = robust[sel] * g[2] / max(float(robust[sel].sum()), 1e-300)
        coef = _wls(design, y, weights)
        resid = y - design @ coef
        for k in range(len(groups)):
            sel = label == k
            r = resid[sel]
            scale = 1.4826 * float(np.median(np.abs(r - np.median(r))))
            if scale > 0:
                z = r / (4.685 * scale)
                robust[sel] = np.where(np.abs(z) < 1, (1 - z**2) ** 2, 0.0)
    return coef


def _dark_level(med: np.ndarray, spread: np.ndarray, count: np.ndarray, degree: int) -> float:
    """The constant dark level: intercept of the smooth median against the smooth spread
    (interquartile range) across pixels, clipped to ``[0, 0.95 * min median]``; 0 when the
    shading varies less than :data:`MIN_SHADING`."""
    m_small = eval_smooth(fit_smooth(med, degree, weights=count), med.shape)
    s_small = eval_smooth(fit_smooth(spread, degree, weights=count), med.shape)
    variation = float(s_small.max() - s_small.min()) / max(float(abs(s_small.mean())), 1e-12)
    if variation < MIN_SHADING or not float(s_small.mean()) > 0:
        return 0.0
    slope, intercept = np.polyfit(s_small.ravel(), m_small.ravel(), 1)
    if not slope > 0:
        return 0.0
    return float(np.clip(intercept, 0.0, 0.95 * float(m_small.min())))


# -- files ----------------------------------------------------------------------------------


def read_profile_file(path: str | Path, what: str,
                      tiles: tuple[tuple[int, ...], int] | None = None) -> np.ndarray:
    """A profile TIFF's pixels as float64 (``what``: ``--flatfield``, for messages).

    With ``tiles`` (the tile shape and the channel count), a file whose header declares
    more pixels than any profile of those tiles holds is refused (:func:`shape_mismatch`)
    before its pixels are read or allocated.
    """
    import tifffile

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p}: no such file")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InputError(f"{what} {p}: cannot read ({exc.strerror or exc})") from None
    if magic not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        raise InputError(f"{what} {p}: not a TIFF file; profiles are TIFF images (2D, or a "
                         "stack of one per channel or plane)")
    try:
        with tifffile.TiffFile(p) as tif:
            declared = tuple(int(n) for n in tif.series[0].shape)
            if tiles is not None and (int(np.prod(declared, dtype=np.int64))
                                      > tiles[1] * int(np.prod(tiles[0], dtype=np.int64))):
                raise shape_mismatch(f"{what} {p}", declared, *tiles)
            data = tif.series[0].asarray()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input
        raise InputError(f"{what} {p}: cannot read the TIFF ({exc})") from None
    data = np.squeeze(np.asarray(data)) if np.asarray(data).ndim > 2 else np.asarray(data)
    if data.dtype.kind not in "uif":
        raise InputError(f"{what} {p}: pixels of dtype {data.dtype}; need numbers")
    return data.astype(np.float64)


def split_profiles(data: np.ndarray, tile_shape: tuple[int, ...], n_channels: int,
                   label: str) -> list[np.ndarray]:
    """One profile per channel from a file's array (see the module docstring's rules)."""
    yx = tuple(tile_shape[-2:])
    three_d = len(tile_shape) == 3
    shape = tuple(data.shape)
    if shape[-2:] == yx:
        if data.ndim == 2:
            return [data] * n_channels
        if data.ndim == 3 and three_d and shape[0] == tile_shape[0]:
            return [data] * n_channels
        if data.ndim == 3 and shape[0] == n_channels:
            return list(data)
        if data.ndim == 4 and three_d and shape[:2] == (n_channels, tile_shape[0]):
            return list(data)
    if n_channels == 1 and data.ndim == 3 and shape[0] == 1 and shape[1:] == yx:
        return [data[0]]
    raise shape_mismatch(label, shape, tile_shape, n_channels)


def shape_mismatch(label: str, shape: tuple[int, ...], tile_shape: tuple[int, ...],
                   n_channels: int) -> InputError:
    """The error for a profile of ``shape`` that fits no rule for these tiles."""
    yx = tuple(tile_shape[-2:])
    allowed = [yx, (n_channels, *yx)]
    if len(tile_shape) == 3:
        allowed += [tuple(tile_shape), (n_channels, *tile_shape)]
    shown = " or ".join(str(s) for s in dict.fromkeys(allowed))
    return InputError(f"{label}: profile shape {tuple(shape)} does not match the tiles: "
                      f"expected {shown} (tile shape {tuple(tile_shape)}, {n_channels} "
                      "channel(s))")


def load_profiles(path: str | Path, tile_shape: tuple[int, ...], n_channels: int, *,
                  kind: str, what: str = "--flatfield") -> list[Profile]:
    """Profiles from a TIFF for ``n_channels`` channels of tiles of ``tile_shape``.

    ``kind`` is ``"flat"`` (checked finite and > 0, normalised to mean 1 per channel) or
    ``"dark"`` (checked finite). Raises :class:`InputError` naming the file.
    """
    label = f"{what} {Path(path)}"
    data = read_profile_file(path, what, (tuple(tile_shape), n_channels))
    out = []
    for c, arr in enumerate(split_profiles(data, tile_shape, n_channels, label)):
        name = label if n_channels == 1 else f"{label} (channel {c})"
        recipe = ("file", str(Path(path).absolute()), tuple(tile_shape), n_channels, c, kind)
        prof = Profile(arr.astype(np.float32), name, recipe)
        if kind == "flat":
            check_flatfield(prof)
            prof = Profile((arr / arr.mean()).astype(np.float32), name, recipe)
        else:
            check_darkfield(prof)
        out.append(prof)
    return out


def check_dark_below_data(dark: Profile, mosaic: Mosaic, label: str,
                          max_tiles: int = 16) -> None:
    """Refuse a dark-field brighter than the data: above the tiles' dtype range, or above
    the median of the (sampled) tiles' pixels."""
    dtype = mosaic.dtype
    top = float(np.iinfo(dtype).max) if dtype.kind in "iu" else math.inf
    dmax = float(dark.array.max())
    if dmax > top:
        raise InputError(f"{label}: dark-field values up to {dmax:.6g} exceed the tiles' "
                         f"{dtype} range (max {top:.6g})")
    picks = np.unique(np.linspace(0, len(mosaic.tiles) - 1,
                                  min(max_tiles, len(mosaic.tiles))).round().astype(int))
    medians = []
    for i in picks:
        src = mosaic.tiles[int(i)].source
        read = getattr(src, "read_raw", src.read)
        full = tuple(slice(0, n) for n in src.shape)
        medians.append(float(np.median(np.asarray(read(full)))))
    data_median = float(np.median(medians))
    dmean = float(dark.array.mean())
    if dmean > data_median:
        raise InputError(f"{label}: dark-field (mean {dmean:.6g}) is brighter than the data "
                         f"(median pixel {data_median:.6g} over {len(picks)} tiles); is it "
                         "the flat-field, or from another camera setting?")


def profile_paths(out: str | Path, darkfield: bool) -> list[Path]:
    """The files :func:`save_profiles` writes for ``out``: the flat-field TIFF, its PNG
    preview and, with ``darkfield``, the dark-field TIFF (``NAME.dark.tif``).

    >>> [p.name for p in profile_paths("scope.tif", darkfield=True)]
    ['scope.tif', 'scope.png', 'scope.dark.tif']
    """
    out = Path(out)
    return [out, out.with_suffix(".png")] + (
        [out.with_name(f"{out.stem}.dark{out.suffix}")] if darkfield else [])


def save_profiles(out: str | Path, profiles: list[EstimatedProfiles], *, darkfield: bool,
                  overwrite: bool = False) -> list[Path]:
    """Write the flat-fields as ``out`` (float32 TIFF, ``(y, x)`` or ``(c, y, x)``), the
    dark-fields as ``out``'s name with ``.dark`` before the suffix when ``darkfield``, and a
    PNG preview beside ``out`` (``.png`` in place of the suffix). Returns the paths written.

    Each file is written under a temporary name and renamed into place when complete.
    """
    import tifffile

    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"-o {out}: profiles are written as TIFF; name it NAME.tif")
    targets = profile_paths(out, darkfield)
    png = targets[1]
    dark_path = out.with_name(f"{out.stem}.dark{out.suffix}")
    for t in targets:
        if t.exists() and not overwrite:
            raise InputError(f"-o {out}: {t} exists; add --overwrite to replace it")
    flats = np.stack([p.flatfield for p in profiles]).astype(np.float32)
    darks = np.stack([p.darkfield for p in profiles]).astype(np.float32)
    arrays = {out: flats[0] if len(profiles) == 1 else flats}
    if darkfield:
        arrays[dark_path] = darks[0] if len(profiles) == 1 else darks
    written = []
    for path, arr in arrays.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tifffile.imwrite(tmp, arr, photometric="minisblack", software="gpufusion",
                         metadata={"axes": "CYX" if arr.ndim == 3 else "YX"})
        tmp.replace(path)
        written.append(path)
    _write_preview_png(png, flats)
    written.append(png)
    return written


def _write_preview_png(path: Path, flats: np.ndarray) -> None:
    """8-bit grey PNG of the flat-fields side by side, each stretched min..max."""
    import imageio.v3 as iio

    panels = []
    for f in flats:
        step = max(1, math.ceil(max(f.shape) / 256))
        small = f[::step, ::step]
        lo, hi = float(small.min()), float(small.max())
        scaled = (small - lo) / (hi - lo) if hi > lo else np.zeros_like(small)
        panels.append(np.round(scaled * 255).astype(np.uint8))
        panels.append(np.full((small.shape[0], 4), 255, np.uint8))
    image = np.concatenate(panels[:-1], axis=1)
    tmp = path.with_name(f".{path.name}.tmp.png")
    iio.imwrite(tmp, image)
    tmp.replace(path)
