"""One entry point for every input kind: :func:`read_tileset`.

Detection, when ``format`` is not given:

=====================================  ==============================================
INPUT                                  format
=====================================  ==============================================
a folder, with ``grid=``               ``grid`` (images on a regular grid)
a folder holding ``*.ome.tif(f)``      ``ome-tiff`` (stage positions in the OME-XML)
``*.xml`` whose root is ``SpimData``   ``bigstitcher`` (BigStitcher / BDV dataset.xml)
``*.czi`` (or ``ZISRAWFILE`` magic)    ``czi`` (mosaic sub-block positions)
a TIFF file with OME-XML               ``ome-tiff`` (one multi-series file)
``*.csv``                              ``csv`` (``file,x,y[,z]`` positions)
any other text file                    ``tileconfig`` (Fiji TileConfiguration)
=====================================  ==============================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .images import _quiet_tifffile
from .library_logs import TIFFFILE_LOG
from .listing import visible_files
from .paths import os_error_message
from .positions import read_positions, read_positions_csv, read_tile_configuration
from .rgb import open_tiles
from .tileset import TileSet

__all__ = ["FORMATS", "detect_format", "list_timepoints", "read_tileset"]

#: Input formats :func:`read_tileset` reads, by the name ``format=`` takes.
FORMATS = ("tileconfig", "csv", "ome-tiff", "bigstitcher", "czi", "grid")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise InputError(f"{path}: {os_error_message('input', exc, path)}") from None


def _is_ome_tiff(path: Path) -> bool:
    import tifffile

    # tifffile's warnings about a damaged file are held back: the reader reports them
    with _quiet_tifffile(), TIFFFILE_LOG.capture():
        try:
            with tifffile.TiffFile(path, is_ome=False) as tif:
                return bool(len(tif.pages)) and "<OME" in (tif.pages[0].description or "")
        except Exception:  # not a readable TIFF: let the positions reader explain
            return False


def _check_exists(p: Path) -> None:
    """Raise the InputError for an input path that cannot be reached (missing, link loop)."""
    try:
        os.stat(p)
    except OSError as exc:
        plain = isinstance(exc, FileNotFoundError) and not os.path.islink(p)
        problem = "no such file or folder" if plain else os_error_message("input", exc, p)
        raise InputError(f"{p}: {problem}") from None


def detect_format(path: str | os.PathLike[str], *, grid: object = None) -> str:
    """Name the input format of ``path`` (one of :data:`FORMATS`).

    Raises
    ------
    InputError
        If the path does not exist, or is a folder with neither OME-TIFF files nor a
        ``grid``.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "tiles.csv").write_text("file,x,y\\n")
    >>> detect_format(d / "tiles.csv"), detect_format(d, grid="2x2")
    ('csv', 'grid')
    """
    p = Path(path)
    _check_exists(p)
    if p.is_dir():
        if grid is not None:
            return "grid"
        if any(f.name.lower().endswith((".ome.tif", ".ome.tiff")) for f in visible_files(p)):
            return "ome-tiff"
        raise InputError(
            f"{p}: folder without OME-TIFF files; for a folder of plain images give "
            "--grid ROWSxCOLS (and --overlap), or pass a positions file, dataset.xml or .czi"
        )
    if grid is not None:
        raise InputError(f"{p}: --grid needs a folder of images, not a file")
    head = _head(p)
    suffix = p.suffix.lower()
    if suffix == ".czi" or head.startswith(b"ZISRAWFILE"):
        return "czi"
    if head[:4] in _TIFF_MAGIC:
        if _is_ome_tiff(p):
            return "ome-tiff"
        raise InputError(
            f"{p}: a TIFF without OME-XML positions; give a positions file (TileConfiguration "
            "or CSV) or a folder with --grid"
        )
    if suffix == ".xml" or b"<SpimData" in head:
        return "bigstitcher"
    if suffix == ".csv":
        return "csv"
    return "tileconfig"


#: Formats holding a single time point (id 0), and how messages call them.
_SINGLE_TIMEPOINT = {"tileconfig": "positions files have", "csv": "positions files have",
                     "grid": "a grid of images has"}


def _checked_format(
    p: Path,
    format: str | None,
    grid: object,
    overlap: object,
    pattern: object,
    illumination: object,
) -> str:
    """Detect (or check) the format and reject options that do not apply to it."""
    fmt = detect_format(p, grid=grid) if format is None else format
    if fmt not in FORMATS:
        raise InputError(f"--format: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "grid" and (grid is not None or overlap is not None or pattern is not None):
        raise InputError(f"{p}: --grid, --overlap and --pattern apply only to --format grid")
    if illumination is not None and fmt != "bigstitcher":
        raise InputError(f"{p}: --illumination applies only to BigStitcher dataset.xml input")
    return fmt


def list_timepoints(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    grid: str | Sequence[int] | None = None,
    overlap: float | Sequence[float] | None = None,
    pattern: str | None = None,
    illumination: int | str | None = None,
) -> list[int]:
    """The time point ids of an input, in order: each is a valid ``read_tileset(timepoint=)``.

    Reads metadata only (no pixels):

    * BigStitcher ``dataset.xml``: the ``<Timepoints>`` ids with at least one view that is
      not a ``MissingView`` (with ``illumination`` an id: one of that illumination);
    * CZI: the ``T`` indices of the full-resolution sub-blocks;
    * OME-TIFF: ``0 .. SizeT - 1`` (the smallest ``SizeT`` of the tiles), keeping the
      indices whose planes are all stored;
    * positions files (TileConfiguration, CSV) and grids: ``[0]``.

    The first id is the one ``read_tileset`` reads when ``timepoint`` is not given.

    Parameters
    ----------
    path, format, grid, overlap, pattern, illumination
        As for :func:`read_tileset` (they select and check the format the same way).

    Raises
    ------
    InputError
        For an input that does not exist, options that do not apply, or metadata the
        format's reader cannot parse (one line naming the file).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "pos.csv").write_text("file,x,y\\n")
    >>> list_timepoints(d / "pos.csv"), list_timepoints(d, grid="2x2")
    ([0], [0])
    """
    p = Path(path)
    _check_exists(p)
    fmt = _checked_format(p, format, grid, overlap, pattern, illumination)
    if fmt in _SINGLE_TIMEPOINT:
        return [0]
    if fmt == "ome-tiff":
        from .ome_tiff import ome_tiff_timepoints

        found = ome_tiff_timepoints(p)
    elif fmt == "czi":
        from .czi import czi_timepoints

        found = czi_timepoints(p)
    else:
        from .bigstitcher import read_spimdata, spimdata_timepoints

        found = spimdata_timepoints(read_spimdata(p), illumination=illumination)
    if not found:
        raise InputError(f"{p}: no time point has every plane of every tile")
    return found


def read_tileset(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    grid: str | Sequence[int] | None = None,
    overlap: float | Sequence[float] | None = None,
    order: str = "raster",
    pattern: str | None = None,
    channel: int | str | None = None,
    timepoint: int | None = None,
    illumination: int | str | None = None,
    pixel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
) -> TileSet:
    """Read any supported input into a :class:`TileSet`.

    Parameters
    ----------
    path : path
        Positions file (TileConfiguration, CSV), OME-TIFF folder or file, BigStitcher
        ``dataset.xml``, ``.czi`` file, or a folder of images (with ``grid``).
    format : {"tileconfig", "csv", "ome-tiff", "bigstitcher", "czi", "grid"}, optional
        Skip detection (see :func:`detect_format`).
    grid, overlap, order, pattern : optional
        Grid layout for a folder of plain images (see :func:`~.grid.read_grid`);
        ``overlap`` defaults to 0.1.
    channel : int or str, optional
        Keep only this channel (index or name); default every channel.
    timepoint : int, optional
        Time point to read (default the first) for OME-TIFF, CZI and BigStitcher; positions
        files and grids have only time point 0. :func:`list_timepoints` lists them.
    illumination : int or "all", optional
        BigStitcher illumination to read (default the first); ``"all"`` keeps all.
    pixel_size : float or sequence of float, optional
        Physical pixel size (index order, or one number). For positions files and grids it
        is only metadata; for OME-TIFF and CZI it replaces the metadata's size (OME-TIFF
        positions are converted with it); for BigStitcher it is the output pixel size.
        Without it, positions files take the size of their ``# pixel_size`` comment line,
        else the one their OME-TIFF tiles all give
        (:func:`~gpufusion.readers.ome_tiff.tiles_pixel_size`).
    unit : str, optional
        NGFF unit (or abbreviation) of ``pixel_size`` (default micrometre; for BigStitcher
        the dataset's unit).

    Returns
    -------
    TileSet

    Raises
    ------
    InputError
        For an unknown format, options that do not apply to the input, and every
        reader's own errors (one line naming the file).

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     tifffile.imwrite(d / f"t{i}.tif", np.zeros((32, 32), np.uint8))
    >>> _ = (d / "pos.csv").write_text("file,x,y\\nt0.tif,0,0\\nt1.tif,28.5,0\\n")
    >>> ts = read_tileset(d / "pos.csv")
    >>> ts.n_tiles, ts.positions().tolist()
    (2, [[0.0, 0.0], [0.0, 28.5]])
    """
    p = Path(path)
    fmt = _checked_format(p, format, grid, overlap, pattern, illumination)
    if fmt in _SINGLE_TIMEPOINT and timepoint not in (None, 0):
        raise InputError(f"{p}: {_SINGLE_TIMEPOINT[fmt]} one time point; --timepoint must be 0 "
                         f"(got {timepoint})")
    if fmt == "grid":
        if grid is None:
            raise InputError(f"{p}: --format grid needs --grid ROWSxCOLS")
        from .grid import read_grid

        result = read_grid(p, grid, overlap=0.1 if overlap is None else overlap, order=order,
                           pattern=pattern, pixel_size=pixel_size, unit=unit)
    elif fmt in ("tileconfig", "csv"):
        reader = {"tileconfig": read_tile_configuration, "csv": read_positions_csv}[fmt]
        table = reader(p) if format is not None else read_positions(p)
        files = open_tiles(table.files, p)  # RGB files: three channels each
        if pixel_size is None:  # the file's comment line, else the tiles' own metadata
            from .ome_tiff import tiles_pixel_size

            pixel_size, unit = ((table.pixel_size, table.unit) if table.pixel_size else
                                tiles_pixel_size(table.files, table.ndim, p))
        result = files.tileset(table.positions, [str(f) for f in table.files], p,
                               pixel_size=pixel_size, unit=unit, channels=table.channels)
    elif fmt == "ome-tiff":
        from .ome_tiff import read_ome_tiff

        result = read_ome_tiff(p, timepoint=timepoint, pixel_size=pixel_size, unit=unit)
    elif fmt == "czi":
        from .czi import read_czi

        result = read_czi(p, timepoint=timepoint, pixel_size=pixel_size, unit=unit)
    else:
        from .bigstitcher import read_bigstitcher

        return read_bigstitcher(p, channel=channel, timepoint=timepoint,
                                illumination=illumination, pixel_size=pixel_size, unit=unit)
    return result if channel is None else result.select_channel(channel)
