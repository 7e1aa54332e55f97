"""``gpufusion register INPUT -o positions.csv``: correct stage positions by registration.

Writes the corrected positions as a CSV (``file,x,y[,z]``, pixels; direct ``fuse`` input;
multi-channel input gets a ``channel`` column listing every channel's files), or for
``-o *.txt`` as a Fiji TileConfiguration (:mod:`gpufusion.writers.tileconfig`), and the edge
table beside it (``positions.edges.csv``); ``--report`` adds a picture of the
layout (``.html``, ``.svg`` or ``.png``).

``fuse --register`` reuses :func:`add_registration_options` and :func:`register_for_fuse`.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..layout import Mosaic
from . import common_options, help_texts, notice, show_progress
from .inputs import INPUT_HELP, add_input_options
from .metadata import add_metadata_options

if TYPE_CHECKING:
    from ..registration import RegistrationResult


def max_shift_value(text: str) -> tuple[float, ...]:
    """``--max-shift``: one number, or one per axis as ``x,y[,z]``; returned in index order.

    Examples
    --------
    >>> max_shift_value("15"), max_shift_value("20,10")
    ((15.0,), (10.0, 20.0))
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or numbers x,y[,z] in pixels, got {text!r}") from None
    if not values or not all(v >= 0 and v != float("inf") for v in values) or len(values) > 3:
        raise argparse.ArgumentTypeError(
            f"expected finite numbers >= 0 (one, or x,y[,z]), got {text!r}")
    return values[::-1]


def add_registration_options(p: argparse.ArgumentParser) -> None:
    """Options of the registration itself (shared by ``register`` and ``fuse --register``)."""
    p.add_argument(
        "--max-shift",
        type=max_shift_value,
        default=None,
        metavar="PX",
        help="largest expected error of a neighbouring pair's offset, in pixels: one number "
        "or x,y[,z] (per-tile stage errors of E px need 2E; default: 10%% of the tile size)",
    )
    p.add_argument(
        "--min-ncc",
        type=float,
        default=0.1,
        metavar="R",
        help="drop pairs whose overlap correlation (NCC) is below R (default: 0.1)",
    )
    p.add_argument(
        "--max-residual",
        type=float,
        default=2.0,
        metavar="PX",
        help="drop pairs that disagree with the solution by more than PX and solve again "
        "(default: 2)",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="FILE",
        help="also draw the layout with edges coloured by residual: .html, .svg or .png",
    )
    p.add_argument(
        "--reg-channel",
        default="0",
        metavar="C",
        help="channel to register on, by index or name; all channels get the result "
        "(default: 0)",
    )


