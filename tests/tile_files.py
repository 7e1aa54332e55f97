"""Tiles on disk for the tests: TIFF files and a ``file,x,y`` positions CSV."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile


def write_tile_csv(folder: Path, tiles: Sequence[np.ndarray], positions: Any,
                   name: str = "pos.csv", **imwrite: Any) -> Path:
    """Write ``tiles`` as ``t{k}.tif`` in ``folder`` (``imwrite``: tifffile options) and
    ``name`` listing them at ``positions`` (index order, (y, x)); return the CSV's path."""
    lines = ["file,x,y"]
    for k, (tile, (y, x)) in enumerate(zip(tiles, positions, strict=True)):
        tifffile.imwrite(folder / f"t{k}.tif", tile, **imwrite)
        lines.append(f"t{k}.tif,{float(x)!r},{float(y)!r}")
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name
