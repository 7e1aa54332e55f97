"""File-backed tile sources: TIFF (incl. OME-TIFF), PNG, JPEG and other Pillow formats.

:func:`open_tile` checks a tile file eagerly (exists, is an image, is complete, is a
supported single-channel 2D ``YX`` or 3D ``ZYX`` image, not empty) from its header only,
and returns a source whose :meth:`read` loads pixels lazily:

* :class:`ContiguousTiffSource` for uncompressed TIFFs whose pixels lie contiguously in
  the file: a read reads only the rows of its window, with ``pread`` (never a memory map,
  so a file truncated during a run is an error naming it, not a ``SIGBUS``).
* :class:`DecodedTileSource` for everything else (compressed or tiled TIFFs, PNG, JPEG):
  the first read decodes the whole tile into a process-wide LRU cache bounded in bytes
  (1 GiB by default, see :func:`set_tile_cache_bytes`); later windows are views of it.
  Threads asking for the same tile wait for one decode.

Arrays returned by ``read`` are **read-only** (views of the rows read or of the cached
tile); copy them before modifying. Sources hold only the path and header facts, so
pickling one is cheap and an unpickled source reads in any process.

Singleton axes (``T=1``, ``C=1``, ``Z=1`` of OME-TIFF series) are squeezed. Multichannel
images (RGB/RGBA, TIFF samples or channels) and time series are rejected by :func:`open_tile`
(RGB and RGBA tiles are read as three channels by :mod:`gpufusion.readers.rgb`);
:class:`CachedTileSource` is the base of sources decoded whole into the tile cache and
:class:`PlanewiseSource` of sources decoded plane by plane (chosen TIFF pages in
:mod:`gpufusion.readers.ome_tiff`, CZI sub-blocks in :mod:`gpufusion.readers.czi`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from gpufusion.errors import InputError
from gpufusion.readers.library_logs import TIFFFILE_LOG
from gpufusion.readers.paths import os_error_message
from gpufusion.readers.tiff_bounds import check_contiguous, check_segments
from gpufusion.sources import Window

__all__ = [
    "CachedTileSource",
    "PlanewiseSource",
    "DecodedTileSource",
    "ContiguousTiffSource",
    "MemmapTiffSource",
    "TileCacheInfo",
    "clear_tile_cache",
    "open_tile",
    "set_tile_cache_bytes",
    "tile_cache_info",
]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + CRC of the closing chunk
_PNG_TAIL_BYTES = 4096
_DEFAULT_CACHE_BYTES = 1 << 30
_MAX_OPEN_FILES = 128  # file descriptors kept open for uncompressed tiles
_Z_AXES = "ZQI"  # depth, "other" and generic image sequences count as Z
_OME_INDEX_MESSAGE = "OME series contains invalid TiffData index"
#: Pixel types a tile file may hold (bool, complex, object or string pixels are refused).
PIXEL_TYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
               "float16", "float32", "float64")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(path: Path | str, message: str) -> InputError:
    return InputError(_one_line(f"{path}: {message}"))


# --- tifffile log filter ----------------------------------------------------------------
# Leica Matrix Screener OME-TIFFs carry TiffData indices that tifffile rejects with a
# logged warning before falling back to reading the page itself, which is right for them.
# The filter drops only that message, only while this module is talking to tifffile on
# the current thread. Inside ``_tifffile_checked`` every other message tifffile logs about
# a tile file becomes one InputError naming it (see :mod:`.library_logs`).

_quiet_state = threading.local()


class _DropOmeIndexWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_quiet_state, "depth", 0) <= 0:
            return True
        return _OME_INDEX_MESSAGE not in record.getMessage()


logging.getLogger("tifffile").addFilter(_DropOmeIndexWarning())


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    _quiet_state.depth = getattr(_quiet_state, "depth", 0) + 1
    try:
        yield
    finally:
        _quiet_state.depth -= 1


@contextlib.contextmanager
def _tifffile_checked(path: Path) -> Iterator[None]:
    """Talk to tifffile quietly: what it logs about ``path`` becomes one InputError.

    An exception raised inside the block wins (it says more than a warning before it).
    """
    with _quiet_tifffile(), TIFFFILE_LOG.capture() as captured:
        yield
    messages = [m for m in captured if _OME_INDEX_MESSAGE not in m]
    if messages:
        more = f" (and {len(messages) - 1} more warnings)" if len(messages) > 1 else ""
        raise _fail(path, f"damaged TIFF: {messages[0]}{more}")


# --- caches -------------------------------------------------------------------------------


class TileCacheInfo(NamedTuple):
    """State of the decoded-tile cache (see :func:`tile_cache_info`)."""

    max_bytes: int
    nbytes: int
    entries: int
    hits: int
    misses: int


class _Pending:
    """Per-key lock and hand-over slot for a tile being decoded."""

    __slots__ = ("lock", "result", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.result: np.ndarray | None = None


class _TileCache:
    """Thread-safe LRU of read-only decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[Any, ...], _Pending] = {}
        self._nbytes = 0
        self._max_bytes = max_bytes
        self._hits = 0
        self._misses = 0

    def _lookup(self, key: tuple[Any, ...]) -> np.ndarray | None:
        array = self._entries.get(key)
        if array is not None:
            self._entries.move_to_end(key)
            self._hits += 1
        return array

    def _evict_to(self, limit: int) -> None:
        while self._entries and self._nbytes > limit:
            _, old = self._entries.popitem(last=False)
            self._nbytes -= old.nbytes

    def get(self, key: tuple[Any, ...], load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            array = self._lookup(key)
            if array is not None:
                return array
            pending = self._pending.setdefault(key, _Pending())
            pending.users += 1
        try:
            with pending.lock:
                with self._lock:
                    array = self._lookup(key)
                if array is not None:
                    return array
                if pending.result is not None:  # decoded by another thread, too big to keep
                    return pending.result
                array = load()
                array.setflags(write=False)
                with self._lock:
                    self._misses += 1
                    if array.nbytes <= self._max_bytes:
                        self._evict_to(self._max_bytes - array.nbytes)
                        self._entries[key] = array
                        self._nbytes += array.nbytes
                    else:
                        pending.result = array
                return array
        finally:
            with self._lock:
                pending.users -= 1
                if pending.users == 0:
                    del self._pending[key]

    def set_max_bytes(self, max_bytes: int) -> None:
        with self._lock:
            self._max_bytes = max_bytes
            self._evict_to(max_bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
            self._hits = 0
            self._misses = 0

    def contains(self, key: tuple[Any, ...]) -> bool:
        with self._lock:
            return key in self._entries

    def info(self) -> TileCacheInfo:
        with self._lock:
            return TileCacheInfo(
                self._max_bytes, self._nbytes, len(self._entries), self._hits, self._misses
            )


class _OpenFile:
    """A read-only file descriptor, closed when the last reference to it goes.

    A read holds a reference while it runs, so a descriptor dropped from the cache by
    another thread is never closed (or its number reused) under that read.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


class _OpenFiles:
    """Thread-safe LRU of open tile files, bounded in count (file descriptors)."""

    def __init__(self, max_files: int) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[tuple[Any, ...], _OpenFile] = OrderedDict()
        self._max_files = max_files

    def get(self, key: tuple[Any, ...], open_file: Callable[[], _OpenFile]) -> _OpenFile:
        with self._lock:
            handle = self._files.get(key)
            if handle is not None:
                self._files.move_to_end(key)
                return handle
            handle = open_file()
            self._files[key] = handle
            while len(self._files) > self._max_files:
                self._files.popitem(last=False)  # reads under way keep theirs open
            return handle

    def clear(self) -> None:
        with self._lock:
            self._files.clear()


_TILE_CACHE = _TileCache(_DEFAULT_CACHE_BYTES)
_OPEN_FILES = _OpenFiles(_MAX_OPEN_FILES)


def set_tile_cache_bytes(n: int) -> None:
    """Bound the process-wide cache of decoded tiles to ``n`` bytes.

    Tiles that cannot be read in place (compressed TIFF, PNG, JPEG) are decoded whole
    once and kept in this cache; the least recently used are dropped beyond the bound.
    A tile larger than the bound is decoded again for every read. ``0`` disables caching.

    Parameters
    ----------
    n : int
        The bound in bytes, ``>= 0``. The default is 1 GiB.

    Raises
    ------
    InputError
        If ``n`` is not a non-negative integer.

    Examples
    --------
    >>> set_tile_cache_bytes(256 * 2**20)
    >>> tile_cache_info().max_bytes
    268435456
    >>> set_tile_cache_bytes(2**30)
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise InputError(f"tile cache size must be a non-negative integer of bytes, got {n!r}")
    _TILE_CACHE.set_max_bytes(int(n))


def tile_cache_info() -> TileCacheInfo:
    """Return the decoded-tile cache's bound, size, entry count, hits and misses.

    Returns
    -------
    TileCacheInfo
        ``(max_bytes, nbytes, entries, hits, misses)``; ``misses`` counts decodes.

    Examples
    --------
    >>> info = tile_cache_info()
    >>> info.nbytes <= info.max_bytes
    True
    """
    return _TILE_CACHE.info()


def clear_tile_cache() -> None:
    """Drop every cached decoded tile and open tile file, and reset the hit/miss counters.

    Arrays already returned by ``read`` stay valid.

    Examples
    --------
    >>> clear_tile_cache()
    >>> tile_cache_info().entries
    0
    """
    _TILE_CACHE.clear()
    _OPEN_FILES.clear()


# --- sources ------------------------------------------------------------------------------


class _FileSource:
    """Common part of file-backed sources: path, header facts and a file stamp."""

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        stamp: tuple[int, int],
    ) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.name = name
        self._stamp = stamp  # (size, mtime_ns) when opened: the cache key and change check

    @property
    def _key(self) -> tuple[Any, ...]:
        return (str(self.path), *self._stamp)

    def _check_unchanged(self) -> None:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise _fail(self.path, os_error_message("tile file", exc, self.path)) from None
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise _fail(self.path, "tile file changed since it was opened; open it again")

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return (type(self).__name__, *self._key, self.shape, self.dtype.str, self.name)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, shape={self.shape}, dtype={self.dtype}, "
            f"path={str(self.path)!r})"
        )


