"""Registration at scale (issue 14): pairs/s on 1 and 2 Dask workers; the solve of 100,000 tiles.

Run: ``python -m pytest benchmarks/bench_register_scale.py --benchmark-only -p no:cacheprovider``
(about 3 minutes on 2 CPU cores).

* pairwise registration of the side-neighbour pairs of a 6x6 grid of 1024x1024 uint16 TIFF
  tiles on disk (60 pairs; 10 % overlap, stage errors of +-15 px, ``max_shift`` 30): in this
  process (:func:`~gpufusion.registration.measure_pairs`, SciPy FFTs on all cores), and as
  Dask tasks on a ``distributed.LocalCluster`` of 1 and 2 worker processes of one thread each
  (:func:`~gpufusion.registration.distributed.measure_pairs_on_cluster`, 8 pairs per task,
  so 8 tasks; the tiles are read by the workers). Each cluster case is warmed up once
  (worker imports, the mosaic sent to the workers) and checked to give the in-process
  result bit for bit. ``extra_info``: ``pairs_per_s``, ``workers``.
* the global solve (:func:`~gpufusion.registration.solve_positions`, weighted least
  squares with robust reweighting and outlier rejection, sparse LU) for a 317x317 grid,
  100,489 tiles and 200,344 edges (0.1 px noise, 1 % wrong edges; the generator of
  ``bench_register.py``). ``extra_info``: solves, rejected edges, peak resident memory of
  the process after the solve (``ru_maxrss``; the normal matrix is never dense: that would
  be 80 GB).
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpufusion import mosaic_from_file
from gpufusion.registration import candidate_pairs, measure_pairs, solve_positions
from gpufusion.synthetic import make_mosaic

sys.path.insert(0, str(Path(__file__).parent))
from bench_register import synthetic_edges  # noqa: E402

distributed = pytest.importorskip("distributed")

MAX_SHIFT = 30.0
PAIRS_PER_TASK = 8
_LOCAL: dict[str, object] = {}


@pytest.fixture(scope="module")
def tiles_on_disk(tmp_path_factory):
    """6x6 tiles of 1024x1024 uint16 as TIFF files and a positions CSV; the candidate pairs."""
    folder = tmp_path_factory.mktemp("scale_tiles")
    syn = make_mosaic((6, 6), (1024, 1024), overlap=0.1, stage_error=15, seed=0)
    lines = ["file,x,y"]
    for k, (tile, (y, x)) in enumerate(zip(syn.tiles, syn.stage_positions, strict=True)):
        tifffile.imwrite(folder / f"t{k}.tif", tile)
        lines.append(f"t{k}.tif,{float(x)!r},{float(y)!r}")
    (folder / "pos.csv").write_text("\n".join(lines) + "\n")
    mosaic = mosaic_from_file(folder / "pos.csv")
    return mosaic, candidate_pairs(mosaic, max_shift=MAX_SHIFT)


def _record(benchmark, pairs, workers: int | str) -> None:
    benchmark.extra_info["pairs"] = len(pairs)
    benchmark.extra_info["pairs_per_s"] = round(len(pairs) / benchmark.stats.stats.min, 2)
    benchmark.extra_info["workers"] = workers
    benchmark.extra_info["cpu_count"] = os.cpu_count()


def test_pairwise_in_process(benchmark, tiles_on_disk) -> None:
    mosaic, pairs = tiles_on_disk

    def run():
        return measure_pairs(mosaic, pairs, max_shift=MAX_SHIFT, backend="numpy")

    run()  # warm-up: page cache, FFT plans
    result = benchmark.pedantic(run, rounds=2, iterations=1)
    assert np.isfinite(result.ncc).all()
    _LOCAL["result"] = result
    _record(benchmark, pairs, "in process")


@pytest.mark.parametrize("workers", [1, 2])
def test_pairwise_on_local_cluster(benchmark, tiles_on_disk, workers: int) -> None:
    from gpufusion.registration.distributed import measure_pairs_on_cluster

    mosaic, pairs = tiles_on_disk
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:

        def run():
            return measure_pairs_on_cluster(client, mosaic, pairs, max_shift=MAX_SHIFT,
                                            backend="numpy", pairs_per_task=PAIRS_PER_TASK)

        run()  # warm-up: worker imports, page cache
        result = benchmark.pedantic(run, rounds=2, iterations=1)
    local = _LOCAL.get("result") or measure_pairs(mosaic, pairs, max_shift=MAX_SHIFT)
    np.testing.assert_array_equal(result.shift, local.shift)  # type: ignore[attr-defined]
    _record(benchmark, pairs, workers)


def test_global_solve_100k_tiles(benchmark) -> None:
    nominal, pairs, offsets, weights = synthetic_edges(317 * 317)
    result = benchmark.pedantic(solve_positions, args=(nominal, pairs, offsets, weights),
                                kwargs={"max_residual": 1.0}, rounds=1, iterations=1)
    benchmark.extra_info.update(
        tiles=len(nominal), edges=len(pairs), solves=result.iterations,
        rejected=int(result.rejected.sum()),
        max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
