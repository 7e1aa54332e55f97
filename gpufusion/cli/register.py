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
from typing import TYPE_CHECKING, Any

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
        "or x,y[,z], an upper bound of the search (per-tile stage errors of E px need 2E; "
        "default: none, offsets up to half a tile are found, a wrong nominal overlap too)",
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
        default=None,
        metavar="C",
        help="channel to register on, by index or name, or 'luminance' for RGB tiles; all "
        "channels get the result (default: 0; for RGB tiles their luminance, BT.709 weights)",
    )


def registration_channel(args: argparse.Namespace) -> int | str | None:
    """``--reg-channel`` as an index when it is a number, else a channel name; None when not
    given (channel 0, or the luminance of RGB tiles)."""
    if args.reg_channel is None:
        return None
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
            "gpufusion register dataset.xml --write-xml dataset.registered.xml",
        ),
    )
    p.add_argument("input", help=INPUT_HELP + " (nominal positions)")
    p.add_argument("-o", "--output", default=None,
                   help="corrected positions to write: NAME.csv (positions CSV) or NAME.txt "
                   "(Fiji TileConfiguration, e.g. TileConfiguration.registered.txt); "
                   "required unless --write-xml or --in-place is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (only once the new ones are complete)")
    # --- BigStitcher export and scale-out (gpufusion.writers.bigstitcher_xml,
    # gpufusion.registration.distributed)
    p.add_argument("--write-xml", default=None, metavar="OUT.xml",
                   help="dataset.xml input: write a copy of it with a 'Stitching Transform' "
                   "per view holding the registration (opens in BigStitcher)")
    p.add_argument("--in-place", action="store_true",
                   help="dataset.xml input: add the Stitching Transforms to INPUT itself, "
                   "after copying it to INPUT~YYYYMMDD-HHMMSS")
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="measure the pairs on local GPUs, e.g. 0,1: one dask-cuda worker per "
                   "GPU")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="measure the pairs on an existing Dask cluster, e.g. tcp://host:8786 "
                   "(its workers read the tiles); the solve runs here")
    # --- end of BigStitcher export and scale-out options
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
    from .inputs import tileset_from_args
    from .metadata import read_tilesets
    from .outputs import check_outputs, input_files, staged

    source = Path(args.input)
    xml = _xml_target(args, source)  # --write-xml / --in-place: checked before any work
    if args.output is None and xml is None:
        raise InputError("-o: give the positions file to write (NAME.csv or NAME.txt), or "
                         "--write-xml OUT.xml for a dataset.xml input")
    out = Path(args.output if args.output is not None else xml)  # type: ignore[arg-type]
    if args.output is not None and out.suffix.lower() not in (".csv", ".txt"):
        raise InputError(f"-o {out}: must end in .csv or .txt (a positions CSV, or a Fiji "
                         "TileConfiguration for .txt)")
    fiji = out.suffix.lower() == ".txt"
    _check_report_path(args.report)
    outputs = [out, edges_path_for(out)] + ([Path(args.report)] if args.report else [])
    if args.output is None:  # only the dataset.xml (written last, below) and the edge table
        outputs = outputs[1:]
    tiles = read_tilesets(args, tileset_from_args)  # --pixel-size/--unit applied
    check_outputs(outputs + ([xml] if xml is not None and not args.in_place else []),
                  [source, *input_files(tiles)] if source.is_file()
                  else input_files(tiles), args.overwrite)
    from ..readers.rgb import registration_mosaic

    channel = registration_channel(args)
    reg = (registration_mosaic(tiles.mosaics(), tiles.channel_names, True, channel, source,
                               names=tiles.names) if tiles.rgb
           else tiles.select_channel(0 if channel is None else channel).mosaics()[0])
    if args.output is None:  # no positions file lists the tiles: the dataset.xml only
        return _register_to_xml(args, tiles, reg, source, xml, outputs)  # type: ignore[arg-type]
    files = [[getattr(src, "path", None) for src in channel] for channel in tiles.sources]
    if tiles.rgb:  # one file holds a tile's R, G and B: list it once, no channel column
        files = files[:1]
    flat = [f for channel in files for f in channel]
    if any(f is None for f in flat) or len(set(flat)) != len(flat):
        raise InputError(f"{source}: its tiles are not one file each, so no positions CSV can "
                         "list them; use 'gpufusion fuse INPUT --register' instead")
    names = [str(c).strip() for c in tiles.channel_names]
    if len(files) > 1 and (len(set(names)) != len(names) or not all(names)):
        raise InputError(f"{source}: channel names {tiles.channel_names} are not distinct and "
                         "non-empty, so a CSV channel column cannot tell them apart; use "
                         "'gpufusion fuse INPUT --register' instead")
    if fiji and len(files) > 1:
        raise InputError(f"-o {out}: a TileConfiguration lists one file per tile, and this "
                         f"input has {tiles.n_channels} channels in separate files; write a "
                         ".csv (it lists every channel's files)")
    if not all(np.allclose(a[:-1, :-1], np.eye(tiles.ndim)) for a in tiles.affines):
        raise InputError(f"{source}: registration corrects translations; this input has "
                         "rotated or scaled tiles")
    result = _register_on(args, reg)
    with staged(outputs) as tmp:
        if fiji:
            write_tile_configuration(tmp[out], result.positions, files[0],
                                     pixel_size=tiles.pixel_size, unit=tiles.unit)
        elif len(files) == 1:
            write_positions_csv(tmp[out], result.positions, files[0],
                                pixel_size=tiles.pixel_size, unit=tiles.unit)
        else:  # every channel, moved alike: fuse reads them back into the c axis
            write_positions_csv(tmp[out], result.positions, files, tiles.channel_names,
                                pixel_size=tiles.pixel_size, unit=tiles.unit)
        result.write_edges_csv(tmp[outputs[1]])
        if args.report:
            result.write_report(tmp[outputs[2]])
        if xml is not None:  # the dataset.xml last, once the others are written
            _write_xml(args, tiles, result, source, xml)
            outputs = [*outputs, xml]
    if not args.quiet:
        print("\n".join([*result.summary().splitlines(),
                         "wrote " + " and ".join(str(p) for p in outputs)]))
    return 0


