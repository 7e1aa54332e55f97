"""Intensity-matching benchmarks (issue 13). Report, do not assert speed.

Run: ``python -m pytest benchmarks/bench_intensity.py --benchmark-only -p no:cacheprovider``
(about a minute on 2 CPU cores, most of it making the synthetic tiles).

* :func:`gpufusion.intensity.estimate_intensity` on 600 tiles (a 24 x 25 grid, 10 %
  overlap, sub-pixel positions, +-20 % gains; uint16 tiles of 256 x 256 and 512 x 512 held in
  memory): reading every overlap (side and diagonal neighbours, about 2,250 pairs), block
  means, the sparse solve and the outlier rounds, in ``gain`` and ``gain+offset`` mode;
* the same on 3 x 4 tiles of 2048 x 2048 (29 pairs): pairs per second, what a slide of
  600 such tiles (2,255 pairs) would take;
* the solve alone (:func:`gpufusion.intensity.solve_intensity`) for 10,000 tiles (side
  neighbours of a 100 x 100 grid) from synthetic block means, 1 % of the pairs corrupted
  (a 30 % error), which the residual rounds drop.

``extra_info`` holds the tile and pair counts and the largest gain error against the truth
(up to the global scale).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpufusion.intensity import estimate_intensity, solve_intensity
from gpufusion.synthetic import make_mosaic

GRID = (24, 25)  # 600 tiles


def _gain_error(found: np.ndarray, gains: np.ndarray) -> float:
    ratio = found * gains  # the correction undoes the gain: constant when right
    return float(np.max(np.abs(ratio / np.exp(np.mean(np.log(ratio))) - 1.0)))


@pytest.fixture(scope="module", params=[256, 512], ids=lambda n: f"{n}px")
def slide(request):
    size = request.param
    syn = make_mosaic(GRID, (size, size), overlap=0.1, gain_spread=0.2, seed=0)
    return size, syn


@pytest.mark.parametrize("mode", ["gain", "gain+offset"])
def test_estimate_600_tiles(benchmark, slide, mode: str) -> None:
    size, syn = slide
    mosaic = syn.mosaic()

    def run():
        return estimate_intensity(mosaic, mode=mode)

    match = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    error = _gain_error(match.gains, syn.gains)
    assert error < 0.01, error  # a benchmark of a wrong answer would be worthless
    benchmark.extra_info.update({
        "tiles": len(mosaic.tiles), "tile": f"{size}x{size}", "pairs": len(match.pairs),
        "pairs_kept": int(match.kept.sum()), "max_gain_error": round(error, 5),
        "cpu_count": os.cpu_count()})


def test_estimate_2048px_tiles(benchmark) -> None:
    """3 x 4 tiles of 2048 x 2048 (all 600 would need 5 GB here): pairs per second, the
    rate that sets the time for a whole slide of such tiles."""
    syn = make_mosaic((3, 4), (2048, 2048), overlap=0.1, gain_spread=0.2, seed=0)
    mosaic = syn.mosaic()

    def run():
        return estimate_intensity(mosaic)

    match = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    error = _gain_error(match.gains, syn.gains)
    assert error < 0.01, error
    benchmark.extra_info.update({
        "tiles": len(mosaic.tiles), "tile": "2048x2048", "pairs": len(match.pairs),
        "pairs_per_s": round(len(match.pairs) / benchmark.stats.stats.min, 1),
        "max_gain_error": error, "cpu_count": os.cpu_count()})


def test_solve_10000_tiles(benchmark) -> None:
    rows, cols = 100, 100
    rng = np.random.default_rng(1)
    n = rows * cols
    gains = rng.uniform(0.8, 1.2, n)
    idx = np.arange(n).reshape(rows, cols)
    pairs = np.concatenate([np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
                            np.stack([idx[:-1].ravel(), idx[1:].ravel()], 1)])
    scene = rng.uniform(1000, 3000, 64)
    samples = [(scene * gains[i], scene * gains[j]) for i, j in pairs]  # as make_mosaic
    bad = rng.choice(len(pairs), len(pairs) // 100, replace=False)
    for k in bad:
        samples[k] = (samples[k][0] * 1.3, samples[k][1])

    def run():
        return solve_intensity(samples, pairs, n)

    match = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
    ratio = match.gains * gains
    off = int(np.sum(np.abs(ratio / np.median(ratio) - 1.0) > 0.01))
    # a tile whose good pairs went before its bad one keeps the bad one as its only link
    assert off <= n // 1000, off
    benchmark.extra_info.update({
        "tiles": n, "pairs": len(pairs), "corrupted": len(bad),
        "dropped": int((match.status == "residual").sum()), "tiles_off_by_1pct": off})
