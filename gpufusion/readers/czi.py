"""Zeiss CZI mosaics: tiles and positions from the sub-block directory.

A CZI mosaic stores every tile (mosaic index ``M``, per scene ``S``) as its own sub-block;
the directory entry of each sub-block gives its start ``X``/``Y`` in the mosaic's pixel
frame (and ``Z``, ``C``, ``T`` indices), which is where the acquisition software placed
it. Those starts are the nominal positions returned here (shifted so the smallest is 0).
The pixel size comes from ``Scaling/Items/Distance`` (metres) in the CZI metadata.

Reading uses `czifile <https://pypi.org/project/czifile/>`_ (BSD, pure Python, by the
author of tifffile), imported only when a CZI is opened. Its API changed between the
release installable on Python 3.11 (2019.7.2.x) and the 2026 rewrite (Python >= 3.12);
:func:`_entry_facts` and :func:`_read_subblock` are the only places that touch it and
handle both. Sources hold the path and the file offsets of their sub-blocks and decode
on first read into the shared tile cache, so they pickle cheaply.

Only pyramid level 0 is read. Sub-blocks of all scenes are tiles of one mosaic (their
starts share one frame). RGB pixel types are not supported.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..layout import translation_affine
from .images import PlanewiseSource, file_stamp
from .library_logs import CZIFILE_LOG, library_message
from .tileset import TileSet, normalise_pixel_size

__all__ = ["CziTileSource", "czi_timepoints", "read_czi"]


def _czifile() -> Any:
    try:
        import czifile
    except ImportError:
        raise InputError(
            "reading CZI files needs the 'czifile' package (pip install czifile)"
        ) from None
    return czifile


@contextlib.contextmanager
def _czifile_checked(path: Path) -> Iterator[None]:
    """Talk to czifile: what it warns (2019.x) or logs (2026+) about ``path`` is an InputError.

    czifile reports a damaged file (an unknown segment, a missing directory, an unfinished
    write) as a warning, raw bytes included, and carries on; here the first such report
    ends the read with one line naming the file. It names the cause better than a failure
    that follows it, so it wins over an exception from the block. Python's warning
    filters are process-wide: use this on the thread that reads the directory, not in the
    fusion tasks (:meth:`CziTileSource._decode_planes` checks segments itself).
    """
    failure: Exception | None = None
    with warnings.catch_warnings(record=True) as caught, CZIFILE_LOG.capture() as logged:
        warnings.simplefilter("always")
        try:
            yield
        except Exception as exc:  # re-raised below unless czifile said what is wrong
            failure = exc
    own = [w for w in caught if "czifile" in w.filename]
    for w in caught:  # warnings from elsewhere go on as if not caught
        if w not in own:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    messages = [library_message(str(w.message)) for w in own] + logged
    if messages:
        raise InputError(f"{path}: damaged CZI file: {messages[0]}") from None
    if failure is not None:
        raise failure


def _open(path: Path, check_warnings: bool = True) -> Any:
    czi = None
    try:
        with _czifile_checked(path) if check_warnings else contextlib.nullcontext():
            czi = _czifile().CziFile(str(path))
        return czi
    except InputError:
        if czi is not None:  # opened, but czifile warned about it
            czi.close()
        raise
    except Exception as exc:  # czifile raises ValueError and others for non-CZI files
        message = " ".join(str(exc).split())
        raise InputError(f"{path}: not a readable CZI file ({message})") from None


#: The segment id a sub-block starts with (16 bytes, NUL padded).
_SUBBLOCK_ID = b"ZISRAWSUBBLOCK\0\0"


def _check_subblock_ids(path: Path, positions: list[int]) -> None:
    """Check that a sub-block segment starts at each file offset, before czifile reads it."""
    with open(path, "rb") as fh:
        for position in positions:
            fh.seek(position)
            found = fh.read(len(_SUBBLOCK_ID))
            if len(found) < len(_SUBBLOCK_ID):
                raise InputError(
                    f"{path}: CZI file is truncated: it ends at byte {fh.seek(0, os.SEEK_END)}, "
                    f"before the sub-block at byte {position}"
                )
            if found != _SUBBLOCK_ID:
                raise InputError(
                    f"{path}: damaged CZI file: no sub-block segment at byte {position} "
                    f"(found {library_message(repr(found))})"
                )


def _entry_facts(czi: Any, entry: Any) -> tuple[dict[str, tuple[int, int, int]], np.dtype, int]:
    """``{dim: (start, size, stored size)}``, dtype and samples per pixel of an entry."""
    if hasattr(entry, "dimension_entries"):  # czifile 2019.x (the release for Python 3.11)
        dims = {str(d.dimension): (int(d.start), int(d.size), int(d.stored_size))
                for d in entry.dimension_entries}
        full = np.dtype(entry.dtype)
        samples = int(np.prod(full.shape)) if full.shape else 1
        return dims, full.base, samples
    # czifile >= 2026 (Python >= 3.12)
    dims = {str(k): (int(d.start), int(d.size), int(d.stored_size or d.size))
            for k, d in entry.read_dimension_entries(czi).items()}
    return dims, np.dtype(entry.pixel_type.dtype), int(entry.pixel_type.samples)


def _read_subblock(czi: Any, position: int) -> np.ndarray:
    """Decode the pixels of the sub-block segment at file offset ``position``."""
    module = sys.modules[type(czi).__module__]
    if hasattr(module, "CziSegment"):  # czifile >= 2026
        segment = module.CziSegment(czi, position).data()
    else:  # czifile 2019.x
        segment = module.Segment(czi._fh, position).data()
    return np.asarray(segment.data())


class CziTileSource(PlanewiseSource):
    """One tile (one channel, one time point) of a CZI mosaic, decoded plane by plane.

    Created by :func:`read_czi`. ``subblocks`` holds ``(file offset, first z, z count)``
    of the sub-blocks that make up the tile (usually one 2D sub-block per Z plane); a
    read decodes only the sub-blocks its planes need, each plane once into the tile cache.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        stamp: tuple[int, int],
        subblocks: tuple[tuple[int, int, int], ...],
    ) -> None:
        super().__init__(path, shape, dtype, name, stamp)
        self.subblocks = subblocks

    @property
    def _key(self) -> tuple[Any, ...]:
        return (*super()._key, self.subblocks)

    def _decode_planes(self, ks: list[int]) -> list[np.ndarray]:
        blocks = {k: next((b for b in self.subblocks if b[1] <= k < b[1] + b[2]), None)
                  for k in ks}
        # checked here, not by czifile's warnings (process-wide filters; this is a worker)
        _check_subblock_ids(self.path, sorted({b[0] for b in blocks.values() if b}))
        plane_shape = self.shape[-2:]
        decoded: dict[int, np.ndarray] = {}
        out = []
        czi = _open(self.path, check_warnings=False)
        try:
            with CZIFILE_LOG.capture() as logged:  # czifile >= 2026 logs damage and goes on
                for k in ks:
                    block = blocks[k]
                    if block is None:  # no sub-block holds this plane
                        out.append(np.zeros(plane_shape, self.dtype))
                        continue
                    if block[0] not in decoded:
                        data = _read_subblock(czi, block[0])
                        decoded[block[0]] = data.reshape(-1, *plane_shape)
                    out.append(decoded[block[0]][k - block[1]])
            if logged:
                raise InputError(f"{self.path}: damaged CZI file: {logged[0]}")
        except InputError:
            raise
        except Exception as exc:  # decoder failures (codec missing, corrupt data)
            raise InputError(
                f"{self.path}: cannot decode CZI sub-block ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())})"
            ) from None
        finally:
            czi.close()
        return out