class ContiguousTiffSource(_FileSource):
    """An uncompressed TIFF tile whose pixels lie contiguously in the file, read in place.

    Created by :func:`open_tile`. ``read(window)`` reads the rows the window spans, one
    ``pread`` per Z plane (one for all of them when the window spans whole planes), and
    returns a read-only view of them, so a window reads little more than its own bytes
    (whole rows) and nothing is decoded or cached but the open file. Reads never touch a
    memory map: a file truncated while a run reads it is an :class:`InputError` naming
    it, not a ``SIGBUS`` that kills the process. Pickles as the path plus header facts.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "t.tif"
    >>> tifffile.imwrite(path, np.arange(12, dtype=np.uint16).reshape(3, 4))
    >>> src = open_tile(path)
    >>> type(src).__name__, src.read((slice(1, 3), slice(0, 2))).tolist()
    ('ContiguousTiffSource', [[4, 5], [8, 9]])
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        stamp: tuple[int, int],
        offset: int,
        file_dtype: np.dtype,
    ) -> None:
        super().__init__(path, shape, dtype, name, stamp)
        self.offset = offset
        self.file_dtype = file_dtype

    def _open_file(self) -> _OpenFile:
        self._check_unchanged()
        try:
            return _OpenFile(os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)))
        except OSError as exc:
            raise _fail(self.path, os_error_message("tile file", exc, self.path)) from None

    def _read_into(self, handle: _OpenFile, buffer: np.ndarray, position: int) -> None:
        """Fill ``buffer`` from byte ``position`` of the file; a short file is an error."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = _pread_into(handle.fd, view[done:], position + done)
            if n == 0:
                size = os.fstat(handle.fd).st_size
                raise _fail(
                    self.path,
                    f"tile file is {size} bytes now but its pixels need bytes up to "
                    f"{position + len(view)}: it was truncated or rewritten after it was opened",
                )
            done += n

    def read(self, window: Window) -> np.ndarray:
        """Return the pixels in ``window`` as a read-only array (see class docs)."""
        window = tuple(window)
        window += (slice(None),) * (len(self.shape) - len(window))
        height, width = self.shape[-2:]
        zs = range(*window[0].indices(self.shape[0])) if len(self.shape) == 3 else range(1)
        ys = range(*window[-2].indices(height))
        xs = window[-1]
        if not zs or not ys or not range(*xs.indices(width)):
            out = np.empty((len(zs), len(ys), len(range(*xs.indices(width)))), self.dtype)
        else:
            lo, hi = min(ys), max(ys) + 1
            row_bytes = width * self.file_dtype.itemsize
            plane_bytes = height * row_bytes
            buffer = np.empty((len(zs), hi - lo, width), self.file_dtype)
            handle = _OPEN_FILES.get(self._key, self._open_file)
            if hi - lo == height and zs.step == 1:  # whole planes: one read
                self._read_into(handle, buffer, self.offset + zs.start * plane_bytes)
            else:
                for i, z in enumerate(zs):
                    self._read_into(handle, buffer[i], self.offset + z * plane_bytes
                                    + lo * row_bytes)
            if not self.file_dtype.isnative:
                buffer = buffer.byteswap(inplace=True).view(self.dtype)
            rows = slice(ys.start - lo, ys.stop - lo if ys.step > 0 else None, ys.step)
            out = buffer[:, rows, xs]
        out = out if len(self.shape) == 3 else out[0]
        out.setflags(write=False)
        return out


