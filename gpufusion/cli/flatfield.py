"""``gpufusion flatfield INPUT -o profiles.tif``: estimate flat-field profiles and save them;
and the ``--flatfield``/``--darkfield`` options of ``fuse``.

The profiles are estimated per channel from the tiles (:func:`gpufusion.flatfield.
estimate_profiles`) and written as a float32 TIFF (``(y, x)``, or ``(c, y, x)`` for several
channels), with ``--darkfield`` the constant dark level as ``NAME.dark.tif`` beside it, and a
PNG preview ``NAME.png``, so a lab estimates once per microscope and fuses with
``gpufusion fuse INPUT -o OUT --flatfield profiles.tif [--darkfield profiles.dark.tif]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import common_options, help_texts, notice
from .inputs import INPUT_HELP, add_input_options

FLATFIELD_HELP = ("flat-field profile: a float TIFF of the tile's (y, x) shape, one per "
                  "channel as (c, y, x), or a z stack (z, y, x) for 3D tiles; normalised to "
                  "mean 1 when loaded; or 'auto' to estimate it from the tiles")
DARKFIELD_HELP = ("dark-field: a TIFF shaped as --flatfield's, a constant in the tiles' "
                  "units (e.g. 100 for a camera offset), or 'auto' (with --flatfield auto: "
                  "estimate a constant dark level from the tiles; needs shading and many "
                  "tiles); subtracted before dividing by the flat-field")


def add_flatfield_options(p: argparse.ArgumentParser) -> None:
    """``--flatfield FILE|auto`` and ``--darkfield FILE|VALUE|auto`` (for ``fuse``)."""
    g = p.add_argument_group("flat-field correction",
                             "corrected = (raw - darkfield) / flatfield, per tile as it is read")
    g.add_argument("--flatfield", default=None, metavar="FILE|auto", help=FLATFIELD_HELP)
    g.add_argument("--darkfield", default=None, metavar="FILE|VALUE|auto", help=DARKFIELD_HELP)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flatfield",
        parents=[common_options()],
        help="estimate flat-field (and dark-field) profiles from the tiles and save them",
        **help_texts(
            "Estimate the flat-field of each channel from the tiles of INPUT (any input fuse "
            "reads) and save it as a float32 TIFF (mean 1; (c, y, x) for several channels) "
            "with a PNG preview beside it (NAME.png); --darkfield also estimates a constant "
            "dark level and saves it as NAME.dark.tif. Reuse them with 'gpufusion fuse INPUT "
            "-o OUT --flatfield NAME.tif [--darkfield NAME.dark.tif]'.",
            "gpufusion flatfield tiles/ --grid 4x3 --overlap 0.1 -o profiles.tif",
            "gpufusion flatfield TileConfiguration.txt -o scope1.tif --darkfield",
        ),
    )
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="NAME.tif: the flat-field TIFF (NAME.dark.tif and NAME.png beside it)")
    p.add_argument("--darkfield", action="store_true",
                   help="also estimate a constant dark level and save it as NAME.dark.tif")
    p.add_argument("--max-tiles", type=int, default=200, metavar="N",
                   help="tiles per channel the estimate looks at (evenly spaced; default 200)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_input_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..flatfield import estimate_profiles, profile_paths, save_profiles
    from .inputs import tileset_from_args
    from .metadata import read_tilesets
    from .outputs import check_outputs, input_files

    out = Path(args.output)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"-o {out}: profiles are written as TIFF; name it NAME.tif")
    args.unit = getattr(args, "unit", None)
    tileset = read_tilesets(args, tileset_from_args)
    # before any work: no profile, preview or dark-field file may be (or be inside) an
    # input, even with --overwrite (e.g. -o t0.tif beside tile t0.tif, or its t0.png)
    check_outputs(profile_paths(out, args.darkfield),
                  [Path(args.input), *input_files(tileset)], args.overwrite)
    estimates = []
    for c, mosaic in enumerate(tileset.mosaics()):
        est = estimate_profiles(mosaic, darkfield=args.darkfield, max_tiles=args.max_tiles)
        estimates.append(est)
        lo, hi = float(est.flatfield.min()), float(est.flatfield.max())
        dark = f", dark level {est.dark:.4g}" if args.darkfield else ""
        notice(args, f"channel {c}: flat-field from {describe(est)}, "
                     f"{lo:.3f}..{hi:.3f} of its mean{dark}")
    written = save_profiles(out, estimates, darkfield=args.darkfield, overwrite=args.overwrite)
    if not args.quiet:
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def correct_channels(args: argparse.Namespace, channels: list, cache: dict) -> list:
    """``fuse``: the channels' mosaics with ``--flatfield``/``--darkfield`` applied.

    The profiles are made once (``cache``: the first time point's tiles for ``auto``) and
    applied to every time point. Without either option the mosaics are returned as they are.
    """
    flat_opt = getattr(args, "flatfield", None)
    dark_opt = getattr(args, "darkfield", None)
    if flat_opt is None and dark_opt is None:
        return channels
    from ..correction import correct_mosaic

    if "profiles" not in cache:
        cache["profiles"] = channel_profiles(args, channels)
    return [correct_mosaic(m, flatfield=f, darkfield=d)
            for m, (f, d) in zip(channels, cache["profiles"], strict=True)]


def channel_profiles(args: argparse.Namespace, channels: list) -> list[tuple[Any, Any]]:
    """``(flat, dark)`` :class:`~gpufusion.correction.Profile` (or None) per channel."""
    import numpy as np

    from ..correction import Profile
    from ..flatfield import check_dark_below_data, estimate_profiles, load_profiles

    flat_opt, dark_opt = args.flatfield, args.darkfield
    first = channels[0]
    shapes = {t.shape for m in channels for t in m.tiles}
    if len(shapes) > 1:
        raise InputError(f"--flatfield/--darkfield: the tiles have {len(shapes)} different "
                         f"shapes ({', '.join(str(s) for s in sorted(shapes)[:3])}); a profile "
                         "needs one tile shape")
    tile_shape = first.tiles[0].shape
    n = len(channels)
    if dark_opt == "auto" and flat_opt != "auto":
        raise InputError("--darkfield auto: estimates the dark level with the flat-field; "
                         "add --flatfield auto, or give a file or a value")
    flats: list[Any] = [None] * n
    darks: list[Any] = [None] * n
    if dark_opt is not None and dark_opt != "auto":
        value = _number(dark_opt)
        if value is not None:
            darks = [Profile(np.full(tile_shape[-2:], value, np.float32), f"--darkfield {value}",
                             ("constant", value, tuple(tile_shape[-2:]))) for _ in range(n)]
        else:
            darks = load_profiles(dark_opt, tile_shape, n, kind="dark", what="--darkfield")
        for dark, m in zip(darks, channels, strict=True):
            check_dark_below_data(dark, m, dark.label)
    if flat_opt == "auto":
        for c, m in enumerate(channels):
            # a given dark-field is taken off first (its mean: the estimate's dark is constant)
            known = float(darks[c].array.mean()) if darks[c] is not None else None
            est = estimate_profiles(m, darkfield=dark_opt == "auto" if known is None else known)
            flat, dark_auto = est.profiles("auto", darkfield=dark_opt == "auto")
            flats[c] = flat
            if dark_auto is not None:
                darks[c] = dark_auto
            lo, hi = float(est.flatfield.min()), float(est.flatfield.max())
            dark = f", dark level {est.dark:.4g}" if dark_opt == "auto" else ""
            notice(args, f"--flatfield auto: channel {c}: estimated from {describe(est)}, "
                         f"{lo:.3f}..{hi:.3f} of its mean{dark}")
    elif flat_opt is not None:
        flats = load_profiles(flat_opt, tile_shape, n, kind="flat", what="--flatfield")
    return list(zip(flats, darks, strict=True))


def describe(est: Any) -> str:
    """What an estimate was made from, for a notice."""
    return str(est.sources)


def _number(text: str) -> float | None:
    """``text`` as a finite number, or None when it is not one (a file name)."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"--darkfield {text}: must be a finite number >= 0 (the camera "
                         "offset, in the tiles' units) or a TIFF file")
    return value
