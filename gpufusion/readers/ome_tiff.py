"""OME-TIFF tiles placed by the stage positions in their OME-XML.

Input: a folder of OME-TIFF files (searched recursively, ``*.ome.tif`` / ``*.ome.tiff``) or
one (multi-series) OME-TIFF file. Every OME ``Image`` is a tile; its planes are located
through its ``TiffData`` elements (``IFD``, ``FirstC/Z/T``, ``PlaneCount`` and
``UUID FileName``, as in the OME-TIFF specification), so channels may sit in one file or
one file each. The same Image listed in several files' XML (multi-file datasets, Leica
exports) is read once. Single-channel Images whose file names differ only in a channel
token (``--C00``/``--C01``, ``_C1``, ``_ch2``) are grouped into one multi-channel tile.

Positions, in order of preference: ``Plane PositionX/PositionY[/PositionZ]`` of the plane
``(C=0, Z=0, T=timepoint)`` with ``PositionXUnit`` etc. (default: the reference frame,
taken as micrometres); ``Plane/StagePosition`` of the 2008-09 schema, which Leica LAS AF
writes in **metres**; ``StageLabel X/Y/Z``. They are divided by ``PhysicalSizeX/Y/Z``
(default unit micrometre; a missing ``PhysicalSizeZ`` is taken equal to X) to give pixels,
and shifted so that the smallest is 0. Stage axes are assumed to point like image axes.
Positions are what the metadata says, which is often tens of pixels off: register before
fusing.

Pixels: :func:`open_tiff_planes` opens chosen pages of TIFF files as one lazy tile
(:class:`TiffPlanesSource`, decoded page by page into the tile cache);
:func:`tiff_series_planes` locates the pages of one channel and time point of a TIFF
series (also used for BigStitcher's file-map loader).
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..layout import translation_affine
from ..units import convert_length, ngff_unit
from .grid import natural_key
from .images import PlanewiseSource, _quiet_tifffile, file_stamp
from .listing import is_gpufusion_output, visible_files
from .safe_xml import parse_xml
from .tileset import MetadataWarning, TileSet, length_to_um, normalise_pixel_size

__all__ = ["TiffPlanesSource", "ome_tiff_timepoints", "open_tiff_planes", "read_ome_tiff",
           "tiff_series_planes", "tiles_pixel_size"]

_CHANNEL_TOKEN = re.compile(r"(--|_|-)(C|c|CH|Ch|ch)(\d+)(?=$|[-_.])")
_OME_SUFFIXES = (".ome.tif", ".ome.tiff")


# --- chosen pages of TIFF files ----------------------------------------------------------


def _file_error(path: Path | str, message: str) -> InputError:
    return InputError(" ".join(f"{path}: {message}".split()))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class TiffPlanesSource(PlanewiseSource):
    """Chosen pages of one or more TIFF files, stacked as the Z planes of one tile.

    Created by :func:`open_tiff_planes`; used for one channel and time point of a
    multi-page (OME-)TIFF, or for channels and planes stored one file each. Each file is
    read on its own (its OME-XML ignored); each page is decoded once into the tile cache
    when a window first needs it. ``path`` is the first plane's file; ``planes`` holds
    ``(file, page index)`` for every plane.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "cyx.tif"
    >>> tifffile.imwrite(path, np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    ...                  photometric="minisblack")
    >>> src = open_tiff_planes([(path, 1)])
    >>> type(src).__name__, src.shape, src.read((slice(0, 1), slice(None))).tolist()
    ('TiffPlanesSource', (3, 4), [[12, 13, 14, 15]])
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        stamp: tuple[int, int],
        planes: tuple[tuple[str, int], ...],
    ) -> None:
        super().__init__(path, shape, dtype, name, stamp)
        self.planes = planes

    @property
    def _key(self) -> tuple[Any, ...]:
        return (*super()._key, self.planes)

    def _decode_planes(self, ks: list[int]) -> list[np.ndarray]:
        import tifffile

        out: dict[int, np.ndarray] = {}
        by_file: dict[str, list[int]] = {}
        for k in ks:
            by_file.setdefault(self.planes[k][0], []).append(k)
        for file, items in by_file.items():
            try:
                with _quiet_tifffile(), tifffile.TiffFile(file, is_ome=False) as tif:
                    for k in items:
                        out[k] = tif.pages[self.planes[k][1]].asarray().reshape(self.shape[-2:])
            except Exception as exc:  # any decoder failure is a bad file
                raise _file_error(
                    file, f"cannot decode TIFF page ({type(exc).__name__}: {_one_line(exc)})"
                ) from None
        return [out[k] for k in ks]


