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

    file,x,y[,z][,channel]
    tile_0.tif,0,0
    tile_1.tif,921.0,3.5

Columns may come in any order, names are case-insensitive, extra columns are ignored,
``#`` lines are comments.

Pixel size: either format may carry the physical pixel size in a comment line (which
Fiji and other readers skip), one number per axis in file order ``x, y[, z]`` (or one
for all) and an NGFF unit or abbreviation (default micrometre)::

    # pixel_size (x, y): 0.2405 0.2405 micrometer

``gpufusion register`` writes it when the input knows its pixel size
(:func:`pixel_size_comment`); :class:`PositionTable` holds it in index order.

The optional ``channel`` column makes a multi-channel tile set, one file per channel per
tile (as ``gpufusion register`` writes for multi-channel input)::

    file,x,y,channel
    tile_0--C00.tif,0,0,C00
    tile_1--C00.tif,921.0,3.5,C00
    tile_0--C01.tif,0,0,C01
    tile_1--C01.tif,921.0,3.5,C01

Rows are grouped by channel value (stripped; channels in order of first appearance) and
tile ``t`` of a channel is that channel's ``t``-th row, so rows may be grouped by channel
or interleaved by tile. Every channel must list the same number of tiles, tile ``t`` must
have the same position (within 1e-6 px) in every channel, and no channel value may be
empty. Without the column every row is a tile of one channel.

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
from gpufusion.readers.listing import visible_files
from gpufusion.readers.paths import os_error_message