#: The former name of :class:`ContiguousTiffSource` (it used to memory-map the file).
MemmapTiffSource = ContiguousTiffSource


def _pread_into(fd: int, view: memoryview, position: int) -> int:
    """Read into ``view`` from byte ``position`` of ``fd`` without moving a file offset."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], position)
    data = os.pread(fd, len(view), position)
    view[: len(data)] = data
    return len(data)


class CachedTileSource(_FileSource):
    """Base of sources decoded whole on first read and kept in the process-wide tile cache.

    Subclasses implement ``_decode() -> ndarray`` (the whole tile, of ``shape`` and
    ``dtype``) and extend ``_key`` when one file holds several tiles (a page, sub-block or
    channel index), so that each tile has its own cache entry. ``read(window)`` returns a
    read-only view of the cached tile. Pickles as the path plus header facts.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> class Ramp(CachedTileSource):
    ...     def _decode(self):
    ...         return np.arange(6, dtype=self.dtype).reshape(self.shape)
    >>> path = Path(tempfile.mkdtemp()) / "f"
    >>> _ = path.write_bytes(b"x")
    >>> st = path.stat()
    >>> src = Ramp(path, (2, 3), np.dtype("uint8"), "ramp", (st.st_size, st.st_mtime_ns))
    >>> src.read((slice(1, 2), slice(0, 3))).tolist()
    [[3, 4, 5]]
    """

    def _decode(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, window: Window) -> np.ndarray:
        """Return the pixels in ``window`` as a read-only view of the cached tile."""
        return _TILE_CACHE.get(self._key, self._decode)[tuple(window)]


class PlanewiseSource(_FileSource):
    """Base of tiles stored as separately decodable 2D planes (TIFF pages, CZI sub-blocks).

    ``read(window)`` decodes only the Z planes the window needs, each once into the tile
    cache, so a 3D tile larger than the cache is never decoded whole. Subclasses implement
    ``_decode_planes(ks) -> list of (Y, X) arrays`` (planes missing from the cache, batched
    so that a file is opened once per read). 3D reads return a new read-only array.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> class Planes(PlanewiseSource):
    ...     def _decode_planes(self, ks):
    ...         return [np.full(self.shape[1:], k, self.dtype) for k in ks]
    >>> path = Path(tempfile.mkdtemp()) / "f"
    >>> _ = path.write_bytes(b"x")
    >>> src = Planes(path, (4, 2, 3), np.dtype("uint8"), "z", file_stamp(path))
    >>> src.read((slice(1, 3), slice(0, 1), slice(0, 1))).ravel().tolist()
    [1, 2]
    """

    def _decode_planes(self, ks: list[int]) -> list[np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _plane_key(self, k: int) -> tuple[Any, ...]:
        return (*self._key, k)

    def read(self, window: Window) -> np.ndarray:
        """Return the pixels in ``window`` as a read-only array."""
        window = tuple(window)
        planar = len(self.shape) == 2
        zs = [0] if planar else list(range(*window[0].indices(self.shape[0])))
        rest = window if planar else window[1:]
        decoded: dict[int, np.ndarray] = {}

        def loader(k: int) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                if k not in decoded:  # decode every plane still missing, in one batch
                    missing = [j for j in zs if j == k or
                               (j not in decoded and not _TILE_CACHE.contains(self._plane_key(j)))]
                    self._check_unchanged()
                    decoded.update(zip(missing, self._decode_planes(missing), strict=True))
                return np.ascontiguousarray(decoded.pop(k), dtype=self.dtype)

            return load

        planes = [_TILE_CACHE.get(self._plane_key(k), loader(k)) for k in zs]
        if planar:
            return planes[0][rest]
        out = np.empty((len(zs), *np.empty(self.shape[1:], dtype=bool)[rest].shape), self.dtype)
        for i, plane in enumerate(planes):
            out[i] = plane[rest]
        out.setflags(write=False)
        return out


class DecodedTileSource(CachedTileSource):
    """A tile decoded whole on first read and kept in the process-wide tile cache.

    Used for compressed or tiled TIFFs and for PNG/JPEG. Created by :func:`open_tile`.
    ``read(window)`` returns a read-only view of the cached tile. Pickles as the path
    plus header facts.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "t.tif"
    >>> tifffile.imwrite(path, np.arange(12, dtype=np.uint16).reshape(3, 4),
    ...                  compression="zlib")
    >>> src = open_tile(path)
    >>> type(src).__name__, src.read((slice(0, 1), slice(1, 3))).tolist()
    ('DecodedTileSource', [[1, 2]])
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        stamp: tuple[int, int],
        decoder: Literal["tiff", "tiff-local", "pillow"],
    ) -> None:
        super().__init__(path, shape, dtype, name, stamp)
        self.decoder = decoder

    def _decode(self) -> np.ndarray:
        self._check_unchanged()
        array = decode_image(self.path, self.decoder, int(np.prod(self.shape)), self.shape)
        if array.size != int(np.prod(self.shape)):
            raise _fail(self.path, f"decoded shape {array.shape} does not match {self.shape}")
        return np.ascontiguousarray(array.reshape(self.shape), dtype=self.dtype)


