"""Regular grids with no metadata: a folder of images laid out row by row.

Positions are nominal: tile ``(row, col)`` is placed at
``(row * height * (1 - overlap_y), col * width * (1 - overlap_x))`` pixels (index order).
Which file is which tile comes either from a name *pattern* with ``{row}``, ``{col}`` or
``{index}`` placeholders (``"r{row}-c{col}.png"``, ``"tile_{index:03d}.tif"``; numbers
may be 0- or 1-based: the smallest one found counts as the first row, column or index), or,
without a pattern, from the natural sort order of the image files, filled in ``raster``
order (row by row, left to right) or ``snake`` order (every other row right to left).

Registration then corrects the nominal positions (real steps differ by a few pixels).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from .listing import is_gpufusion_output, visible_files
from .rgb import open_tiles
from .tileset import TileSet

__all__ = ["IMAGE_SUFFIXES", "natural_key", "parse_grid", "read_grid"]

#: File name endings taken as images when a folder is listed without a pattern.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_GRID_RE = re.compile(r"^\s*(\d+)\s*[xX×,]\s*(\d+)\s*$")
_FIELD_RE = re.compile(r"\{(row|col|index)(?::[^{}]*)?\}")


def natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers by value: ``t2`` before ``t10``.

    Examples
    --------
    >>> sorted(["t10.tif", "t2.tif", "t1.tif"], key=natural_key)
    ['t1.tif', 't2.tif', 't10.tif']
    """
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def parse_grid(spec: str | Sequence[int]) -> tuple[int, int]:
    """Parse a grid spec ``"ROWSxCOLS"`` (or a pair of ints) into ``(rows, cols)``.

    Raises
    ------
    InputError
        If the spec is malformed or not positive.

    Examples
    --------
    >>> parse_grid("4x3"), parse_grid((2, 5))
    ((4, 3), (2, 5))
    """
    if isinstance(spec, str):
        match = _GRID_RE.match(spec)
        if match is None:
            raise InputError(f"--grid: expected ROWSxCOLS such as 4x3, got {spec!r}")
        rows, cols = int(match.group(1)), int(match.group(2))
    else:
        values = tuple(int(v) for v in spec)
        if len(values) != 2:
            raise InputError(f"--grid: expected (rows, cols), got {spec!r}")
        rows, cols = values
    if rows < 1 or cols < 1:
        raise InputError(f"--grid: rows and columns must be >= 1, got {rows}x{cols}")
    return rows, cols


def _parse_overlap(overlap: float | Sequence[float]) -> tuple[float, float]:
    values = (
        (float(overlap),) * 2 if isinstance(overlap, int | float) else tuple(map(float, overlap))
    )
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(0.0 <= v < 1.0 for v in values):
        raise InputError(
            f"--overlap: expected a fraction in [0, 1) (or one per axis, y then x), got {overlap!r}"
        )
    return values[0], values[1]


def _grid_cell(index: int, cols: int, order: str) -> tuple[int, int]:
    row, col = divmod(index, cols)
    if order == "snake" and row % 2 == 1:
        col = cols - 1 - col
    return row, col


def _pattern_regex(pattern: str) -> tuple[re.Pattern[str], set[str]]:
    fields = set(_FIELD_RE.findall(pattern))
    if not fields:
        raise InputError(
            f"--pattern: {pattern!r} has no {{row}}, {{col}} or {{index}} placeholder"
        )
    if "index" in fields and fields & {"row", "col"}:
        raise InputError(f"--pattern: use {{index}} or {{row}} and {{col}}, not both: {pattern!r}")
    if "index" not in fields and fields != {"row", "col"}:
        raise InputError(f"--pattern: {pattern!r} needs both {{row}} and {{col}}")
    parts: list[str] = []
    seen: set[str] = set()
    last = 0
    for match in _FIELD_RE.finditer(pattern):
        parts.append(re.escape(pattern[last : match.start()]))
        field = match.group(1)
        parts.append(f"(?P={field})" if field in seen else f"(?P<{field}>\\d+)")
        seen.add(field)
        last = match.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("".join(parts) + r"\Z"), fields


