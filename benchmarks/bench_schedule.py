"""Dask scheduling overhead of a whole-slide run, with the pixel work stubbed out.

What is left of :func:`gpufusion.fuse_to_file` when every block's fusion returns at once:
planning, building the dask graph, optimising it, scheduling its tasks, and the writer's
own steps on blocks of zeros (pyramid downsampling, encoding, storing; cheap on zeros,
but not free: the chunk files are really written). The tiles are stub sources (shape and
dtype, no pixels), and the NumPy backend's ``fuse_task`` is replaced by one returning a
block of zeros of the block's shape, so no tile window is ever read.

Nothing here knows the writer's graph: a dask callback records every graph the local
scheduler runs (a writer may compute more than once), so the same cases measure the
per-level writer (a fuse, downsample and store task per block and level) and a
one-task-per-block writer alike, and report the task count they see.

Cases:

* ``slide600``: the layout of ``bench_wsi.py`` (600 tiles of 2048x2048 uint16, 10 %
  overlap, grid 24x25, chunks of 1024: about 2,000 output blocks at level 0);
* ``blocks10k``: 14x14 such tiles with chunks of 256: about 10,400 output blocks.

Recorded in ``extra_info`` (and printed): ``blocks`` (level-0 output blocks), ``computes``
(graphs the scheduler ran), ``tasks`` (tasks in them, after optimisation), ``first_task_s``
(from the call to the first task starting: planning, graph building, optimisation and
scheduler start-up), ``wall_s`` (the whole call), ``task_thread_s`` (time inside tasks,
summed over threads), ``overhead_s`` (``wall_s - task_thread_s / threads``: the time the
threads were not running task code) and ``overhead_per_task_us``.

Run::

    python -m pytest benchmarks/bench_schedule.py -q -p no:cacheprovider \\
        --benchmark-json=schedule.json
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from dask.callbacks import Callback

TILE = 2048
OVERLAP = 0.1


class StubSource:
    """A tile of ``shape`` and ``dtype`` without pixels (never read: fusion is stubbed)."""

    def __init__(self, shape: tuple[int, ...], dtype: str, name: str) -> None:
        self.shape, self.dtype, self.name = shape, np.dtype(dtype), name

    def read(self, window: tuple[slice, ...]) -> np.ndarray:
        raise AssertionError(f"{self.name}: a stub tile was read ({window})")


def stub_mosaic(rows: int, cols: int, tile: int = TILE):
    """``rows x cols`` stub tiles on a regular grid with ``OVERLAP``, like bench_wsi.py's."""
    from gpufusion import mosaic_from_positions

    step = round(tile * (1 - OVERLAP))
    tiles = [StubSource((tile, tile), "uint16", f"stub_{r}_{c}")
             for r in range(rows) for c in range(cols)]
    positions = [(r * step, c * step) for r in range(rows) for c in range(cols)]
    return mosaic_from_positions(tiles, positions)


def zeros_fuse_task(self: Any, task: Any, params: Any, algorithm: str = "auto") -> np.ndarray:
    """The stub of ``NumpyBackend.fuse_task``: the block, all zeros, without reading."""
    return np.zeros(tuple(task.table.shape), dtype=params.out_dtype)


class GraphRecorder(Callback):
    """Records every graph the local scheduler runs and when its tasks run."""

    def __init__(self) -> None:
        super().__init__()
        self.graphs: list[int] = []  # tasks of each graph run
        self.first_task: float | None = None  # perf_counter() when the first task began
        self.busy = 0.0  # seconds inside tasks, summed over threads
        self._lock = threading.Lock()
        self._started: dict[Any, float] = {}

    def _start(self, dsk: Any) -> None:
        self.graphs.append(len(dsk))

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.first_task is None:
                self.first_task = now
            self._started[key] = now

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            self.busy += now - self._started.pop(key, now)


@dataclass(frozen=True)
class Case:
    name: str
    rows: int
    cols: int
    chunk: int


CASES = [
    pytest.param(Case("slide600", 24, 25, 1024), id="slide600"),
    pytest.param(Case("blocks10k", 14, 14, 256), id="blocks10k"),
]


def threads() -> int:
    return dask.config.get("num_workers", None) or os.cpu_count() or 1


def run_stubbed(case: Case, out: Path) -> dict[str, Any]:
    """One ``fuse_to_file`` call of ``case`` to OME-Zarr with fusion stubbed; the figures."""
    from gpufusion import fuse_to_file

    mosaic = stub_mosaic(case.rows, case.cols)
    recorder = GraphRecorder()
    t0 = time.perf_counter()
    with recorder:
        result = fuse_to_file(mosaic, out, chunks=case.chunk, backend="numpy", overwrite=True)
    wall = time.perf_counter() - t0
    tasks = sum(recorder.graphs)
    blocks = math.prod(math.ceil(n / case.chunk) for n in result.shape)
    overhead = wall - recorder.busy / threads()
    return {
        "tiles": case.rows * case.cols, "chunk": case.chunk, "shape": list(result.shape),
        "blocks": blocks, "computes": len(recorder.graphs), "tasks": tasks,
        "tasks_per_block": round(tasks / blocks, 2),
        "first_task_s": round((recorder.first_task or t0) - t0, 3),
        "wall_s": round(wall, 3), "task_thread_s": round(recorder.busy, 3),
        "threads": threads(), "overhead_s": round(overhead, 3),
        "overhead_per_task_us": round(1e6 * overhead / max(1, tasks), 1),
    }


@pytest.mark.parametrize("case", CASES)
def test_scheduling_overhead(benchmark, case: Case, tmp_path: Path, monkeypatch,
                             capsys) -> None:
    import zarr

    from gpufusion.backends import NumpyBackend

    monkeypatch.setattr(NumpyBackend, "fuse_task", zeros_fuse_task)
    out = tmp_path / f"{case.name}.ome.zarr"
    figures: dict[str, Any] = {}

    def run() -> None:
        figures.update(run_stubbed(case, out))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(figures, cpu=cpu_name())
    with capsys.disabled():
        print(f"\nschedule [{case.name}] {figures['blocks']} blocks, {figures['tasks']} tasks "
              f"in {figures['computes']} graph(s) ({figures['tasks_per_block']} per block); "
              f"first task after {figures['first_task_s']:.3f} s; {figures['wall_s']:.2f} s "
              f"end to end, {figures['overhead_s']:.2f} s outside task code "
              f"({figures['overhead_per_task_us']:.0f} us per task, {figures['threads']} "
              f"threads)")
    assert figures["tasks"] >= figures["blocks"] > 0
    level0 = zarr.open_group(str(out), mode="r")["0"]  # written, all zeros
    assert tuple(level0.shape) == tuple(figures["shape"])
    assert not np.any(level0[: case.chunk, : case.chunk])


def cpu_name() -> str:
    from gpufusion.bench import cpu_name as name

    return name()
