"""Flat-field correction benchmarks (issue 13). Report, do not assert beyond correctness.

Run: ``python -m pytest benchmarks/bench_flatfield.py --benchmark-only``

* fusion throughput of 4 x 4 tiles of 1024 x 1024 uint16 (in memory, NumPy backend, all
  threads) with the flat-field and dark-field correction on and off;
* estimation time of ``--flatfield auto`` for 600 tiles (24 x 25, 15 % overlap) of 256 x 256
  uint16 (the estimate reduces every tile to at most 128 px per side, so the tile size
  changes the reading cost, not the fit's; 600 tiles of 2048^2 would need 5 GB here), with
  and without the dark level search; each run checks the flat-field within 2 % RMS of the
  truth.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpufusion import correct_mosaic, fuse, mosaic_from_positions
from gpufusion.flatfield import estimate_profiles
from gpufusion.synthetic import Specimen


def vignetting(shape: tuple[int, int], strength: float = 0.3) -> np.ndarray:
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return 1 - strength * (yy**2 + xx**2) / 2


def shaded_tiles(rows: int, cols: int, tile: int, seed: int = 0):
    spec = Specimen.random(2, min_frequency=0.03, max_frequency=0.12, lo=0, hi=1, seed=seed)
    flat = vignetting((tile, tile))
    step = round(tile * 0.85)
    pos = np.array([(i * step, j * step) for i in range(rows) for j in range(cols)], float)
    tiles = [np.rint(flat * (2000 + 20000 * spec.sample(p, (tile, tile))) + 500)
             .astype(np.uint16) for p in pos]
    return tiles, pos, flat


@pytest.fixture(scope="module")
def fusion_case():
    return shaded_tiles(4, 4, 1024)


@pytest.mark.parametrize("correction", ["off", "on"])
def test_fuse_with_flatfield(benchmark, fusion_case, correction: str) -> None:
    tiles, pos, flat = fusion_case
    mosaic = mosaic_from_positions(tiles, pos)
    if correction == "on":
        mosaic = correct_mosaic(mosaic, flatfield=flat,
                                darkfield=np.full(flat.shape, 500.0, np.float32))
    image = fuse(mosaic, chunks=1024)
    out = np.empty(image.shape, image.dtype)

    def run():
        image.store(out, lock=False, scheduler="threads")

    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
    mpx = float(np.prod(mosaic.shape)) / 1e6
    benchmark.extra_info["Mpx_per_s"] = round(mpx / benchmark.stats.stats.min, 1)
    benchmark.extra_info["cpu_count"] = os.cpu_count()


@pytest.fixture(scope="module")
def estimation_case():
    return shaded_tiles(24, 25, 256, seed=1)


@pytest.mark.parametrize("darkfield", [False, True])
def test_estimate_600_tiles(benchmark, estimation_case, darkfield: bool) -> None:
    tiles, pos, flat = estimation_case
    mosaic = mosaic_from_positions(tiles, pos)
    est = benchmark.pedantic(lambda: estimate_profiles(mosaic, darkfield=darkfield),
                             rounds=2, iterations=1)
    err = float(np.sqrt(np.mean((est.flatfield / (flat / flat.mean()) - 1) ** 2)))
    assert err < 0.02, err
    benchmark.extra_info["flat_rms_error"] = round(err, 5)
    benchmark.extra_info["dark"] = round(est.dark, 1)
    benchmark.extra_info["sources"] = est.sources
