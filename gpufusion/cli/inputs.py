"""Input options shared by commands that read tiles (``fuse``, ``register``).

``add_input_options(parser)`` adds the options that say how to read INPUT;
``tileset_from_args(args)`` reads it with :func:`gpufusion.readers.detect.read_tileset`.
Every channel is read; commands choose channels themselves (e.g. ``--reg-channel``).
"""

from __future__ import annotations

import argparse

from ..readers.detect import FORMATS, read_tileset
from ..readers.tileset import TileSet

__all__ = ["INPUT_HELP", "add_input_options", "tileset_from_args"]

#: Help text for the INPUT positional argument of commands using these options.
INPUT_HELP = (
    "TileConfiguration.txt, positions CSV (file,x,y[,z]), a folder or file of OME-TIFFs "
    "with stage positions, a BigStitcher dataset.xml, a .czi mosaic, or a folder of images "
    "with --grid"
)


def _grid(text: str) -> str:
    from ..errors import InputError
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
    g.add_argument("--timepoint", type=_non_negative_int, default=None, metavar="T",
                   help="time point to read (OME-TIFF, CZI, dataset.xml; default the first)")
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
    pixel_size = getattr(args, "pixel_size", None)
    return read_tileset(
        args.input,
        format=getattr(args, "format", None),
        grid=getattr(args, "grid", None),
        overlap=getattr(args, "overlap", None),
        order=getattr(args, "order", "raster"),
        pattern=getattr(args, "pattern", None),
        timepoint=getattr(args, "timepoint", None),
        illumination=getattr(args, "illumination", None),
        pixel_size=pixel_size,
        unit=getattr(args, "unit", None) if pixel_size is not None else None,
    )