# --- BigStitcher export and scale-out (gpufusion.writers.bigstitcher_xml,
# gpufusion.registration.distributed)


def _register_on(args: argparse.Namespace, mosaic: Mosaic) -> RegistrationResult:
    """Register ``mosaic`` here, or with ``--gpus``/``--scheduler`` on a Dask cluster (the
    pairs measured by its workers, the backend resolved there, the solve here)."""
    from ..cluster import connect, parse_gpus
    from .fuse import resolve_backend_with_notice

    gpus = parse_gpus(args.gpus) if args.gpus else None
    with connect(gpus=gpus, scheduler=args.scheduler) as client:
        if client is not None:
            notice(args, f"running on {client.dashboard_link or client.scheduler.address}")
        backend = resolve_backend_with_notice(args, client)  # the no-GPU notice, as fuse's
        return _register(args, mosaic, backend, client)


def _xml_target(args: argparse.Namespace, source: Path) -> Path | None:
    """The dataset.xml that ``--write-xml`` or ``--in-place`` writes (None without them)."""
    if args.write_xml and args.in_place:
        raise InputError("--write-xml and --in-place are exclusive: write a copy, or change "
                         "INPUT itself (after a backup)")
    if not (args.write_xml or args.in_place):
        return None
    from ..readers.detect import detect_format

    option = "--write-xml" if args.write_xml else "--in-place"
    if not source.is_file() or detect_format(source) != "bigstitcher":
        raise InputError(f"{option}: applies to a BigStitcher dataset.xml input; {source} is "
                         "not one")
    if args.in_place:
        return source
    target = Path(args.write_xml)
    if target.suffix.lower() != ".xml":
        raise InputError(f"--write-xml {target}: must end in .xml")
    if target.resolve() == source.resolve():
        raise InputError(f"--write-xml {target}: is INPUT; use --in-place to change it (a "
                         "backup is written first)")
    return target


