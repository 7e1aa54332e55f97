"""Synthetic mosaics with exact ground truth, for the demo, tests and benchmarks.

The specimen is a continuous, band-limited function: a sum of ``n_waves`` plane waves with
random directions, phases and log-uniform frequencies (up to ``max_frequency`` cycles per
pixel) and a pink (1/f) amplitude spectrum, which looks like textured tissue and has no
periodic structure. Being continuous, it can be sampled **exactly** at any sub-pixel tile
position, so the only error left after fusion is the fusion's own (interpolation, blending).
Sampling a grid is two matrix products per plane (``Re(E_y diag(c) E_x^T)``), so 16 tiles of
1024x1024 take well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .layout import Mosaic, mosaic_from_positions


@dataclass(frozen=True)
class Specimen:
    """A continuous band-limited test image ``f(coords) -> intensity`` in ``[lo, hi]``."""

    freqs: np.ndarray  # (k, ndim) cycles per pixel, index order
    phases: np.ndarray  # (k,)
    amps: np.ndarray  # (k,)
    lo: float
    hi: float

    @classmethod
    def random(cls, ndim: int = 2, *, n_waves: int = 256, max_frequency: float = 0.12,
               min_frequency: float = 1 / 1500, lo: float = 0.0, hi: float = 1.0,
               seed: int = 0) -> Specimen:
        rng = np.random.default_rng(seed)
        mag = np.exp(rng.uniform(np.log(min_frequency), np.log(max_frequency), n_waves))
        direction = rng.normal(size=(n_waves, ndim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        amps = 1.0 / (mag * n_waves**0.5)
        amps /= np.sqrt(0.5 * np.sum(amps**2))  # unit standard deviation
        return cls(mag[:, None] * direction, rng.uniform(0, 2 * np.pi, n_waves), amps, lo, hi)

    def sample(self, origin: Sequence[float], shape: Sequence[int]) -> np.ndarray:
        """Sample on the grid ``origin + index`` (index order); float32 in ``[lo, hi]``."""
        origin = np.asarray(origin, dtype=np.float64)
        ndim = len(shape)
        c = self.amps * np.exp(1j * (self.phases + 2 * np.pi * self.freqs @ origin))
        ey = np.exp(2j * np.pi * np.outer(np.arange(shape[-2]), self.freqs[:, -2]))
        ex = np.exp(2j * np.pi * np.outer(np.arange(shape[-1]), self.freqs[:, -1]))
        ey, ex = ey.astype(np.complex64), ex.astype(np.complex64)
        if ndim == 2:
            planes = [c]
        else:
            ez = np.exp(2j * np.pi * np.outer(np.arange(shape[0]), self.freqs[:, 0]))
            planes = [c * ez[z] for z in range(shape[0])]
        out = np.empty((len(planes), shape[-2], shape[-1]), dtype=np.float32)
        for z, cz in enumerate(planes):
            cz = cz.astype(np.complex64)
            # Re((ey*c) @ ex^T) as two real products
            a = ey * cz
            out[z] = a.real @ ex.real.T - a.imag @ ex.imag.T
        mid, half = 0.5 * (self.lo + self.hi), 0.5 * (self.hi - self.lo)
        out = np.clip(mid + out * (half / 3.5), self.lo, self.hi)  # +-3.5 sigma fills the range
        return out.reshape(tuple(shape))


@dataclass
class SyntheticMosaic:
    """Tiles cut from a :class:`Specimen` at known positions.

    Attributes
    ----------
    tiles : list of ndarray
    positions : ndarray (n, ndim)
        True positions (index order) of each tile's pixel 0.
    stage_positions : ndarray (n, ndim)
        Positions a stage would report: ``positions`` plus ``stage_error`` noise.
    grid : tuple of int
        Tiles per axis.
    specimen : Specimen
    gains : ndarray (n,)
        Per-tile intensity gain applied to the tiles (1 = none).
    """

    tiles: list[np.ndarray]
    positions: np.ndarray
    stage_positions: np.ndarray
    grid: tuple[int, ...]
    specimen: Specimen
    dtype: np.dtype
    gains: np.ndarray = field(default_factory=lambda: np.ones(0))

    def mosaic(self, positions: np.ndarray | None = None, **kwargs) -> Mosaic:
        """The tiles as a :class:`Mosaic` at ``positions`` (default: the true ones)."""
        pos = self.positions if positions is None else positions
        names = [f"tile_{'_'.join(map(str, idx))}" for idx in np.ndindex(*self.grid)]
        return mosaic_from_positions(self.tiles, pos, names=names, **kwargs)

    def coverage(self, origin: Sequence[float], shape: Sequence[int],
                 positions: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of the output grid pixels that some tile covers."""
        pos = self.positions if positions is None else positions
        mask = np.zeros(tuple(shape), dtype=bool)
        tshape = np.asarray(self.tiles[0].shape)
        for p in np.asarray(pos, dtype=np.float64) - np.asarray(origin, dtype=np.float64):
            lo = np.maximum(np.ceil(p - 1e-6), 0).astype(int)
            hi = np.floor(p + tshape - 1 + 1e-6).astype(int) + 1
            mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
        return mask

    def ground_truth(self, origin: Sequence[float], shape: Sequence[int]) -> np.ndarray:
        """The specimen on the output grid, quantised like the tiles."""
        return _quantise(self.specimen.sample(origin, shape), self.dtype)