def registration_channel(args: argparse.Namespace) -> int | str:
    """``--reg-channel`` as an index when it is a number, else a channel name."""
    text = str(args.reg_channel)
    return int(text) if text.isdigit() else text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "register",
        parents=[common_options()],
        help="correct stage positions by registering overlapping tiles",
        **help_texts(
            "Correct the stage positions of a tile set: phase correlation of every "
            "overlapping pair, then a global least-squares solve with outlier rejection. "
            "Writes the corrected positions (pixels) that 'gpufusion fuse' reads: a CSV "
            "(file,x,y[,z][,channel]) for -o NAME.csv, or a Fiji TileConfiguration (what "
            "Fiji's Grid/Collection stitching reads) for -o NAME.txt; and the per-pair table "
            "beside it (NAME.edges.csv). Runs on the GPU when one is usable.",
            "gpufusion register TileConfiguration.txt -o TileConfiguration.registered.txt",
            "gpufusion register positions.csv -o registered.csv --max-shift 30 "
            "--report report.html",
            "gpufusion register experiment_folder/ -o registered.csv --reg-channel DAPI",
        ),
    )
    p.add_argument("input", help=INPUT_HELP + " (nominal positions)")
    p.add_argument("-o", "--output", required=True,
                   help="corrected positions to write: NAME.csv (positions CSV) or NAME.txt "
                   "(Fiji TileConfiguration, e.g. TileConfiguration.registered.txt)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (only once the new ones are complete)")
    add_input_options(p)
    add_metadata_options(p, name=False)  # --pixel-size, --unit: recorded in the CSV
    p.add_argument(
        "--backend",
        choices=("auto", "numpy", "cupy"),
        default="auto",
        help="auto: the GPU when usable, else NumPy (default: auto)",
    )
    add_registration_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..registration import edges_path_for, write_positions_csv
    from ..writers.tileconfig import write_tile_configuration
    from .fuse import resolve_backend_with_notice
    from .inputs import tileset_from_args
    from .metadata import read_tilesets
    from .outputs import check_outputs, input_files, staged

    out = Path(args.output)
    source = Path(args.input)
    if out.suffix.lower() not in (".csv", ".txt"):
        raise InputError(f"-o {out}: must end in .csv or .txt (a positions CSV, or a Fiji "
                         "TileConfiguration for .txt)")
    fiji = out.suffix.lower() == ".txt"
    _check_report_path(args.report)
    outputs = [out, edges_path_for(out)] + ([Path(args.report)] if args.report else [])
    tiles = read_tilesets(args, tileset_from_args)  # --pixel-size/--unit applied
    check_outputs(outputs, [source, *input_files(tiles)] if source.is_file()
                  else input_files(tiles), args.overwrite)
    reg = tiles.select_channel(registration_channel(args))
    files = [[getattr(src, "path", None) for src in channel] for channel in tiles.sources]
    flat = [f for channel in files for f in channel]
    if any(f is None for f in flat) or len(set(flat)) != len(flat):
        raise InputError(f"{source}: its tiles are not one file each, so no positions CSV can "
                         "list them; use 'gpufusion fuse INPUT --register' instead")
    names = [str(c).strip() for c in tiles.channel_names]
    if tiles.n_channels > 1 and (len(set(names)) != len(names) or not all(names)):
        raise InputError(f"{source}: channel names {tiles.channel_names} are not distinct and "
                         "non-empty, so a CSV channel column cannot tell them apart; use "
                         "'gpufusion fuse INPUT --register' instead")
    if fiji and tiles.n_channels > 1:
        raise InputError(f"-o {out}: a TileConfiguration lists one file per tile, and this "
                         f"input has {tiles.n_channels} channels in separate files; write a "
                         ".csv (it lists every channel's files)")
    if not all(np.allclose(a[:-1, :-1], np.eye(tiles.ndim)) for a in tiles.affines):
        raise InputError(f"{source}: registration corrects translations; this input has "
                         "rotated or scaled tiles")
    backend = resolve_backend_with_notice(args)  # the no-GPU notice, as fuse gives it
    result = _register(args, reg.mosaics()[0], backend)
    with staged(outputs) as tmp:
        if fiji:
            write_tile_configuration(tmp[out], result.positions, files[0],
                                     pixel_size=tiles.pixel_size, unit=tiles.unit)
        elif tiles.n_channels == 1:
            write_positions_csv(tmp[out], result.positions, files[0],
                                pixel_size=tiles.pixel_size, unit=tiles.unit)
        else:  # every channel, moved alike: fuse reads them back into the c axis
            write_positions_csv(tmp[out], result.positions, files, tiles.channel_names,
                                pixel_size=tiles.pixel_size, unit=tiles.unit)
        result.write_edges_csv(tmp[outputs[1]])
        if args.report:
            result.write_report(tmp[outputs[2]])
    if not args.quiet:
        print("\n".join([*result.summary().splitlines(),
                         "wrote " + " and ".join(str(p) for p in outputs)]))
    return 0


def _check_report_path(report: str | None) -> None:
    from ..registration.report import REPORT_SUFFIXES

    if report is None:
        return
    path = Path(report)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"--report {report}: must end in {', '.join(REPORT_SUFFIXES)}")
    if not path.parent.resolve().is_dir():
        raise InputError(f"--report {report}: folder {path.parent} does not exist")


