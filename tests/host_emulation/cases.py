"""Seeded random fusion cases built through the real planner, shared by the kernel tests.

A case is a small mosaic (random tile pixels, a tile grid with overlaps placed by integer
translations, sub-pixel translations or well-conditioned random affines), an uneven chunking
and the validated :class:`~gpufusion.backends.numpy_ref.FusionParams`. :func:`check_case`
runs any chunk-fusion function over every chunk of the plan and compares it with
:func:`gpufusion.backends.numpy_ref.fuse_chunk` using the project's dtype-keyed tolerances,
so the host-emulated kernel and the CuPy backend are held to the same test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gpufusion.backends.numpy_ref import FusionParams, fuse_chunk
from gpufusion.fuse import fusion_params
from gpufusion.layout import Mosaic, mosaic_from_affines, mosaic_from_positions
from gpufusion.plan import ChunkTable, plan_fusion

from ..conftest import assert_close

LAYOUTS = ("translation", "subpixel", "affine")
#: (tile dtype, output dtype): the kernel's native pairs (float32 accumulators, then float64
#: ones for wide dtypes), then conversion paths (float16 tiles converted on the host, outputs
#: of another dtype rounded, clipped and cast after the kernel).
DTYPE_PAIRS = (("uint8", "uint8"), ("uint16", "uint16"), ("float32", "float32"),
               ("uint16", "float32"), ("uint32", "uint32"), ("int64", "int64"),
               ("float64", "float64"))
FALLBACK_PAIRS = (("float16", "float16"), ("uint16", "int16"), ("int16", "int16"),
                  ("int32", "float32"), ("uint64", "uint16"))

#: Tile grid, tile shape and output chunks (uneven on purpose) per ndim.
GEOMETRY = {2: ((2, 3), (23, 19), (16, 7)), 3: ((2, 2, 2), (9, 13, 11), (5, 9, 7))}

FuseFn = Callable[[Sequence[np.ndarray], ChunkTable, FusionParams], np.ndarray]


@dataclass(frozen=True)
class Case:
    """One fusion problem: a mosaic, its chunking and the fusion parameters."""

    name: str
    mosaic: Mosaic
    chunks: tuple[int, ...]
    params: FusionParams


def random_tile(rng: np.random.Generator, shape: Sequence[int], dtype: str) -> np.ndarray:
    """Random pixels over most of the dtype's range (floats: 0..1000)."""
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, int(info.max) + 1, size=tuple(shape), dtype=dt)
    return (rng.random(tuple(shape)) * 1000).astype(dt)


def random_affine(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A well-conditioned linear part: rotations, anisotropic scale, shear."""
    lin = np.eye(ndim)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            t = rng.uniform(-0.4, 0.4)
            r = np.eye(ndim)
            r[[i, i, j, j], [i, j, i, j]] = [np.cos(t), -np.sin(t), np.sin(t), np.cos(t)]
            lin = r @ lin
    shear = np.eye(ndim) + np.triu(rng.uniform(-0.15, 0.15, (ndim, ndim)), 1)
    return lin @ np.diag(rng.uniform(0.85, 1.2, ndim)) @ shear


def make_case(layout: str, ndim: int, mode: str, interpolation: str,
              dtypes: tuple[str, str], seed: int,
              blend_width: float | Sequence[float] | None = None) -> Case:
    """A seeded random case (see the module docstring)."""
    rng = np.random.default_rng(seed)
    grid, tshape, chunks = GEOMETRY[ndim]
    step = np.asarray(tshape, dtype=np.float64) * 0.7
    idx = np.array(list(np.ndindex(*grid)), dtype=np.float64)
    tiles = [random_tile(rng, tshape, dtypes[0]) for _ in range(len(idx))]
    if layout == "translation":
        mosaic = mosaic_from_positions(tiles, np.round(idx * step))
    elif layout == "subpixel":
        mosaic = mosaic_from_positions(tiles, idx * step + rng.uniform(-1.5, 1.5, idx.shape))
    elif layout == "affine":
        affines = []
        for p in idx * step:
            a = np.eye(ndim + 1)
            a[:ndim, :ndim] = random_affine(rng, ndim)
            a[:ndim, ndim] = p + rng.uniform(-2, 2, ndim)
            affines.append(a)
        mosaic = mosaic_from_affines(tiles, affines)
    else:
        raise ValueError(layout)
    params = fusion_params(mosaic, blend=mode, blend_width=blend_width,
                           interpolation=interpolation, dtype=dtypes[1])
    name = f"{layout}-{ndim}d-{mode}-{interpolation}-{dtypes[0]}-{dtypes[1]}-s{seed}"
    return Case(name, mosaic, chunks, params)


def chunk_inputs(case: Case) -> list[tuple[list[np.ndarray], ChunkTable]]:
    """``(windows, table)`` of every chunk of the case's plan."""
    plan = plan_fusion(case.mosaic, case.chunks)
    sources = [t.source for t in case.mosaic.tiles]
    out = []
    for idx in np.ndindex(*plan.numblocks):
        table = plan.chunk(idx)
        windows = [sources[int(i)].read(w) for i, w in zip(table.tiles, table.windows(),
                                                           strict=True)]
        out.append((windows, table))
    return out


def check_case(case: Case, fuse: FuseFn, algorithm: str = "auto") -> dict[str, float]:
    """Fuse every chunk with ``fuse`` and with the NumPy reference and compare them.

    Returns counts for reporting: pixels compared, pixels that differ at all, the largest
    absolute difference and the number of chunks with at least one entry.
    """
    stats = {"pixels": 0, "differ": 0, "max_abs": 0.0, "chunks": 0}
    for windows, table in chunk_inputs(case):
        expected = fuse_chunk(windows, table, case.params, algorithm=algorithm)
        actual = np.asarray(fuse(windows, table, case.params))
        assert actual.dtype == expected.dtype, case.name
        try:
            assert_close(actual, expected)
        except AssertionError as exc:
            raise AssertionError(f"{case.name}, chunk at {table.start.tolist()}: {exc}") from None
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        stats["pixels"] += diff.size
        stats["differ"] += int(np.count_nonzero(diff))
        stats["max_abs"] = max(stats["max_abs"], float(diff.max(initial=0.0)))
        stats["chunks"] += int(len(table) > 0)
    assert stats["chunks"] > 0, f"{case.name}: no chunk had a tile"
    return stats
