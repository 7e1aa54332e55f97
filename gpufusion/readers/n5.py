"""A minimal N5 dataset reader, bounded by what the dataset can hold.

N5 (github.com/saalfeldlab/n5, README "File-system specification"): a dataset's
``attributes.json`` gives ``dimensions``, ``blockSize`` (both ``x`` first), ``dataType``
and ``compression``; block ``(i, j, k)`` is the file ``i/j/k``: a big-endian header (mode,
number of dimensions, the block's size per dimension; mode 1 adds an element count)
followed by the compressed big-endian pixels, ``x`` fastest. zarr 3 reads no N5, hence this
reader (used by BigDataViewer's ``bdv.n5`` loader, :mod:`gpufusion.readers.bigstitcher`).

Every size a block states is checked against ``blockSize`` before anything is
decompressed, and decompression stops at the bytes that size can hold: a block that would
inflate beyond them (a decompression bomb) is refused, naming the block file.
"""

from __future__ import annotations

import bz2
import json
import lzma
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["N5_COMPRESSIONS", "N5DatasetSource"]

#: N5 ``dataType`` values that are pixels (``object`` blocks are not).
_N5_TYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
             "float32", "float64")

#: N5 ``compression`` types this reader decodes.
N5_COMPRESSIONS = ("raw", "gzip", "bzip2", "xz", "blosc", "zstd")

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _fail(path: Path, message: str) -> InputError:
    return InputError(" ".join(f"{path}: {message}".split()))


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sizes(attrs: dict[str, Any], key: str, file: Path) -> tuple[int, ...]:
    """``dimensions`` / ``blockSize``: three whole numbers >= 1, ``x`` first."""
    value = attrs.get(key)
    if not isinstance(value, list) or len(value) != 3 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        and float(v).is_integer() and v >= 1 for v in value
    ):
        raise _fail(file, f"N5 {key} must be a list of 3 whole numbers >= 1 (x, y, z), "
                          f"got {_brief(value)}")
    return tuple(int(v) for v in value)


def _compression(attrs: dict[str, Any], file: Path) -> dict[str, Any]:
    compression = attrs.get("compression")
    if compression is None:  # N5 before 1.0: "compressionType"
        compression = {"type": attrs.get("compressionType", "raw")}
    if not isinstance(compression, dict):
        raise _fail(file, f"N5 compression must be an object with a 'type', got "
                          f"{_brief(compression)}")
    kind = compression.get("type", "raw")
    if kind not in N5_COMPRESSIONS:
        raise _fail(file, f"N5 compression {_brief(kind)} is not supported "
                          f"({', '.join(N5_COMPRESSIONS)} are)")
    return compression


def _declared_size(kind: str, payload: bytes) -> int | None:
    """Uncompressed size a blosc or zstd frame states in its header, if it states one."""
    if kind == "blosc":  # blosc 1 header: version, flags, typesize, then nbytes (uint32 LE)
        return struct.unpack_from("<I", payload, 4)[0] if len(payload) >= 16 else None
    if len(payload) < 6 or payload[:4] != _ZSTD_MAGIC:  # zstd frame header, RFC 8878 3.1.1
        return None
    descriptor = payload[4]
    single_segment = descriptor >> 5 & 1
    field = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    if not field:
        return None
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    if len(payload) < start + field:
        return None
    return int.from_bytes(payload[start : start + field], "little") + (256 if field == 2 else 0)


def _inflate(kind: str, payload: bytes, limit: int, file: Path) -> bytes:
    """Decompress ``payload``, producing at most ``limit`` bytes; refuse more."""
    if kind == "raw":
        return payload
    if kind in ("blosc", "zstd"):
        declared = _declared_size(kind, payload)
        if declared is not None and declared > limit:
            raise _fail(file, f"N5 {kind} block inflates to {declared} bytes, more than the "
                              f"{limit} its header allows; refused")
        import numcodecs

        codec = numcodecs.Blosc() if kind == "blosc" else numcodecs.Zstd()
        # ``out`` bounds frames that state no size; one stating fewer bytes stays short.
        size = limit if declared is None else declared
        return bytes(codec.decode(payload, out=bytearray(size)))
    if kind == "gzip":
        inflater: Any = zlib.decompressobj(47)  # 47: gzip or zlib header, detected
        data = inflater.decompress(payload, limit + 1)
    else:
        inflater = bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor()
        data = inflater.decompress(payload, max_length=limit + 1)
    if len(data) > limit:
        raise _fail(file, f"N5 {kind} block inflates beyond the {limit} bytes its header "
                          "allows; refused")
    if not inflater.eof:
        raise _fail(file, f"corrupt N5 block (the {kind} stream is truncated)")
    return data