def _inspect_tiff_page(path: Path, tif: Any, index: int) -> tuple[tuple[int, int], np.dtype]:
    """Check page ``index`` of an open TIFF: exists, 2D single-sample, decodable, complete."""
    from tifffile import TIFF

    if not 0 <= index < len(tif.pages):
        raise _file_error(path, f"TIFF page {index} does not exist (the file has {len(tif.pages)})")
    try:
        page = tif.pages[index]
        page = page.keyframe if page.keyframe is not None else page
        shape = tuple(int(n) for n in page.shape)
        samples = int(page.samplesperpixel)
        dtype = page.dtype
        compression = page.compression
        page = tif.pages[index]
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        ends = offsets + np.asarray(page.databytecounts, dtype=np.int64)
    except Exception as exc:  # corrupt IFDs surface here
        raise _file_error(
            path, f"corrupt TIFF page {index} ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    if samples != 1 or len(shape) != 2:
        raise _file_error(
            path,
            f"TIFF page {index} has shape {shape} with {samples} samples per pixel; "
            "expected a single-channel 2D plane",
        )
    if compression != 1 and compression not in TIFF.DECOMPRESSORS:
        raise _file_error(
            path,
            f"TIFF compression {compression!r} cannot be decoded here "
            "(it needs the 'imagecodecs' package)",
        )
    if ends.size and int(ends.max()) > tif.filehandle.size:
        raise _file_error(
            path,
            f"TIFF is truncated: page {index} ends at byte {int(ends.max())}, "
            f"file has {tif.filehandle.size} bytes",
        )
    if 0 in shape:
        raise _file_error(path, f"TIFF page {index} is empty (shape {shape})")
    if dtype is None or np.dtype(dtype).kind not in "biuf":
        raise _file_error(path, f"pixel type {dtype} not supported; expected integer or float")
    dtype = np.dtype(dtype)
    return (shape[0], shape[1]), dtype if dtype.isnative else dtype.newbyteorder("=")


def open_tiff_planes(planes: Any, *, name: str | None = None) -> TiffPlanesSource:
    """Open chosen TIFF pages as one lazy tile: 2D for one page, ``(Z, Y, X)`` for several.

    Parameters
    ----------
    planes : sequence of (path, int)
        ``(file, page index)`` of each plane in Z order. Files are read on their own
        (OME-XML references to other files are ignored); page indices count the file's
        IFDs from 0.
    name : str, optional
        The source's name; defaults to the first file's name.

    Returns
    -------
    TiffPlanesSource
        Pixels are read on the first ``read``, into the tile cache.

    Raises
    ------
    InputError
        If a file is missing or not a TIFF, a page does not exist, is not a single-sample
        2D plane, is compressed with an unknown codec or truncated, or the planes differ
        in shape or dtype. The message names the file.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for z in range(3):
    ...     tifffile.imwrite(folder / f"z{z}.tif", np.full((4, 5), z, np.uint16))
    >>> src = open_tiff_planes([(folder / f"z{z}.tif", 0) for z in range(3)])
    >>> src.shape, src.read((slice(None), slice(0, 1), slice(0, 1))).ravel().tolist()
    ((3, 4, 5), [0, 1, 2])
    """
    import tifffile

    resolved = [(Path(file), int(page)) for file, page in planes]
    if not resolved:
        raise InputError("open_tiff_planes: no planes given")
    facts: dict[Path, tuple[tuple[int, int], np.dtype]] = {}
    by_file: dict[Path, list[int]] = {}
    for file, page in resolved:
        by_file.setdefault(file, []).append(page)
    for file, pages in by_file.items():
        file_stamp(file)
        try:
            tif = tifffile.TiffFile(file, is_ome=False)
        except Exception as exc:  # tifffile raises several types for corrupt headers
            raise _file_error(file, f"not a readable TIFF ({_one_line(exc)})") from None
        with _quiet_tifffile(), tif:
            for page in sorted(set(pages)):
                found = _inspect_tiff_page(file, tif, page)
                first = facts.setdefault(file, found)
                if found != first:
                    raise _file_error(file, f"TIFF page {page} differs in shape or dtype")
    first_file = resolved[0][0]
    plane_shape, dtype = facts[first_file]
    for file, (other_shape, other_dtype) in facts.items():
        if (other_shape, other_dtype) != (plane_shape, dtype):
            raise _file_error(
                file,
                f"planes of shape {other_shape} {other_dtype} differ from {first_file.name} "
                f"({plane_shape} {dtype}); all planes of a tile must match",
            )
    shape = plane_shape if len(resolved) == 1 else (len(resolved), *plane_shape)
    return TiffPlanesSource(
        first_file,
        tuple(shape),
        dtype,
        first_file.name if name is None else name,
        file_stamp(first_file),
        tuple((str(file), page) for file, page in resolved),
    )


def tiff_series_planes(
    path: str | os.PathLike[str], *, series: int = 0, channel: int = 0, timepoint: int = 0
) -> list[tuple[Path, int]]:
    """Locate the Z planes of one channel and time point of a TIFF series.

    Series are tifffile's (OME Images, ImageJ hyperstacks, shaped stacks); pages of
    multi-file OME series may sit in other files. ``Z``, ``I`` and ``Q`` axes are taken as
    Z; other axes must have size 1. Feed the result to :func:`open_tiff_planes`.

    Returns
    -------
    list of (Path, int)
        ``(file, page index in that file)`` per Z plane.

    Raises
    ------
    InputError
        If the file is missing or not a TIFF, the series, channel or time point does not
        exist, or the pixels have several samples (RGB).

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "tczyx.tif"
    >>> stack = np.zeros((2, 3, 4, 8, 8), np.uint8)  # ImageJ order: T, Z, C, Y, X
    >>> tifffile.imwrite(path, stack, imagej=True)
    >>> [page for _, page in tiff_series_planes(path, channel=2, timepoint=1)]
    [14, 18, 22]
    """
    import tifffile

    from .tiff_compat import series_dims

    file = Path(path)
    file_stamp(file)
    try:
        tif = tifffile.TiffFile(file)
    except Exception as exc:  # tifffile raises several types for corrupt headers
        raise _file_error(file, f"not a readable TIFF ({_one_line(exc)})") from None
    with _quiet_tifffile(), tif:
        if not 0 <= series < len(tif.series):
            raise _file_error(file, f"series {series} does not exist ({len(tif.series)} series)")
        s = tif.series[series]
        shape, axes = series_dims(tif, series)
        sizes = dict(zip(axes, shape, strict=True))
        if sizes.get("S", 1) != 1:
            raise _file_error(file, "RGB (multi-sample) TIFF pixels are not supported")
        frame_axes = [(a, n) for a, n in sizes.items() if a not in "YXS"]
        index: list[Any] = []
        for axis, n in frame_axes:
            want = channel if axis == "C" else timepoint if axis == "T" else None
            if want is None:
                index.append(range(n) if axis in "ZQI" or n == 1 else [0])
            elif not 0 <= want < n:
                raise _file_error(file, f"{axis} index {want} does not exist (size {n})")
            else:
                index.append([want])
        dims = [n for _, n in frame_axes]
        planes = []
        for idx in np.ndindex(*(len(r) for r in index)):
            chosen = tuple(r[i] for r, i in zip(index, idx, strict=True))
            flat = int(np.ravel_multi_index(chosen, dims)) if dims else 0
            page = s.pages[flat]
            planes.append((Path(page.parent.filehandle.path), int(page.index)))
    return planes


# --- OME-XML ------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in elem if _local(e.tag) == name]


#: OME-XML's ``PositiveInt`` and ``NonNegativeInt`` (sizes, indices) are ``xsd:int``.
_OME_INT_MAX = 2**31 - 1


def _number(elem: ET.Element, attr: str, where: str, default: float | None = None) -> Any:
    """A finite number attribute, or ``default`` when absent."""
    text = elem.get(attr)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {attr}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: {attr}={text!r} is not a finite number")
    return value


def _integer(
    elem: ET.Element, attr: str, where: str, default: int, *, minimum: int = 0,
    maximum: int | None = _OME_INT_MAX,
) -> int:
    """A whole-number attribute (OME ``NonNegativeInt``/``PositiveInt``), range-checked."""
    text = elem.get(attr)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        number = _number(elem, attr, where)
        if not float(number).is_integer():
            raise InputError(f"{where}: {attr}={text!r} is not a whole number") from None
        value = int(number)
    if value < minimum or (maximum is not None and value > maximum):
        expected = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise InputError(f"{where}: {attr}={text!r} is out of range (expected {expected})")
    return value


def _length_um(elem: ET.Element, attr: str, where: str, *, metres: bool = False) -> float | None:
    """A length attribute in micrometres: its unit is ``<attr>Unit`` (default µm), or metres."""
    value = _number(elem, attr, where)
    if value is None:
        return None
    if metres:
        um = value * 1e6
    else:
        um = length_to_um(value, elem.get(f"{attr}Unit"), f"{where} {attr}Unit")
    if not math.isfinite(um):
        raise InputError(f"{where}: {attr}={elem.get(attr)!r} is out of range in micrometres")
    return um


@dataclass
class _Image:
    """One OME Image: sizes, physical sizes (µm), plane locations and positions (µm)."""

    key: tuple[str, str]
    label: str
    sizes: dict[str, int]
    physical: dict[str, float | None]
    planes: dict[tuple[int, int, int], tuple[Path, int]]  # (c, z, t) -> (file, IFD)
    positions: dict[tuple[int, int, int], dict[str, float]]  # (c, z, t) -> {x, y, z} µm
    stage_label: dict[str, float]
    channel_names: list[str]


class _PageCounts:
    """Number of IFDs per TIFF file, read once (for TiffData without IFD/PlaneCount)."""

    def __init__(self) -> None:
        self._counts: dict[Path, int] = {}

    def get(self, path: Path, where: str) -> int:
        if path not in self._counts:
            import tifffile

            if not path.is_file():
                raise InputError(f"{where}: TiffData names {path.name!r}, which is not found")
            try:
                with _quiet_tifffile(), tifffile.TiffFile(path, is_ome=False) as tif:
                    self._counts[path] = len(tif.pages)
            except Exception as exc:  # tifffile raises several types for corrupt headers
                message = " ".join(str(exc).split())
                raise InputError(f"{path}: not a readable TIFF ({message})") from None
        return self._counts[path]


def _plane_order(order: str, where: str) -> list[str]:
    """Axes from fastest to slowest varying among Z, C, T (``XYZCT`` -> ``Z, C, T``)."""
    axes = [a for a in order.upper() if a in "ZCT"]
    if sorted(axes) != ["C", "T", "Z"]:
        raise InputError(f"{where}: DimensionOrder {order!r} is not a permutation of XY + ZCT")
    return axes


def _tiffdata_planes(
    tiffdata: list[ET.Element], xml_file: Path, counts: _PageCounts, where: str,
    fast_to_slow: list[str], dims: list[int],
) -> dict[tuple[int, int, int], tuple[Path, int]]:
    """Map ``(c, z, t)`` to ``(file, IFD)`` from an Image's TiffData elements.

    Bounded by what the files hold: a ``PlaneCount`` above the IFDs left in its file from
    ``IFD`` on is refused, and planes past ``SizeZ x SizeC x SizeT`` are ignored, so the
    work is at most one entry per IFD whatever the metadata claims.
    """
    total = math.prod(dims)

    def unravel(linear: int) -> tuple[int, int, int]:
        idx = {}
        for axis, n in zip(fast_to_slow, dims, strict=True):
            linear, idx[axis] = divmod(linear, n)
        return idx["C"], idx["Z"], idx["T"]

    planes: dict[tuple[int, int, int], tuple[Path, int]] = {}
    if not tiffdata:
        for linear in range(min(total, counts.get(xml_file, where))):
            planes[unravel(linear)] = (xml_file, linear)
    for td in tiffdata:
        uuid = next(iter(_children(td, "UUID")), None)
        name = uuid.get("FileName") if uuid is not None else None
        file = (xml_file.parent / name) if name else xml_file
        ifd = _integer(td, "IFD", where, 0)
        if td.get("PlaneCount") is None:
            count = 1 if td.get("IFD") is not None else counts.get(file, where) - ifd
        else:
            count = _integer(td, "PlaneCount", where, 0, maximum=None)
            available = max(counts.get(file, where) - ifd, 0) if count > 1 else count
            if count > available:
                raise InputError(
                    f"{where}: TiffData PlaneCount={count} but {file.name} has only "
                    f"{available} IFD(s) from IFD {ifd} on"
                )
        start = 0
        for axis, dim in zip(reversed(fast_to_slow), reversed(dims), strict=True):
            start = start * dim + _integer(td, f"First{axis}", where, 0)
        for k in range(max(min(count, total - start), 0)):
            planes.setdefault(unravel(start + k), (file, ifd + k))
    return planes


def _parse_image(image: ET.Element, xml_file: Path, counts: _PageCounts) -> _Image:
    where = f"{xml_file}: Image {image.get('ID', '?')}"
    pixels = next(iter(_children(image, "Pixels")), None)
    if pixels is None:
        raise InputError(f"{where}: no Pixels element")
    sizes = {a.lower(): _integer(pixels, f"Size{a}", where, 1, minimum=1) for a in "XYZCT"}
    physical: dict[str, float | None] = {}
    for axis in "XYZ":
        value = _length_um(pixels, f"PhysicalSize{axis}", where)
        if value is not None and value < 0:
            raise InputError(f"{where}: PhysicalSize{axis}={pixels.get(f'PhysicalSize{axis}')!r} "
                             "is negative")
        physical[axis.lower()] = value or None  # 0 (Leica's PhysicalSizeZ): not given
    fast_to_slow = _plane_order(pixels.get("DimensionOrder", "XYZCT"), where)
    tiffdata = _children(pixels, "TiffData")
    # TiffData may name channels beyond SizeC (Leica: SizeC=1 with a FirstC=1 in another
    # file); grow the sizes to cover every plane the TiffData claim.
    for td in tiffdata:
        for axis in "ZCT":
            first = _integer(td, f"First{axis}", where, 0)
            sizes[axis.lower()] = max(sizes[axis.lower()], first + 1)
    dims = [sizes[a.lower()] for a in fast_to_slow]
    planes = _tiffdata_planes(tiffdata, xml_file, counts, where, fast_to_slow, dims)
    positions: dict[tuple[int, int, int], dict[str, float]] = {}
    for k, plane in enumerate(_children(pixels, "Plane")):
        at = f"{where} Plane {k}"
        key = tuple(_integer(plane, f"The{a}", at, 0) for a in "CZT")
        pos: dict[str, float] = {}
        for axis in "XYZ":
            value = _length_um(plane, f"Position{axis}", at)
            if value is not None:
                pos[axis.lower()] = value
        stage = next(iter(_children(plane, "StagePosition")), None)
        if not pos and stage is not None:
            # OME 2008-09 StagePosition: Leica LAS AF writes metres.
            for axis in "XYZ":
                value = _length_um(stage, f"Position{axis}", f"{at} StagePosition", metres=True)
                if value is not None:
                    pos[axis.lower()] = value
        if pos:
            positions[key] = pos  # type: ignore[index]
    label_elem = next(iter(_children(image, "StageLabel")), None)
    stage_label: dict[str, float] = {}
    if label_elem is not None:
        for axis in "XYZ":
            value = _length_um(label_elem, axis, f"{where} StageLabel")
            if value is not None:
                stage_label[axis.lower()] = value
    names = [ch.get("Name") or "" for ch in _children(pixels, "Channel")]
    first_file = planes.get((0, 0, 0), (xml_file, 0))[0]
    return _Image(
        key=(str(first_file.resolve()), image.get("ID", "")),
        label=image.get("Name") or image.get("ID", ""),
        sizes=sizes, physical=physical, planes=planes, positions=positions,
        stage_label=stage_label, channel_names=names,
    )


def _images_in_file(path: Path, counts: _PageCounts) -> list[_Image]:
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path, is_ome=False) as tif:
            description = tif.pages[0].description if len(tif.pages) else ""
    except Exception as exc:  # tifffile raises several types for corrupt headers
        raise InputError(f"{path}: not a readable TIFF ({' '.join(str(exc).split())})") from None
    if "<OME" not in description:
        raise InputError(f"{path}: no OME-XML metadata in the first page; not an OME-TIFF")
    root = parse_xml(description, path, "OME-XML")
    images = [e for e in root if _local(e.tag) == "Image"]
    if not images:
        if any(_local(e.tag) == "BinaryOnly" for e in root):
            raise InputError(
                f"{path}: the OME-XML is in a companion file (BinaryOnly); open a file "
                "that carries the full OME-XML"
            )
        raise InputError(f"{path}: OME-XML has no Image")
    return [_parse_image(image, path, counts) for image in images]


