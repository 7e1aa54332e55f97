"""``gpufusion fuse INPUT -o OUT.ome.zarr``: fuse tiles from a positions file."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..blend import BLEND_MODES, INTERPOLATIONS
from ..errors import InputError
from ..pipeline import FuseResult
from ..writers.target import check_not_input, leftovers_notice, recover_interrupted
from . import common_options, help_texts, notice, show_progress
from .flatfield import add_flatfield_options, correct_channels
from .inputs import INPUT_HELP, add_input_options
from .intensity import (
    add_intensity_options,
    intensity_lines,
    intensity_record,
    intensity_report_output,
    match_tile_intensities,
    write_intensity_report,
)
from .metadata import add_metadata_options, image_name, provenance, read_tilesets
from .register import (
    add_registration_options,
    fuse_report_outputs,
    register_channels,
    write_fuse_reports,
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_fusion_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``fuse`` and ``demo``."""
    p.add_argument(
        "--blend",
        choices=BLEND_MODES,
        default="linear",
        help="how overlaps are combined (default: linear feathering)",
    )
    p.add_argument(
        "--blend-width",
        type=non_negative_float,
        default=None,
        metavar="PX",
        help="blending ramp width in pixels (default: half the median overlap)",
    )
    p.add_argument(
        "--interp",
        choices=INTERPOLATIONS,
        default="linear",
        help="resampling (default: linear; integer positions are exact copies)",
    )
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=1024,
        metavar="N",
        help="output chunk size in pixels per axis (default: 1024)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "numpy", "cupy"),
        default="auto",
        help="auto: the GPU when usable, else NumPy (default: auto)",
    )
    p.add_argument(
        "--dtype",
        choices=("same", "float32"),
        default="same",
        help="output dtype (default: same as the tiles, rounded and clipped)",
    )
    p.add_argument(
        "--ngff",
        choices=("0.4", "0.5"),
        default="0.4",
        help="OME-Zarr version: 0.4 (Zarr v2, default) or 0.5 (Zarr v3)",
    )
    p.add_argument(
        "--compression",
        choices=("blosc-zstd", "blosc-lz4", "zstd", "zlib", "lzw", "none"),
        default=None,
        help="lossless compression; OME-Zarr takes blosc-zstd (default), blosc-lz4, zstd or "
        "none; OME-TIFF takes zlib (default), lzw, zstd or none (lzw and zstd need "
        "imagecodecs: pip install 'gpufusion[tiff]'); others are refused",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fuse",
        parents=[common_options()],
        help="fuse tiles into an OME-Zarr image or a pyramidal OME-TIFF",
        **help_texts(
            "Fuse microscope tiles (Fiji TileConfiguration, positions CSV, OME-TIFF stage "
            "positions, BigStitcher dataset.xml, CZI mosaic, or a regular grid) into one "
            "multiscale image: an OME-Zarr folder for -o NAME.ome.zarr (or .zarr), a tiled "
            "pyramidal OME-TIFF for -o NAME.ome.tif (or .ome.tiff, .tif, .tiff). Runs on the "
            "GPU when one is usable, else on all CPU cores (with a notice).",
            "gpufusion fuse TileConfiguration.txt -o slide.ome.zarr",
            "gpufusion fuse experiment_folder/ -o slide.ome.tif --compression lzw",
            "gpufusion fuse positions.csv -o slide.ome.zarr --register --max-shift 30 "
            "--report report.html",
        ),
    )
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="NAME.ome.zarr or NAME.zarr (OME-Zarr folder), or NAME.ome.tif, "
                   ".ome.tiff, .tif or .tiff (pyramidal OME-TIFF); other names are refused")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT when it is an earlier output of the same kind (OME-Zarr image, "
        "OME-TIFF file), only once the new result is complete; also removes temporary "
        "folders a stopped run left beside it",
    )
    add_metadata_options(p)  # --pixel-size, --unit, --name
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="local GPUs to use, e.g. 0,1: one dask-cuda worker per GPU")
    p.add_argument("--threads-per-gpu", type=int, default=None, metavar="N",
                   help="with --gpus: threads per GPU worker, overlapping reads, transfers, "
                        "kernels and writes (default: CPU cores / GPUs, at least 2)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://host:8786")
    add_input_options(p)
    add_fusion_options(p)
    p.add_argument("--blend-width-z", type=non_negative_float, default=None, metavar="PX",
                   help="3D: blending ramp width along z (default: as --blend-width)")
    p.add_argument("--allow-sparse", action="store_true",
                   help="fuse even when the output would be more than 90%% empty (refused "
                        "otherwise: usually a mistyped position)")
    p.add_argument("--register", action="store_true",
                   help="correct the positions by registration before fusing")
    add_intensity_options(p)  # --intensity-match, --intensity-offset
    p.add_argument("--shard", type=int, default=None, metavar="N",
                   help="OME-Zarr with --ngff 0.5: Zarr v3 shards of N pixels per spatial "
                        "axis (a multiple of --chunk), each written whole by one task; "
                        "default: 2 x --chunk when the output would have more than 10,000 "
                        "chunks, else none; 0: none")
    p.add_argument("--resume", action="store_true",
                   help="OME-Zarr: write resumably, and continue what an earlier --resume "
                        "run that was stopped or failed left (only the blocks not yet "
                        "written are fused); refused if the tiles, positions or options "
                        "changed")
    add_registration_options(p)
    add_flatfield_options(p)  # --flatfield, --darkfield
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..cluster import connect, parse_gpus
    from ..pipeline import fuse_to_file
    from .inputs import tilesets_from_args
    from .outputs import check_outputs, input_files

    out = prepare_output(args)
    timepoints = read_tilesets(args, tilesets_from_args)  # one unless --timepoint all
    tiles = timepoints[0]
    if args.blend_width_z is not None and tiles.ndim != 3:
        raise InputError("--blend-width-z: applies to 3D tiles; these are 2D")
    if args.report and not args.register:
        raise InputError("--report: draws the registration; add --register")
    inputs = [Path(args.input), *input_files(*timepoints)]
    check_not_input(out, inputs)  # every tile file, plane file and container: before work
    reports = fuse_report_outputs(args, len(timepoints)) if args.register else []
    gains_table = intensity_report_output(args) if reports else []
    check_outputs(reports + gains_table, inputs, args.overwrite)
    for report in reports:
        if out.resolve() in (report.resolve(), *report.resolve().parents):
            raise InputError(f"--report {report}: is inside the output {out}; write it "
                             "elsewhere")
    # --flatfield/--darkfield: profiles made (or refused) once for every time point, before
    # any backend or cluster is set up, so a bad profile is the run's one line of output
    profiles: dict = {}
    corrected = [correct_channels(args, tileset.mosaics(), profiles) for tileset in timepoints]
    gpus = parse_gpus(args.gpus) if args.gpus else None
    with connect(gpus=gpus, scheduler=args.scheduler,
                 threads_per_gpu=args.threads_per_gpu) as client:
        if client is not None:
            notice(args, f"running on {client.dashboard_link or client.scheduler.address}")
        # on a cluster the backend is the workers' (probed there); so is registration's
        backend = resolve_backend_with_notice(args, client)
        if args.register:
            reg_backend = backend  # on a cluster: the workers' (they measure the pairs)
        grid = []
        registered: list = []
        matched: list = []  # --intensity-match: one IntensityMatch per time point and channel
        for tileset, channels in zip(timepoints, corrected, strict=True):
            if not args.register and not grid:  # a quick look at the given positions
                warn_if_positions_off(args, channels[0])
            if args.register:  # each time point on its own: the stage may drift between them
                channels = register_channels(args, channels, tileset.channel_names,
                                             reg_backend, registered, rgb=tileset.rgb,
                                             client=client)
            if args.intensity_match or args.intensity_offset:  # on flat-field corrected
                channels = match_tile_intensities(args, channels, matched)  # tiles, registered
            grid.append(channels)
        # [t][c] for several time points, [c] for channels, or one mosaic
        single = grid[0][0] if len(grid[0]) == 1 else grid[0]
        mosaic = grid if len(grid) > 1 else single
        kwargs = fusion_kwargs(args, backend)
        if args.blend_width_z is not None:
            kwargs["blend_width"] = (args.blend_width_z, args.blend_width, args.blend_width)
        if client is not None:
            kwargs["progress"] = False  # the dashboard shows progress on a cluster
            kwargs["scheduler"] = client
        result = fuse_to_file(mosaic, out, overwrite=args.overwrite,
                              allow_sparse=args.allow_sparse, resume=args.resume,
                              shard="auto" if args.shard is None else args.shard,
                              channel_names=tiles.channel_names, rgb=tiles.rgb,
                              name=image_name(args),
                              provenance={**provenance(args, registered),
                                          **intensity_record(matched)}, **kwargs)
    write_fuse_reports(args, reports, registered)  # only once the image is complete
    write_intensity_report(args, gains_table, matched, tiles.channel_names)
    if not args.quiet:
        print(summary(result, tiles.n_tiles))
        for line in intensity_lines(matched, tiles.channel_names):
            print(line)
    return 0