def _pixel_size_um(metadata: str | None, path: Path) -> tuple[float | None, float | None,
                                                             float | None]:
    """``(z, y, x)`` distances in micrometres from ``Scaling/Items/Distance`` (metres)."""
    if not metadata:
        return None, None, None
    try:
        root = ET.fromstring(metadata)
    except ET.ParseError as exc:
        raise InputError(f"{path}: corrupt CZI metadata XML (line {exc.position[0]})") from None
    values: dict[str, float] = {}
    for dist in root.iter("Distance"):
        value = dist.find("Value")
        if dist.get("Id") in ("X", "Y", "Z") and value is not None and value.text:
            try:
                values[dist.get("Id", "")] = float(value.text) * 1e6
            except ValueError:
                raise InputError(
                    f"{path}: Scaling Distance {dist.get('Id')} is not a number: {value.text!r}"
                ) from None
    return values.get("Z"), values.get("Y"), values.get("X")


def _channel_names(metadata: str | None, n: int) -> list[str]:
    names: list[str] = []
    if metadata:
        root = ET.fromstring(metadata)
        for dims in root.iter("Dimensions"):
            channels = dims.find("Channels")
            if channels is not None:
                names = [c.get("Name") or c.get("Id") or "" for c in channels.findall("Channel")]
                break
    names = [name or f"C{k}" for k, name in enumerate(names[:n])]
    return names + [f"C{k}" for k in range(len(names), n)]


