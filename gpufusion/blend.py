"""Blending: how overlapping tiles are combined, and the analytic per-tile weights.

Modes
-----
``linear``  feather: a ramp from the tile edge that reaches 1 at ``width`` pixels inside it
``cosine``  raised-cosine ramp over the same ``width`` (smooth first derivative)
``average`` flat weights: plain mean of the overlapping tiles
``max``     maximum intensity of the overlapping tiles
``overlay`` no blending: the tile listed **last** wins wherever it has data (painter's order)

Weights are separable: a tile's weight at tile coordinate ``q`` is the product over axes of
``ramp(d_a / width_a)``, where ``d_a = min(q_a + 0.5, shape_a - 0.5 - q_a)`` is the distance
from the pixel centre to the tile border along axis ``a`` (the border lies half a pixel outside
the outermost pixel centres). ``ramp`` is ``min(r, 1)`` for ``linear`` and
``0.5 - 0.5 cos(pi min(r, 1))`` for ``cosine``; a zero ``width`` gives flat weights. Every
covered pixel has a weight > 0, so normalising by the sum of weights is always defined.
Nothing is stored per tile: kernels evaluate the same formula per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

BLEND_MODES = ("linear", "cosine", "average", "max", "overlay")
INTERPOLATIONS = ("linear", "nearest")

#: Integer codes shared by the NumPy reference and the CUDA kernels.
MODE_CODES = {m: i for i, m in enumerate(BLEND_MODES)}
INTERP_CODES = {m: i for i, m in enumerate(INTERPOLATIONS)}


@dataclass(frozen=True)
class BlendSpec:
    """Blend mode and ramp width (pixels, per axis in index order)."""

    mode: str
    width: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        """True for modes that normalise by the sum of weights."""
        return self.mode in ("linear", "cosine", "average")


def check_blend_mode(mode: str) -> str:
    if mode not in BLEND_MODES:
        raise InputError(f"blend: unknown mode {mode!r}; choose one of {', '.join(BLEND_MODES)}")
    return mode


def check_interpolation(interp: str) -> str:
    if interp not in INTERPOLATIONS:
        raise InputError(
            f"interpolation: unknown {interp!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    return interp


def resolve_blend(
    mode: str, width: float | Sequence[float] | None, ndim: int, default: Sequence[float]
) -> BlendSpec:
    """Validate a blend mode and width; ``None`` (for all axes or per axis) takes ``default``."""
    check_blend_mode(mode)
    if width is None:
        w = tuple(float(v) for v in default)
    elif isinstance(width, int | float | np.number):
        w = (float(width),) * ndim
    else:
        given = list(width)
        if len(given) != ndim:
            raise InputError(f"blend width: expected 1 or {ndim} values, got {len(given)}")
        w = tuple(float(default[i] if v is None else v) for i, v in enumerate(given))
    for v in w:
        if not math.isfinite(v) or v < 0:
            raise InputError(f"blend width: must be a finite number >= 0, got {v}")
    return BlendSpec(mode, w)


def ramp_weights(q: np.ndarray, size: float, width: float, mode: str,
                 dtype: np.dtype | type = np.float32) -> np.ndarray:
    """1-D blending weight at tile coordinates ``q`` (float64) along one axis.

    Computed in float64 and returned as ``dtype``, the accumulator dtype (float32, or float64
    for wide tile dtypes). This is the NumPy twin of ``gf_ramp`` in ``kernels/fuse.cu``.

    Examples
    --------
    >>> ramp_weights(np.array([0.0, 1.0, 5.0]), 10, 2.0, "linear").tolist()
    [0.25, 0.75, 1.0]
    """
    if mode in ("average", "max", "overlay") or width <= 0:
        return np.ones(q.shape, dtype=dtype)
    d = np.minimum(q + 0.5, size - 0.5 - q)
    r = np.minimum(d / width, 1.0)
    if mode == "cosine":
        r = 0.5 - 0.5 * np.cos(np.pi * r)
    return r.astype(dtype, copy=False)


def default_blend_width(lo: np.ndarray, hi: np.ndarray, pairs: np.ndarray) -> tuple[float, ...]:
    """Default ramp width: half the median overlap between neighbouring tiles, per axis.

    ``lo``, ``hi`` are the tiles' bounding boxes and ``pairs`` the overlapping pairs (see
    :func:`gpufusion.spatial.overlapping_pairs`). For each pair, the overlap along its thinnest
    axis is the seam's width; the default is half the median of those (at least 1 px), so the
    ramps of two neighbours meet inside the overlap. Without overlaps it is 1 px.
    """
    ndim = lo.shape[1]
    if len(pairs) == 0:
        return (1.0,) * ndim
    i, j = pairs[:, 0], pairs[:, 1]
    ext = np.minimum(hi[i], hi[j]) - np.maximum(lo[i], lo[j]) + 1.0  # (p, ndim)
    thin = ext.min(axis=1)
    width = max(1.0, 0.5 * float(np.median(thin)))
    return (width,) * ndim