def _register(args: argparse.Namespace, mosaic: Mosaic, backend: str) -> RegistrationResult:
    """Run :func:`~gpufusion.registration.register_mosaic`, warnings shown as notices."""
    from ..registration import RegistrationWarning, register_mosaic

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RegistrationWarning)
        result = register_mosaic(
            mosaic,
            max_shift=None if args.max_shift is None else _per_axis(args.max_shift, mosaic),
            backend=backend,
            min_ncc=args.min_ncc,
            max_residual=args.max_residual,
            progress=show_progress(args),
        )
    for w in caught:
        if issubclass(w.category, RegistrationWarning):
            notice(args, f"warning: {w.message}")
        else:  # not ours: hand it back to the warnings machinery
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def _per_axis(values: tuple[float, ...], mosaic: Mosaic) -> tuple[float, ...]:
    if len(values) not in (1, mosaic.ndim):
        raise InputError(f"--max-shift: give one number or {mosaic.ndim} (x,y[,z]), got "
                         f"{len(values)}")
    return values


def fuse_report_outputs(args: argparse.Namespace, n_timepoints: int) -> list[Path]:
    """``fuse --register --report FILE``: every report and edge table the run will write.

    One report (``FILE``, and ``FILE-stem.edges.csv`` beside it) per time point; with
    several, time point ``k``'s are ``FILE-stem.tK.suffix`` and ``FILE-stem.tK.edges.csv``.
    Checked before any work and written only once the fused image is complete
    (:func:`write_fuse_reports`).
    """
    from ..registration import edges_path_for

    if not args.report:
        return []
    _check_report_path(args.report)
    report = Path(args.report)
    reports = [report] if n_timepoints == 1 else [
        report.with_name(f"{report.stem}.t{k}{report.suffix}") for k in range(n_timepoints)]
    return [p for r in reports for p in (r, edges_path_for(r))]


def write_fuse_reports(args: argparse.Namespace, outputs: list[Path],
                       results: list[RegistrationResult]) -> None:
    """Write the reports of :func:`fuse_report_outputs` (pairs of report, edge table, one
    per time point, in order) together and atomically."""
    from .outputs import staged

    if not outputs:
        return
    with staged(outputs) as tmp:
        for k, result in enumerate(results):
            result.write_report(tmp[outputs[2 * k]])
            result.write_edges_csv(tmp[outputs[2 * k + 1]])
    notice(args, "wrote " + " and ".join(str(p) for p in outputs))


def register_channels(args: argparse.Namespace, channels: list[Mosaic],
                      channel_names: list[str], backend: str,
                      results: list[RegistrationResult] | None = None) -> list[Mosaic]:
    """``fuse --register``: register on ``--reg-channel``, move every channel alike.

    The registration result is appended to ``results`` when given (for the reports).
    """
    from ..readers.tileset import channel_index

    index = channel_index(channel_names, registration_channel(args),
                          Path(args.input))
    corrected = register_for_fuse(args, channels[index], backend, results)
    return [m.with_affines([t.affine for t in corrected.tiles]) for m in channels]


def register_for_fuse(args: argparse.Namespace, mosaic: Mosaic, backend: str,
                      results: list[RegistrationResult] | None = None) -> Mosaic:
    """Register ``mosaic`` for ``fuse --register`` and return the corrected mosaic.

    ``args`` carries the options of :func:`add_registration_options` (and ``quiet``);
    ``backend`` is the backend to register on (``numpy`` or ``cupy``). The summary goes to
    stderr as notices; the result is appended to ``results`` when given (reports are
    written by :func:`write_fuse_reports` once the fusion is complete).
    """
    result = _register(args, mosaic, backend)
    for line in result.summary().splitlines():
        notice(args, line)
    if results is not None:
        results.append(result)
    return result.mosaic
