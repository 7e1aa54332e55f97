"""Planning and graph shape, checked against brute force."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpufusion import fuse, mosaic_from_affines, mosaic_from_positions, plan_fusion
from gpufusion.plan import COVER_EPS
from gpufusion.spatial import chunk_bounds, overlapping_pairs

from .test_fuse import random_affine


def _brute_force(mosaic, chunks):
    """For every chunk and tile: the pixels whose sample point the tile covers, and the
    tile pixels linear interpolation touches for them (a Python loop, small cases only)."""
    bounds = chunk_bounds(chunks)
    ndim = mosaic.ndim
    expected = {}
    for idx in np.ndindex(*(len(c) for c in chunks)):
        sl = [np.arange(bounds[a][k], bounds[a][k + 1]) for a, k in enumerate(idx)]
        pts = np.stack(np.meshgrid(*sl, indexing="ij")).reshape(ndim, -1).astype(np.float64)
        for t, inv in enumerate(mosaic.inverse_affines):
            q = inv[:ndim, :ndim] @ pts + inv[:ndim, ndim:]
            s = mosaic.tile_shapes[t][:, None]
            ok = np.all((q >= -COVER_EPS) & (q <= s - 1 + COVER_EPS), axis=0)
            if ok.any():
                qc = np.clip(q[:, ok], 0, s - 1)
                expected[(idx, t)] = (np.floor(qc).min(axis=1), np.ceil(qc).max(axis=1))
    return expected


@pytest.mark.parametrize("ndim", [2, 3])
def test_plan_covers_exactly_what_brute_force_needs(ndim: int) -> None:
    rng = np.random.default_rng(ndim)
    shape = (20, 24) if ndim == 2 else (8, 10, 12)
    tiles, affs = [], []
    for k in range(5):
        a = random_affine(rng, ndim, shift=0) if k % 2 else np.eye(ndim + 1)
        a[:ndim, ndim] = rng.uniform(0, 25, ndim)
        tiles.append(np.zeros(shape, np.uint8))
        affs.append(a)
    m = mosaic_from_affines(tiles, affs)
    chunks = (7,) * ndim
    plan = plan_fusion(m, chunks)
    expected = _brute_force(m, plan.chunks)
    found = {}
    for idx in np.ndindex(*plan.numblocks):
        table = plan.chunk(idx)
        assert list(table.tiles) == sorted(table.tiles)  # overlay order
        for k, t in enumerate(table.tiles):
            found[(idx, int(t))] = (table.win_lo[k], table.win_lo[k] + table.win_shape[k])
    # every needed (chunk, tile) pair is planned, with a window holding every touched pixel
    for key, (lo, hi) in expected.items():
        assert key in found, key
        wlo, whi = found[key]
        assert np.all(wlo <= lo) and np.all(hi < whi)
    # and planned-but-unneeded pairs are rare (chunk boxes vs rotated tiles), never windowless
    assert len(found) <= 1.5 * len(expected)
    for wlo, whi in found.values():
        assert np.all(whi > wlo)


def test_plan_for_many_tiles_is_consistent() -> None:
    rng = np.random.default_rng(0)
    n = 50 * 50
    grid = np.stack(np.unravel_index(np.arange(n), (50, 50)), axis=1) * 90.0
    pos = grid + rng.uniform(-3, 3, grid.shape)
    pos -= pos.min(axis=0)

    class Stub:
        shape, dtype, name = (100, 100), np.dtype(np.uint16), "stub"

        def read(self, window):  # never called by the planner
            raise AssertionError

    m = mosaic_from_positions([Stub()] * n, pos)
    plan = plan_fusion(m, 256)
    counts = np.diff(plan.ptr)
    assert counts.min() >= 1 and counts.max() <= 16
    # every tile appears in the chunks its box touches; sum of window areas ~ tile areas
    area = (plan.win_shape.prod(axis=1)).sum()
    assert 1.0 * n * 100 * 100 <= area <= 1.3 * n * 100 * 100
    pairs = overlapping_pairs(*m.tile_bounds())
    assert 2 * 49 * 50 <= len(pairs) <= 2 * 49 * 50 + 2 * 49 * 49


def test_one_task_per_chunk_and_only_windows_are_read() -> None:
    reads: list[tuple] = []
    lock = threading.Lock()

    class Counting:
        def __init__(self, arr, name):
            self.arr, self.shape, self.dtype, self.name = arr, arr.shape, arr.dtype, name

        def read(self, window):
            with lock:
                reads.append((self.name, window))
            return self.arr[window]

    rng = np.random.default_rng(1)
    tiles = [Counting(rng.integers(0, 255, (64, 64)).astype(np.uint8), f"t{i}")
             for i in range(4)]
    m = mosaic_from_positions(tiles, [(0, 0), (0, 56.5), (56, 0), (56.25, 56.75)])
    img = fuse(m, chunks=16)
    graph = dict(img.__dask_graph__())
    fuse_keys = [k for k in graph if isinstance(k, tuple) and k[0] == img.name]
    assert len(fuse_keys) == np.prod(img.numblocks)
    out = img.compute()
    assert out.shape == m.shape
    plan = plan_fusion(m, 16)
    assert len(reads) == plan.n_entries  # one window per (chunk, tile) entry, nothing else
    for _, window in reads:
        assert all(s.stop - s.start <= 16 + 2 for s in window)  # chunk + interpolation support