def _write_xml(args: argparse.Namespace, tiles: Any, result: RegistrationResult,
               source: Path, xml: Path) -> None:
    """Write the Stitching Transforms of ``result`` into ``xml``: a copy of ``source``, or
    with ``--in-place`` ``source`` itself after a backup."""
    from ..readers.bigstitcher import read_spimdata
    from ..writers.bigstitcher_xml import (
        stitching_translations,
        write_backup,
        write_stitched_xml,
    )

    spim = read_spimdata(source)
    after = np.stack([t.affine for t in result.mosaic.tiles])
    translations = stitching_translations(spim, np.asarray(tiles.affines, float), after,
                                          timepoint=getattr(args, "timepoint", None),
                                          illumination=getattr(args, "illumination", None))
    if args.in_place:
        notice(args, f"backup of {source}: {write_backup(source)}")
    write_stitched_xml(source, xml, translations)


def _register_to_xml(args: argparse.Namespace, tiles: Any, reg: Mosaic, source: Path,
                     xml: Path, outputs: list[Path]) -> int:
    """``register dataset.xml --write-xml OUT.xml`` (or ``--in-place``) without ``-o``: the
    XML, the edge table and the report."""
    from .outputs import staged

    if not all(np.allclose(a[:-1, :-1], np.eye(tiles.ndim)) for a in tiles.affines):
        raise InputError(f"{source}: registration corrects translations; this input has "
                         "rotated or scaled tiles (or a calibration that is not isotropic)")
    result = _register_on(args, reg)
    with staged(outputs) as tmp:  # the edge table and report, renamed once the XML is written
        result.write_edges_csv(tmp[outputs[0]])
        if args.report:
            result.write_report(tmp[outputs[1]])
        _write_xml(args, tiles, result, source, xml)
    if not args.quiet:
        print("\n".join([*result.summary().splitlines(),
                         "wrote " + " and ".join(str(p) for p in [xml, *outputs])]))
    return 0


# --- end of BigStitcher export and scale-out


def _check_report_path(report: str | None) -> None:
    from ..registration.report import REPORT_SUFFIXES

    if report is None:
        return
    path = Path(report)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"--report {report}: must end in {', '.join(REPORT_SUFFIXES)}")
    if not path.parent.resolve().is_dir():
        raise InputError(f"--report {report}: folder {path.parent} does not exist")


def _register(args: argparse.Namespace, mosaic: Mosaic, backend: str,
              client: Any = None) -> RegistrationResult:
    """Run :func:`~gpufusion.registration.register_mosaic`, warnings shown as notices (the
    pairs measured on the Dask cluster of ``client`` when given)."""
    from ..registration import RegistrationWarning, register_mosaic
    from ..registration.distributed import on_cluster

    with warnings.catch_warnings(record=True) as caught, on_cluster(client, backend) as name:
        warnings.simplefilter("always", RegistrationWarning)
        result = register_mosaic(
            mosaic,
            max_shift=None if args.max_shift is None else _per_axis(args.max_shift, mosaic),
            backend=name,
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
                      results: list[RegistrationResult] | None = None,
                      rgb: bool = False, client: Any = None) -> list[Mosaic]:
    """``fuse --register``: register on ``--reg-channel``, move every channel alike.

    RGB tiles (``rgb``) register on their luminance unless ``--reg-channel`` names one
    (:func:`gpufusion.readers.rgb.registration_mosaic`). The registration result is
    appended to ``results`` when given (for the reports).
    """
    from ..readers.rgb import registration_mosaic

    reg = registration_mosaic(channels, channel_names, rgb, registration_channel(args),
                              Path(args.input))
    corrected = register_for_fuse(args, reg, backend, results, client)
    return [m.with_affines([t.affine for t in corrected.tiles]) for m in channels]


def register_for_fuse(args: argparse.Namespace, mosaic: Mosaic, backend: str,
                      results: list[RegistrationResult] | None = None,
                      client: Any = None) -> Mosaic:
    """Register ``mosaic`` for ``fuse --register`` and return the corrected mosaic.

    ``args`` carries the options of :func:`add_registration_options` (and ``quiet``);
    ``backend`` is the backend to register on (``numpy`` or ``cupy``). The summary goes to
    stderr as notices; the result is appended to ``results`` when given (reports are
    written by :func:`write_fuse_reports` once the fusion is complete).
    """
    result = _register(args, mosaic, backend, client)
    for line in result.summary().splitlines():
        notice(args, line)
    if results is not None:
        results.append(result)
    return result.mosaic
