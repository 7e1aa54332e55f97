"""Helpers shared by the writer tests (OME-Zarr and OME-TIFF) and the CLI error tests."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import dask.array as da
import numpy as np

from gpufusion.cli import main


def random_image(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def counting_image(
    data: np.ndarray, chunks: int | tuple[int, ...], fail_at: tuple[int, ...] | None = None
) -> tuple[da.Array, Counter]:
    """A dask array whose blocks count their own evaluation (and optionally fail)."""
    calls: Counter = Counter()
    lock = threading.Lock()

    def produce(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        location = tuple(block_info[0]["chunk-location"])
        with lock:
            calls[location] += 1
        if location == fail_at:
            raise RuntimeError(f"boom in block {location}")
        return block.copy()

    return da.from_array(data, chunks=chunks).map_blocks(produce, dtype=data.dtype), calls


def leftovers(parent: Path, keep: str) -> list[str]:
    """Names in ``parent`` other than ``keep`` (temporary folders a write left behind)."""
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def refused(capsys, argv: list, out: Path | None, *parts: str, absent: str = "") -> str:
    """Run the CLI: exit 2, one stderr line holding every part, nothing at ``out``."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpufusion: error: "), err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    if absent:
        assert absent not in lines[0]
    if out is not None:
        assert not out.exists()
        assert not [n for n in leftovers(out.parent, out.name) if n.startswith(f".{out.name}")]
    return lines[0]
