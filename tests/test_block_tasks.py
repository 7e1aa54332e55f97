"""One dask task per output block: fuse, every inline pyramid level, write (issue #12).

The block pass of :func:`gpufusion.writers.ome_zarr.write_ome_zarr` (``pyramid="inline"``)
runs one task per level-0 block; the stores it writes are compared byte for byte with the
read-back path (level 0 stored from the dask fusion graph, each level read back), and the
pixels with an independent NumPy pyramid of the fused image.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
import zarr.storage
from dask.callbacks import Callback
from skimage.transform import downscale_local_mean

from gpufusion import fuse
from gpufusion.fuse import StackedBlocks, fuse_blocks
from gpufusion.pipeline import fuse_to_file
from gpufusion.synthetic import make_mosaic
from gpufusion.writers import ome_zarr as writer
from gpufusion.writers.ome_zarr import write_ome_zarr

from .test_pyramid_inline import assert_same_store


class TaskCounter(Callback):
    """Counts the tasks the local scheduler runs, per computation."""

    def __init__(self) -> None:
        super().__init__()
        self.totals: list[int] = []
        self.done = 0
        self.lock = threading.Lock()

    def _start_state(self, dsk, state) -> None:
        self.totals.append(len(state["ready"]) + len(state["waiting"]))

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        with self.lock:
            self.done += 1


def blocks_of(shape, chunk) -> int:
    return int(np.prod([-(-n // chunk) for n in shape]))


# ---------------------------------------------------------------------------- task count


def test_graph_has_one_task_per_block_for_10000_blocks() -> None:
    mosaic = make_mosaic((4, 4), (64, 64), overlap=0.1, seed=1).mosaic()
    grid = fuse_blocks(mosaic, chunks=2)
    n = int(np.prod(grid.numblocks))
    assert n >= 10_000
    arrays = [object()]  # never written: the graph is only built
    block_writer = writer._BlockWriter(arrays, [], (2, 2), "numpy", None, None)
    graph, keys = writer.block_task_graph(grid, block_writer)
    assert len(keys) == len(graph) == n  # the fusion adds no task of its own
    # each task names its block and carries only its own tiles, not the mosaic
    task = graph[keys[0]]
    assert task[2] == (0, 0) and len(task[3].args[0].sources) <= 4


def test_fuse_to_file_runs_one_task_per_level0_block(tmp_path: Path) -> None:
    mosaic = make_mosaic((3, 3), (200, 200), overlap=0.1, seed=2).mosaic()
    with TaskCounter() as counter, dask.config.set(scheduler="threads"):
        result = fuse_to_file(mosaic, tmp_path / "m.ome.zarr", chunks=128)
    n = blocks_of(result.shape, 128)
    group = zarr.open_group(str(result.path), mode="r")
    levels = len(group.attrs["multiscales"][0]["datasets"])
    assert levels >= 3
    # first pass: exactly one task per block writes level 0 and level 1 (64-px chunks);
    # the rest are the few read-back tasks of the small levels
    assert counter.totals[0] == n
    assert group["1"].chunks == (64, 64) and group["1"].nchunks == n
    assert sum(counter.totals[1:]) < n


def test_progress_counts_blocks(tmp_path: Path, capsys) -> None:
    mosaic = make_mosaic((2, 2), (160, 160), overlap=0.1, seed=1).mosaic()
    with dask.config.set(scheduler="threads"):
        result = fuse_to_file(mosaic, tmp_path / "m.ome.zarr", chunks=128, progress=True)
    first = capsys.readouterr().err.split("\n")[0].split("\r")[-1]
    n = blocks_of(result.shape, 128)
    assert first.startswith("fusing, writing levels 0-1")
    assert f" {n}/{n} tasks" in first


# ------------------------------------------------------------ same store as read-back


@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_block_tasks_write_the_read_back_store(tmp_path: Path, ngff_version: str) -> None:
    mosaic = make_mosaic((3, 3), (300, 300), overlap=0.15, seed=3).mosaic()
    blocks = fuse_blocks(mosaic, chunks=128)
    options = {"axes": ["y", "x"], "chunks": 128, "ngff_version": ngff_version}
    new = write_ome_zarr(blocks, tmp_path / "blocks.ome.zarr", pyramid="inline", **options)
    old = write_ome_zarr(fuse(mosaic, chunks=128), tmp_path / "readback.ome.zarr",
                         pyramid="readback", **options)
    assert_same_store(new, old)
    # and the pixels: level 0 is the fusion, level 1 its 2x2 mean (independent reference)
    fused = fuse(mosaic, chunks=128).compute()
    group = zarr.open_group(str(new), mode="r")
    np.testing.assert_array_equal(group["0"][...], fused)
    even = fused[: fused.shape[0] // 2 * 2, : fused.shape[1] // 2 * 2]
    mean = downscale_local_mean(even.astype(np.float64), (2, 2))
    np.testing.assert_array_equal(group["1"][: mean.shape[0], : mean.shape[1]],
                                  np.rint(mean).astype(fused.dtype))


def test_channels_as_stacked_blocks_write_the_same_store(tmp_path: Path) -> None:
    synthetic = make_mosaic((2, 2), (200, 200), overlap=0.1, seed=4)
    channels = [synthetic.mosaic(), synthetic.mosaic()]
    stacked = StackedBlocks([fuse_blocks(m, chunks=64) for m in channels])
    assert stacked.numblocks[0] == 2 and stacked.chunks[0] == (1, 1)
    options = {"axes": ["c", "y", "x"], "chunks": (1, 64, 64)}
    new = write_ome_zarr(stacked, tmp_path / "c.ome.zarr", pyramid="inline", **options)
    old = write_ome_zarr(da.stack([fuse(m, chunks=64) for m in channels]),
                         tmp_path / "d.ome.zarr", pyramid="readback", **options)
    assert_same_store(new, old)


def test_no_chunk_is_written_twice(tmp_path: Path, monkeypatch) -> None:
    """Every stored object of the block pass is set by one task, once (no read-modify-write
    of a chunk two blocks share)."""
    writes: Counter = Counter()
    lock = threading.Lock()
    original = zarr.storage.LocalStore.set

    async def counting_set(self, key, value):
        with lock:
            writes[key] += 1
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    image = da.from_array(np.random.default_rng(5).integers(0, 4000, (700, 530))
                          .astype("uint16"), chunks=256)
    with dask.config.set(scheduler="threads", num_workers=4):
        write_ome_zarr(image, tmp_path / "w.ome.zarr", axes="yx", pyramid="inline",
                       ngff_version="0.5", shard=512, chunks=128)
    chunk_writes = {k: v for k, v in writes.items() if "/c/" in k}
    assert chunk_writes and set(chunk_writes.values()) == {1}


def test_block_tables_are_the_plans() -> None:
    mosaic = make_mosaic((3, 3), (64, 64), overlap=0.2, seed=6).mosaic()
    grid = fuse_blocks(mosaic, chunks=(24, 40))
    for idx in np.ndindex(*grid.numblocks):
        got, want = grid._table(idx), grid.plan.chunk(idx)
        for name in want.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        np.testing.assert_array_equal(grid.block_function(idx)(),
                                      fuse(mosaic, chunks=(24, 40)).blocks[idx].compute())


def test_block_tasks_stop_at_a_quarter_of_the_block() -> None:
    """Blocks of 1024 write levels 1 and 2 themselves (512, 256 px chunks); level 3 and
    below (128 px contributions: about 1 ms of zarr overhead each, for little data) are
    read back in chunks of 1024, clipped to the level."""
    from gpufusion.pyramid import pyramid_factors
    from gpufusion.writers.ome_zarr import _pyramid_layout

    shape, chunks = (8192, 8192), (1024, 1024)
    plan = pyramid_factors(shape, chunks, ("y", "x"))
    layouts, block = _pyramid_layout(shape, chunks, plan, None)
    assert block == chunks
    assert [lv.chunks for lv in layouts[:4]] == [(1024, 1024), (512, 512), (256, 256),
                                                 (1024, 1024)]
    small = _pyramid_layout((1000, 731), (128, 128), pyramid_factors(
        (1000, 731), (128, 128), ("y", "x")), None)[0]
    assert small[1].chunks == (64, 64)  # small blocks: down to 64 px, as before
