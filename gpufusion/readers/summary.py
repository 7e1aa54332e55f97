"""Describe an input tile set without fusing it: what ``gpufusion info INPUT`` prints.

:func:`describe_input` gives the format, tile and channel counts, time points, the pixel
size and where the pixels are read from (resolved, each location marked when it lies
outside the input's folder, and when it is not found); :func:`format_input_info` renders
it. A BigStitcher ``dataset.xml`` is described from its metadata alone, so a project whose
data lives elsewhere (an absolute loader path, an S3 bucket) is described all the same;
other inputs are opened as :func:`~gpufusion.readers.detect.read_tileset` opens them
(headers only, no pixels).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .detect import detect_format, list_timepoints, read_tileset

__all__ = ["describe_input", "format_input_info"]

#: How each input format is named in the description.
FORMAT_NAMES = {
    "tileconfig": "Fiji TileConfiguration",
    "csv": "CSV positions file",
    "ome-tiff": "OME-TIFF",
    "bigstitcher": "BigStitcher dataset.xml (SpimData)",
    "czi": "Zeiss CZI",
}


def _location(kind: str, path: Path, count: int, folder: Path) -> dict[str, Any]:
    resolved = path.resolve()
    return {"kind": kind, "path": str(resolved), "count": count,
            "outside": not resolved.is_relative_to(folder), "exists": resolved.exists()}


def _describe_spimdata(path: Path) -> dict[str, Any]:
    from .bigstitcher import read_spimdata, spimdata_locations, world_unit

    spim = read_spimdata(path)
    setups = list(spim.setups.values())
    views = spim.views()
    attributes = {key: sorted({s.attributes.get(key, 0) for s in setups})
                  for key in ("channel", "angle", "illumination")}
    names = spim.attribute_names.get("channel", {})
    size, unit = world_unit(spim, views) if setups else (None, None)
    info: dict[str, Any] = {
        "path": str(path.resolve()),
        "format": f"{FORMAT_NAMES['bigstitcher']}, "
                  + (f"ImageLoader {spim.loader_format}" if spim.loader is not None
                     else "no ImageLoader"),
        "tiles": len({(s.attributes.get("tile", s.id), s.attributes.get("angle", 0))
                      for s in setups}),
        "channels": [names.get(c) or f"channel {c}" for c in attributes["channel"]],
        "angles": len(attributes["angle"]),
        "illuminations": len(attributes["illumination"]),
        "timepoints": sorted({t for t, _ in views}),
        "views": (len(views), len(spim.missing)),
        "axes": "z, y, x",
        "pixel_size": size,
        "unit": unit,
        "locations": [],
        "problem": None,
    }
    if not setups:
        info["problem"] = "no ViewSetups: nothing to read"
    elif spim.loader is None:
        info["problem"] = "no ImageLoader in the SequenceDescription"
    else:
        info["locations"] = [
            {"kind": loc.kind, "path": loc.path, "count": loc.views, "outside": loc.outside,
             "exists": loc.exists} for loc in spimdata_locations(spim)
        ]
    return info


def _source_files(source: Any) -> list[Path]:
    planes = getattr(source, "planes", None)
    if planes:
        return [Path(file) for file, _ in planes]
    path = getattr(source, "path", None)
    return [Path(path)] if path is not None else []


def describe_input(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe an input tile set (any format :func:`~.detect.read_tileset` detects).

    Returns
    -------
    dict
        ``path``, ``format`` (a label), ``tiles``, ``channels`` (names), ``timepoints``
        (ids), ``axes``, ``pixel_size`` (per axis, or None) and ``unit``, ``locations``
        (one dict per folder or container: ``kind``, ``path`` resolved, ``count`` of
        files or views, ``outside`` the input's folder, ``exists``), and for BigStitcher
        ``views`` (present, missing), ``angles``, ``illuminations`` and ``problem`` (why
        nothing could be read, or None).

    Raises
    ------
    InputError
        As :func:`~.detect.read_tileset` (or, for a dataset.xml,
        :func:`~.bigstitcher.read_spimdata`) for inputs it cannot read.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for i in range(2):
    ...     tifffile.imwrite(d / f"t{i}.tif", np.zeros((8, 8), np.uint8))
    >>> _ = (d / "pos.csv").write_text("file,x,y\\nt0.tif,0,0\\nt1.tif,6,0\\n")
    >>> info = describe_input(d / "pos.csv")
    >>> info["format"], info["tiles"], info["locations"][0]["count"]
    ('CSV positions file', 2, 2)
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "bigstitcher":
        return _describe_spimdata(p)
    tiles = read_tileset(p)
    folder = (p if p.is_dir() else p.parent).resolve()
    by_folder: dict[Path, set[Path]] = {}
    for channel in tiles.sources:
        for source in channel:
            for file in _source_files(source):
                by_folder.setdefault(file.resolve().parent, set()).add(file.resolve())
    return {
        "path": str(p.resolve()),
        "format": FORMAT_NAMES.get(fmt, fmt),
        "tiles": tiles.n_tiles,
        "channels": list(tiles.channel_names),
        "timepoints": list_timepoints(p),
        "axes": ", ".join("zyx"[3 - tiles.ndim:]),
        "pixel_size": tiles.pixel_size,
        "unit": tiles.unit,
        "locations": [_location("tile files", parent, len(files), folder)
                      for parent, files in by_folder.items()],
    }


def _ids(values: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, values[:most]))
    return shown + (f", ... {values[-1]}" if len(values) > most else "")


def format_input_info(info: dict[str, Any]) -> str:
    """Render :func:`describe_input` output as a few lines of text.

    Examples
    --------
    >>> print(format_input_info({
    ...     "path": "/d/dataset.xml", "format": "BigStitcher dataset.xml (SpimData)",
    ...     "tiles": 2, "channels": ["488"], "timepoints": [0], "axes": "z, y, x",
    ...     "pixel_size": (2.0, 0.5, 0.5), "unit": "micrometer", "views": (2, 0),
    ...     "locations": [{"kind": "N5 container", "path": "/data/x.n5", "count": 2,
    ...                    "outside": True, "exists": False}]}))
    /d/dataset.xml
      BigStitcher dataset.xml (SpimData)
      tiles: 2, channels: 1 (488), time points: 1 (0), views: 2 present, 0 missing
      pixel size: 2 x 0.5 x 0.5 micrometer (z, y, x)
      data: N5 container /data/x.n5 (2 views; outside the input's folder; not found)
    """
    counts = [f"tiles: {info['tiles']}", f"channels: {len(info['channels'])} "
              f"({', '.join(info['channels'])})",
              f"time points: {len(info['timepoints'])} ({_ids(info['timepoints'])})"]
    if "views" in info:
        counts.append(f"views: {info['views'][0]} present, {info['views'][1]} missing")
    for key in ("angles", "illuminations"):
        if info.get(key, 1) > 1:
            counts.append(f"{key}: {info[key]}")
    size = info["pixel_size"]
    pixel = (" x ".join(f"{s:g}" for s in size) + f" {info['unit'] or 'units'}"
             if size is not None else "not given")
    lines = [info["path"], f"  {info['format']}", "  " + ", ".join(counts),
             f"  pixel size: {pixel} ({info['axes']})"]
    if info.get("problem"):
        lines.append(f"  data: {info['problem']}")
    for loc in info["locations"]:
        unit = "views" if loc["kind"] != "tile files" else "files"
        notes = [f"{loc['count']} {unit}",
                 "outside the input's folder" if loc["outside"] else "inside the input's folder"]
        if loc["exists"] is False:
            notes.append("not found")
        elif loc["exists"] is None:
            notes.append("remote, not read by gpufusion")
        lines.append(f"  data: {loc['kind']} {loc['path']} ({'; '.join(notes)})")
    return "\n".join(lines)