def decode_image(path: Path, decoder: str, size: int | None = None,
                 opened: tuple[int, ...] = ()) -> np.ndarray:
    """Decode a whole image file: series 0 of a TIFF (``decoder`` ``tiff``, or
    ``tiff-local`` to ignore OME metadata) or a PNG/JPEG (``pillow``).

    A TIFF whose series 0 no longer holds ``size`` elements, when given (the file was
    replaced since it was opened with shape ``opened``), is refused before anything is
    allocated; any decoder
    failure is an :class:`InputError` naming the file.
    """
    try:
        if decoder in ("tiff", "tiff-local"):
            import tifffile

            flags = {"is_ome": False} if decoder == "tiff-local" else {}
            with _tifffile_checked(path), tifffile.TiffFile(path, **flags) as tif:
                series = tif.series[0]
                if size is not None and int(np.prod(series.shape)) != size:  # never allocate
                    raise _fail(path, f"TIFF series 0 is {series.shape} now but was "
                                f"{opened} when opened; open it again")
                return series.asarray()
        import imageio.v3 as iio

        return iio.imread(path, plugin="pillow")
    except InputError:
        raise
    except Exception as exc:  # any decoder failure is a bad file
        raise _fail(path, f"cannot decode image ({type(exc).__name__}: {_one_line(exc)})"
                    ) from None