def prepare_output(args: argparse.Namespace) -> Path:
    """Check ``-o OUT`` before reading anything, and settle what a killed run left there.

    OUT may not be, be inside or contain INPUT (the tiles and containers it lists are
    checked once read). A replacement a killed run left half done is rolled back (the
    earlier output put back); leftover temporary folders are named, and removed with
    ``--overwrite``; then :func:`gpufusion.pipeline.check_output_path`. Each action is a
    notice.
    """
    from ..pipeline import check_output_path
    from ..writers.target import check_compression

    out = Path(args.output)
    check_not_input(out, [Path(args.input)])
    args.compression = check_compression(out, args.compression)  # and the output's name
    resume = getattr(args, "resume", False)
    for message in recover_interrupted(out, args.overwrite, resume=resume):
        notice(args, message)
    found = None if args.overwrite or resume else leftovers_notice(out)
    if resume:
        from ..writers.ome_zarr import resumable_outputs

        earlier = resumable_outputs(out)
        if earlier:
            notice(args, f"{out}: resuming {earlier[0].name}, left by an earlier --resume run")
    if found:
        notice(args, found)
    return check_output_path(out, args.overwrite)


def fusion_kwargs(args: argparse.Namespace, backend: str) -> dict:
    """Keyword arguments of :func:`gpufusion.fuse_to_file` from the shared options."""
    return {
        "chunks": args.chunk,
        "blend": args.blend,
        "blend_width": args.blend_width,
        "interpolation": args.interp,
        "dtype": None if args.dtype == "same" else args.dtype,
        "backend": backend,
        "ngff_version": args.ngff,
        "compressor": args.compression,
        "progress": show_progress(args),
    }


