"""Describe a pyramidal OME-TIFF image (what ``gpufusion fuse -o out.ome.tif`` writes).

:func:`read_ome_tiff_info` is the OME-TIFF counterpart of
:func:`gpufusion.writers.ome_zarr.read_ome_zarr_info`: the levels (the full-resolution
series and its sub-resolutions, SubIFDs in gpufusion's files), each level's shape, TIFF tile
size, dtype and compression, the axes, the pixel size with its unit and the channel names
(from the OME-XML ``Pixels`` element, parsed without entities by
:mod:`gpufusion.readers.safe_xml`), and which program wrote the file (TIFF ``Software``
tag). :func:`format_ome_tiff_info` renders it; :func:`is_image_tiff` tells an image (a
gpufusion output, or any pyramidal TIFF) from a tile file, which ``gpufusion info``
describes as an input tile set instead.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from .listing import GPUFUSION_SOFTWARE
from .safe_xml import parse_xml

__all__ = ["TIFF_SUFFIXES", "format_ome_tiff_info", "is_image_tiff", "is_ome_zarr",
           "open_tiff", "read_ome_tiff_info"]

#: File name endings read as TIFF images.
TIFF_SUFFIXES = (".tif", ".tiff")

#: tifffile axis code -> (axis name, NGFF axis type).
_AXES = {"T": ("t", "time"), "C": ("c", "channel"), "Z": ("z", "space"),
         "Y": ("y", "space"), "X": ("x", "space"), "S": ("s", "channel")}

#: tifffile COMPRESSION names -> the names gpufusion's ``--compression`` uses.
_COMPRESSION_NAMES = {"NONE": "none", "ADOBE_DEFLATE": "zlib", "DEFLATE": "zlib",
                      "LZW": "lzw", "ZSTD": "zstd"}


#: Files whose presence makes a folder a Zarr group (v3, v2).
_ZARR_METADATA = ("zarr.json", ".zgroup", ".zattrs")


def is_ome_zarr(path: Path) -> bool:
    """True for a path named ``*.zarr`` or a folder holding Zarr group metadata."""
    if path.name.lower().endswith(".zarr"):
        return True
    return path.is_dir() and any((path / name).is_file() for name in _ZARR_METADATA)


def _fail(path: Path, message: str) -> InputError:
    return InputError(" ".join(f"{path}: {message}".split()))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@contextlib.contextmanager
def open_tiff(path: Path, problem: str = "not a readable TIFF") -> Iterator[Any]:
    """Open ``path`` with tifffile for the block; a damaged file is one InputError naming it.

    Whatever tifffile raises or logs about the file inside the block (a truncated file, a
    corrupted tag list, a failed decompression) becomes ``PATH: PROBLEM (...)`` or
    ``PATH: damaged TIFF: ...``; an InputError raised in the block passes unchanged.
    """
    import tifffile

    from .images import _tifffile_checked

    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "not a file")
    try:
        with _tifffile_checked(path), tifffile.TiffFile(path) as tif:
            if not len(tif.pages):
                raise _fail(path, "a TIFF without images")
            yield tif
    except InputError:
        raise
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise _fail(path, f"{problem} ({type(exc).__name__}: {exc})") from None


def is_image_tiff(path: str | os.PathLike[str]) -> bool:
    """True for a TIFF that is an image rather than a tile: gpufusion wrote it (``Software``
    tag ``gpufusion``), or its first series has sub-resolution levels (a pyramid).

    Raises
    ------
    InputError
        If ``path`` is not a readable TIFF.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "tile.ome.tif", np.zeros((4, 4), np.uint8))
    >>> tifffile.imwrite(d / "out.ome.tif", np.zeros((4, 4), np.uint8), software="gpufusion")
    >>> is_image_tiff(d / "tile.ome.tif"), is_image_tiff(d / "out.ome.tif")
    (False, True)
    """
    path = Path(path)
    with open_tiff(path) as tif:
        if (tif.pages[0].software or "").startswith(GPUFUSION_SOFTWARE):
            return True
        _pixels(path, tif.pages[0].description or "")  # hostile OME-XML: before tifffile
        return len(tif.series) > 0 and len(tif.series[0].levels) > 1


def _pixels(path: Path, description: str) -> ET.Element | None:
    """The first Image's ``Pixels`` element of the OME-XML, or None for a plain TIFF."""
    if "<OME" not in description:
        return None
    root = parse_xml(description, path, "OME-XML")
    for image in root:
        if _local(image.tag) == "Image":
            for pixels in image:
                if _local(pixels.tag) == "Pixels":
                    return pixels
    return None


