"""Peak memory does not grow with the mosaic (issue #12).

The same job on a mosaic of 6 x 6 and of 12 x 12 tiles (4x the pixels), with the same
chunk size, each in a fresh process; what is measured is the growth of the peak resident
set over the process's own size after its imports: ``VmHWM`` of ``/proc/self/status``,
the kernel's ``ru_maxrss`` of this process alone (``resource.getrusage`` would report the
parent's size at the fork when that is larger: Linux carries ``ru_maxrss`` across
``exec``). Holding the mosaic,
the output or one level of it would add at least the extra pixels; the block tasks keep
the growth to a small fraction of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .tile_files import write_tile_csv

CHILD = """
import json, sys
import dask, numpy, tifffile, zarr  # imported before the baseline
import gpufusion.cli, gpufusion.pipeline, gpufusion.writers.ome_zarr
from gpufusion.cli import main
def peak():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = peak()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "before": before, "after": peak()}))
"""

TILE = 512


def peak_growth(folder: Path, grid: int) -> tuple[int, int]:
    """Fuse a ``grid`` x ``grid`` mosaic of uint16 tiles in a fresh process; return the
    growth of its peak RSS over its size after imports, and the tile bytes."""
    folder.mkdir()
    rng = np.random.default_rng(grid)
    tiles = [rng.integers(0, 4000, (TILE, TILE), dtype=np.uint16) for _ in range(grid * grid)]
    step = TILE * 7 // 8
    positions = [(i * step, j * step) for i in range(grid) for j in range(grid)]
    csv = write_tile_csv(folder, tiles, positions)
    nbytes = sum(t.nbytes for t in tiles)
    del tiles
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "DASK_NUM_WORKERS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "fuse", str(csv), "-o", str(folder / "out.ome.zarr"),
         "--chunk", "256", "--backend", "numpy", "--quiet"],
        capture_output=True, text=True, check=False, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["code"] == 0
    return result["after"] - result["before"], nbytes


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_mosaic(tmp_path: Path) -> None:
    small, small_bytes = peak_growth(tmp_path / "small", 6)
    large, large_bytes = peak_growth(tmp_path / "large", 12)
    extra = large_bytes - small_bytes  # 27 MiB more tiles, ~24 MiB more output
    assert small > 0 and large > 0
    assert large - small < extra // 4, (small, large, extra)
