"""Fusion on a Dask worker process vs in this process (pytest-benchmark).

distributed's nanny starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``, which
also freezes glibc's mmap threshold at 128 KiB: every block-sized array is then mmapped,
page-faulted and unmapped anew. Fusion and registration tasks reset both thresholds in such
processes (:func:`gpufusion.cluster.tune_worker_malloc`). This measures a whole fusion to
OME-Zarr (36 synthetic tiles of 1024² uint16 from TIFF files) on one worker process of 2
threads, with the tasks' tuning (as shipped) and with it disabled, against the threaded
scheduler in this process::

    python -m pytest benchmarks/bench_workers.py -q -p no:cacheprovider -s

Each case: an untimed warm-up run, then the fastest of 3.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

ROUNDS = 3


@pytest.fixture(scope="module")
def tiles_csv(tmp_path_factory) -> Path:
    import tifffile

    from gpufusion.synthetic import make_mosaic

    syn = make_mosaic((6, 6), (1024, 1024), overlap=0.1, dtype="uint16", seed=1)
    folder = tmp_path_factory.mktemp("tiles")
    lines = ["file,x,y"]
    for k, (tile, (y, x)) in enumerate(zip(syn.tiles, syn.positions, strict=True)):
        tifffile.imwrite(folder / f"t{k}.tif", tile)
        lines.append(f"t{k}.tif,{x},{y}")
    (folder / "pos.csv").write_text("\n".join(lines) + "\n")
    return folder / "pos.csv"


def _fuse_seconds(csv: Path, scheduler) -> float:
    import gpufusion

    mosaic = gpufusion.mosaic_from_file(csv)
    best = float("inf")
    for k in range(ROUNDS + 1):  # the first is the warm-up
        out = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        gpufusion.fuse_to_file(mosaic, out / "o.ome.zarr", scheduler=scheduler,
                               progress=False)
        if k:
            best = min(best, time.perf_counter() - t0)
        shutil.rmtree(out)
    return best


def _untune() -> None:
    """On a worker: make the tasks' tuning a no-op (as before it existed)."""
    from gpufusion import cluster

    cluster.tune_worker_malloc = lambda: False  # the tasks look it up when they run


@pytest.mark.parametrize("where", ["this process", "worker, tuned", "worker, untuned"])
def test_fusion_on_a_worker_process(benchmark, tiles_csv: Path, where: str) -> None:
    import distributed

    if where == "this process":
        seconds = _fuse_seconds(tiles_csv, None)
    else:
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                      dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            if where.endswith("untuned"):
                client.run(_untune)
            seconds = _fuse_seconds(tiles_csv, client)
    benchmark.extra_info.update(where=where, seconds=seconds, megapixels=36 * 1.048576)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{where}: {seconds:.2f} s")