_Entry = tuple[Any, dict[str, tuple[int, int, int]], np.dtype, int]


def _czi_part(file: Path, part: str, read: Any) -> Any:
    """``read()`` a part of the file; any failure is an InputError naming the part.

    czifile 2019.x warns about an unknown segment id (see :func:`_czifile_checked`);
    czifile 2026.10 raises ``ValueError("invalid CziSegment ID ...")`` with the raw bytes
    in it: both become "damaged CZI file", printable ASCII only.
    """
    try:
        return read()
    except Exception as exc:  # truncated or corrupt segments
        raise InputError(
            f"{file}: damaged CZI file: corrupt {part} ({type(exc).__name__}: "
            f"{library_message(str(exc))})"
        ) from None


def _mosaic_entries(file: Path) -> tuple[list[_Entry], str | None]:
    """Full-resolution directory entries (entry, dims, dtype, samples) and the metadata.

    Raises
    ------
    InputError
        For a file that is not a readable CZI, a corrupt directory, or no mosaic index.
    """
    czi = _open(file)
    try:
        with _czifile_checked(file):
            directory = _czi_part(file, "sub-block directory", lambda: list(czi.subblock_directory))
            metadata = _czi_part(file, "metadata segment", czi.metadata)
            entries = [(e, *_entry_facts(czi, e)) for e in directory if int(e.pyramid_type) == 0]
    finally:
        czi.close()
    entries = [item for item in entries
               if all(item[1][a][1] == item[1][a][2] for a in "XY" if a in item[1])]
    if not entries:
        raise InputError(f"{file}: no image sub-blocks at full resolution")
    if all("M" not in dims for _, dims, _, _ in entries):
        raise InputError(
            f"{file}: CZI without mosaic positions (no M index in the sub-block directory); "
            "this file holds a single field of view, nothing to stitch"
        )
    return entries, metadata


def _t_values(entries: list[_Entry]) -> list[int]:
    return sorted({dims.get("T", (0, 1, 1))[0] for _, dims, _, _ in entries})


def czi_timepoints(path: str | os.PathLike[str]) -> list[int]:
    """The time indices (``T`` starts of the sub-blocks, sorted) of a CZI mosaic.

    Reads only the sub-block directory; each is a valid ``timepoint`` of :func:`read_czi`.

    Raises
    ------
    InputError
        As :func:`read_czi` does for unreadable files or files without mosaic positions.

    Examples
    --------
    >>> czi_timepoints("mosaic_test.czi")  # doctest: +SKIP
    [0]
    """
    return _t_values(_mosaic_entries(Path(path))[0])