__all__ = [
    "PositionTable",
    "pixel_size_comment",
    "positions_format",
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
# "# pixel_size (x, y): 0.2405 0.2405 micrometer"
_PIXEL_SIZE_RE = re.compile(
    r"^#\s*pixel[_ ]size\s*(?:\((?P<axes>[^()]*)\))?\s*[:=]\s*(?P<rest>.*?)\s*$",
    re.IGNORECASE,
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
    channels : list of str or None
        ``channels[i]`` is the channel of ``files[i]`` (a CSV ``channel`` column), or
        ``None`` for single-channel files (the default). When given, every channel has the
        same number of rows; tile ``t`` of a channel is its ``t``-th row (see
        :meth:`channel_rows`).
    pixel_size : tuple of float or None
        Physical pixel size per axis, index order, from a ``# pixel_size`` comment line.
    unit : str or None
        Its NGFF unit (``"micrometer"`` when the line names none).

    Examples
    --------
    >>> import numpy as np
    >>> table = PositionTable([Path("/data/a.tif")], np.array([[0.0, 5.0]]), 2,
    ...                       Path("/data/pos.csv"))
    >>> len(table), table.positions[0].tolist(), table.channels
    (1, [0.0, 5.0], None)
    """

    files: list[Path]
    positions: np.ndarray
    ndim: int
    source: Path
    channels: list[str] | None = None
    pixel_size: tuple[float, ...] | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        positions = np.array(self.positions, dtype=np.float64)
        if positions.shape != (len(self.files), self.ndim):
            raise ValueError(
                f"positions has shape {positions.shape}, expected ({len(self.files)}, {self.ndim})"
            )
        positions.setflags(write=False)
        object.__setattr__(self, "positions", positions)
        if self.channels is not None:
            channels = [str(c) for c in self.channels]
            if len(channels) != len(self.files):
                raise ValueError(
                    f"{len(channels)} channel values for {len(self.files)} files"
                )
            object.__setattr__(self, "channels", channels)
            counts = {len(rows) for rows in self.channel_rows().values()}
            if len(counts) > 1:
                raise ValueError(f"channels list different tile counts {sorted(counts)}")

    def __len__(self) -> int:
        return len(self.files)

    def channel_rows(self) -> dict[str, list[int]]:
        """Row indices of every channel's tiles, in tile order; channels in order of first
        appearance. Without channels: ``{"channel 0": [0, 1, ...]}``.

        Examples
        --------
        >>> t = PositionTable([Path("/a0"), Path("/b0"), Path("/a1"), Path("/b1")],
        ...                   np.zeros((4, 2)), 2, Path("/p.csv"), ["A", "B", "A", "B"])
        >>> t.channel_rows()
        {'A': [0, 2], 'B': [1, 3]}
        """
        if self.channels is None:
            return {"channel 0": list(range(len(self.files)))}
        rows: dict[str, list[int]] = {}
        for i, channel in enumerate(self.channels):
            rows.setdefault(channel, []).append(i)
        return rows


def _fail(source: Path, line: int | None, message: str) -> InputError:
    """Build a one-line InputError ``<file>[:<line>]: <message>``."""
    where = f"{source}:{line}" if line is not None else f"{source}"
    return InputError(" ".join(f"{where}: {message}".split()))


def _read_text_lines(path: Path) -> list[str]:
    """Read a positions file as text lines, turning every failure into InputError."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise _fail(path, None, "positions file is a directory, expected a text file") from None
    except OSError as exc:
        raise _fail(path, None, os_error_message("positions file", exc, path)) from None
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


def _parse_number(source: Path, line: int, axis: str, text: str, tile: str) -> float:
    """Parse one coordinate of ``tile``, which must be a finite number."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        raise _fail(source, line, f"tile {tile!r}: {axis} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise _fail(source, line, f"tile {tile!r}: {axis} is not finite: {text!r}; every "
                    "position must be a finite number of pixels")
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
            for path in visible_files(self.base):  # no hidden (temporary) folders
                if path.parent != self.base:  # files beside the positions file were tried
                    by_name.setdefault(path.name, []).append(path)
            self._by_name = by_name
        return self._by_name

    def resolve(self, name: str, line: int) -> Path:
        """Return the resolved path of tile ``name`` listed on ``line``; check duplicates."""
        candidate = Path(name)
        if not candidate.is_absolute():
            candidate = self.base / candidate
        try:
            os.stat(candidate)
            missing = False
        except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL
            missing = True
        except OSError as exc:  # a symbolic link loop, no permission
            problem = os_error_message(f"tile file {name!r}", exc, candidate)
            raise _fail(self.source, line, f"{problem} ({str(candidate)!r})") from None
        if missing:
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


def pixel_size_comment(pixel_size: tuple[float, ...] | list[float], unit: str | None) -> str:
    """The comment line that records a pixel size (index order) in a positions file.

    Examples
    --------
    >>> pixel_size_comment((0.2405, 0.2405), "micrometer")
    '# pixel_size (x, y): 0.2405 0.2405 micrometer'
    >>> pixel_size_comment((2.0, 0.5, 0.5), "um")
    '# pixel_size (x, y, z): 0.5 0.5 2 micrometer'
    """
    from ..units import ngff_unit

    values = [float(v) for v in pixel_size][::-1]
    axes = ", ".join(_AXES[: len(values)])
    numbers = " ".join(f"{v:.10g}" for v in values)
    return f"# pixel_size ({axes}): {numbers} {ngff_unit(unit or 'micrometer')}"


def _pixel_size(
    source: Path, lines: list[str], ndim: int
) -> tuple[tuple[float, ...] | None, str | None]:
    """The ``# pixel_size`` comment line's size (index order) and NGFF unit, if any."""
    from ..units import ngff_unit

    found: tuple[tuple[float, ...] | None, str | None] = (None, None)
    first = 0
    for number, raw in enumerate(lines, start=1):
        match = _PIXEL_SIZE_RE.match(raw.strip())
        if match is None:
            continue
        if first:
            raise _fail(source, number, f"pixel_size is given twice (first on line {first})")
        first = number
        axes = [a.strip().lower() for a in (match.group("axes") or "").split(",") if a.strip()]
        words = match.group("rest").replace(",", " ").split()
        unit = "micrometer"
        if words and not _is_number(words[-1]):
            unit = ngff_unit(words.pop(), f"{source}:{number}: pixel_size unit")
        if not words or not all(_is_number(w) for w in words):
            raise _fail(source, number, "malformed pixel_size line; expected e.g. "
                        f"'{pixel_size_comment((1.0,) * ndim, 'micrometer')}'")
        values = [float(w) for w in words]
        if axes and axes != list(_AXES[: len(values)]):
            raise _fail(source, number, f"pixel_size axes ({', '.join(axes)}) must be "
                        f"({', '.join(_AXES[:len(values)])}) for {len(values)} values")
        if len(values) == 1:
            values *= ndim
        if len(values) != ndim or not all(math.isfinite(v) and v > 0 for v in values):
            raise _fail(source, number, f"pixel_size needs 1 or {ndim} positive numbers "
                        f"({', '.join(_AXES[:ndim])}), got {words}")
        found = (tuple(values[::-1]), unit)
    return found


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _finish(
    source: Path,
    files: list[Path],
    rows: list[list[float]],
    ndim: int,
    channels: list[str] | None = None,
    lines: list[str] | None = None,
) -> PositionTable:
    """Build the table, reversing file order (x, y[, z]) into index order."""
    if not files:
        raise _fail(source, None, "no tiles listed")
    positions = np.asarray(rows, dtype=np.float64)[:, ::-1]
    size, unit = _pixel_size(source, lines or [], ndim)
    return PositionTable(files=files, positions=positions, ndim=ndim, source=source,
                         channels=channels, pixel_size=size, unit=unit)


#: Largest difference, in pixels, between the positions one tile gets in two channels.
CHANNEL_POSITION_TOLERANCE = 1e-6


def _check_channels(
    source: Path, channels: list[str], rows: list[list[float]], lines: list[int], ndim: int
) -> None:
    """Check that every channel lists the same tiles at the same positions.

    ``rows`` are in file order (x, y[, z]); ``lines`` are the rows' line numbers.
    """
    by_channel: dict[str, list[int]] = {}
    for i, channel in enumerate(channels):
        by_channel.setdefault(channel, []).append(i)
    (first, ref), *others = by_channel.items()
    axes = ", ".join(_AXES[:ndim])

    def shown(row: list[float]) -> str:
        return "(" + ", ".join(repr(float(v)) for v in row) + ")"

    for channel, members in others:
        for t, (i, r) in enumerate(zip(members, ref, strict=False)):
            if any(abs(a - b) > CHANNEL_POSITION_TOLERANCE
                   for a, b in zip(rows[i], rows[r], strict=True)):
                raise _fail(
                    source,
                    lines[i],
                    f"channel {channel!r} tile {t} is at ({axes}) = {shown(rows[i])} but "
                    f"channel {first!r} puts it at {shown(rows[r])}; every channel of a tile "
                    "needs the same position",
                )
    counts = {channel: len(members) for channel, members in by_channel.items()}
    fewest = min(counts, key=counts.__getitem__)
    n = counts[fewest]
    if any(count > n for count in counts.values()):
        i = min(members[n] for members in by_channel.values() if len(members) > n)
        raise _fail(
            source,
            lines[i],
            f"channel {channels[i]!r} lists {counts[channels[i]]} tiles but channel "
            f"{fewest!r} lists {n}, so tile {n} of {channels[i]!r} has no match; every "
            "channel needs the same number of tiles",
        )


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
        name = match.group("file").strip()
        row = [_parse_number(source, number, _AXES[i], c, name) for i, c in enumerate(coords)]
        files.append(resolver.resolve(name, number))
        rows.append(row)
    if ndim is None:
        raise _fail(source, None, "no 'dim = 2' or 'dim = 3' line; not a TileConfiguration file")
    return _finish(source, files, rows, ndim, lines=lines)


def read_positions_csv(path: str | os.PathLike[str]) -> PositionTable:
    """Read a CSV positions file with a ``file,x,y[,z][,channel]`` header.

    Parameters
    ----------
    path : str or path-like
        The CSV file. The first non-blank, non-``#`` line is the header; it must name
        the columns ``file``, ``x`` and ``y`` and may name ``z`` and ``channel``
        (case-insensitive, any order, other columns ignored). Fields may be quoted and
        padded with spaces.

    Returns
    -------
    PositionTable
        Positions in index order (``(y, x)`` or ``(z, y, x)`` when ``z`` is present),
        in file order. With a ``channel`` column, ``channels`` holds every row's
        (stripped) channel value; tile ``t`` of a channel is its ``t``-th row.

    Raises
    ------
    InputError
        For an unreadable file, a missing or duplicated header column, a row whose
        field count differs from the header, a non-finite or non-numeric coordinate,
        a missing or duplicated tile file, an empty tile list, an empty channel value,
        channels listing different numbers of tiles, or a tile whose position differs
        between channels (by more than 1e-6 px). The message names the file and line.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(folder / "a.tif", np.zeros((4, 4), np.uint8))
    >>> _ = (folder / "pos.csv").write_text("file, x, y\\na.tif, 10.5, 2\\n")
    >>> read_positions_csv(folder / "pos.csv").positions.tolist()
    [[2.0, 10.5]]
    >>> tifffile.imwrite(folder / "b.tif", np.zeros((4, 4), np.uint8))
    >>> _ = (folder / "two.csv").write_text("file,x,y,channel\\na.tif,0,0,DAPI\\nb.tif,0,0,GFP\\n")
    >>> table = read_positions_csv(folder / "two.csv")
    >>> table.channels, table.channel_rows()
    (['DAPI', 'GFP'], {'DAPI': [0], 'GFP': [1]})
    """
    source = Path(path)
    lines = _read_text_lines(source)
    resolver = _TileResolver(source, search_subfolders=False)
    header: list[str] | None = None
    columns: dict[str, int] = {}
    files: list[Path] = []
    rows: list[list[float]] = []
    channels: list[str] = []
    row_lines: list[int] = []
    ndim = 2
    for number, line in _content_lines(lines):
        try:
            fields = [f.strip() for f in next(csv.reader([line], skipinitialspace=True))]
        except csv.Error as exc:
            raise _fail(source, number, f"malformed CSV line ({exc})") from None
        if header is None:
            header = [f.lower() for f in fields]
            for column in ("file", "x", "y", "z", "channel"):
                hits = [i for i, name in enumerate(header) if name == column]
                if len(hits) > 1:
                    raise _fail(source, number, f"column {column!r} appears {len(hits)} times")
                if hits:
                    columns[column] = hits[0]
                elif column not in ("z", "channel"):
                    raise _fail(
                        source,
                        number,
                        f"missing column {column!r} in header {line[:80]!r}; "
                        "expected a header with columns file,x,y[,z][,channel]",
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
        row = [_parse_number(source, number, axis, fields[columns[axis]], name)
               for axis in _AXES[:ndim]]
        if "channel" in columns:
            channel = fields[columns["channel"]]
            if not channel:
                raise _fail(source, number, f"empty channel value for tile {name!r}")
            channels.append(channel)
        files.append(resolver.resolve(name, number))
        rows.append(row)
        row_lines.append(number)
    if header is None:
        raise _fail(
            source, None, "empty CSV; expected a header with columns file,x,y[,z][,channel]"
        )
    if "channel" not in columns:
        return _finish(source, files, rows, ndim, lines=lines)
    if files:
        _check_channels(source, channels, rows, row_lines, ndim)
    return _finish(source, files, rows, ndim, channels, lines=lines)


def positions_format(path: str | os.PathLike[str]) -> str:
    """Which reader :func:`read_positions` uses for ``path``: ``"csv"`` or ``"tileconfig"``.

    A ``.csv`` suffix means CSV. Otherwise the first non-comment line decides: ``dim = N``
    or a ``;``-separated tile line means a Fiji TileConfiguration; a CSV header naming a
    ``file`` column means CSV. Only the text is read; tile files are not looked at.

    Raises
    ------
    InputError
        For an unreadable file, or when the format is not recognised.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "tiles.txt").write_text("dim = 2\\na.tif; ; (1, 2)\\n")
    >>> _ = (folder / "tiles.dat").write_text("file,x,y,channel\\n")
    >>> positions_format(folder / "tiles.txt"), positions_format(folder / "tiles.dat")
    ('tileconfig', 'csv')
    """
    source = Path(path)
    if source.suffix.lower() == ".csv":
        return "csv"
    lines = _read_text_lines(source)
    first = next(_content_lines(lines), None)
    if first is not None:
        line = first[1]
        if _DIM_RE.match(line) or ";" in line:
            return "tileconfig"
        try:
            header = [f.strip().lower() for f in next(csv.reader([line]))]
        except csv.Error:
            header = []
        if "file" in header:
            return "csv"
    raise _fail(
        source,
        first[0] if first is not None else None,
        "unrecognised positions file; expected a Fiji TileConfiguration ('dim = N' and "
        "'name; ; (x, y)' lines) or a CSV with a file,x,y[,z][,channel] header",
    )


def read_positions(path: str | os.PathLike[str]) -> PositionTable:
    """Read a positions file, detecting its format.

    A ``.csv`` suffix means CSV (:func:`read_positions_csv`). Otherwise the first
    non-comment line decides: ``dim = N`` or a ``;``-separated tile line means a Fiji
    TileConfiguration (:func:`read_tile_configuration`); a CSV header naming a ``file``
    column means CSV (see :func:`positions_format`).

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
    if positions_format(path) == "csv":
        return read_positions_csv(path)
    return read_tile_configuration(path)
