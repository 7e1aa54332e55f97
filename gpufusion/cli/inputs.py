"""Input options shared by commands that read tiles (``fuse``, ``register``).

``add_input_options(parser)`` adds the options that say how to read INPUT;
``tileset_from_args(args)`` reads one time point of it with
:func:`gpufusion.readers.detect.read_tileset`; ``tilesets_from_args(args)`` reads one
TileSet per selected time point (``--timepoint all``: every one, see
:func:`gpufusion.readers.detect.list_timepoints`). Every channel is read; commands choose
channels themselves (e.g. ``--reg-channel``).
"""

from __future__ import annotations

import argparse
import math

from ..errors import InputError
from ..readers.detect import FORMATS, list_timepoints, read_tileset
from ..readers.tileset import TileSet

__all__ = ["INPUT_HELP", "add_input_options", "check_same_layout", "tileset_from_args",
           "tilesets_from_args", "timepoints_from_args"]

#: Help text for the INPUT positional argument of commands using these options.
INPUT_HELP = (
    "TileConfiguration.txt, positions CSV (file,x,y[,z][,channel]), a folder or file of "
    "OME-TIFFs with stage positions, a BigStitcher dataset.xml, a .czi mosaic, or a folder "
    "of images with --grid"
)


def _grid(text: str) -> str:
    from ..readers.grid import parse_grid

    try:
        parse_grid(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--grid: ")) from None
    return text


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _timepoint(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    return _non_negative_int(text)


def _illumination(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    return _non_negative_int(text)


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--format``, ``--grid``, ``--overlap``, ``--order``, ``--pattern``,
    ``--timepoint`` and ``--illumination`` to ``parser`` (in an "input" group).

    Examples
    --------
    >>> p = argparse.ArgumentParser()
    >>> add_input_options(p)
    >>> a = p.parse_args(["--grid", "4x3", "--overlap", "0.1", "--order", "snake"])
    >>> a.grid, a.overlap, a.order, a.format
    ('4x3', 0.1, 'snake', None)
    """
    g = parser.add_argument_group("input", "how INPUT is read (default: detected)")
    g.add_argument("--format", choices=FORMATS, default=None,
                   help="input kind; default: detected from INPUT")
    g.add_argument("--grid", type=_grid, default=None, metavar="ROWSxCOLS",
                   help="INPUT is a folder of images on a regular grid, e.g. 4x3")
    g.add_argument("--overlap", type=_overlap, default=None, metavar="F",
                   help="with --grid: fraction of a tile shared with a neighbour (default 0.1)")
    g.add_argument("--order", choices=("raster", "snake"), default="raster",
                   help="with --grid and no {row}/{col} pattern: how files sorted by name "
                        "fill the grid (default raster)")
    g.add_argument("--pattern", default=None, metavar="PATTERN",
                   help='with --grid: file names with {row} and {col} or {index}, '
                        'e.g. "r{row}-c{col}.png"')
    g.add_argument("--timepoint", type=_timepoint, default=None, metavar="T",
                   help="time point to read (OME-TIFF, CZI, dataset.xml; default the first), "
                        "or 'all' for every time point")
    g.add_argument("--illumination", type=_illumination, default=None, metavar="I",
                   help="dataset.xml: illumination to read (default the first), or 'all' to "
                        "fuse every illumination as separate tiles")


def tileset_from_args(args: argparse.Namespace) -> TileSet:
    """Read ``args.input`` as the input options say.

    ``args.pixel_size`` and ``args.unit``, when the command has them, are passed on.

    Raises
    ------
    InputError
        From the readers: one line naming the file at fault.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for r in range(2):
    ...     tifffile.imwrite(d / f"r{r}.tif", np.zeros((10, 10), np.uint8))
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("input")
    >>> add_input_options(p)
    >>> ts = tileset_from_args(p.parse_args([str(d), "--grid", "2x1", "--overlap", "0.2"]))
    >>> ts.positions().tolist()
    [[0.0, 0.0], [8.0, 0.0]]
    """
    timepoint = getattr(args, "timepoint", None)
    if _is_all(timepoint):
        raise InputError("--timepoint all: this command reads one time point; give its id "
                         "(e.g. --timepoint 0)")
    return _read(args, timepoint)


def _is_all(timepoint: object) -> bool:
    return isinstance(timepoint, str) and timepoint.strip().lower() == "all"


def _read(args: argparse.Namespace, timepoint: int | None) -> TileSet:
    pixel_size = getattr(args, "pixel_size", None)
    return read_tileset(
        args.input,
        format=getattr(args, "format", None),
        grid=getattr(args, "grid", None),
        overlap=getattr(args, "overlap", None),
        order=getattr(args, "order", "raster"),
        pattern=getattr(args, "pattern", None),
        timepoint=timepoint,
        illumination=getattr(args, "illumination", None),
        pixel_size=pixel_size,
        unit=getattr(args, "unit", None) if pixel_size is not None else None,
    )


def _list(args: argparse.Namespace) -> list[int]:
    return list_timepoints(
        args.input,
        format=getattr(args, "format", None),
        grid=getattr(args, "grid", None),
        overlap=getattr(args, "overlap", None),
        pattern=getattr(args, "pattern", None),
        illumination=getattr(args, "illumination", None),
    )


def timepoints_from_args(args: argparse.Namespace) -> list[int]:
    """The time point ids ``--timepoint`` selects, in order (metadata only, no pixels).

    ``all``: every id of the input (:func:`~gpufusion.readers.detect.list_timepoints`);
    an id: ``[id]`` if the input has it; not given: ``[first id]``. The ids match the
    TileSets :func:`tilesets_from_args` returns, one to one.

    Raises
    ------
    InputError
        If the input has no such time point (one line naming the file and the ids).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "pos.csv").write_text("file,x,y\\n")
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("input")
    >>> add_input_options(p)
    >>> timepoints_from_args(p.parse_args([str(d / "pos.csv"), "--timepoint", "all"]))
    [0]
    """
    ids = _list(args)
    timepoint = getattr(args, "timepoint", None)
    if _is_all(timepoint):
        return ids
    if timepoint is None:
        return ids[:1]
    if int(timepoint) not in ids:
        raise InputError(f"{args.input}: timepoint {int(timepoint)} does not exist "
                         f"(timepoints {ids})")
    return [int(timepoint)]


def tilesets_from_args(args: argparse.Namespace) -> list[TileSet]:
    """One TileSet per time point ``--timepoint`` selects (one unless ``all``).

    Without ``all`` this is ``[tileset_from_args(args)]``. With ``all`` every time point
    of :func:`timepoints_from_args` is read, in that order, and checked to have the tiles,
    channels, tile shapes, dtypes and pixel size of the first (:func:`check_same_layout`);
    tile positions may differ between time points (stage drift, registrations).

    Raises
    ------
    InputError
        From the readers, or for a time point whose layout differs from the first (one
        line naming the file and the time point).

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "a.ome.tif", np.zeros((2, 8, 8), np.uint8),
    ...                  metadata={"axes": "TYX", "PhysicalSizeX": 1, "PhysicalSizeY": 1,
    ...                            "Plane": {"PositionX": [0, 0], "PositionY": [0, 0]}})
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("input")
    >>> add_input_options(p)
    >>> [ts.n_tiles for ts in tilesets_from_args(p.parse_args([str(d), "--timepoint", "all"]))]
    [1, 1]
    """
    timepoint = getattr(args, "timepoint", None)
    if not _is_all(timepoint):
        return [_read(args, timepoint)]
    ids = _list(args)
    tilesets = [_read(args, t) for t in ids]
    check_same_layout(tilesets, ids)
    return tilesets


def check_same_layout(tilesets: list[TileSet], timepoints: list[int]) -> None:
    """Check that every TileSet has the tiles, channels and shapes of the first.

    Compared: tile count and names, channel names, dimensionality, per tile and channel
    the shape and dtype, and the pixel size and unit. Affines are not compared.

    Raises
    ------
    InputError
        Naming the source, the first differing time point and what differs.
    """
    if not tilesets:
        return
    ref, t0 = tilesets[0], timepoints[0]
    for ts, t in zip(tilesets[1:], timepoints[1:], strict=True):
        problem = _layout_difference(ref, ts)
        if problem:
            raise InputError(f"{ts.source}: timepoint {t} differs from timepoint {t0}: "
                             f"{problem}; every time point needs the same tiles, channels "
                             "and shapes")


def _layout_difference(ref: TileSet, ts: TileSet) -> str | None:
    """What differs between two time points (``ts`` first, ``ref`` second), if anything."""
    if ts.n_tiles != ref.n_tiles or ts.names != ref.names:
        return (f"tiles {ts.n_tiles} ({_short(ts.names)}) vs {ref.n_tiles} "
                f"({_short(ref.names)})")
    if ts.channel_names != ref.channel_names:
        return f"channels {ts.channel_names} vs {ref.channel_names}"
    if ts.ndim != ref.ndim:
        return f"{ts.ndim}D vs {ref.ndim}D"
    for k, name in enumerate(ref.names):
        for c in range(ref.n_channels):
            a, b = ts.sources[c][k], ref.sources[c][k]
            if tuple(a.shape) != tuple(b.shape):
                return f"tile {name} has shape {tuple(a.shape)} vs {tuple(b.shape)}"
            if a.dtype != b.dtype:
                return f"tile {name} has dtype {a.dtype} vs {b.dtype}"
    same_size = (ts.pixel_size is None) == (ref.pixel_size is None) and (
        ts.pixel_size is None or all(
            math.isclose(x, y, rel_tol=1e-6)
            for x, y in zip(ts.pixel_size, ref.pixel_size or (), strict=True)))
    if not same_size or ts.unit != ref.unit:
        return f"pixel size {ts.pixel_size} {ts.unit} vs {ref.pixel_size} {ref.unit}"
    return None


def _short(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