def _files_by_pattern(
    folder: Path, pattern: str, rows: int, cols: int, order: str
) -> dict[tuple[int, int], Path]:
    regex, fields = _pattern_regex(pattern)
    found: list[tuple[dict[str, int], Path]] = []
    for path in visible_files(folder):  # hidden files and gpufusion's outputs skipped
        match = regex.match(path.relative_to(folder).as_posix())
        if match and not is_gpufusion_output(path):
            found.append(({k: int(v) for k, v in match.groupdict().items()}, path))
    if len(found) != rows * cols:
        raise InputError(
            f"{folder}: grid {rows}x{cols} needs {rows * cols} tiles but {len(found)} files "
            f"match the pattern {pattern!r}"
        )
    cells: dict[tuple[int, int], Path] = {}
    base = {f: min(values[f] for values, _ in found) for f in fields}
    for values, path in sorted(found, key=lambda item: natural_key(item[1].name)):
        if "index" in fields:
            index = values["index"] - base["index"]
            if index >= rows * cols:
                raise InputError(
                    f"{path}: index {values['index']} is beyond the {rows}x{cols} grid "
                    f"(indices start at {base['index']})"
                )
            cell = _grid_cell(index, cols, order)
        else:
            cell = (values["row"] - base["row"], values["col"] - base["col"])
            if cell[0] >= rows or cell[1] >= cols:
                raise InputError(
                    f"{path}: row {values['row']}, column {values['col']} is outside the "
                    f"{rows}x{cols} grid (numbers start at {base['row']}, {base['col']})"
                )
        if cell in cells:
            raise InputError(
                f"{path}: grid cell (row {cell[0]}, column {cell[1]}) is already taken by "
                f"{cells[cell].name}"
            )
        cells[cell] = path
    return cells


def _files_in_order(folder: Path, rows: int, cols: int, order: str) -> dict[tuple[int, int], Path]:
    files = sorted(  # hidden files and gpufusion's outputs are no tiles
        (p for p in visible_files(folder, recursive=False)
         if p.name.lower().endswith(IMAGE_SUFFIXES) and not is_gpufusion_output(p)),
        key=lambda p: natural_key(p.name),
    )
    if len(files) != rows * cols:
        raise InputError(
            f"{folder}: grid {rows}x{cols} needs {rows * cols} tiles but the folder has "
            f"{len(files)} image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return {_grid_cell(i, cols, order): path for i, path in enumerate(files)}


def read_grid(
    folder: str | os.PathLike[str],
    grid: str | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.1,
    order: str = "raster",
    pattern: str | None = None,
    pixel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
) -> TileSet:
    """Read a folder of images on a regular grid into a single-channel :class:`TileSet`.

    Parameters
    ----------
    folder : path
        The folder holding the tiles.
    grid : str or (int, int)
        ``"ROWSxCOLS"`` such as ``"4x3"``.
    overlap : float or (float, float)
        Fraction of a tile shared with its neighbour, one for both axes or ``(y, x)``.
    order : {"raster", "snake"}
        How files sorted by name (or ``{index}`` numbers) fill the grid.
    pattern : str, optional
        File names relative to ``folder`` with ``{row}`` and ``{col}``, or ``{index}``
        placeholders (format specs like ``{index:03d}`` are accepted).
    pixel_size, unit : optional
        Physical pixel size (one number or one per axis) and its unit.

    Returns
    -------
    TileSet
        Translation affines at the nominal grid positions; tiles sorted by (row, col).

    Raises
    ------
    InputError
        For a malformed grid spec, overlap, order or pattern, a file count that does not
        match the grid (the message names both numbers), two files in one cell, tiles of
        different shapes, or any unreadable image.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for r in range(2):
    ...     for c in range(3):
    ...         tifffile.imwrite(d / f"r{r}-c{c}.tif", np.zeros((100, 200), np.uint8))
    >>> ts = read_grid(d, "2x3", overlap=0.1, pattern="r{row}-c{col}.tif")
    >>> ts.positions()[[1, 3]].tolist()
    [[0.0, 180.0], [90.0, 0.0]]
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; --grid needs a folder of images")
    rows, cols = parse_grid(grid)
    oy, ox = _parse_overlap(overlap)
    if order not in ("raster", "snake"):
        raise InputError(f"--order: expected 'raster' or 'snake', got {order!r}")
    if pattern:
        cells = _files_by_pattern(root, pattern, rows, cols, order)
    else:
        cells = _files_in_order(root, rows, cols, order)
    ordered = sorted(cells.items())
    files = open_tiles([path for _, path in ordered], root)  # RGB files: three channels each
    sources = files.first
    shape = sources[0].shape
    for (_, path), src in zip(ordered, sources, strict=True):
        if src.shape != shape:
            raise InputError(
                f"{path}: tile shape {src.shape} differs from {ordered[0][1].name} {shape}; "
                "grid tiles must all have the same shape"
            )
    height, width = shape[-2:]
    positions = np.zeros((len(ordered), len(shape)))
    for k, ((row, col), _) in enumerate(ordered):
        positions[k, -2] = row * height * (1.0 - oy)
        positions[k, -1] = col * width * (1.0 - ox)
    names = [path.relative_to(root).as_posix() for _, path in ordered]
    return files.tileset(positions, names, root, pixel_size=pixel_size, unit=unit)
