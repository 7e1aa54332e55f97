"""Tile positions files: Fiji ``TileConfiguration.txt`` and a simple CSV.

Both formats give, for every tile file, the position in the output grid of the tile's
first pixel, in pixels. Files write coordinates as ``x, y[, z]``; a
:class:`PositionTable` stores them in **array index order**, ``(y, x)`` or ``(z, y, x)``,
the order used everywhere else in gpufusion.

Formats
-------
``TileConfiguration.txt`` (Fiji Grid/Collection stitching, also ``*.registered.txt``)::

    # Define the number of dimensions we are working on
    dim = 2
    # Define the image coordinates
    tile_0.tif; ; (0.0, 0.0)
    tile_1.tif; ; (921.0, 3.5)

The middle field (series index of multi-series files) may be empty, ``0`` or left out.
Vendor exports (Leica Matrix Screener) list bare image names that actually live in
sub-folders: a bare name not found beside the configuration file is looked up by
basename in its sub-folders and must match exactly one file.

CSV::

    file,x,y[,z]
    tile_0.tif,0,0
    tile_1.tif,921.0,3.5

Columns may come in any order, extra columns are ignored, ``#`` lines are comments.

Tile paths are relative to the folder of the positions file. Every problem raises
:class:`~gpufusion.errors.InputError` with a one-line message ``<file>:<line>: <what>``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpufusion.errors import InputError

__all__ = [
    "PositionTable",
    "read_positions",
    "read_positions_csv",
    "read_tile_configuration",
]

_AXES = ("x", "y", "z")
_DIM_RE = re.compile(r"^dim\s*=\s*(?P<value>.*?)\s*$", re.IGNORECASE)
# "name; [series;] (c0, c1[, c2])" with free whitespace; the name may hold ';'.
_TILE_RE = re.compile(
    r"^(?P<file>.+?)\s*;\s*(?:(?P<series>[^;()]*?)\s*;\s*)?\((?P<coords>[^()]*)\)\s*$"
)


@dataclass(frozen=True, eq=False)
class PositionTable:
    """Tile files and their positions, as read from a positions file.

    Attributes
    ----------
    files : list of Path
        Resolved absolute paths of the tile files, in file order; all exist.
    positions : numpy.ndarray
        ``(n, ndim)`` float64, read-only, in array index order: ``(y, x)`` for 2D,
        ``(z, y, x)`` for 3D. Row ``i`` is the output-grid position, in pixels, of
        pixel ``(0, 0[, 0])`` of ``files[i]``.
    ndim : int
        2 or 3.
    source : Path
        The positions file.

    Examples
    --------
    >>> import numpy as np
    >>> table = PositionTable([Path("/data/a.tif")], np.array([[0.0, 5.0]]), 2,
    ...                       Path("/data/pos.csv"))
    >>> len(table), table.positions[0].tolist()
    (1, [0.0, 5.0])
    """

    files: list[Path]
    positions: np.ndarray
    ndim: int
    source: Path

    def __post_init__(self) -> None:
        positions = np.array(self.positions, dtype=np.float64)
        if positions.shape != (len(self.files), self.ndim):
            raise ValueError(
                f"positions has shape {positions.shape}, expected ({len(self.files)}, {self.ndim})"
            )
        positions.setflags(write=False)
        object.__setattr__(self, "positions", positions)

    def __len__(self) -> int:
        return len(self.files)


def _fail(source: Path, line: int | None, message: str) -> InputError:
    """Build a one-line InputError ``<file>[:<line>]: <message>``."""
    where = f"{source}:{line}" if line is not None else f"{source}"
    return InputError(" ".join(f"{where}: {message}".split()))


def _read_text_lines(path: Path) -> list[str]:
    """Read a positions file as text lines, turning every failure into InputError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, None, "positions file not found") from None
    except IsADirectoryError:
        raise _fail(path, None, "positions file is a directory, expected a text file") from None
    except OSError as exc:
        raise _fail(path, None, f"cannot read positions file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _fail(path, None, f"not a UTF-8 text file (byte {exc.start})") from None
    if "\x00" in text:
        raise _fail(path, None, "not a text file (contains NUL bytes)")
    return text.splitlines()


def _content_lines(lines: list[str]) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, stripped_line)`` for lines that are not blank or ``#`` comments."""
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def _parse_number(source: Path, line: int, axis: str, text: str) -> float:
    """Parse one coordinate, which must be a finite number."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        raise _fail(source, line, f"{axis} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise _fail(source, line, f"{axis} is not finite: {text!r}")
    return value


class _TileResolver:
    """Resolve tile names relative to a positions file, optionally by basename search."""

    def __init__(self, source: Path, search_subfolders: bool) -> None:
        self.source = source
        self.base = source.parent
        self.search_subfolders = search_subfolders
        self._by_name: dict[str, list[Path]] | None = None
        self._first_line: dict[Path, int] = {}

    def _index(self) -> dict[str, list[Path]]:
        """Map basename -> sorted files in sub-folders of the base folder (built once)."""
        if self._by_name is None:
            by_name: dict[str, list[Path]] = {}
            for root, dirs, names in os.walk(self.base):
                dirs.sort()
                if Path(root) == self.base:
                    continue  # files beside the positions file were already tried
                for name in sorted(names):
                    by_name.setdefault(name, []).append(Path(root) / name)
            self._by_name = by_name
        return self._by_name

    def resolve(self, name: str, line: int) -> Path:
        """Return the resolved path of tile ``name`` listed on ``line``; check duplicates."""
        candidate = Path(name)
        if not candidate.is_absolute():
            candidate = self.base / candidate
        if not candidate.exists():
            bare = Path(name).name == name and not Path(name).is_absolute()
            found = self._index().get(name, []) if (bare and self.search_subfolders) else []
            if not found:
                where = " or in its sub-folders" if bare and self.search_subfolders else ""
                raise _fail(
                    self.source,
                    line,
                    f"tile file not found: {name!r} (looked for {str(candidate)!r}{where})",
                )
            if len(found) > 1:
                shown = ", ".join(repr(str(p.relative_to(self.base))) for p in found[:4])
                more = f" and {len(found) - 4} more" if len(found) > 4 else ""
                raise _fail(
                    self.source,
                    line,
                    f"tile name {name!r} is ambiguous: {len(found)} files in sub-folders "
                    f"({shown}{more}); write the sub-folder into the positions file",
                )
            candidate = found[0]
        if not candidate.is_file():
            raise _fail(self.source, line, f"tile path is not a file: {str(candidate)!r}")
        resolved = candidate.resolve()
        first = self._first_line.setdefault(resolved, line)
        if first != line:
            raise _fail(
                self.source,
                line,
                f"tile {name!r} is listed twice (lines {first} and {line})",
            )
        return resolved


def _finish(source: Path, files: list[Path], rows: list[list[float]], ndim: int) -> PositionTable:
    """Build the table, reversing file order (x, y[, z]) into index order."""
    if not files:
        raise _fail(source, None, "no tiles listed")
    positions = np.asarray(rows, dtype=np.float64)[:, ::-1]
    return PositionTable(files=files, positions=positions, ndim=ndim, source=source)


def read_tile_configuration(path: str | os.PathLike[str]) -> PositionTable:
    """Read a Fiji/ImageJ ``TileConfiguration.txt`` (or ``.registered.txt``).

    Parameters
    ----------
    path : str or path-like
        The configuration file. It needs a ``dim = 2`` or ``dim = 3`` line before the
        first tile line; tile lines are ``name; ; (x, y[, z])`` with the middle (series)
        field empty, ``0`` or absent. ``#`` lines and blank lines are ignored.

    Returns
    -------
    PositionTable
        Positions in index order (``(y, x)`` or ``(z, y, x)``), pixels.

    Raises
    ------
    InputError
        For an unreadable file, a missing or invalid ``dim`` line, a malformed tile
        line, a coordinate count that does not match ``dim``, a non-finite or
        non-numeric coordinate, a missing, ambiguous or duplicated tile file, or an
        empty tile list. The message names the file and line.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("a.tif", "b.tif"):
    ...     tifffile.imwrite(folder / name, np.zeros((4, 4), np.uint8))
    >>> _ = (folder / "TileConfiguration.txt").write_text(
    ...     "dim = 2\\na.tif; ; (0.0, 0.0)\\nb.tif; ; (3.5, 1.0)\\n")
    >>> table = read_tile_configuration(folder / "TileConfiguration.txt")
    >>> table.positions.tolist()
    [[0.0, 0.0], [1.0, 3.5]]
    """
    source = Path(path)
    lines = _read_text_lines(source)
    resolver = _TileResolver(source, search_subfolders=True)
    ndim: int | None = None
    dim_line = 0
    files: list[Path] = []
    rows: list[list[float]] = []
    for number, line in _content_lines(lines):
        dim_match = _DIM_RE.match(line)
        if dim_match:
            value = dim_match.group("value")
            if ndim is not None:
                raise _fail(source, number, f"dim is given twice (first on line {dim_line})")
            if value not in ("2", "3"):
                raise _fail(source, number, f"dim must be 2 or 3, got {value!r}")
            ndim, dim_line = int(value), number
            continue
        match = _TILE_RE.match(line)
        if match is None:
            raise _fail(
                source,
                number,
                f"malformed line {line[:80]!r}; expected 'dim = N' or 'name; ; (x, y[, z])'",
            )
        if ndim is None:
            raise _fail(source, number, "tile line before the 'dim = 2' or 'dim = 3' line")
        series = (match.group("series") or "").strip()
        if series not in ("", "0"):
            raise _fail(
                source,
                number,
                f"series index {series!r} is not supported; "
                "only single-series image files (middle field empty or 0)",
            )
        coords = match.group("coords").split(",")
        if len(coords) != ndim:
            expected = ", ".join(_AXES[:ndim])
            raise _fail(
                source,
                number,
                f"expected {ndim} coordinates ({expected}) for dim = {ndim}, got {len(coords)}",
            )
        row = [_parse_number(source, number, _AXES[i], c) for i, c in enumerate(coords)]
        files.append(resolver.resolve(match.group("file").strip(), number))
        rows.append(row)
    if ndim is None:
        raise _fail(source, None, "no 'dim = 2' or 'dim = 3' line; not a TileConfiguration file")
    return _finish(source, files, rows, ndim)


def read_positions_csv(path: str | os.PathLike[str]) -> PositionTable:
    """Read a CSV positions file with a ``file,x,y[,z]`` header.

    Parameters
    ----------
    path : str or path-like
        The CSV file. The first non-blank, non-``#`` line is the header; it must name
        the columns ``file``, ``x`` and ``y`` and may name ``z`` (case-insensitive, any
        order, other columns ignored). Fields may be quoted and padded with spaces.

    Returns
    -------
    PositionTable
        Positions in index order (``(y, x)`` or ``(z, y, x)`` when ``z`` is present).

    Raises
    ------
    InputError
        For an unreadable file, a missing or duplicated header column, a row whose
        field count differs from the header, a non-finite or non-numeric coordinate,
        a missing or duplicated tile file, or an empty tile list. The message names
        the file and line.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(folder / "a.tif", np.zeros((4, 4), np.uint8))
    >>> _ = (folder / "pos.csv").write_text("file, x, y\\na.tif, 10.5, 2\\n")
    >>> read_positions_csv(folder / "pos.csv").positions.tolist()
    [[2.0, 10.5]]
    """
    source = Path(path)
    lines = _read_text_lines(source)
    resolver = _TileResolver(source, search_subfolders=False)
    header: list[str] | None = None
    columns: dict[str, int] = {}
    files: list[Path] = []
    rows: list[list[float]] = []
    ndim = 2
    for number, line in _content_lines(lines):
        try:
            fields = [f.strip() for f in next(csv.reader([line], skipinitialspace=True))]
        except csv.Error as exc:
            raise _fail(source, number, f"malformed CSV line ({exc})") from None
        if header is None:
            header = [f.lower() for f in fields]
            for column in ("file", "x", "y", "z"):
                hits = [i for i, name in enumerate(header) if name == column]
                if len(hits) > 1:
                    raise _fail(source, number, f"column {column!r} appears {len(hits)} times")
                if hits:
                    columns[column] = hits[0]
                elif column != "z":
                    raise _fail(
                        source,
                        number,
                        f"missing column {column!r} in header {line[:80]!r}; "
                        "expected a header with columns file,x,y[,z]",
                    )
            ndim = 3 if "z" in columns else 2
            continue
        if len(fields) != len(header):
            raise _fail(
                source,
                number,
                f"expected {len(header)} fields as in the header, got {len(fields)}",
            )
        name = fields[columns["file"]]
        if not name:
            raise _fail(source, number, "empty file name")
        row = [_parse_number(source, number, axis, fields[columns[axis]]) for axis in _AXES[:ndim]]
        files.append(resolver.resolve(name, number))
        rows.append(row)
    if header is None:
        raise _fail(source, None, "empty CSV; expected a header with columns file,x,y[,z]")
    return _finish(source, files, rows, ndim)


def read_positions(path: str | os.PathLike[str]) -> PositionTable:
    """Read a positions file, detecting its format.

    A ``.csv`` suffix means CSV (:func:`read_positions_csv`). Otherwise the first
    non-comment line decides: ``dim = N`` or a ``;``-separated tile line means a Fiji
    TileConfiguration (:func:`read_tile_configuration`); a CSV header naming a ``file``
    column means CSV.

    Parameters
    ----------
    path : str or path-like
        The positions file.

    Returns
    -------
    PositionTable
        Positions in index order.

    Raises
    ------
    InputError
        When the format is not recognised, or for any error of the format's reader.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(folder / "a.tif", np.zeros((4, 4), np.uint8))
    >>> _ = (folder / "tiles.txt").write_text("dim = 2\\na.tif; ; (1, 2)\\n")
    >>> read_positions(folder / "tiles.txt").positions.tolist()
    [[2.0, 1.0]]
    """
    source = Path(path)
    if source.suffix.lower() == ".csv":
        return read_positions_csv(source)
    lines = _read_text_lines(source)
    first = next(_content_lines(lines), None)
    if first is not None:
        line = first[1]
        if _DIM_RE.match(line) or ";" in line:
            return read_tile_configuration(source)
        try:
            header = [f.strip().lower() for f in next(csv.reader([line]))]
        except csv.Error:
            header = []
        if "file" in header:
            return read_positions_csv(source)
    raise _fail(
        source,
        first[0] if first is not None else None,
        "unrecognised positions file; expected a Fiji TileConfiguration ('dim = N' and "
        "'name; ; (x, y)' lines) or a CSV with a file,x,y[,z] header",
    )