class N5DatasetSource:
    """One N5 dataset (``(x, y, z)`` on disk, ``(z, y, x)`` here), read block by block.

    Missing blocks read as 0. Pickles as the path and the attributes.

    Raises
    ------
    InputError
        For a missing or unreadable ``attributes.json``, sizes that are not three whole
        numbers >= 1, a ``dataType`` that is not pixels, or an unsupported compression
        (on opening); for a corrupt block, one whose header disagrees with ``blockSize``,
        or one that inflates beyond its stated size (on reading). Messages name the file.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "attributes.json").write_text('{"dimensions": [4, 3, 2], '
    ...     '"blockSize": [4, 3, 2], "dataType": "uint8", "compression": {"type": "gzip"}}')
    >>> (d / "0" / "0").mkdir(parents=True)
    >>> pixels = bytes(range(24))
    >>> _ = (d / "0" / "0" / "0").write_bytes(struct.pack(">HH3I", 0, 3, 4, 3, 2)
    ...                                       + zlib.compress(pixels))
    >>> src = N5DatasetSource(d, "tile")
    >>> src.shape, src.read((slice(1, 2), slice(0, 1), slice(None))).tolist()
    ((2, 3, 4), [[[12, 13, 14, 15]]])
    >>> _ = (d / "0" / "0" / "0").write_bytes(struct.pack(">HH3I", 0, 3, 4, 3, 2)
    ...                                       + zlib.compress(bytes(10**6)))
    >>> src.read((slice(0, 1), slice(0, 1), slice(0, 1)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: .../0/0/0: N5 gzip block inflates beyond the 24 bytes ...
    """

    def __init__(self, path: Path, name: str) -> None:
        attrs_file = path / "attributes.json"
        try:
            attrs = json.loads(attrs_file.read_text())
        except FileNotFoundError:
            raise _fail(attrs_file, "N5 dataset not found (no attributes.json)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _fail(attrs_file, f"not an N5 dataset's attributes (invalid JSON: {exc})") \
                from None
        if not isinstance(attrs, dict):
            raise _fail(attrs_file, f"N5 attributes must be a JSON object, got {_brief(attrs)}")
        dims = _sizes(attrs, "dimensions", attrs_file)
        block = _sizes(attrs, "blockSize", attrs_file)
        if attrs.get("dataType") not in _N5_TYPES:
            raise _fail(attrs_file, f"N5 dataType {_brief(attrs.get('dataType'))} is not "
                                    f"pixels (one of {', '.join(_N5_TYPES)})")
        self.compression = _compression(attrs, attrs_file)
        self.path, self.name = path, name
        self.shape = tuple(dims[::-1])
        self.block = tuple(block[::-1])
        self.dtype = np.dtype(attrs["dataType"])

    def _block(self, index: tuple[int, ...]) -> np.ndarray | None:
        file = self.path.joinpath(*(str(i) for i in index[::-1]))
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            mode, ndim = struct.unpack(">HH", raw[:4])
            dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        except struct.error:
            raise _fail(file, f"corrupt N5 block (a header of {len(raw)} bytes)") from None
        if mode not in (0, 1):
            raise _fail(file, f"N5 block mode {mode} is not image data (0 or 1)")
        if len(dims) != len(self.block) or any(
                d > b for d, b in zip(dims, self.block[::-1], strict=True)):
            raise _fail(file, f"N5 block header size {list(dims)} does not fit the blockSize "
                              f"{list(self.block[::-1])}")
        expected = math.prod(dims) * self.dtype.itemsize
        offset = 4 + 4 * ndim + (4 if mode == 1 else 0)
        kind = self.compression.get("type", "raw")
        try:
            data = _inflate(kind, raw[offset:], expected, file)
            array = np.frombuffer(data, dtype=self.dtype.newbyteorder(">"),
                                  count=math.prod(dims))
            return array.reshape(dims[::-1]).astype(self.dtype)
        except InputError:
            raise
        except Exception as exc:  # truncated block, wrong codec: every decoder's own type
            raise _fail(file, f"corrupt N5 block ({type(exc).__name__}: {exc})") from None

    def read(self, window: tuple[slice, ...]) -> np.ndarray:
        """Return the pixels in ``window`` (slices with step 1)."""
        bounds = [s.indices(n)[:2] for s, n in zip(window, self.shape, strict=True)]
        out = np.zeros(tuple(max(b - a, 0) for a, b in bounds), dtype=self.dtype)
        ranges = [range(a // bs, (b - 1) // bs + 1) if b > a else range(0)
                  for (a, b), bs in zip(bounds, self.block, strict=True)]
        for index in np.ndindex(*(len(r) for r in ranges)):
            grid = tuple(r[i] for r, i in zip(ranges, index, strict=True))
            block = self._block(grid)
            if block is None:
                continue
            src, dst = [], []
            for g, bs, (a, b), n in zip(grid, self.block, bounds, block.shape, strict=True):
                lo, hi = max(a, g * bs), min(b, g * bs + n)
                src.append(slice(lo - g * bs, hi - g * bs))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = block[tuple(src)]
        return out