def _image_name(path: Path, description: str) -> str | None:
    root = parse_xml(description, path, "OME-XML")
    for image in root:
        if _local(image.tag) == "Image":
            return image.get("Name")
    return None


def _physical(path: Path, pixels: ET.Element | None, spatial: list[str]
              ) -> tuple[tuple[float | None, ...] | None, str | None]:
    """Pixel size per spatial axis (None where not given) and its NGFF unit name."""
    from .tileset import ngff_length_unit

    if pixels is None:
        return None, None
    sizes: list[float | None] = []
    units = set()
    for axis in spatial:
        attr = f"PhysicalSize{axis.upper()}"
        text = pixels.get(attr)
        if text is None:
            sizes.append(None)
            continue
        try:
            value = float(text)
        except ValueError:
            raise _fail(path, f"OME-XML Pixels {attr}={text!r} is not a number") from None
        sizes.append(value)
        units.add(pixels.get(attr + "Unit") or "µm")  # the OME schema's default unit
    if all(s is None for s in sizes):
        return None, None
    if len(units) > 1:
        return tuple(sizes), " / ".join(sorted(units))
    symbol = units.pop()
    try:
        return tuple(sizes), ngff_length_unit(symbol, "unit") or symbol
    except InputError:  # a unit without an NGFF name: show it as written
        return tuple(sizes), symbol


def _ome_color(path: Path, text: str | None) -> tuple[int, int, int] | None:
    """An OME ``Color`` (signed 32-bit RGBA integer) as (r, g, b)."""
    if text is None:
        return None
    try:
        value = int(text) & 0xFFFFFFFF
    except ValueError:
        raise _fail(path, f"OME-XML Channel Color={text!r} is not an integer") from None
    return (value >> 24) & 255, (value >> 16) & 255, (value >> 8) & 255


def _channels(path: Path, pixels: ET.Element | None, count: int
              ) -> tuple[list[str | None], list[tuple[int, int, int] | None]]:
    elements = [] if pixels is None else [e for e in pixels if _local(e.tag) == "Channel"]
    names = [e.get("Name") for e in elements][:count]
    colors = [_ome_color(path, e.get("Color")) for e in elements][:count]
    names += [None] * (count - len(names))
    colors += [None] * (count - len(colors))
    return names, colors


def _compression(keyframe: Any) -> str:
    name = getattr(keyframe.compression, "name", str(keyframe.compression))
    label = _COMPRESSION_NAMES.get(name, name.lower())
    if int(getattr(keyframe, "predictor", 1) or 1) == 2:
        label += " (horizontal predictor)"
    elif int(getattr(keyframe, "predictor", 1) or 1) == 3:
        label += " (floating-point predictor)"
    return label


def _level_info(level: Any, shape0: tuple[int, ...], pixel: dict[str, float | None],
                axes: list[str]) -> dict[str, Any]:
    keyframe = level.keyframe
    shape = tuple(int(n) for n in level.shape)
    factors = {a: max(1, round(n0 / n)) if n else 1
               for a, n0, n in zip(axes, shape0, shape, strict=True)}
    scale = tuple((pixel.get(a) or 1.0) * factors[a] if a in pixel else float(factors[a])
                  for a in axes)
    tiled = bool(keyframe.is_tiled)
    return {
        "shape": shape,
        "tile": (int(keyframe.tilelength), int(keyframe.tilewidth)) if tiled else None,
        "dtype": str(level.dtype),
        "compression": _compression(keyframe),
        "factor": factors.get("x", 1),
        "scale": scale,
    }


