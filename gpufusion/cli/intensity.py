"""The ``--intensity-match`` / ``--intensity-offset`` options of ``fuse``
(:mod:`gpufusion.intensity`): match each channel's tiles after flat-field correction and
registration, report the gains (stdout, provenance, beside ``--report``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from . import notice


def add_intensity_options(p: argparse.ArgumentParser) -> None:
    """``--intensity-match`` and ``--intensity-offset`` (for ``fuse``)."""
    p.add_argument("--intensity-match", action="store_true",
                   help="match the tiles' brightness: one gain per tile (per channel) from "
                        "the overlaps, solved over the whole mosaic (saturated and empty "
                        "overlaps left out), so exposure drift leaves no steps at the seams")
    p.add_argument("--intensity-offset", action="store_true",
                   help="--intensity-match with an offset per tile besides the gain (for "
                        "background levels that differ between tiles)")


def match_tile_intensities(args: argparse.Namespace, channels: list,
                           matched: list) -> list:
    """``--intensity-match``: each channel's gains (and offsets) from its overlaps, applied
    as the tiles are read (:func:`gpufusion.intensity.match_channels`); what was found is
    appended to ``matched``. Nothing to match (one tile, no overlap) is exit 2."""
    from ..intensity import match_channels

    mode = "gain+offset" if args.intensity_offset else "gain"
    try:
        corrected, found = match_channels(channels, mode=mode,
                                          notify=lambda text: notice(args, text))
    except InputError as exc:
        raise InputError(f"--intensity-match: {exc}".replace(": intensity match:", ":",
                                                             1)) from None
    matched.extend(found)
    return corrected


def intensity_lines(matched: list, channel_names: list[str],
                    labels: bool = False) -> list[str]:
    """The ``--intensity-match`` summaries, each named by its channel (and time point) when
    there are several; ``labels``: only those names (none for a single match)."""
    if len(matched) <= 1:
        return [] if labels else [m.summary() for m in matched]
    n = len(channel_names)
    names = [f"{f't{k // n} ' if len(matched) > n else ''}{channel_names[k % n]}"
             for k in range(len(matched))]
    return names if labels else [f"{name}: {m.summary()}"
                                 for name, m in zip(names, matched, strict=True)]


def intensity_report_output(args: argparse.Namespace) -> list[Path]:
    """``--report FILE`` with ``--intensity-match``: the gains table ``FILE-stem.gains.csv``
    beside the report (checked before any work, written once the image is complete)."""
    if not (args.intensity_match or args.intensity_offset):
        return []
    from ..intensity import gains_path_for

    return [gains_path_for(args.report)]


def write_intensity_report(args: argparse.Namespace, outputs: list[Path], matched: list,
                           channel_names: list[str]) -> None:
    """Write the gains table of :func:`intensity_report_output` (one row per tile, with a
    channel column when several channels or time points were matched)."""
    from ..intensity import write_gains_csv
    from .outputs import staged

    if not outputs or not matched:
        return
    with staged(outputs) as tmp:
        write_gains_csv(tmp[outputs[0]], matched,
                        intensity_lines(matched, channel_names, labels=True) or None)
    notice(args, f"wrote {outputs[0]}")


def intensity_record(matched: list) -> dict:
    """The provenance entry of ``--intensity-match``: one record, or one per time point and
    channel."""
    if not matched:
        return {}
    records = [m.record() for m in matched]
    return {"intensity_match": records[0] if len(records) == 1 else records}
