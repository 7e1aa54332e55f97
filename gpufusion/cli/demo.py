"""``gpufusion demo``: fuse a synthetic mosaic with known ground truth and report the error.

Runs with no files and no network: 4x4 tiles of 1024x1024 uint16 with 10 % overlap at known
sub-pixel positions, cut from a continuous textured specimen, so the fused image can be
compared with the exact ground truth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import common_options, help_texts
from .fuse import (
    add_fusion_options,
    fusion_kwargs,
    positive_int,
    resolve_backend_with_notice,
    summary,
)

#: Bounds of the demo. It holds every tile, the fused image and its ground truth in memory
#: (about 30 bytes per tile pixel at its peak, measured) and samples the specimen at every
#: pixel (~0.35 s per megapixel on 2 cores), so 2**28 tile pixels (256 Mpx) need ~8 GiB
#: and a couple of minutes: within a 24 GiB, 2-core machine. Beyond that it shows nothing
#: new; ``gpufusion fuse`` streams larger mosaics from files without holding them.
MAX_TILE = 8192
MAX_TILES = 1024
MAX_TILE_PIXELS = 1 << 28


def check_demo_size(rows: int, cols: int, tile: int) -> None:
    """Refuse a demo mosaic beyond :data:`MAX_TILE`, :data:`MAX_TILES` or
    :data:`MAX_TILE_PIXELS`, with an InputError naming the option.

    Examples
    --------
    >>> check_demo_size(4, 4, 1024)
    >>> check_demo_size(1, 1, 100000)
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: --tile: 100000 px is above the demo's limit (8192 px per side); ...
    """
    if tile > MAX_TILE:
        raise InputError(f"--tile: {tile} px is above the demo's limit ({MAX_TILE} px per side)"
                         "; it makes and holds every tile in memory")
    if rows * cols > MAX_TILES:
        raise InputError(f"--tiles: {rows}x{cols} is {rows * cols} tiles, above the demo's "
                         f"limit of {MAX_TILES} (it makes and holds every tile in memory)")
    pixels = rows * cols * tile * tile
    if pixels > MAX_TILE_PIXELS:
        raise InputError(
            f"--tiles {rows}x{cols} --tile {tile}: {pixels / 2**20:.0f} Mpx of tiles, above "
            f"the demo's limit of {MAX_TILE_PIXELS >> 20} Mpx (the demo keeps tiles, result "
            "and ground truth in memory, ~8 GiB at the limit); 'gpufusion fuse' streams "
            "larger mosaics from files"
        )


def parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 4x4, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"grid must be at least 1x1, got {text!r}")
    return rows, cols


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common_options()],
        help="fuse a synthetic mosaic with known ground truth (no files needed)",
        **help_texts(
            "Cut a grid of tiles (default 4x4 of 1024x1024 uint16, 10% overlap, known "
            "sub-pixel offsets) from a continuous synthetic specimen, fuse them into "
            "DIR/demo.ome.zarr (OME-Zarr), and print the time, throughput and the error "
            "against the exact ground truth. Needs no files and no network; shows what "
            "this machine does (GPU or CPU) in seconds.",
            "gpufusion demo",
            "gpufusion demo --out /tmp/demo --tiles 8x8 --tile 512",
            "gpufusion demo --backend numpy --blend cosine --compression blosc-lz4",
        ),
    )
    p.add_argument(
        "--out",
        default="gpufusion-demo",
        metavar="DIR",
        help="folder for demo.ome.zarr (default: ./gpufusion-demo); the demo "
        "replaces its own previous output",
    )
    p.add_argument(
        "--tiles",
        type=parse_grid,
        default=(4, 4),
        metavar="ROWSxCOLS",
        help=f"tile grid (default: 4x4; at most {MAX_TILES} tiles and "
        f"{MAX_TILE_PIXELS >> 20} Mpx of tiles in all, as the demo holds everything in "
        "memory)",
    )
    p.add_argument(
        "--tile", type=positive_int, default=1024, metavar="PX",
        help=f"tile size (default: 1024, at most {MAX_TILE})",
    )
    p.add_argument("--overlap", type=float, default=0.1, help="overlap fraction (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_fusion_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import zarr

    from ..pipeline import fuse_to_file
    from ..synthetic import make_mosaic
    from ..writers.target import check_compression

    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap: must be in [0, 1), got {args.overlap}")
    check_demo_size(*args.tiles, args.tile)
    args.compression = check_compression("demo.ome.zarr", args.compression)  # an OME-Zarr
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "demo.ome.zarr"
    backend = resolve_backend_with_notice(args)
    t0 = time.perf_counter()
    syn = make_mosaic(args.tiles, (args.tile, args.tile), overlap=args.overlap, seed=args.seed)
    mosaic = syn.mosaic()
    if not args.quiet:
        print(
            f"synthetic mosaic: {len(mosaic)} tiles of {args.tile}x{args.tile} uint16, "
            f"{args.overlap:.0%} overlap, sub-pixel positions "
            f"(made in {time.perf_counter() - t0:.2f} s)"
        )
    result = fuse_to_file(mosaic, out, overwrite=True, **fusion_kwargs(args, backend))
    fused = zarr.open_array(str(out / "0"), mode="r")[...]
    truth = syn.ground_truth(mosaic.origin, mosaic.shape)
    covered = syn.coverage(mosaic.origin, mosaic.shape)
    err = fused.astype(np.float64)[covered] - truth.astype(np.float64)[covered]
    span = float(truth.max()) - float(truth.min())
    psnr = 10 * np.log10(span**2 / max(float(np.mean(err**2)), 1e-30))
    print(summary(result, len(mosaic)))
    print(
        f"error vs ground truth over {covered.mean():.1%} covered pixels: "
        f"max abs {np.abs(err).max():.0f} DN, PSNR {psnr:.1f} dB"
    )
    from ..preview import write_preview

    # a thumbnail beside the image, replaced as the demo replaces its own output
    preview = write_preview(out, out_dir / "demo.png", overwrite=True)
    print(f"preview: {preview}")
    return 0
