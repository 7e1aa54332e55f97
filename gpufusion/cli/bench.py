"""``gpufusion bench``: fusion throughput per backend on a synthetic mosaic.

Builds a synthetic tiled acquisition in memory, fuses it with each backend (NumPy on all CPU
cores, CuPy on the GPU when one is usable) and prints a table of seconds, Mpx/s and the
speed-up over NumPy; ``--plot`` also writes a bar chart (needs matplotlib; the path
and matplotlib are checked before any work, exit code 2 if unusable).
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from . import common_options, help_texts, notice
from .demo import parse_grid
from .fuse import positive_int


def parse_backends(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names or any(n not in ("numpy", "cupy") for n in names):
        raise argparse.ArgumentTypeError(f"expected a list of numpy, cupy such as numpy,cupy; "
                                         f"got {text!r}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", parents=[common_options()],
        help="time in-memory fusion per backend on a synthetic mosaic",
        **help_texts(
            "Time the fusion itself on this machine: a synthetic tiled acquisition is built "
            "in memory and fused with each backend (NumPy on all CPU cores, CuPy on the GPU "
            "when one is usable), best of --repeat runs; prints seconds, megapixels per "
            "second and the speed-up over NumPy. Nothing is read from or written to disk "
            "(but the --plot PNG).",
            "gpufusion bench",
            "gpufusion bench --tiles 4x4 --tile 1024 --backends numpy --repeat 1",
            "gpufusion bench --tiles 8x8 --tile 2048 --plot bench.png --profile",
        ),
    )
    p.add_argument("--tiles", type=parse_grid, default=(8, 8), metavar="ROWSxCOLS",
                   help="tile grid (default: 8x8)")
    p.add_argument("--tile", type=positive_int, default=2048, metavar="PX",
                   help="tile size (default: 2048)")
    p.add_argument("--dtype", choices=("uint8", "uint16", "float32"), default="uint16",
                   help="tile dtype (default: uint16)")
    p.add_argument("--chunk", type=positive_int, default=1024, metavar="N",
                   help="output chunk size (default: 1024)")
    p.add_argument("--backends", type=parse_backends, default=("numpy", "cupy"),
                   metavar="LIST", help="comma-separated backends (default: numpy,cupy)")
    p.add_argument("--repeat", type=positive_int, default=3, metavar="N",
                   help="timed runs per backend; the best is reported (default: 3)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a bar chart here")
    p.add_argument("--profile", action="store_true",
                   help="also print where the GPU time goes (CUDA events per stage)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import (
        check_plot_path,
        describe,
        format_stages,
        format_table,
        plot_results,
        run_benchmark,
    )

    if args.plot is not None:  # before any work: a bad path or no matplotlib fails at once
        check_plot_path(args.plot)
    results, notes = run_benchmark(args.tiles, args.tile, args.dtype, args.chunk,
                                   args.backends, args.repeat, profile=args.profile)
    for line in notes:
        notice(args, line)
    if not results:
        raise InputError("bench: no backend could run (see the notes above)")
    print(describe(args.tiles, args.tile, args.dtype, args.chunk, 0.1, results[0].megapixels))
    print(format_table(results))
    for r in results:
        if r.stages:
            print(format_stages(r.stages))
    if args.plot is not None:
        if not plot_results(results, args.plot):  # checked above; only if it vanished since
            raise InputError("--plot needs matplotlib, which is not installed")
        print(f"plot written to {args.plot}")
    return 0
