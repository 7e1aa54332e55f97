"""``gpufusion info OUT.ome.zarr``: describe an OME-Zarr image."""

from __future__ import annotations

import argparse

from . import common_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        parents=[common_options()],
        help="describe an OME-Zarr image (levels, shapes, chunks, scales)",
    )
    p.add_argument("path", help="an OME-Zarr image folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..writers.ome_zarr import format_info, read_ome_zarr_info

    print(format_info(read_ome_zarr_info(args.path)))
    return 0