def read_ome_tiff_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe an (OME-)TIFF image: its levels, axes, pixel size and channels.

    Parameters
    ----------
    path : str or path-like
        A TIFF file, usually a pyramidal OME-TIFF ``gpufusion fuse`` wrote. Its first
        series is described (the first OME ``Image``).

    Returns
    -------
    dict
        ``path``, ``format`` (``"OME-TIFF"`` or ``"TIFF"``), ``bigtiff``, ``software``
        (TIFF ``Software`` tag of the first page, or None), ``gpufusion`` (True when
        gpufusion wrote it), ``name`` (OME ``Image Name``), ``axes`` (list of ``{"name",
        "type", "unit"}`` as :func:`~gpufusion.writers.ome_zarr.read_ome_zarr_info`),
        ``dtype``, ``compression`` (of level 0), ``pixel_size`` (per spatial axis ``z``,
        ``y``, ``x`` present, None where not given; None if none is) and ``unit`` (NGFF
        name, e.g. ``"micrometer"``), ``channels`` (one name per channel, None where
        unnamed), ``colors`` (per channel ``(r, g, b)`` from OME ``Channel Color``, or
        None) and ``levels``: per level ``shape``, ``tile`` (height, width; None for a
        striped level), ``dtype``, ``compression``, ``factor`` (its downsampling of ``x``
        against level 0) and ``scale`` (per axis: pixel size times factor; the factor
        where no pixel size is given).

    Raises
    ------
    InputError
        One line naming ``path``: missing, not a readable TIFF, malformed OME-XML, or a
        pixel size that is not a number.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> from gpufusion.writers.ome_tiff import write_ome_tiff
    >>> out = write_ome_tiff(np.zeros((2, 600, 400), "uint16"), tempfile.mkdtemp() + "/a.ome.tif",
    ...                      axes=["c", "y", "x"], pixel_size=[0.5, 0.5], unit="um",
    ...                      channel_names=["DAPI", "GFP"], tile=256)
    >>> info = read_ome_tiff_info(out)
    >>> [level["shape"] for level in info["levels"]], info["pixel_size"], info["unit"]
    ([(2, 600, 400), (2, 300, 200), (2, 150, 100)], (0.5, 0.5), 'micrometer')
    >>> info["channels"], info["gpufusion"], info["levels"][0]["tile"]
    (['DAPI', 'GFP'], True, (256, 256))
    """
    path = Path(path)
    with open_tiff(path) as tif:
        page = tif.pages[0]
        description = page.description or ""
        software = page.software or None
        pixels = _pixels(path, description)  # parsed safely before tifffile parses it
        series = tif.series[0]
        codes = series.axes
        levels = list(series.levels)
        shape0 = tuple(int(n) for n in series.shape)
        names = [_AXES.get(code, (code.lower(), None))[0] for code in codes]
        spatial = [n for n in names if n in ("z", "y", "x")]
        pixel_size, unit = _physical(path, pixels, spatial)
        by_axis = dict(zip(spatial, pixel_size or (None,) * len(spatial), strict=True))
        n_channels = 1
        for name, n in zip(names, shape0, strict=True):
            if name in ("c", "s"):
                n_channels *= n
        channel_names, colors = _channels(path, pixels, n_channels)
        axes = [{"name": name, "type": _AXES.get(code, (None, None))[1],
                 "unit": unit if name in spatial and by_axis.get(name) is not None else None}
                for code, name in zip(codes, names, strict=True)]
        infos = [_level_info(level, shape0, by_axis, names) for level in levels]
        return {
            "path": str(path),
            "format": "OME-TIFF" if pixels is not None else "TIFF",
            "bigtiff": bool(tif.is_bigtiff),
            "software": software,
            "gpufusion": bool(software and software.startswith(GPUFUSION_SOFTWARE)),
            "name": _image_name(path, description) if pixels is not None else None,
            "axes": axes,
            "dtype": infos[0]["dtype"],
            "compression": infos[0]["compression"],
            "pixel_size": pixel_size,
            "unit": unit,
            "channels": channel_names,
            "colors": colors,
            "levels": infos,
        }


def _cells(values: Any, sep: str = " x ") -> str:
    return sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def format_ome_tiff_info(info: dict[str, Any]) -> str:
    """Render :func:`read_ome_tiff_info` output as a small text table.

    Examples
    --------
    >>> print(format_ome_tiff_info({
    ...     "path": "/d/out.ome.tif", "format": "OME-TIFF", "bigtiff": True,
    ...     "software": "gpufusion", "gpufusion": True, "name": "slide",
    ...     "axes": [{"name": "c", "type": "channel", "unit": None},
    ...              {"name": "y", "type": "space", "unit": "micrometer"},
    ...              {"name": "x", "type": "space", "unit": "micrometer"}],
    ...     "dtype": "uint16", "compression": "zlib (horizontal predictor)",
    ...     "pixel_size": (0.5, 0.5), "unit": "micrometer", "channels": ["DAPI", None],
    ...     "colors": [None, None],
    ...     "levels": [{"shape": (2, 600, 400), "tile": (256, 256), "dtype": "uint16",
    ...                 "compression": "zlib", "factor": 1, "scale": (1.0, 0.5, 0.5)},
    ...                {"shape": (2, 300, 200), "tile": (256, 256), "dtype": "uint16",
    ...                 "compression": "zlib", "factor": 2, "scale": (1.0, 1.0, 1.0)}]}))
    /d/out.ome.tif
      OME-TIFF (BigTIFF), written by gpufusion (TIFF Software tag), name 'slide'
      axes: c (channel), y (space, micrometer), x (space, micrometer)
      channels: 2 (DAPI, channel 1)
      pixel size: 0.5 x 0.5 micrometer (y, x)
      compression: zlib (horizontal predictor)
      level  shape          tile       dtype   downsampling  pixel size
      0      2 x 600 x 400  256 x 256  uint16  1             0.5 x 0.5
      1      2 x 300 x 200  256 x 256  uint16  2             1 x 1
    """
    kind = f"{info['format']} (BigTIFF)" if info["bigtiff"] else info["format"]
    if info["gpufusion"]:
        origin = f"written by {info['software']} (TIFF Software tag)"
    elif info["software"]:
        origin = f"written by {info['software']!r} (TIFF Software tag), not by gpufusion"
    else:
        origin = "no TIFF Software tag, not written by gpufusion"
    head = f"  {kind}, {origin}" + (f", name {info['name']!r}" if info["name"] else "")
    axes = ", ".join(
        f"{a['name']} ({', '.join(str(v) for v in (a['type'], a['unit']) if v)})"
        if a["type"] or a["unit"] else str(a["name"]) for a in info["axes"])
    names = [n if n else f"channel {k}" for k, n in enumerate(info["channels"])]
    spatial = [a["name"] for a in info["axes"] if a["name"] in ("z", "y", "x")]
    size = info["pixel_size"]
    pixel = ("not given" if size is None else
             " x ".join("?" if s is None else f"{s:g}" for s in size)
             + f" {info['unit']} ({', '.join(spatial)})")
    where = [k for k, a in enumerate(info["axes"]) if a["name"] in ("z", "y", "x")]
    header = ("level", "shape", "tile", "dtype", "downsampling", "pixel size")
    rows = [(str(k), _cells(level["shape"]),
             _cells(level["tile"]) if level["tile"] else "strips", level["dtype"],
             str(level["factor"]),
             _cells([level["scale"][i] for i in where]) if size is not None else "")
            for k, level in enumerate(info["levels"])]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    table = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)
                              ).rstrip() for row in [header, *rows]]
    return "\n".join([
        info["path"], head, f"  axes: {axes}",
        f"  channels: {len(names)} ({', '.join(names)})",
        f"  pixel size: {pixel}",
        f"  compression: {info['compression']}",
        *table,
    ])
