"""Physical metadata options of ``fuse`` and ``register``, and what the output records.

* ``--pixel-size`` and ``--unit`` (:func:`add_metadata_options`): ``--unit`` is an NGFF
  space unit (``micrometer``, ``nanometer``, ...; ``um``, ``nm`` accepted) and is checked
  when parsed. With ``--pixel-size`` it is that size's unit (default micrometre; for
  dataset.xml the dataset's voxel unit) for every input kind. Without ``--pixel-size`` the
  input's own pixel size (OME-XML, CZI, dataset.xml, a positions file's ``# pixel_size``
  line or its tiles' OME-XML) is converted to it; an input that gives none is refused
  (there is nothing to convert).
* ``--name`` (``fuse``): the image name; default after INPUT (:func:`image_name`).
* :func:`read_tilesets` reads INPUT as :mod:`gpufusion.cli.inputs` does, turning the
  readers' :class:`~gpufusion.readers.tileset.MetadataWarning` into notices.
* :func:`provenance`: the command line, input and registration summary recorded in the
  output (with what :func:`gpufusion.fuse_to_file` records itself).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import notice

__all__ = ["add_metadata_options", "image_name", "provenance", "read_tilesets", "unit_value"]


def unit_value(text: str) -> str:
    """``--unit``: an NGFF space unit name (abbreviations accepted), else a usage error.

    Examples
    --------
    >>> unit_value("nm")
    'nanometer'
    """
    from ..units import ngff_unit

    try:
        return ngff_unit(text, "")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def name_value(text: str) -> str:
    """``--name``: a non-empty, one-line image name."""
    name = text.strip()
    if not name or "\n" in name:
        raise argparse.ArgumentTypeError(f"need a non-empty one-line name, got {text!r}")
    return name


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_metadata_options(p: argparse.ArgumentParser, name: bool = True) -> None:
    """Add ``--pixel-size`` and ``--unit`` (and ``--name`` with ``name``) to ``p``."""
    p.add_argument(
        "--pixel-size",
        type=positive_float,
        default=None,
        metavar="SIZE",
        help="physical pixel size, in --unit (micrometer; for dataset.xml the dataset's "
        "unit); default: the input's own, from OME-XML, CZI, dataset.xml or a positions "
        "file's '# pixel_size' line; none is written when it is unknown",
    )
    p.add_argument(
        "--unit",
        type=unit_value,
        default=None,
        metavar="UNIT",
        help="NGFF length unit: micrometer, nanometer, millimeter, ... (um, nm, mm accepted); "
        "the unit of --pixel-size (default micrometer), or alone: the input's pixel size is "
        "converted to it",
    )
    if name:
        p.add_argument("--name", type=name_value, default=None, metavar="NAME",
                       help="image name in the metadata (default: after INPUT, e.g. the "
                       "folder or file name)")


def read_tilesets(args: argparse.Namespace, read: Callable[[argparse.Namespace], Any]) -> Any:
    """``read(args)`` (a TileSet or a list of them) with ``--unit`` applied and the readers'
    metadata warnings shown as notices.

    ``--unit`` without ``--pixel-size`` converts the pixel size the input gives.

    Raises
    ------
    InputError
        From the readers, or for ``--unit`` alone on an input without a pixel size.
    """
    from ..readers.tileset import MetadataWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MetadataWarning)
        result = read(args)
    for w in caught:
        if issubclass(w.category, MetadataWarning):
            notice(args, f"notice: {w.message}")
        else:  # not ours: hand it back to the warnings machinery
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    unit = getattr(args, "unit", None)
    if unit is None or getattr(args, "pixel_size", None) is not None:
        return result
    if isinstance(result, list):
        return [ts.in_unit(unit, "--unit") for ts in result]
    return result.in_unit(unit, "--unit")


#: Positions and project files whose own name says little: the image is named after the
#: folder that holds them.
_GENERIC_STEMS = ("tileconfiguration", "dataset", "positions", "registered")


def image_name(args: argparse.Namespace) -> str:
    """``--name``, else INPUT's name: a folder's name, a file's name without its suffixes
    (``.ome.tif``, ``.czi``, ``.registered.txt``, ...), or for a generic file name
    (``TileConfiguration.txt``, ``dataset.xml``, ``positions.csv``) its folder's name.

    Examples
    --------
    >>> image_name(argparse.Namespace(name=None, input="/data/leica_2tiles/"))
    'leica_2tiles'
    >>> image_name(argparse.Namespace(name=None, input="/data/run3/TileConfiguration.txt"))
    'run3'
    >>> image_name(argparse.Namespace(name=None, input="mosaic.ome.tiff"))
    'mosaic'
    """
    if getattr(args, "name", None) is not None:
        text = str(args.name).strip()
        if not text or "\n" in text:
            raise InputError(f"--name: need a non-empty one-line name, got {args.name!r}")
        return text
    path = Path(args.input).absolute()
    if path.is_dir() or not path.suffix:
        return path.name or "gpufusion"
    stem = path.name.split(".")[0] or path.stem
    if stem.lower().startswith(_GENERIC_STEMS) and path.parent.name:
        return path.parent.name
    return stem


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``args.argv`` when the entry point recorded it)."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return shlex.join(["gpufusion", *map(str, argv)])


def provenance(args: argparse.Namespace, registered: list | None = None) -> dict[str, Any]:
    """What ``fuse`` adds to the output's provenance record: ``command``, ``input`` (the
    absolute path) and, with ``--register``, ``registration`` (one summary per time point,
    :func:`gpufusion.registration.report.summary_record`)."""
    record: dict[str, Any] = {"command": command_line(args),
                              "input": str(Path(args.input).absolute())}
    if registered:
        from ..registration.report import summary_record

        summaries = [summary_record(result) for result in registered]
        record["registration"] = summaries[0] if len(summaries) == 1 else summaries
    return record
