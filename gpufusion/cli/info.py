"""``gpufusion info PATH``: describe an OME-Zarr image, or an input tile set.

An OME-Zarr image (a folder holding Zarr group metadata, or named ``*.zarr``) is described
level by level (:func:`gpufusion.writers.ome_zarr.read_ome_zarr_info`); any other input
(positions file, OME-TIFF folder or file, BigStitcher ``dataset.xml``, CZI) by its format,
tiles, channels, time points, pixel size and the resolved locations its pixels are read
from (:func:`gpufusion.readers.summary.describe_input`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import common_options

_ZARR_METADATA = ("zarr.json", ".zgroup", ".zattrs")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        parents=[common_options()],
        help="describe an OME-Zarr image (levels, shapes, chunks, scales) or an input tile "
             "set (format, tiles, channels, time points, pixel size, where data is read from)",
    )
    p.add_argument("path", help="an OME-Zarr image folder, or an input gpufusion fuse reads")
    p.set_defaults(run=run)


def _is_ome_zarr(path: Path) -> bool:
    if path.name.lower().endswith(".zarr"):
        return True
    return path.is_dir() and any((path / name).is_file() for name in _ZARR_METADATA)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if _is_ome_zarr(path):
        from ..writers.ome_zarr import format_info, read_ome_zarr_info

        print(format_info(read_ome_zarr_info(path)))
    else:
        from ..readers.summary import describe_input, format_input_info

        print(format_input_info(describe_input(path)))
    return 0
