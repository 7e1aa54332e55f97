"""``gpufusion info PATH [--preview PNG]``: describe an image, or an input tile set.

An OME-Zarr image (a folder holding Zarr group metadata, or named ``*.zarr``) is described
level by level (:func:`gpufusion.writers.ome_zarr.read_ome_zarr_info`), and so is an
OME-TIFF image: a TIFF gpufusion wrote (``Software`` tag ``gpufusion``) or any pyramidal
TIFF (:func:`gpufusion.readers.image_info.read_ome_tiff_info`). Any other input (positions
file, OME-TIFF folder, a single-level OME-TIFF tile file, BigStitcher ``dataset.xml``, CZI)
is described as an input tile set: format, tiles, channels, time points, pixel size and the
resolved locations its pixels are read from (:func:`gpufusion.readers.summary.describe_input`).

``--preview PNG`` also writes a thumbnail of an image (:func:`gpufusion.preview.write_preview`);
an existing PNG is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from . import common_options, help_texts

#: Endings of the files read as TIFF images (``readers.image_info.TIFF_SUFFIXES``; the
#: readers package is imported only when a command runs).
_TIFF_SUFFIXES = (".tif", ".tiff")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        parents=[common_options()],
        help="describe an image (OME-Zarr or OME-TIFF: levels, shapes, chunks or tiles, pixel "
             "size, channels; --preview PNG: a thumbnail) or an input tile set (format, tiles, "
             "channels, time points, pixel size, where data is read from)",
        **help_texts(
            "Describe PATH. An image gpufusion wrote (OME-Zarr folder or OME-TIFF): its "
            "resolution levels with shapes, chunks or tiles, scales and pixel size, and its "
            "channels. Any input 'gpufusion fuse' reads (positions file, OME-TIFF folder, "
            "dataset.xml, CZI): its format, tiles, channels, time points, pixel size and the "
            "files its pixels are read from, so a run can be checked before it starts.",
            "gpufusion info slide.ome.zarr",
            "gpufusion info slide.ome.tif --preview slide.png",
            "gpufusion info TileConfiguration.txt",
        ),
    )
    p.add_argument("path", help="an OME-Zarr image folder, an OME-TIFF gpufusion wrote, or an "
                                "input gpufusion fuse reads")
    p.add_argument("--preview", metavar="PNG",
                   help="also write a contrast-stretched RGB thumbnail of the image (OME-Zarr "
                        "or OME-TIFF) to PNG: channels as colours, 3D as maximum projection")
    p.add_argument("--preview-size", type=int, default=1024, metavar="PX",
                   help="longest side of the preview (default: 1024)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --preview PNG (default: refuse)")
    p.set_defaults(run=run)


def _is_image_tiff(path: Path) -> bool:
    from ..readers.image_info import is_image_tiff

    return path.is_file() and path.name.lower().endswith(_TIFF_SUFFIXES) and is_image_tiff(path)


def _is_rgb_tiff(path: Path) -> bool:
    """Whether the TIFF's first image holds interleaved or planar RGB samples (3)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        return page.photometric == tifffile.PHOTOMETRIC.RGB and page.samplesperpixel == 3


def _is_rgb_input(path: Path) -> bool:
    """Whether an input's channels R, G, B are the samples of colour tile files (not three
    gray channels that happen to be named so)."""
    from ..readers.detect import read_tileset

    return read_tileset(path).rgb


def run(args: argparse.Namespace) -> int:
    from ..readers.image_info import is_ome_zarr

    path = Path(args.path)
    preview = Path(args.preview) if args.preview is not None else None
    if preview is not None:
        from ..preview import check_preview_target

        if args.preview_size < 16:
            raise InputError(f"--preview-size: {args.preview_size} px; must be at least 16")
        check_preview_target(path, preview, args.overwrite)  # before any work
    image = True
    if is_ome_zarr(path):
        from ..writers.ome_zarr import format_info, read_ome_zarr_info

        print(format_info(read_ome_zarr_info(path)))
    elif _is_image_tiff(path):
        from ..readers.image_info import format_ome_tiff_info, read_ome_tiff_info

        info = read_ome_tiff_info(path)
        rgb = _is_rgb_tiff(path)
        if rgb:  # one OME channel of 3 interleaved samples: name the samples
            info["channels"] = ["R", "G", "B"]
        text = format_ome_tiff_info(info)
        print(text.replace("  channels: 3 (R, G, B)", "  channels: 3 (R, G, B): RGB colour, "
                           "interleaved (Photometric RGB, 3 samples per pixel)") if rgb else text)
    else:
        from ..readers.summary import describe_input, format_input_info

        described = describe_input(path)
        text = format_input_info(described)
        if described["channels"] == ["R", "G", "B"] and _is_rgb_input(path):
            text = text.replace("channels: 3 (R, G, B)", "channels: 3 (R, G, B): RGB colour "
                                "tiles (registered on their luminance by default)")
        print(text)
        image = False
    if preview is not None:
        if not image:
            raise InputError(f"--preview: {path} is an input tile set, not an image; a preview "
                             "needs an OME-Zarr image or an OME-TIFF gpufusion wrote")
        from ..preview import write_preview

        write_preview(path, preview, args.preview_size, overwrite=args.overwrite)
        print(f"preview: {preview}")
    return 0