def _list_files(path: Path) -> list[Path]:
    """The OME-TIFF tiles of a folder (and its sub-folders), or ``[path]`` for a file.

    Hidden files and folders and gpufusion's own outputs are skipped
    (:mod:`gpufusion.readers.listing`): an output written beside the tiles, or the
    temporary folder of one being written, is never read as a tile.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    candidates = [p for p in visible_files(path) if p.name.lower().endswith(_OME_SUFFIXES)]
    files = [p for p in candidates if not is_gpufusion_output(p)]
    if not files:
        skipped = len(candidates)
        why = f" ({skipped} written by gpufusion, skipped)" if skipped else ""
        raise InputError(f"{path}: no OME-TIFF files (*.ome.tif, *.ome.tiff) in this "
                         f"folder{why}")
    return sorted(files, key=lambda p: natural_key(p.relative_to(path).as_posix()))


def _group_by_channel_token(images: list[_Image], root: Path) -> list[list[_Image]]:
    """Group single-channel images whose file names differ only in a channel token."""
    if any(img.sizes["c"] != 1 for img in images):
        return [[img] for img in images]
    groups: dict[str, list[tuple[int, _Image]]] = {}
    for img in images:
        file = Path(img.key[0])
        stem = file.name
        matches = list(_CHANNEL_TOKEN.finditer(stem))
        if not matches:
            return [[i] for i in images]
        token = matches[-1]
        key = str(file.parent / (stem[: token.start()] + stem[token.end():])) + img.key[1]
        groups.setdefault(key, []).append((int(token.group(3)), img))
    out = [[img for _, img in sorted(members, key=lambda m: m[0])] for members in groups.values()]
    counts = {len(g) for g in out}
    if len(counts) > 1:
        detail = ", ".join(f"{Path(g[0].key[0]).name}: {len(g)}" for g in out[:6])
        raise InputError(
            f"{root}: inconsistent channel counts per tile ({detail}); every field needs "
            "the same channel files"
        )
    return out


def _images_and_groups(root: Path) -> tuple[list[_Image], list[list[_Image]]]:
    """Every OME Image under ``root`` (each once), and the Images grouped into tiles."""
    counts = _PageCounts()
    images: list[_Image] = []
    seen: set[tuple[str, str]] = set()
    for file in _list_files(root):
        for img in _images_in_file(file, counts):
            if img.key not in seen:
                seen.add(img.key)
                images.append(img)
    return images, _group_by_channel_token(images, root)


def _has_timepoint(group: list[_Image], t: int) -> bool:
    """Whether every plane of time index ``t`` of a tile is stored (what reading needs)."""
    return 0 <= t < group[0].sizes["t"] and all(
        (c, z, t) in img.planes
        for img in group for c in range(img.sizes["c"]) for z in range(img.sizes["z"]))


def ome_tiff_timepoints(path: str | os.PathLike[str]) -> list[int]:
    """Time indices (``T``, from 0) that :func:`read_ome_tiff` can read: those below every
    tile's ``SizeT`` (grown by ``TiffData FirstT``) whose planes are all stored.

    Reads only the OME-XML, no pixels.

    Raises
    ------
    InputError
        As :func:`read_ome_tiff` does for unreadable files or metadata.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "a.ome.tif", np.zeros((3, 8, 8), np.uint8),
    ...                  metadata={"axes": "TYX"})
    >>> ome_tiff_timepoints(d)
    [0, 1, 2]
    """
    _, groups = _images_and_groups(Path(path))
    n = min(g[0].sizes["t"] for g in groups)
    # Only indices some plane is stored for can qualify: never loop over SizeT itself.
    stored = sorted({key[2] for g in groups for img in g for key in img.planes})
    return [t for t in stored if t < n and all(_has_timepoint(g, t) for g in groups)]


def _tile_position(img: _Image, timepoint: int, where: str) -> dict[str, float]:
    candidates = [(0, 0, timepoint)] + sorted(k for k in img.positions if k[2] == timepoint)
    for key in candidates + sorted(img.positions):
        if key in img.positions:
            return img.positions[key]
    if img.stage_label:
        return img.stage_label
    raise InputError(
        f"{where}: no stage position (Plane PositionX/Y, StagePosition or StageLabel) in the "
        "OME-XML; give positions with a TileConfiguration/CSV or --grid"
    )


def read_ome_tiff(
    path: str | os.PathLike[str],
    *,
    channel: int | str | None = None,
    timepoint: int | None = None,
    pixel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
) -> TileSet:
    """Read OME-TIFF tiles and their stage positions into a :class:`TileSet`.

    Parameters
    ----------
    path : path
        A folder of OME-TIFF files (searched recursively) or one multi-series OME-TIFF.
    channel : int or str, optional
        Keep only this channel (index or name); default all channels.
    timepoint : int, optional
        Time index to read (default 0, the first).
    pixel_size : float or sequence of float, optional
        Physical pixel size in ``unit`` (one number, or one per axis in index order);
        replaces ``PhysicalSizeX/Y/Z`` for converting positions to pixels.
    unit : str, optional
        NGFF unit (or abbreviation) of ``pixel_size``; default micrometre.

    Returns
    -------
    TileSet
        2D (``Y, X``) or 3D (``Z, Y, X``) tiles with translation affines in pixels; the
        pixel size in micrometres, or ``pixel_size`` in ``unit`` when given.

    Raises
    ------
    InputError
        For files that are not OME-TIFF, corrupt OME-XML, unknown units, missing physical
        pixel sizes or stage positions, missing plane files, tiles of different pixel
        sizes, or inconsistent channel counts. The message names the file.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for k, x_um in enumerate((0.0, 45.0)):
    ...     tifffile.imwrite(d / f"tile{k}.ome.tif", np.zeros((64, 64), np.uint16),
    ...                      metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
    ...                                "Plane": {"PositionX": [x_um], "PositionY": [10.0]}})
    >>> read_ome_tiff(d).positions().tolist()
    [[0.0, 0.0], [0.0, 90.0]]
    """
    root = Path(path)
    t = 0 if timepoint is None else int(timepoint)
    images, groups = _images_and_groups(root)
    n_channels = {sum(img.sizes["c"] for img in g) for g in groups}
    if len(n_channels) > 1:
        raise InputError(
            f"{root}: inconsistent channel counts per tile ({sorted(n_channels)}); every tile "
            "must have the same channels"
        )
    ndim = 3 if any(img.sizes["z"] > 1 for img in images) else 2
    override = normalise_pixel_size(pixel_size, ndim, root)
    override_unit = ngff_unit(unit or "micrometer", "unit")
    override_um = None if override is None else tuple(
        convert_length(v, override_unit, "micrometer") for v in override)
    per_tile: list[list[Any]] = []  # [tile][channel]: sized by the planes found, not SizeC
    names, spacing, raw_positions = [], [], []
    for group in groups:
        first = group[0]
        where = f"{first.key[0]} ({first.label})"
        if not 0 <= t < first.sizes["t"]:
            raise InputError(f"{where}: timepoint {t} does not exist (SizeT={first.sizes['t']})")
        channels: list[Any] = []
        for img in group:
            for c in range(img.sizes["c"]):
                planes = [_stored_plane(img, (c, z, t), where) for z in range(img.sizes["z"])]
                channels.append(open_tiff_planes(planes, name=f"{img.label} C{len(channels)}"))
        per_tile.append(channels)
        sizes = tuple(first.physical[a] for a in "zyx"[3 - ndim:])
        if override_um is not None:
            sizes = override_um
        elif any(s is None for s in sizes[-2:]):
            raise InputError(
                f"{where}: no PhysicalSizeX/PhysicalSizeY in the OME-XML; give --pixel-size"
            )
        spacing.append(sizes)
        pos = _tile_position(first, t, where)
        raw_positions.append([pos.get(a, 0.0) for a in "zyx"[3 - ndim:]])
        names.append(_tile_name(first, root, len(groups)))
    ref = spacing[0]
    for k, sizes in enumerate(spacing):
        if any((a is None) != (b is None) or (a and b and abs(a / b - 1) > 1e-6)
               for a, b in zip(sizes, ref, strict=True)):
            raise InputError(
                f"{names[k]}: pixel size {sizes} µm differs from {names[0]} {ref}; all tiles "
                "must share one pixel size"
            )
    pos_um = np.array(raw_positions, dtype=np.float64)
    _check_in_range(pos_um, names, ref)
    if ndim == 3 and ref[0] is None:  # no PhysicalSizeZ: taken as isotropic (= X)
        if np.ptp(pos_um[:, 0]) > 0:
            raise InputError(
                f"{root}: PositionZ differs between tiles but PhysicalSizeZ is missing; "
                "give --pixel-size"
            )
        ref = (ref[2], *ref[1:])
    scale = np.array([s if s is not None else 1.0 for s in ref])
    pixels = (pos_um - pos_um.min(axis=0)) / scale
    affines = np.stack([translation_affine(p) for p in pixels])
    sources = [list(tiles) for tiles in zip(*per_tile, strict=True)]
    channel_names = _channel_names(groups[0], len(sources))
    if override is not None:  # the pixel size as given, in its unit
        tiles = TileSet(sources, affines, names, channel_names, override, override_unit, root)
    else:
        tiles = TileSet(sources, affines, names, channel_names,
                        tuple(float(s) for s in scale), "micrometer", root)
    return tiles if channel is None else tiles.select_channel(channel)


def _stored_plane(img: _Image, key: tuple[int, int, int], where: str) -> tuple[Path, int]:
    """The ``(file, IFD)`` of plane ``(c, z, t)``; the first missing one ends the read, so
    sizes claimed beyond the stored planes cost one look-up, not a loop over them."""
    if key not in img.planes:
        c, z, t = key
        raise InputError(
            f"{where}: no TIFF page for C={c} Z={z} T={t} (SizeC={img.sizes['c']}, "
            f"SizeZ={img.sizes['z']}, SizeT={img.sizes['t']}; the TiffData locate "
            f"{len(img.planes)} plane(s))"
        )
    return img.planes[key]


def _check_in_range(pos_um: np.ndarray, names: list[str], spacing: Sequence[Any]) -> None:
    """Refuse stage positions whose spread in pixels overflows float64; name the tile."""
    scale = np.array([s if s is not None else 1.0 for s in spacing])
    with np.errstate(over="ignore", invalid="ignore"):
        spread = (pos_um - pos_um.min(axis=0)) / scale
    if np.isfinite(spread).all():
        return
    k = int(np.argmax(np.abs(pos_um).max(axis=1)))
    raise InputError(
        f"{names[k]}: stage position {pos_um[k].tolist()} µm (index order) is out of range "
        f"for pixels of {[float(s) for s in scale]} µm"
    )


def _tile_name(img: _Image, root: Path, n_tiles: int) -> str:
    file = Path(img.key[0])
    if root.is_dir():
        return file.relative_to(root.resolve()).as_posix()
    return f"{file.name} {img.label}" if n_tiles > 1 else file.name


def _channel_names(group: list[_Image], n: int) -> list[str]:
    """Channel Names from the OME-XML, else the channel token of each channel's file."""
    names: list[str] = []
    for img in group:
        files = {c: img.planes.get((c, 0, 0), (Path(img.key[0]), 0))[0]
                 for c in range(img.sizes["c"])}
        one_file_per_channel = len(group) > 1 or len(set(files.values())) == len(files) > 1
        for c in range(img.sizes["c"]):
            given = img.channel_names[c] if c < len(img.channel_names) else ""
            token = list(_CHANNEL_TOKEN.finditer(Path(files[c]).name))
            if not given and one_file_per_channel and token:
                given = f"C{token[-1].group(3)}"
            names.append(given or f"C{len(names)}")
    if len(set(names)) != len(names):
        names = [f"{name} ({k})" for k, name in enumerate(names)]
    return names[:n]