def resolve_backend_with_notice(args: argparse.Namespace, client: Any = None) -> str:
    """``numpy`` or ``cupy`` for ``--backend``, with a one-line notice for ``auto``.

    With a ``distributed.Client`` the workers are probed (every one must have a usable GPU
    for ``cupy``); else this machine. Raises :class:`InputError` when ``cupy`` is asked for
    and not usable there.
    """
    from ..backends import get_backend, resolve_backend
    from ..cluster import resolve_cluster_backend

    if client is not None:
        name, message = resolve_cluster_backend(client, args.backend)
    else:
        name, message = resolve_backend(args.backend)
    if message:
        notice(args, message)
    if client is None:
        get_backend(name)  # fails now, with a clear message, if the GPU is not usable
    return name


def summary(result: FuseResult, n_tiles: int) -> str:
    """One line: what was fused, where, how fast."""
    shape = " x ".join(str(s) for s in result.shape)
    mpx = math.prod(result.shape) / 1e6
    return (
        f"fused {n_tiles} tiles -> {result.path} ({shape} {result.dtype}, {mpx:.1f} Mpx) "
        f"in {result.seconds:.2f} s ({result.megapixels_per_second:.1f} Mpx/s, "
        f"backend {result.backend})"
    )


def warn_if_positions_off(args: argparse.Namespace, mosaic: Any) -> None:
    """Without ``--register``: a notice when a few overlaps show that the given positions are
    clearly off (:func:`gpufusion.registration.quality.check_positions`; binned overlap
    strips of a few pairs, well under a second)."""
    if args.quiet or len(mosaic) < 2:
        return
    from ..registration.quality import check_positions

    try:
        check = check_positions(mosaic)
    except InputError:  # tiles rotated or scaled: not a translation layout to check
        return
    if check.looks_off:
        notice(args, f"warning: {check.message()}")