def read_czi(
    path: str | os.PathLike[str],
    *,
    channel: int | str | None = None,
    timepoint: int | None = None,
    pixel_size: float | tuple[float, ...] | None = None,
    unit: str | None = None,
) -> TileSet:
    """Read the tiles of a CZI mosaic at the positions of its sub-block directory.

    Parameters
    ----------
    path : path
        The ``.czi`` file.
    channel : int or str, optional
        Keep only this channel (index or name); default all.
    timepoint : int, optional
        Time index (``T``) to read; default the first.
    pixel_size : float or tuple of float, optional
        Physical pixel size in ``unit``, replacing the metadata's (positions are in pixels:
        it is only metadata).
    unit : str, optional
        NGFF unit (or abbreviation) of ``pixel_size``; default micrometre.

    Returns
    -------
    TileSet
        One tile per (scene, mosaic index); 2D, or 3D when tiles have several Z planes.

    Raises
    ------
    InputError
        If ``czifile`` is missing, the file is not a CZI, has no mosaic index (a single
        field, nothing to stitch), has RGB pixels, or tiles differ in size or channels.

    Examples
    --------
    >>> ts = read_czi("mosaic_test.czi")  # doctest: +SKIP
    >>> ts.positions().tolist(), ts.mosaics()[0].shape  # doctest: +SKIP
    ([[0.0, 0.0], [0.0, 832.0]], (624, 1756))
    """
    file = Path(path)
    stamp = file_stamp(file)
    entries, metadata = _mosaic_entries(file)
    t_values = _t_values(entries)
    t = t_values[0] if timepoint is None else int(timepoint)
    if t not in t_values:
        raise InputError(f"{file}: timepoint {t} does not exist (T indices {t_values})")
    _check_subblock_ids(file, sorted(int(e.file_position) for e, *_ in entries))
    tiles: dict[tuple[int, int], dict[int, list[tuple[Any, dict, np.dtype, int]]]] = {}
    for entry, dims, dtype, samples in entries:
        if dims.get("T", (0, 1, 1))[0] != t:
            continue
        if samples != 1:
            raise InputError(f"{file}: RGB (multi-sample) CZI pixels are not supported")
        key = (dims.get("S", (0, 1, 1))[0], dims.get("M", (0, 1, 1))[0])
        tiles.setdefault(key, {}).setdefault(dims.get("C", (0, 1, 1))[0], []).append(
            (entry, dims, dtype, samples))
    channels = sorted({c for per_c in tiles.values() for c in per_c})
    z_lo = min(dims.get("Z", (0, 1, 1))[0] for _, dims, _, _ in entries)
    z_hi = max(sum(dims.get("Z", (0, 1, 1))[:2]) for _, dims, _, _ in entries)
    ndim = 3 if z_hi - z_lo > 1 else 2
    sources: list[list[CziTileSource]] = [[] for _ in channels]
    names, starts = [], []
    for (scene, m), per_c in sorted(tiles.items()):
        name = f"S{scene} M{m}" if len({s for s, _ in tiles}) > 1 else f"M{m}"
        if sorted(per_c) != channels:
            raise InputError(
                f"{file}: inconsistent channel counts per tile: tile {name} has channels "
                f"{sorted(per_c)}, the file has {channels}"
            )
        first = per_c[channels[0]][0][1]
        y0, x0 = first["Y"][0], first["X"][0]
        for k, c in enumerate(channels):
            blocks = per_c[c]
            shape_yx = (blocks[0][1]["Y"][1], blocks[0][1]["X"][1])
            if any((b[1]["Y"][1], b[1]["X"][1]) != shape_yx or
                   (b[1]["Y"][0], b[1]["X"][0]) != (y0, x0) for b in blocks):
                raise InputError(f"{file}: sub-blocks of tile {name} differ in size or start")
            shape = (z_hi - z_lo, *shape_yx) if ndim == 3 else shape_yx
            subblocks = tuple(sorted(
                (int(b[0].file_position), b[1].get("Z", (0, 1, 1))[0] - z_lo,
                 b[1].get("Z", (0, 1, 1))[1]) for b in blocks))
            sources[k].append(CziTileSource(file, shape, blocks[0][2], name, stamp, subblocks))
        names.append(name)
        starts.append((z_lo, y0, x0)[3 - ndim:])
    pos = np.asarray(starts, dtype=np.float64)
    pos -= pos.min(axis=0)
    affines = np.stack([translation_affine(p) for p in pos])
    size = normalise_pixel_size(pixel_size, ndim, file)
    size_unit = unit or "micrometer"
    if size is None:
        zyx = _pixel_size_um(metadata, file)[3 - ndim:]
        size = None if any(v is None for v in zyx) else tuple(float(v) for v in zyx)
        size_unit = "micrometer"
    result = TileSet(sources, affines, names, _channel_names(metadata, len(channels)), size,
                     size_unit if size is not None else None, file)
    return result if channel is None else result.select_channel(channel)
