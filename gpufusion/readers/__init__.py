"""Readers: positions files and tile images into a :class:`~gpufusion.layout.Mosaic`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..layout import Mosaic, mosaic_from_positions
from .images import open_tile
from .positions import PositionTable, read_positions

__all__ = ["PositionTable", "mosaic_from_file", "open_tile", "read_positions"]


def mosaic_from_file(
    path: str | Path,
    *,
    pixel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
) -> Mosaic:
    """Read a positions file (Fiji TileConfiguration or CSV) and open its tiles lazily.

    ``pixel_size`` is one number for all axes or one per axis (index order).
    Tile headers are read and checked now (missing, unreadable, truncated files fail here
    with an :class:`~gpufusion.errors.InputError`); pixels are read later, per output chunk.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     tifffile.imwrite(d / f"t{i}.tif", np.zeros((32, 32), np.uint8))
    >>> _ = (d / "pos.csv").write_text("file,x,y\\nt0.tif,0,0\\nt1.tif,28.5,0\\n")
    >>> mosaic_from_file(d / "pos.csv").shape
    (32, 60)
    """
    table = read_positions(path)
    if table.channels is not None and len(set(table.channels)) > 1:
        raise InputError(
            f"{table.source}: lists {len(set(table.channels))} channels (a channel column); "
            "a Mosaic holds one: use gpufusion.readers.detect.read_tileset(...).mosaics()"
        )
    sources = [open_tile(f) for f in table.files]
    for f, src in zip(table.files, sources, strict=True):
        if len(src.shape) != table.ndim:
            raise InputError(
                f"{f}: image is {len(src.shape)}D but {table.source} gives {table.ndim}D "
                "positions"
            )
    names = [str(f) for f in table.files]
    if pixel_size is not None and not isinstance(pixel_size, Sequence):
        pixel_size = (float(pixel_size),) * table.ndim
    return mosaic_from_positions(sources, table.positions, names=names, pixel_size=pixel_size,
                                 unit=unit)
