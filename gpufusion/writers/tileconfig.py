"""Write tile positions as a Fiji ``TileConfiguration.txt``.

The text format of Fiji's Grid/Collection stitching plugin ("Positions from file"), which
also writes ``TileConfiguration.registered.txt`` after its own registration::

    # Define the number of dimensions we are working on
    dim = 2

    # Define the image coordinates
    tile_0.tif; ; (0.0000, 0.0000)
    tile_1.tif; ; (921.0000, 3.5000)

``dim = 2`` or ``dim = 3``, then one line per tile: the file name, an empty series field and
the position of the tile's pixel ``(0, 0[, 0])`` in pixels, ``x`` (columns) first, with a
decimal point (never the locale's comma). File names are relative to the configuration
file's folder, as Fiji reads them (it joins them to that folder), with ``/`` separators;
``..`` steps out of it. Lines starting with ``#`` are comments.
:func:`gpufusion.readers.positions.read_tile_configuration` reads it back.

What Fiji's reader (``Stitching_Grid.getLayoutFromFile``) does with each trimmed line, and
so what this writer avoids: a line starting with ``#``, or of 3 characters or fewer, is
skipped; one starting with ``dim`` (or ``multiseries``, in newer versions) is a header line,
``dim = n``, whatever follows; any other line is split at ``;`` into exactly three fields,
the third ``(x, y[, z])`` split at ``,`` into ``dim`` numbers read as 32-bit floats (so
about 7 significant digits are used: 4 decimals are plenty); the image is
``new File(folder, name)``, so a name must be relative (an absolute one is appended to the
folder). Names that start with ``dim``, ``multiseries`` or ``#``, hold a ``;`` or a line
break, have surrounding blanks or are absolute are refused.

A configuration lists one file per tile, so it holds one channel (Fiji tiles hold their
channels in the file); multi-channel tile sets with one file per channel go into a positions
CSV with a ``channel`` column instead.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from gpufusion.errors import InputError

__all__ = ["tile_configuration_name", "write_tile_configuration"]

_AXES = ("x", "y", "z")
# a name Fiji or our reader would take for something else: a comment, a header line (Fiji:
# any line starting with 'dim' or 'multiseries'), a field separator, surrounding blanks that
# both strip, a line break
_UNSAFE_NAME = re.compile(r"^#|^dim\s*=|[;\r\n]|^\s|\s$", re.IGNORECASE)
_FIJI_HEADER = re.compile(r"^(dim|multiseries)")  # Java's startsWith: case-sensitive


def tile_configuration_name(file: str | os.PathLike[str], folder: Path) -> str:
    """How a TileConfiguration in ``folder`` names ``file``: relative to ``folder`` (with
    ``..`` where it lies outside), ``/`` separators; absolute only on another drive. A
    relative ``file`` is taken relative to the current folder, as Python opens it.

    Examples
    --------
    >>> tile_configuration_name("/data/run/tiles/t0.tif", Path("/data/run"))
    'tiles/t0.tif'
    >>> tile_configuration_name("/data/other/t0.tif", Path("/data/run"))
    '../other/t0.tif'
    """
    path = Path(os.path.abspath(file))
    try:
        return Path(os.path.relpath(path, os.path.abspath(folder))).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return path.as_posix()


def write_tile_configuration(path: str | os.PathLike[str], positions: Sequence[Sequence[float]],
                             files: Sequence[str | os.PathLike[str]], *,
                             pixel_size: Sequence[float] | None = None,
                             unit: str | None = None) -> Path:
    """Write ``files`` at ``positions`` as a Fiji TileConfiguration.

    Parameters
    ----------
    path : path
        The file to write (``TileConfiguration.txt``, ``*.registered.txt``).
    positions : (n, 2) or (n, 3) array-like
        Position of each tile's pixel ``(0, 0[, 0])`` in pixels, in array index order
        (``(y, x)`` or ``(z, y, x)``), as :class:`~gpufusion.layout.Mosaic` and the
        registration give them; written ``x`` first.
    files : sequence of path
        One file per tile (absolute, or relative to the current folder), written relative
        to ``path``'s folder (:func:`tile_configuration_name`).
    pixel_size : sequence of float, optional
        Physical pixel size (index order), recorded as a ``# pixel_size`` comment line
        (:func:`gpufusion.readers.positions.pixel_size_comment`) that ``gpufusion fuse``
        reads back; Fiji skips ``#`` lines.
    unit : str, optional
        Unit of ``pixel_size`` (micrometre when None).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        For a count mismatch, a non-finite position, or a file name the format cannot hold
        (a ``;`` or line break, leading ``#``, surrounding blanks); the message names
        ``path`` and the tile.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> p = write_tile_configuration(d / "TileConfiguration.txt",
    ...                              [(0.0, 0.0), (2.5, 90.25)], [d / "a.tif", d / "b.tif"])
    >>> print(p.read_text().strip())
    # Define the number of dimensions we are working on
    dim = 2
    <BLANKLINE>
    # Define the image coordinates
    a.tif; ; (0.0000, 0.0000)
    b.tif; ; (90.2500, 2.5000)
    """
    out = Path(path)
    rows = [[float(v) for v in p] for p in positions]
    if len(rows) != len(files):
        raise InputError(f"{out}: {len(files)} file names for {len(rows)} positions")
    if not rows:
        raise InputError(f"{out}: no tiles to write")
    ndim = len(rows[0])
    if ndim not in (2, 3) or any(len(r) != ndim for r in rows):
        raise InputError(f"{out}: positions must all have 2 or 3 coordinates")
    folder = out.resolve().parent
    lines = ["# Define the number of dimensions we are working on", f"dim = {ndim}", ""]
    if pixel_size is not None:
        from ..readers.positions import pixel_size_comment

        lines += [pixel_size_comment(tuple(pixel_size), unit), ""]
    lines.append("# Define the image coordinates")
    for file, row in zip(files, rows, strict=True):
        name = tile_configuration_name(file, folder)
        if _UNSAFE_NAME.search(name) or _FIJI_HEADER.match(name):
            raise InputError(f"{out}: tile file {name!r} cannot be listed in a TileConfiguration "
                             "(a ';' or line break, a leading '#', 'dim' or 'multiseries', "
                             "which Fiji reads as a header, or surrounding blanks); write a "
                             ".csv instead")
        if Path(name).is_absolute() or re.match(r"[A-Za-z]:[/\\]", name):
            raise InputError(f"{out}: tile file {name!r} is on another drive, and Fiji reads "
                             "the names relative to the configuration's folder; write the "
                             "configuration on the tiles' drive")
        if not all(math.isfinite(v) for v in row):
            raise InputError(f"{out}: tile {name!r} has no finite position {row}")
        coords = ", ".join(f"{round(v, 4) + 0.0:.4f}" for v in row[::-1])  # no "-0.0000"
        lines.append(f"{name}; ; ({coords})")
    with open(out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines) + "\n")
    return out