def _file_pixel_size(path: Path, ndim: int) -> tuple[float, ...] | None:
    """``PhysicalSizeX/Y[/Z]`` (µm, index order) of the first Image in ``path``'s OME-XML;
    None for a file without OME-XML or without a physical size (a missing ``Z`` is ``X``)."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path, is_ome=False) as tif:
            description = tif.pages[0].description if len(tif.pages) else ""
    except Exception:  # not a TIFF (PNG tiles), or unreadable: opening the tile says why
        return None
    if "<OME" not in description:
        return None
    try:  # the positions file places the tile: metadata it cannot use is no error
        root = parse_xml(description, path, "OME-XML")
        image = next((e for e in root if _local(e.tag) == "Image"), None)
        pixels = None if image is None else next(iter(_children(image, "Pixels")), None)
        if pixels is None:
            return None
        where = f"{path}: Image {image.get('ID', '?')}"  # type: ignore[union-attr]
        size = {a: _length_um(pixels, f"PhysicalSize{a.upper()}", where) for a in "xyz"}
    except InputError:
        return None
    if not (size["x"] and size["y"] and size["x"] > 0 and size["y"] > 0):
        return None
    if ndim == 3 and not (size["z"] and size["z"] > 0):
        size["z"] = size["x"]
    return tuple(float(size[a]) for a in "zyx"[3 - ndim:])  # type: ignore[arg-type]


def tiles_pixel_size(
    files: Sequence[Path], ndim: int, source: Path
) -> tuple[tuple[float, ...] | None, str | None]:
    """The pixel size the tile files' own OME-XML give, when they all give the same one.

    For positions files (TileConfiguration, CSV) listing OME-TIFF tiles. Returns the size
    (index order) in micrometres and ``"micrometer"``, or ``(None, None)``: when the first
    file has no OME pixel size (plain TIFF, PNG; the others are then not opened),
    silently; when only some have one, or they differ (by more than 1e-6 relative), with a
    :class:`MetadataWarning` naming ``source`` and two of the files.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for k in range(2):
    ...     tifffile.imwrite(d / f"t{k}.ome.tif", np.zeros((8, 8), np.uint8),
    ...                      metadata={"axes": "YX", "PhysicalSizeX": 0.25,
    ...                                "PhysicalSizeY": 0.25})
    >>> tiles_pixel_size([d / "t0.ome.tif", d / "t1.ome.tif"], 2, d / "pos.csv")
    ((0.25, 0.25), 'micrometer')
    """
    import warnings

    if not files or _file_pixel_size(Path(files[0]), ndim) is None:
        return None, None  # plain tiles: one look, not one per file
    found = {Path(f): _file_pixel_size(Path(f), ndim) for f in files}
    given = {f: size for f, size in found.items() if size is not None}
    (first, ref), *_ = given.items()
    if len(given) < len(found):
        missing = next(f for f, size in found.items() if size is None)
        warnings.warn(f"{source}: {len(given)} of {len(found)} tile files give a pixel size "
                      f"in their OME-XML ({first.name}: {ref} µm) but {missing.name} gives "
                      "none, so none is written; give --pixel-size", MetadataWarning,
                      stacklevel=2)
        return None, None
    for f, size in given.items():
        if any(abs(a / b - 1) > 1e-6 for a, b in zip(size, ref, strict=True)):
            warnings.warn(f"{source}: tile files give different pixel sizes ({first.name}: "
                          f"{ref} µm, {f.name}: {size} µm, index order), so none is written; "
                          "give --pixel-size", MetadataWarning, stacklevel=2)
            return None, None
    return ref, "micrometer"
