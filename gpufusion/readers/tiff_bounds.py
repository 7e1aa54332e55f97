"""Bounds on what a TIFF header may claim: no allocation larger than the file can fill.

A TIFF header states the image size (``ImageWidth``, ``ImageLength``, ...) and where the
pixels are (``StripOffsets``/``TileOffsets`` and their byte counts). A 50 KB file can
claim 100000 x 100000 pixels, and a reader that trusts it allocates 18.6 GiB before it
finds out. :func:`check_contiguous` and :func:`check_segments` compare the claim with the
file before anything is decoded, and raise :class:`~gpufusion.errors.InputError` naming
the file and the fields when they disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpufusion.errors import InputError

__all__ = ["check_contiguous", "check_segments", "size_text"]


def _fail(path: Path, message: str) -> InputError:
    return InputError(" ".join(f"{path}: {message}".split()))


#: Most bytes one byte of a compressed TIFF segment can decode to, for the codecs whose
#: worst case is known: LZW (a code of >= 9 bits yields at most 4096 bytes), Deflate (258
#: bytes per 2 bits) and PackBits (128 bytes per 2). Other codecs (JPEG, Zstandard, ...)
#: are only checked for segment count and extent.
_MAX_EXPANSION = {5: 4096 * 8 // 9 + 1, 8: 1032, 32946: 1032, 32773: 64}


def size_text(n: int) -> str:
    """``n`` bytes in binary units.

    Examples
    --------
    >>> size_text(512), size_text(8448), size_text(20_000_000_000)
    ('512 B', '8.2 KiB', '18.6 GiB')
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, k = float(n), 0
    while value >= 1024 and k < len(units) - 1:
        value, k = value / 1024, k + 1
    return f"{n} B" if k == 0 else f"{value:.1f} {units[k]}"


def _dims_text(series: Any, dtype: np.dtype) -> str:
    """The TIFF fields that size an image: ``ImageWidth x ImageLength 64 x 48 (uint16)``."""
    key = series.keyframe
    text = f"ImageWidth x ImageLength {key.imagewidth} x {key.imagelength}"
    if key.imagedepth > 1:
        text += f" x ImageDepth {key.imagedepth}"
    if key.samplesperpixel > 1:
        text += f" x SamplesPerPixel {key.samplesperpixel}"
    pages = len(series)
    return text + (f" in {pages} pages" if pages > 1 else "") + f" ({dtype})"


def _covered_bytes(offsets: np.ndarray, counts: np.ndarray) -> int:
    """Bytes of the file that the segments ``[offset, offset + count)`` cover (overlaps once)."""
    if offsets.size == 0:
        return 0
    order = np.argsort(offsets, kind="stable")
    starts, ends = offsets[order], offsets[order] + counts[order]
    reach = np.concatenate((starts[:1], np.maximum.accumulate(ends)[:-1]))
    return int(np.maximum(0, ends - np.maximum(starts, reach)).sum())


def check_contiguous(path: Path, series: Any, dtype: np.dtype, shape: tuple[int, ...],
                      file_size: int) -> None:
    """Check that the file holds all the pixels of a series stored in one run of bytes."""
    offset = int(series.dataoffset)
    needed = int(np.prod(shape)) * dtype.itemsize
    held = max(0, file_size - offset)
    if needed > held:
        raise _fail(
            path,
            f"TIFF is truncated or its header is wrong: {_dims_text(series, dtype)} needs "
            f"{size_text(needed)} but the file holds {size_text(held)} of image data "
            f"(pixel data from byte {offset} to {offset + needed}, file has {file_size} bytes)",
        )


def check_segments(path: Path, series: Any, dtype: np.dtype) -> None:
    """Check the strips or tiles of every page against its dimensions and its file.

    Each page needs one segment per strip or tile its dimensions call for, each inside
    the file that holds it; uncompressed segments must cover the bytes the dimensions
    need, and compressed ones (of a codec with a known worst case, see
    ``_MAX_EXPANSION``) must be able to decode to them. So no allocation that the header
    sizes exceeds what the file can fill.
    """
    needed = capacity = stored = 0
    bounded = True
    plain: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # uncompressed, per file
    for index, page in enumerate(series):
        if page is None:
            continue
        key = page.keyframe
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        expected = int(np.prod(key.chunked))
        if offsets.size != expected or counts.size != expected:
            kind = "Tile" if key.is_tiled else "Strip"
            raise _fail(
                path,
                f"TIFF header does not match its data: page {index} lists {offsets.size} "
                f"{kind}Offsets and {counts.size} {kind}ByteCounts, but "
                f"{_dims_text(series, dtype)} in {kind.lower()}s of "
                f"{' x '.join(map(str, key.chunks[::-1]))} needs {expected}",
            )
        if offsets.size == 0:
            continue
        ends = offsets + counts
        last = int(np.argmax(ends))
        limit = page.parent.filehandle.size
        if ends[last] > limit:
            raise _fail(
                path,
                f"TIFF is truncated: page {index} segment {last} ends at byte {int(ends[last])}, "
                f"file has {limit} bytes",
            )
        needed += int(np.prod(key.shape)) * int(key.bitspersample) // 8
        if key.compression == 1:
            plain.setdefault(str(page.parent.filehandle.path), []).append((offsets, counts))
        else:
            stored += int(counts.sum())
            ratio = _MAX_EXPANSION.get(int(key.compression))
            bounded = bounded and ratio is not None
            capacity += (ratio or 0) * (int(counts.sum()) + offsets.size)
    for parts in plain.values():
        held = _covered_bytes(np.concatenate([o for o, _ in parts]),
                              np.concatenate([c for _, c in parts]))
        stored += held
        capacity += held
    if bounded and needed > capacity:
        decoded = f", which decode to at most {size_text(capacity)}" if capacity > stored else ""
        raise _fail(
            path,
            f"TIFF header does not match its data: {_dims_text(series, dtype)} needs "
            f"{size_text(needed)} but the file holds {size_text(stored)} of image "
            f"data{decoded}",
        )