def _quantise(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def make_mosaic(
    grid: Sequence[int] = (4, 4),
    tile_shape: Sequence[int] = (1024, 1024),
    *,
    overlap: float = 0.1,
    dtype: str | np.dtype = "uint16",
    subpixel: float = 2.0,
    stage_error: float = 0.0,
    gain_spread: float = 0.0,
    blank: Sequence[int] = (),
    integer_positions: bool = False,
    seed: int = 0,
) -> SyntheticMosaic:
    """Make a synthetic tiled acquisition with exact ground truth.

    Parameters
    ----------
    grid : sequence of int
        Tiles per axis (index order), e.g. ``(4, 4)`` or ``(2, 3, 3)`` for 3D.
    tile_shape : sequence of int
        Shape of every tile; its length sets 2D or 3D.
    overlap : float
        Fraction of the tile shared with each neighbour on the nominal grid.
    dtype : dtype
        Tile dtype; integers use 5 %..95 % of their range, floats ``[0, 1]``.
    subpixel : float
        True positions deviate from the nominal grid by uniform noise in ``+-subpixel`` px
        (the first tile stays at the origin).
    stage_error : float
        ``stage_positions`` = true positions + uniform noise in ``+-stage_error`` px.
    gain_spread : float
        Each tile's intensities are multiplied by ``1 + uniform(-gain_spread, gain_spread)``
        (shading differences between tiles, for blending tests).
    blank : sequence of int
        Indices of tiles replaced by a constant (empty field of view).
    integer_positions : bool
        Round the true positions to whole pixels.
    seed : int

    Examples
    --------
    >>> s = make_mosaic((2, 2), (64, 64), seed=1)
    >>> len(s.tiles), s.tiles[0].dtype.name
    (4, 'uint16')
    """
    dtype = np.dtype(dtype)
    ndim = len(tile_shape)
    if len(grid) != ndim:
        raise ValueError(f"grid {tuple(grid)} and tile_shape {tuple(tile_shape)} differ in ndim")
    rng = np.random.default_rng(seed)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        span = float(info.max) - float(info.min)
        lo, hi = info.min + 0.05 * span, info.min + 0.95 * span
    else:
        lo, hi = 0.0, 1.0
    spec = Specimen.random(ndim, lo=lo, hi=hi, seed=seed)
    step = np.asarray(tile_shape, dtype=np.float64) * (1.0 - overlap)
    idx = np.array(list(np.ndindex(*grid)), dtype=np.float64).reshape(-1, ndim)
    pos = idx * step + subpixel  # keep every true position >= 0
    pos += rng.uniform(-subpixel, subpixel, size=pos.shape)
    pos[0] = 0.0
    if integer_positions:
        pos = np.round(pos)
    stage = pos + rng.uniform(-stage_error, stage_error, size=pos.shape)
    gains = 1.0 + rng.uniform(-gain_spread, gain_spread, size=len(pos))
    tiles = []
    for k, p in enumerate(pos):
        if k in set(blank):
            tiles.append(np.full(tuple(tile_shape), lo, dtype=dtype))
            continue
        vals = spec.sample(p, tile_shape)
        if gains[k] != 1.0:
            vals = vals * np.float32(gains[k])
        tiles.append(_quantise(vals, dtype))
    return SyntheticMosaic(tiles, pos, stage, tuple(grid), spec, dtype, gains)