# --- opening ------------------------------------------------------------------------------


def _check_dtype(path: Path, dtype: np.dtype | None) -> np.dtype:
    dtype = None if dtype is None else np.dtype(dtype)
    if dtype is None or dtype.kind not in "iuf" or dtype.itemsize > 8:
        name = "of this file" if dtype is None else str(dtype)
        raise _fail(path, f"pixel type {name} not supported; expected one of "
                    f"{', '.join(PIXEL_TYPES)}")
    return dtype.newbyteorder("=") if not dtype.isnative else dtype


def _check_size(path: Path, shape: tuple[int, ...]) -> None:
    if 0 in shape:
        raise _fail(path, f"image is empty (shape {shape})")


def _squeeze_tiff_axes(path: Path, shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """Drop singleton axes; accept YX or one Z-like axis before YX."""
    kept: list[tuple[str, int]] = []
    for axis, size in zip(axes, shape, strict=True):
        if axis in "YX":
            kept.append((axis, size))
        elif size == 1:
            continue
        elif axis == "S":
            raise _fail(
                path,
                f"{size} samples per pixel in TIFF series axes {axes!r} shape {shape}: only "
                "RGB (3) or RGBA (4) colour samples are read (as channels R, G, B); other "
                "multi-sample tiles are not supported (save one file per channel)",
            )
        elif axis == "C":
            raise _fail(
                path,
                f"{size} channels in TIFF series axes {axes!r} shape {shape}: multichannel "
                "images are not supported yet as one file (only RGB colour); save one file "
                "per channel and list them in a positions CSV with a channel column",
            )
        elif axis == "T":
            raise _fail(
                path,
                f"{size} time points in TIFF series axes {axes!r}: time series are not "
                "supported; tiles must be 2D (YX) or 3D (ZYX) images",
            )
        elif axis in _Z_AXES:
            kept.append((axis, size))
        else:
            raise _fail(
                path,
                f"axis {axis!r} of size {size} in TIFF series axes {axes!r} is not supported; "
                "tiles must be 2D (YX) or 3D (ZYX) images",
            )
    kept_axes = "".join(axis for axis, _ in kept)
    if kept_axes[-2:] != "YX" or len(kept_axes) > 3:
        raise _fail(
            path,
            f"TIFF series axes {axes!r} shape {shape} not supported; tiles must be 2D (YX) "
            "or 3D (ZYX) images",
        )
    return tuple(size for _, size in kept)


# Series kinds whose pages may come from other files named in the metadata.
_MULTIFILE_KINDS = ("ome", "mmstack", "ndtiff")


def _pages_elsewhere(tif: Any, series: Any) -> bool:
    """True if series 0 takes pages from files other than ``tif`` (multi-file datasets)."""
    own = tif.filehandle.path
    pages = series if series.kind in _MULTIFILE_KINDS else [series[0]]
    return any(page is not None and page.parent.filehandle.path != own for page in pages)


def _inspect_tiff(
    path: Path, file_size: int, ignore_ome: bool
) -> tuple[tuple[int, ...], np.dtype, int | None, np.dtype] | None:
    """Check series 0 of a TIFF; return ``(shape, dtype, data offset, file dtype)``.

    Returns None when the series takes pages from other files, which happens for
    multi-file OME datasets (and for Leica exports whose OME-XML names the other
    channel's file): one file is one tile here, so the caller retries reading only
    this file's own pages (``ignore_ome=True``).
    """
    import tifffile
    from tifffile import TIFF

    from gpufusion.readers.tiff_compat import series_dims

    flags = {"is_ome": False} if ignore_ome else {}
    try:
        tif = tifffile.TiffFile(path, **flags)
    except Exception as exc:  # tifffile raises several types for corrupt headers
        raise _fail(path, f"not a readable TIFF ({_one_line(exc)})") from None
    with tif:
        try:
            if not tif.series:
                raise _fail(path, "TIFF file has no images")
            series = tif.series[0]
            if not ignore_ome and _pages_elsewhere(tif, series):
                return None
            shape = _squeeze_tiff_axes(path, *series_dims(tif, 0))
            dtype = _check_dtype(path, series.dtype)
            _check_size(path, shape)
            keyframe = series.keyframe
            if keyframe.compression != 1 and keyframe.compression not in TIFF.DECOMPRESSORS:
                raise _fail(
                    path,
                    f"TIFF compression {keyframe.compression!r} cannot be decoded here "
                    "(it needs the 'imagecodecs' package)",
                )
            if keyframe.predictor != 1 and keyframe.predictor not in TIFF.UNPREDICTORS:
                raise _fail(path, f"TIFF predictor {keyframe.predictor!r} not supported")
            offset = series.dataoffset
            if offset is not None:
                check_contiguous(path, series, dtype, shape, file_size)
            else:
                check_segments(path, series, dtype)
            return shape, dtype, offset, np.dtype(tif.byteorder + dtype.char)
        except InputError:
            raise
        except Exception as exc:  # corrupt IFDs surface while walking the series
            raise _fail(
                path, f"corrupt or truncated TIFF ({type(exc).__name__}: {_one_line(exc)})"
            ) from None


def _open_tiff(
    path: Path, name: str, stamp: tuple[int, int]
) -> ContiguousTiffSource | DecodedTileSource:
    with _tifffile_checked(path):
        facts = _inspect_tiff(path, stamp[0], ignore_ome=False)
        local = facts is None
        if facts is None:
            facts = _inspect_tiff(path, stamp[0], ignore_ome=True)
    assert facts is not None  # ignore_ome=True never defers
    shape, dtype, offset, file_dtype = facts
    if offset is not None:
        return ContiguousTiffSource(path, shape, dtype, name, stamp, int(offset), file_dtype)
    return DecodedTileSource(path, shape, dtype, name, stamp, "tiff-local" if local else "tiff")


def _open_pillow(path: Path, name: str, stamp: tuple[int, int], head: bytes) -> DecodedTileSource:
    import imageio.v3 as iio
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns (only) from 1x to 2x its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            props = iio.improps(path, plugin="pillow")
    except Exception as exc:  # Pillow raises several types for unknown or corrupt files
        cause = exc.__cause__ or exc.__context__  # imageio wraps Pillow's error
        if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
            cause = exc
        if isinstance(cause, Image.DecompressionBombError | Image.DecompressionBombWarning):
            raise _fail(
                path,
                f"refused as a possible decompression bomb: {str(cause).split(', could')[0]} "
                f"(Pillow's PIL.Image.MAX_IMAGE_PIXELS); save tiles this large as TIFF",
            ) from None
        raise _fail(
            path,
            f"not a readable image; expected TIFF, PNG, JPEG or another format Pillow "
            f"reads ({_one_line(exc)})",
        ) from None
    shape = tuple(int(n) for n in props.shape)
    if props.is_batch or (props.n_images or 1) > 1:
        raise _fail(
            path, f"multi-frame image (shape {shape}); 3D stacks are supported only as TIFF"
        )
    if len(shape) == 3 and shape[-1] == 2:
        raise _fail(path, f"gray+alpha image (shape {shape}) is not supported; save it as "
                    "grayscale (or RGB)")
    if len(shape) == 3 and shape[-1] in (3, 4):
        raise _fail(
            path,
            f"{'RGB' if shape[-1] == 3 else 'RGBA'} image (shape {shape}): multichannel "
            "images are not supported yet by open_tile, which reads one channel; colour tiles "
            "are read as channels R, G, B by gpufusion.readers.rgb.open_tile_channels and "
            "read_tileset",
        )
    if len(shape) != 2:
        raise _fail(path, f"image shape {shape} not supported; expected a 2D grayscale image")
    _check_size(path, shape)
    dtype = _check_dtype(path, props.dtype)
    if head.startswith(_PNG_MAGIC):
        # A complete PNG ends with an IEND chunk; allow some trailing bytes after it.
        with open(path, "rb") as fh:
            fh.seek(max(0, stamp[0] - _PNG_TAIL_BYTES))
            if _PNG_IEND not in fh.read():
                raise _fail(path, "PNG is truncated (no IEND chunk at the end of the file)")
    return DecodedTileSource(path, shape, dtype, name, stamp, "pillow")


def open_tile(
    path: str | os.PathLike[str], *, name: str | None = None
) -> ContiguousTiffSource | DecodedTileSource:
    """Open an image file as a lazy, picklable tile source.

    The header is checked now; pixels are read by ``source.read(window)``.
    TIFF files (recognised by content, any extension) are read with tifffile,
    series 0 with singleton axes squeezed; uncompressed contiguous ones are read in
    place (:class:`ContiguousTiffSource`), others decoded once into the tile
    cache (:class:`DecodedTileSource`). Other files go through imageio's Pillow plugin.

    Parameters
    ----------
    path : str or path-like
        The image file.
    name : str, optional
        The source's name (used in messages); defaults to the file name.

    Returns
    -------
    ContiguousTiffSource or DecodedTileSource
        A :class:`~gpufusion.sources.TileSource` with ``shape`` (``(y, x)`` or
        ``(z, y, x)``), ``dtype``, ``name`` and ``read``. ``read`` returns read-only
        arrays.

    Raises
    ------
    InputError
        If the file is missing or unreadable, not an image, a truncated TIFF or PNG,
        multichannel (RGB/RGBA, TIFF samples or channels), a time series, empty, or
        of an unsupported pixel type or compression. The message names the file.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "stack.tif"
    >>> tifffile.imwrite(path, np.zeros((5, 8, 6), np.uint16))
    >>> src = open_tile(path, name="tile 0")
    >>> src.shape, src.dtype.name, src.read((slice(0, 2), slice(None), slice(4, 6))).shape
    ((5, 8, 6), 'uint16', (2, 8, 2))
    """
    file_path = Path(path)
    try:
        st = file_path.stat()
        if not file_path.is_file():
            raise _fail(file_path, "not a file")
        with open(file_path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise _fail(file_path, os_error_message("image file", exc, file_path)) from None
    if not head:
        raise _fail(file_path, "image file is empty (0 bytes)")
    stamp = (int(st.st_size), int(st.st_mtime_ns))
    tile_name = file_path.name if name is None else name
    if head[:4] in _TIFF_MAGIC:
        return _open_tiff(file_path, tile_name, stamp)
    return _open_pillow(file_path, tile_name, stamp, head)


# --- file stamps --------------------------------------------------------------------------


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(size, mtime_ns)`` of a file, the change stamp file sources keep.

    Raises
    ------
    InputError
        If the file is missing, not a regular file or unreadable.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "f.bin"
    >>> _ = path.write_bytes(b"abc")
    >>> file_stamp(path)[0]
    3
    """
    file_path = Path(path)
    try:
        st = file_path.stat()
    except OSError as exc:
        raise _fail(file_path, os_error_message("image file", exc, file_path)) from None
    if not file_path.is_file():
        raise _fail(file_path, "not a file")
    return int(st.st_size), int(st.st_mtime_ns)
