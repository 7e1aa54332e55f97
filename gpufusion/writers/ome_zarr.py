"""Write fused images as multiscale OME-Zarr, and describe existing ones.

Two on-disk flavours are written:

* NGFF 0.4: Zarr v2 arrays (``dimension_separator`` ``/``), multiscales in ``.zattrs``;
* NGFF 0.5: Zarr v3 arrays with ``dimension_names``, multiscales under ``"ome"`` in the
  group's ``zarr.json`` attributes.

Datasets are named ``"0"``, ``"1"``, ...; level ``k + 1`` is the 2x mean of level ``k``
(:mod:`gpufusion.pyramid`). Every level carries a ``scale`` and a ``translation``: with
``F`` the total factor on an axis and ``p`` its level-0 pixel size, ``scale = p * F`` and
``translation = origin + (F - 1) * p / 2``, which keeps each low-resolution pixel centred on
the block of level-0 pixels it averages.

How a write runs
----------------
Level 0 is computed once from the (lazy, expensive) fusion and stored block by block, so
the fusion is never recomputed and no level is ever held in memory whole.

``pyramid="inline"``: ONE dask task per level-0 block (:func:`block_task_graph`): it gets
its block (for a :class:`gpufusion.fuse.BlockGrid` such as the pipeline's fusion, by
calling the block's fusion itself, so the fusion adds no task), downsamples it for levels
1, 2, ... (on the GPU for CuPy blocks), copies each level to the host (``to_host``) and
writes it into the Zarr arrays, all inside :func:`gpufusion.backends.task_scope` (for CuPy:
one CUDA stream for the whole task). Level ``k``'s chunks (or shards) are the block's
share, ``block / 2**k`` (:func:`_pyramid_layout`), so every chunk is written whole by one
task: no two tasks touch one chunk. This goes on while halved blocks stay >=
:data:`INLINE_MIN_CHUNK` and block-wise equals whole-array downsampling; the small levels
left (chunks of ``chunks``) are computed from the last inline level, read back.
``pyramid="readback"``: level 0 stored from the dask array, level ``k + 1`` from level ``k``
read back; the same layout, so both modes write identical stores.

Everything is written to a hidden sibling directory ``.NAME.tmp-XXXX`` that is renamed to the
output only when complete; on any error or interrupt it is removed (kept, to be continued,
when the write is resumable: ``resume``) and an existing output is left untouched.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.threaded
import numcodecs
import numpy as np
import zarr
import zarr.codecs
from dask.base import get_scheduler
from dask.system import CPU_COUNT

from gpufusion.backends import task_scope
from gpufusion.errors import InputError
from gpufusion.fuse import BlockGrid
from gpufusion.progress import dask_progress
from gpufusion.pyramid import (
    SPATIAL_AXES,
    blockwise_level_chunks,
    downsample_mean2,
    downsampled_shape,
    pyramid_factors,
    pyramid_level,
)
from gpufusion.units import NGFF_SPACE_UNITS, ngff_unit
from gpufusion.units import UNIT_ALIASES as _UNIT_ALIASES
from gpufusion.writers.target import RESUME_FILE as _RESUME_FILE

#: NGFF versions :func:`write_ome_zarr` can write, with the Zarr format each uses.
NGFF_VERSIONS = {"0.4": 2, "0.5": 3}

#: Compressor presets: name -> description. All are lossless.
COMPRESSORS = {
    "blosc-zstd": "Blosc zstd level 1 with bit shuffle (default: fast, ~best ratio)",
    "blosc-lz4": "Blosc LZ4 level 5 with bit shuffle (about 3x faster, files ~5% larger)",
    "zstd": "plain Zstandard level 1 (no shuffle; readable by any Zarr implementation)",
    "none": "no compression",
}

#: Axis name -> NGFF axis type; axes must appear in this order.
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}

#: The NGFF space units (UDUNITS-2 lengths), plus a few common abbreviations.
SPACE_UNITS = frozenset(NGFF_SPACE_UNITS)
UNIT_ALIASES = dict(_UNIT_ALIASES)

#: Default chunk size on spatial axes when the image is not a dask array.
DEFAULT_CHUNK = 512

#: How levels below 0 are computed (see "How a write runs" above).
PYRAMID_MODES = ("readback", "inline")

#: Inline levels stop before a halved block would be shorter than this on an axis (and
#: than a quarter of the block: :func:`inline_min_chunk`).
INLINE_MIN_CHUNK = 64


def inline_min_chunk(block: Sequence[int]) -> int:
    """Smallest halved block a block task still writes itself: :data:`INLINE_MIN_CHUNK`, or a
    quarter of the block's longest side when that is more.

    Each inline level is stored in chunks of the block's contribution (block / 2^k), and
    zarr-python costs about 1 ms per chunk written whatever its size (measured on the 2-core
    CI machine), so the tiny contributions of deep levels cost more than they save: on the
    600-tile whole slide (blocks of 1024) stopping at 256 px instead of 64 took the
    end-to-end time from 40-42 s to 36 s. The coarser levels are read back (a few tasks).

    Examples
    --------
    >>> inline_min_chunk((1024, 1024)), inline_min_chunk((128, 128))
    (256, 64)
    >>> inline_min_chunk((1, 512, 512))  # c, y, x
    128
    """
    return max(INLINE_MIN_CHUNK, max(int(b) for b in block) // 4)

_DOWNSAMPLING = {
    "description": "2x mean of pixel blocks on spatial axes; an odd trailing sample is the "
    "mean of the samples available; integers rounded half to even",
    "method": "gpufusion.pyramid.downsample_mean2",
}


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Geometry:
    """Validated axes and level-0 physical placement (spatial axes only)."""

    axes: tuple[str, ...]
    pixel_size: tuple[float, ...]
    origin: tuple[float, ...]
    unit: str | None

    @property
    def spatial(self) -> tuple[bool, ...]:
        return tuple(name in SPATIAL_AXES for name in self.axes)


def _check_axes(axes: Sequence[str], ndim: int) -> tuple[str, ...]:
    names = tuple(str(a).lower() for a in axes)
    order = "".join(AXIS_TYPES)
    positions = [order.find(n) if len(n) == 1 else -1 for n in names]
    if (
        len(names) != ndim
        or -1 in positions
        or positions != sorted(set(positions))
        or not {"y", "x"} <= set(names)
    ):
        raise InputError(
            f"axes {list(axes)} do not fit an image of {ndim} dimensions: give one name per "
            "axis, in the order t, c, z, y, x, with y and x present (e.g. ['z', 'y', 'x'])"
        )
    return names


def _check_vector(
    values: Sequence[float] | None, n: int, default: float, what: str, positive: bool
) -> tuple[float, ...]:
    if values is None:
        return (default,) * n
    try:
        vector = tuple(float(v) for v in np.atleast_1d(np.asarray(values, dtype=float)))
    except (TypeError, ValueError):
        raise InputError(f"{what} {values!r}: need {n} numbers, one per spatial axis") from None
    if len(vector) == 1 and n > 1:
        vector *= n
    bad = len(vector) != n or not all(math.isfinite(v) and (v > 0 or not positive) for v in vector)
    if bad:
        need = "positive numbers" if positive else "finite numbers"
        raise InputError(f"{what} {list(vector)}: need {n} {need}, one per spatial axis")
    return vector


def _check_unit(unit: str | None) -> str | None:
    return None if unit is None else ngff_unit(unit, "unit")


def _geometry(
    ndim: int,
    axes: Sequence[str],
    pixel_size: Sequence[float] | None,
    origin: Sequence[float] | None,
    unit: str | None,
) -> _Geometry:
    names = _check_axes(axes, ndim)
    n_space = sum(name in SPATIAL_AXES for name in names)
    return _Geometry(
        axes=names,
        pixel_size=_check_vector(pixel_size, n_space, 1.0, "pixel_size", positive=True),
        origin=_check_vector(origin, n_space, 0.0, "origin", positive=False),
        unit=_check_unit(unit),
    )


def _chunk_shape(
    chunks: int | Sequence[int] | None, image: Any, axes: tuple[str, ...]
) -> tuple[int, ...]:
    """Zarr chunk shape: given per axis, or an int for spatial axes (1 on c/t)."""
    if chunks is None:
        if isinstance(image, da.Array):
            wanted = tuple(int(c) for c in image.chunksize)
        else:
            wanted = tuple(DEFAULT_CHUNK if a in SPATIAL_AXES else 1 for a in axes)
    elif isinstance(chunks, int | np.integer):
        wanted = tuple(int(chunks) if a in SPATIAL_AXES else 1 for a in axes)
    else:
        wanted = tuple(int(c) for c in chunks)
    if len(wanted) != len(axes) or min(wanted) < 1:
        raise InputError(
            f"chunks {chunks!r}: need a positive int or one positive int per axis {list(axes)}"
        )
    return _level_chunks(wanted, image.shape)


def _shard_shape(
    shard: int | Sequence[int] | None,
    chunk_shape: tuple[int, ...],
    shape: Sequence[int],
    axes: tuple[str, ...],
    ngff_version: str,
) -> tuple[int, ...] | None:
    """The level-0 shard shape (the task block), or None for no sharding.

    An int applies to spatial axes (shards of one chunk on ``c`` and ``t``). On an axis the
    image spans in one shard, the shard is the fewest chunks covering it; elsewhere it must
    be a multiple of the chunk.
    """
    if shard is None:
        return None
    if NGFF_VERSIONS[ngff_version] != 3:
        raise InputError(f"shard {shard!r}: sharding needs NGFF 0.5 (Zarr v3); "
                         f"ngff_version is {ngff_version}")
    if isinstance(shard, int | np.integer):
        wanted = tuple(int(shard) if a in SPATIAL_AXES else c
                       for a, c in zip(axes, chunk_shape, strict=True))
    else:
        wanted = tuple(int(s) for s in shard)
    if len(wanted) != len(axes) or min(wanted) < 1:
        raise InputError(f"shard {shard!r}: need a positive int or one positive int per "
                         f"axis {list(axes)}")
    out = []
    for s, c, n, a in zip(wanted, chunk_shape, shape, axes, strict=True):
        if s >= n:
            out.append(c * -(-int(n) // c))
        elif s % c:
            raise InputError(f"shard {shard!r}: the shard size on axis {a} ({s}) must be a "
                             f"multiple of the chunk size ({c})")
        else:
            out.append(s)
    return tuple(out)


def _check_image(image: Any) -> None:
    dtype = np.dtype(image.dtype)
    if dtype == np.bool_ or dtype.kind not in "uif":
        raise InputError(f"image dtype {dtype} is not supported; use an integer or float dtype")


def _codec_settings(compressor: str, zarr_format: int, axes: tuple[str, ...]) -> dict[str, Any]:
    """Keyword arguments for ``Group.create_array`` for one compressor preset."""
    if compressor not in COMPRESSORS:
        raise InputError(f"compressor {compressor!r} is not one of {sorted(COMPRESSORS)}")
    if zarr_format == 2:
        codecs: dict[str, Any] = {
            "blosc-zstd": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.BITSHUFFLE),
            "blosc-lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE),
            "zstd": numcodecs.Zstd(level=1),
        }
        layout: dict[str, Any] = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    else:
        codecs = {
            "blosc-zstd": zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
            "blosc-lz4": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
            "zstd": zarr.codecs.ZstdCodec(level=1),
        }
        layout = {"dimension_names": axes}
    return {"compressors": codecs.get(compressor), **layout}


# ------------------------------------------------------------------------------ metadata


def _level_transform(geometry: _Geometry, total: Sequence[int]) -> list[dict[str, Any]]:
    """Scale and translation of a level whose total factor per axis is ``total``."""
    scale, translation = [], []
    spatial = iter(zip(geometry.pixel_size, geometry.origin, strict=True))
    for is_space, factor in zip(geometry.spatial, total, strict=True):
        if is_space:
            size, start = next(spatial)
            scale.append(size * factor)
            translation.append(start + 0.5 * (factor - 1) * size)
        else:
            scale.append(1.0)
            translation.append(0.0)
    return [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]


def _multiscale(
    geometry: _Geometry, totals: Sequence[Sequence[int]], name: str, version: str
) -> dict[str, Any]:
    axes = []
    for axis in geometry.axes:
        entry = {"name": axis, "type": AXIS_TYPES[axis]}
        if geometry.unit is not None and AXIS_TYPES[axis] == "space":
            entry["unit"] = geometry.unit
        axes.append(entry)
    multiscale: dict[str, Any] = {"version": version} if version == "0.4" else {}
    multiscale |= {
        "name": name,
        "axes": axes,
        "datasets": [
            {"path": str(k), "coordinateTransformations": _level_transform(geometry, total)}
            for k, total in enumerate(totals)
        ],
        "type": "mean",
        "metadata": dict(_DOWNSAMPLING),
    }
    return multiscale


def _group_attributes(
    multiscale: dict[str, Any],
    version: str,
    omero: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The group's attributes: NGFF metadata (``omero`` too, when given) and ``extra`` free
    attributes at the top level (beside ``ome`` in NGFF 0.5), which NGFF allows."""
    ome: dict[str, Any] = {"multiscales": [multiscale]}
    if omero is not None:
        ome["omero"] = ({"version": version} if version == "0.4" else {}) | omero
    attributes = ome if version == "0.4" else {"ome": {"version": version, **ome}}
    return {**(extra or {}), **attributes}


# ---------------------------------------------------------------------------- channels

#: Reserved top-level attribute names: free attributes may not replace NGFF metadata.
_RESERVED_ATTRIBUTES = frozenset(("multiscales", "omero", "ome", "labels", "plate", "well"))


def default_channel_colors(n: int) -> list[str]:
    """Display colours (``RRGGBB``) for ``n`` channels: one white, two green and magenta,
    three red, green and blue; more cycle through those, cyan and yellow.

    Examples
    --------
    >>> default_channel_colors(1), default_channel_colors(2)
    (['FFFFFF'], ['00FF00', 'FF00FF'])
    >>> default_channel_colors(4)
    ['FF0000', '00FF00', '0000FF', '00FFFF']
    """
    if n == 1:
        return ["FFFFFF"]
    if n == 2:
        return ["00FF00", "FF00FF"]
    cycle = ["FF0000", "00FF00", "0000FF", "00FFFF", "FF00FF", "FFFF00", "FFFFFF"]
    return [cycle[k % len(cycle)] for k in range(n)]


def check_channels(
    names: Sequence[str] | None,
    colors: Sequence[str] | None,
    shape: Sequence[int],
    axes: Sequence[str],
) -> tuple[list[str] | None, list[str]]:
    """Validated channel names (None when not given) and colours (``RRGGBB``, defaults by
    :func:`default_channel_colors`): one per channel of the ``c`` axis (one without it).

    Raises
    ------
    InputError
        Naming ``channel_names`` or ``channel_colors`` when a count or value is wrong.
    """
    n = int(shape[list(axes).index("c")]) if "c" in axes else 1
    if names is not None:
        if isinstance(names, str) or len(names) != n:
            raise InputError(f"channel_names {names!r}: need a list of {n} names, one per "
                             "channel")
        names = [str(name) for name in names]
        if not all(name.strip() for name in names):
            raise InputError(f"channel_names {names!r}: every name must be non-empty")
    if colors is None:
        return names, default_channel_colors(n)
    if isinstance(colors, str) or len(colors) != n:
        raise InputError(f"channel_colors {colors!r}: need a list of {n} colours, one per "
                         "channel")
    checked = []
    for color in colors:
        text = str(color).strip().removeprefix("#").upper()
        if len(text) != 6 or any(ch not in "0123456789ABCDEF" for ch in text):
            raise InputError(f"channel_colors: {color!r} is not a colour RRGGBB (hex)")
        checked.append(text)
    return names, checked


def _check_extra_attributes(extra: Any) -> dict[str, Any]:
    """Free attributes: a JSON-serialisable mapping that does not touch NGFF keys."""
    import json

    if extra is None:
        return {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise InputError("attributes: need a dict with string keys")
    clash = sorted(_RESERVED_ATTRIBUTES & set(extra))
    if clash:
        raise InputError(f"attributes: {clash} are NGFF metadata and cannot be replaced")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"attributes: not JSON-serialisable ({exc})") from None
    return dict(extra)


def channel_windows(level: Any, axes: Sequence[str]) -> list[dict[str, float]]:
    """Display windows per channel from a (small) pyramid level.

    ``min``/``max``: the dtype's range for integers, the finite data range for floats;
    ``start``/``end``: the 0.1 and 99.9 percentiles of the channel's pixels (a cheap
    estimate of the contrast, from the smallest level), ``end > start``.

    Examples
    --------
    >>> channel_windows(np.array([[0, 10], [20, 30]], np.uint8), ["y", "x"])
    [{'start': 0.03, 'end': 29.97, 'min': 0.0, 'max': 255.0}]
    """
    data = np.asarray(level[...])
    dtype = data.dtype
    c = list(axes).index("c") if "c" in axes else None
    channels = [data] if c is None else [np.take(data, k, axis=c) for k in range(data.shape[c])]
    finite = data[np.isfinite(data)] if dtype.kind == "f" else data
    if dtype.kind in "ui":
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
    windows = []
    for values in channels:
        values = values[np.isfinite(values)] if dtype.kind == "f" else values.ravel()
        if values.size:
            start, end = (float(v) for v in np.percentile(values, (0.1, 99.9)))
        else:
            start, end = lo, hi
        if not end > start:  # a flat channel: keep a window of one unit above it
            end = start + 1.0
            if end > hi:
                start, end = hi - 1.0, hi
        windows.append({"start": round(start, 6), "end": round(end, 6),
                        "min": min(lo, start), "max": max(hi, end)})
    return windows


def _omero(names: list[str] | None, colors: list[str], windows: list[dict[str, float]],
           name: str) -> dict[str, Any]:
    """The NGFF ``omero`` block (rendering hints napari, OMERO and others read).

    Channels ``R``, ``G``, ``B`` coloured red, green, blue (colour tiles,
    :mod:`gpufusion.readers.rgb`) are shown in true colour: each window spans the whole
    range (``start`` = ``min``, ``end`` = ``max``: the dtype's range for integers), so the
    three channels keep their balance instead of being stretched one by one.
    """
    labels = names if names is not None else [f"C{k}" for k in range(len(colors))]
    if labels == ["R", "G", "B"] and colors == ["FF0000", "00FF00", "0000FF"]:
        windows = [{**w, "start": w["min"], "end": w["max"]} for w in windows]
    return {
        "name": name,
        "channels": [
            {"label": label, "color": color, "window": window, "active": True,
             "coefficient": 1.0, "family": "linear", "inverted": False}
            for label, color, window in zip(labels, colors, windows, strict=True)
        ],
        "rdefs": {"model": "greyscale" if len(colors) == 1 else "color"},
    }


def _total_factors(plan: Sequence[Sequence[int]], ndim: int) -> list[tuple[int, ...]]:
    totals = [(1,) * ndim]
    for factors in plan:
        totals.append(tuple(t * f for t, f in zip(totals[-1], factors, strict=True)))
    return totals


# ------------------------------------------------------------------- atomic output folder


def _check_target(out: Path, overwrite: bool) -> None:
    if not overwrite and (out.exists() or out.is_symlink()):
        raise InputError(f"output {out} already exists; pass overwrite=True to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sibling_dir(out: Path, tag: str) -> Path:
    """Create a new hidden folder ``.NAME.TAG-XXXXXXXX`` beside ``out``.

    Unlike ``tempfile.mkdtemp`` (mode 0700), ``mkdir`` honours the umask, so the finished
    output gets the same permissions as any folder the user creates.
    """
    while True:
        candidate = out.parent / f".{out.name}.{tag}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is removed only once ``tmp`` is in.

    A folder cannot be replaced by one rename: the old ``out`` is renamed aside into
    ``.NAME.old-XXXXXXXX/NAME``, ``tmp`` renamed in, then the old one removed. A process
    killed between the renames leaves no ``out``; the next run puts the old one back
    (:func:`gpufusion.writers.target.recover_interrupted`).
    """
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    _check_target(out, overwrite)  # it may have appeared while we were computing
    old = _sibling_dir(out, "old")
    try:
        os.rename(out, old / out.name)
    except BaseException:
        _remove(old)
        raise
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)
        _remove(old)
        raise
    _remove(old)


@contextmanager
def _atomic_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden sibling folder of ``out``, renamed to ``out`` on success."""
    with _output_directory(out, overwrite, resume=False) as (tmp, _):
        yield tmp


#: In a resumable temporary output: the fingerprint of the run (JSON), written first.
RESUME_FILE = _RESUME_FILE
#: In a resumable temporary output: one empty file per block written, named ``i.j.k``.
RESUME_DONE = ".gpufusion-done"


def resumable_outputs(out: str | os.PathLike[str]) -> list[Path]:
    """The temporary folders of ``out`` a resumable run left (newest first).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / ".a.zarr.tmp-0123abcd").mkdir()
    >>> resumable_outputs(d / "a.zarr")
    []
    >>> _ = (d / ".a.zarr.tmp-0123abcd" / RESUME_FILE).write_text("{}")
    >>> [p.name for p in resumable_outputs(d / "a.zarr")]
    ['.a.zarr.tmp-0123abcd']
    """
    from gpufusion.writers.target import leftovers

    out = Path(out)
    found = [p for p in leftovers(out) if p.name.startswith(f".{out.name}.tmp-")
             and (p / RESUME_FILE).is_file()]
    return sorted(found, key=lambda p: (p / RESUME_FILE).stat().st_mtime_ns, reverse=True)


@contextmanager
def _output_directory(out: Path, overwrite: bool, resume: bool) -> Iterator[tuple[Path, bool]]:
    """Yield ``(tmp, resumed)``: a hidden sibling folder of ``out``, renamed to ``out`` on
    success.

    Without ``resume`` a new folder, removed on any error or interrupt. With ``resume`` the
    newest folder an earlier resumable run left (``resumed`` True) or a new one, kept on an
    error or interrupt so that the next resumed run can finish it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = resumable_outputs(out) if resume else []
    tmp = earlier[0] if earlier else None
    if tmp is not None:
        _remove_partial_writes(tmp)
    try:
        # named before it is made, so that an interrupt right after the mkdir (a SIGTERM
        # sent as soon as the folder appears) still finds it to remove
        while tmp is None:
            tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
            except FileExistsError:
                tmp = None
        yield tmp, bool(earlier)
        if resume:
            _remove(tmp / RESUME_DONE)
            _remove(tmp / RESUME_FILE)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        if not resume and tmp is not None:
            _remove(tmp)
        raise


#: A write zarr's LocalStore had begun when the process was killed: it writes each file to
#: ``NAME.<32 hex digits>.partial`` first and renames it into place (zarr 3.x,
#: ``zarr.storage._local._atomic_write``).
_PARTIAL_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _remove_partial_writes(tmp: Path) -> None:
    """Remove the half-written files a killed run left in ``tmp`` (their blocks were not
    recorded as done, so they are written again)."""
    for path in tmp.rglob("*.partial"):
        if _PARTIAL_WRITE.search(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _check_fingerprint(tmp: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume ``tmp`` when it was started with other inputs or options."""
    import json

    try:
        earlier = json.loads((tmp / RESUME_FILE).read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict):
        raise InputError(f"--resume: {tmp / RESUME_FILE} is unreadable; remove {tmp} (or "
                         "run without --resume)")
    fingerprint = json.loads(json.dumps(fingerprint))  # as stored: lists, not tuples
    if earlier == fingerprint:
        return
    changed = []
    for section in sorted(set(earlier) | set(fingerprint)):
        old, new = earlier.get(section), fingerprint.get(section)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = [f"{k}: {old.get(k, 'absent')!r} -> {new.get(k, 'absent')!r}"
                     for k in keys[:3]]
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            changed.append(f"{section} ({'; '.join(shown)}{more})")
        else:
            changed.append(section)
    raise InputError(f"--resume: {tmp.name} was started with different "
                     f"{', '.join(changed)}; run without --resume to start again "
                     "(--overwrite removes it)")


# ------------------------------------------------------------------------------- compute


@contextmanager
def _scheduler_for(scheduler: Any, image: da.Array) -> Iterator[tuple[Any, bool]]:
    """Yield ``(scheduler, is_local)``.

    The default threaded scheduler is replaced by a private thread pool that is shut down
    (waiting for running tasks) on exit, so that after a failed block no straggling task
    can write into the temporary folder once it has been removed.
    """
    collections = [image] if isinstance(image, da.Array) else None
    get = get_scheduler(scheduler=scheduler, collections=collections) or dask.threaded.get
    if get is not dask.threaded.get:
        yield scheduler, getattr(get, "__self__", None) is None  # a Client's .get is bound
        return
    workers = dask.config.get("num_workers", None) or CPU_COUNT
    pool = ThreadPoolExecutor(workers, thread_name_prefix="gpufusion-write")
    try:
        yield pool, True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _level_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """The Zarr chunk shape of a level: ``chunks``, but never larger than the level."""
    return tuple(min(c, max(n, 1)) for c, n in zip(chunks, shape, strict=True))


def _store_levels(
    sources: Sequence[da.Array],
    group: zarr.Group,
    first: int,
    chunks: tuple[int, ...],
    codec: dict[str, Any],
    scheduler: Any,
    progress: bool,
    label: str | None = None,
    layouts: Sequence[_Level] | None = None,
) -> list[zarr.Array]:
    """Store ``sources`` as arrays ``first``, ``first + 1``, ... of ``group`` in one pass.

    Each is stored with chunks of ``chunks`` clipped to it, or as ``layouts`` (one per
    source) says. With ``progress``, one line counts the tasks of the pass, labelled
    ``label`` (default: ``fusing, writing levels 0-2`` for a pass from level 0, else
    ``writing level 3``).
    """
    targets, regrouped = [], []
    for k, source in enumerate(sources):
        layout = layouts[k] if layouts else _Level(_level_chunks(chunks, source.shape))
        unit = layout.shards or layout.chunks  # one task per shard: no two write one shard
        if source.chunks != da.core.normalize_chunks(unit, source.shape):
            source = source.rechunk(unit)
        regrouped.append(source)
        targets.append(_create_level(group, first + k, source.shape, source.dtype, layout,
                                     codec))
    with dask_progress(label or _pass_label(first, len(sources)), progress):  # on stderr
        da.store(regrouped, targets, lock=False, scheduler=scheduler)
    return targets


def _create_level(group: zarr.Group, level: int, shape: Sequence[int], dtype: Any,
                  layout: _Level, codec: dict[str, Any]) -> zarr.Array:
    """Create the (empty) array of ``level`` in ``group``."""
    # write_empty_chunks: skipping empty chunks costs a comparison per chunk
    settings = {"fill_value": 0, "config": {"write_empty_chunks": True}, **codec}
    if layout.shards is not None:
        settings["shards"] = layout.shards
    # overwrite: a resumed run computes the read-back levels again
    return _complete(group.create_array, str(level), shape=tuple(shape),
                     chunks=layout.chunks, dtype=dtype, overwrite=True, **settings)


def _complete(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run to its end even when this thread is interrupted.

    zarr-python runs its I/O on an event-loop thread of its own; an interrupt (Ctrl-C,
    SIGTERM) raised in the thread waiting for it would leave the write going on, and a
    metadata file written after the temporary output was removed would recreate it. So
    metadata writes from this thread run in a helper thread, awaited to the end; the
    interrupt is raised once it is done.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    worker = threading.Thread(target=run, name="gpufusion-metadata")
    worker.start()
    try:
        worker.join()
    except BaseException:
        worker.join()  # the write finishes before the interrupt unwinds (and cleans up)
        raise
    if error:
        raise error[0]
    return result[0]


def _write_json(path: Path, value: Any) -> None:
    import json

    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(part, path)


def _writer_fingerprint(image: Any, chunk_shape: tuple[int, ...],
                        shard: tuple[int, ...] | None, compressor: str, ngff_version: str,
                        geometry: _Geometry, plan: Sequence[Sequence[int]]) -> dict[str, Any]:
    """What the stored bytes depend on besides the inputs and the fusion options."""
    return {"shape": list(image.shape), "dtype": str(np.dtype(image.dtype)),
            "chunks": list(chunk_shape), "shard": None if shard is None else list(shard),
            "compressor": compressor, "ngff_version": ngff_version,
            "axes": list(geometry.axes), "pixel_size": list(geometry.pixel_size),
            "origin": list(geometry.origin), "unit": geometry.unit,
            "pyramid": [list(f) for f in plan]}


def _pass_label(first: int, count: int) -> str:
    """``fusing, writing levels 0-2`` for a pass from level 0, else ``writing level 3``."""
    last = first + count - 1
    levels = f"level {first}" if last == first else f"levels {first}-{last}"
    return f"fusing, writing {levels}" if first == 0 else f"writing {levels}"


def _store_level(
    source: da.Array,
    group: zarr.Group,
    path: str,
    chunks: tuple[int, ...],
    codec: dict[str, Any],
    scheduler: Any,
    progress: bool,
    label: str | None = None,
) -> zarr.Array:
    """Store ``source`` as array ``path`` (a level number) of ``group``, one task per chunk."""
    return _store_levels([source], group, int(path), chunks, codec, scheduler, progress,
                         label)[0]


# ------------------------------------------------------------------ pyramid chunk layout


@dataclass(frozen=True)
class _Level:
    """How one level is stored: its Zarr chunk shape and, sharded, its shard shape."""

    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None


def _inline_blocks(block: tuple[int, ...], shape: Sequence[int],
                   plan: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Nominal block size of levels 0, 1, ... while blocks of ``block`` downsample on their own.

    A level is added while :func:`gpufusion.pyramid.blockwise_level_chunks` accepts it
    (every block but the last even on a halved axis, halves >= :func:`inline_min_chunk`).
    """
    chunks = da.core.normalize_chunks(block, tuple(shape))
    sizes = [tuple(block)]
    min_chunk = inline_min_chunk(block)
    for factors in plan:
        chunks = blockwise_level_chunks(chunks, factors, min_chunk)
        if chunks is None:
            break
        sizes.append(tuple(-(-b // int(f)) for b, f in zip(sizes[-1], factors, strict=True)))
    return sizes


def _pyramid_layout(
    shape: Sequence[int],
    chunk_shape: tuple[int, ...],
    plan: Sequence[Sequence[int]],
    shard: tuple[int, ...] | None,
) -> tuple[list[_Level], tuple[int, ...]]:
    """The stored chunk (and shard) shape of every level, and the task block of level 0.

    Every task of the block pass writes one level-0 block (``shard``, else ``chunk_shape``)
    and what it contributes to the levels below; level ``k``'s chunks (unsharded) or shards
    are that contribution's nominal size, ``block / 2**k``, so each is written whole by
    exactly one task. The levels below those (whose halved blocks would be shorter than
    :func:`inline_min_chunk` on an axis of several blocks) have chunks of ``chunk_shape``
    (clipped to the level) and are computed by read-back. The layout depends on the options
    only, never on how the levels are computed (``pyramid``), so both modes write the same
    store.
    """
    block = shard or chunk_shape
    inline = _inline_blocks(block, shape, plan)
    levels: list[_Level] = []
    level_shape = tuple(int(n) for n in shape)
    for k in range(len(plan) + 1):
        if k:
            level_shape = downsampled_shape(level_shape, plan[k - 1])
        if k >= len(inline):
            levels.append(_Level(_level_chunks(chunk_shape, level_shape)))
        elif shard is None:
            levels.append(_Level(_level_chunks(inline[k], level_shape)))
        else:  # chunks inside the shard: the chunk shape, or what divides the shard
            inner = tuple(s if s <= c else math.gcd(s, c)
                          for s, c in zip(inline[k], chunk_shape, strict=True))
            levels.append(_Level(inner, inline[k]))
    return levels, block


def chunk_count(shape: Sequence[int], chunk_shape: Sequence[int], axes: Sequence[str],
                shard: Sequence[int] | None = None) -> int:
    """How many chunk (or, with ``shard``, shard) objects :func:`write_ome_zarr` stores.

    Examples
    --------
    >>> chunk_count((1000, 731), (128, 128), "yx")  # 48 + 48 (64-px chunks) + 4 + 1
    101
    """
    chunk_shape = tuple(int(c) for c in chunk_shape)
    plan = pyramid_factors(shape, chunk_shape, tuple(axes))
    layouts, _ = _pyramid_layout(shape, chunk_shape, plan,
                                 None if shard is None else tuple(shard))
    total, level_shape = 0, tuple(int(n) for n in shape)
    for k, layout in enumerate(layouts):
        if k:
            level_shape = downsampled_shape(level_shape, plan[k - 1])
        unit = layout.shards or layout.chunks
        total += math.prod(-(-n // c) for n, c in zip(level_shape, unit, strict=True))
    return total


# ------------------------------------------------------------------- one task per block


@dataclass
class _BlockWriter:
    """What a block task does after it has its level-0 block: every level it feeds.

    ``arrays`` are levels ``0 .. n`` (``factors`` from each to the next); ``block`` the
    nominal level-0 block size. Level ``k`` of block ``idx`` starts at ``idx * block / 2**k``
    and is one whole chunk (or shard) of its array: no two tasks write the same one.
    ``done`` (resume): the folder where the task records, after its data, that it is done.
    """

    arrays: list[Any]
    factors: list[tuple[int, ...]]
    block: tuple[int, ...]
    backend: str
    downsample: Callable[..., Any] | None
    to_host: Callable[[Any], np.ndarray] | None
    done: str | None = None

    def write(self, idx: tuple[int, ...], source: Any) -> None:
        """Compute (``source`` a callable) or take the level-0 block, write every level."""
        from ..cluster import tune_worker_malloc

        tune_worker_malloc()  # on a distributed worker: glibc thresholds fit for blocks
        writes = []
        with task_scope(self.backend):
            data = source() if callable(source) else source
            start = tuple(i * b for i, b in zip(idx, self.block, strict=True))
            for k, array in enumerate(self.arrays):
                if k:
                    data = (self.downsample or downsample_mean2)(data, self.factors[k - 1])
                    start = tuple(s // f for s, f in zip(start, self.factors[k - 1],
                                                         strict=True))
                host = self.to_host(data) if self.to_host is not None else data
                writes.append((array, tuple(slice(s, s + n) for s, n in
                                            zip(start, host.shape, strict=True)), host))
        _store_regions(writes)
        if self.done is not None:
            _mark_done(Path(self.done), idx)


def _store_regions(writes: Sequence[tuple[Any, tuple[slice, ...], np.ndarray]]) -> None:
    """Store each ``(array, region, data)``, all in one round trip to zarr's event loop.

    zarr-python 3's synchronous ``array[region] = data`` hands every call to its one
    event-loop thread and waits: about 1 ms of fixed cost per call on the 2-core CI
    machine, whatever the chunk size, which a block task paid once per level. Here the
    levels' writes are gathered into one coroutine (``AsyncArray.setitem``, what
    ``__setitem__`` awaits), so a task waits once and zarr encodes and writes the levels
    concurrently. Falls back to plain assignments where the async array is not there.
    """
    if not all(hasattr(array, "_async_array") for array, _, _ in writes):
        for array, region, data in writes:
            array[region] = data
        return
    import asyncio

    from zarr.core.sync import sync

    async def store_all() -> None:
        await asyncio.gather(*(array._async_array.setitem(region, data)
                               for array, region, data in writes))

    sync(store_all())


def _write_block(writer: _BlockWriter, idx: tuple[int, ...], source: Any) -> None:
    writer.write(idx, source)


def _block_key_name(idx: Sequence[int]) -> str:
    return ".".join(str(int(i)) for i in idx)


def _mark_done(folder: Path, idx: Sequence[int]) -> None:
    """Record block ``idx`` as written (after its data; an empty file, made atomically)."""
    name = _block_key_name(idx)
    part = folder / f".{name}.part"
    part.write_bytes(b"")
    os.replace(part, folder / name)


def _done_blocks(folder: Path) -> set[tuple[int, ...]]:
    """The blocks recorded by :func:`_mark_done` in ``folder``."""
    if not folder.is_dir():
        return set()
    done = set()
    for entry in os.scandir(folder):
        parts = entry.name.split(".")
        if not entry.name.startswith(".") and all(p.isdigit() for p in parts):
            done.add(tuple(int(p) for p in parts))
    return done


def block_task_graph(
    image: Any, writer: _BlockWriter, skip: set[tuple[int, ...]] | None = None
) -> tuple[Any, list[Any]]:
    """The graph of the block pass: one task per level-0 block, and its keys.

    For a :class:`gpufusion.fuse.BlockGrid` each task computes its block itself (the fusion
    adds no task); for a dask array each task depends on the array's block. Blocks in
    ``skip`` (already written, on resume) get no task.
    """
    from dask.base import tokenize

    # keys of their own per write: two writes of one image (to two outputs, on one cluster)
    # must never be taken for one computation
    unique = secrets.token_hex(8)
    numblocks = tuple(len(c) for c in image.chunks)
    if isinstance(image, BlockGrid):
        name = f"gpufusion-write-{tokenize(image.token(), writer.block, unique)}"
        dsk: dict[Any, Any] = {
            (name, *idx): (_write_block, writer, idx, image.block_function(idx))
            for idx in np.ndindex(*numblocks) if not skip or idx not in skip
        }
        return dsk, list(dsk)
    from dask.highlevelgraph import HighLevelGraph

    name = f"gpufusion-write-{tokenize(image.name, writer.block, unique)}"
    layer = {(name, *idx): (_write_block, writer, idx, (image.name, *idx))
             for idx in np.ndindex(*numblocks) if not skip or idx not in skip}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[image])
    keys = list(layer)
    return graph.cull(set(keys)) if keys else {}, keys


def _run_graph(graph: Any, keys: list[Any], scheduler: Any, label: str,
               progress: bool) -> None:
    """Run ``graph`` for ``keys`` (results dropped) with ``scheduler``, one progress line."""
    if not keys:
        return
    get = get_scheduler(scheduler=scheduler) or dask.threaded.get
    with dask_progress(label, progress):
        get(graph, keys)


# ---------------------------------------------------------------------------- public API


def write_ome_zarr(
    image: da.Array,
    out: str | os.PathLike[str],
    *,
    axes: Sequence[str],
    pixel_size: Sequence[float] | None = None,
    unit: str | None = None,
    origin: Sequence[float] | None = None,
    ngff_version: str = "0.4",
    chunks: int | Sequence[int] | None = None,
    compressor: str = "blosc-zstd",
    overwrite: bool = False,
    progress: bool = False,
    name: str = "gpufusion",
    scheduler: Any = None,
    anisotropic_pyramid: bool = False,
    pyramid: str = "readback",
    downsample: Callable[..., Any] | None = None,
    to_host: Callable[[Any], np.ndarray] | None = None,
    shard: int | Sequence[int] | None = None,
    backend: str | None = None,
    resume: dict[str, Any] | None = None,
    channel_names: Sequence[str] | None = None,
    channel_colors: Sequence[str] | None = None,
    attributes: dict[str, Any] | None = None,
) -> Path:
    """Write ``image`` and its 2x mean pyramid as an OME-Zarr image, atomically.

    Parameters
    ----------
    image : dask.array.Array or gpufusion.fuse.BlockGrid
        Level 0, usually a lazy fusion graph (:func:`gpufusion.fuse`), or the fusion as a
        grid of block callables (:func:`gpufusion.fuse.fuse_blocks`); each block is
        computed exactly once. A NumPy array is accepted too (chunked by ``chunks``).
        Integer or float dtype.
    out : str or path-like
        Output folder, conventionally ``*.ome.zarr``. Its parent is created if needed.
    axes : sequence of str
        One name per axis, in the order ``t``, ``c``, ``z``, ``y``, ``x`` (``y`` and ``x``
        required), e.g. ``["y", "x"]`` or ``["c", "z", "y", "x"]``.
    pixel_size : sequence of float, optional
        Level-0 physical pixel size per spatial axis (one value is repeated); default 1 (NGFF
        needs a scale: for an unknown pixel size, give no ``unit`` either).
    unit : str, optional
        NGFF space unit such as ``"micrometer"`` (``"um"``, ``"nm"``, ``"mm"`` accepted);
        when None, no unit is written.
    origin : sequence of float, optional
        Physical position of the centre of level-0 pixel ``(0, ..., 0)`` per spatial axis;
        default 0.
    ngff_version : {"0.4", "0.5"}
        ``"0.4"`` writes Zarr v2, ``"0.5"`` writes Zarr v3.
    chunks : int or sequence of int, optional
        Zarr chunk shape of every level: an int applies to spatial axes (chunk 1 on ``c``
        and ``t``); default: the chunk size of ``image`` (512 for NumPy input). ``image`` is
        rechunked first when its chunks differ.
    compressor : str
        One of :data:`COMPRESSORS`: ``"blosc-zstd"`` (default), ``"blosc-lz4"``, ``"zstd"``
        or ``"none"``.
    overwrite : bool
        Replace an existing ``out``; it is removed only after the new image is complete.
    progress : bool
        Show one labelled progress line on stderr per pass over the levels (``fusing,
        writing levels 0-2``, then ``writing level 3``, ...: tasks done/total, rate, ETA;
        local schedulers only, :mod:`gpufusion.progress`).
    name : str
        Name stored in the multiscales metadata.
    scheduler : optional
        Dask scheduler for the computations (None: dask's default).
    anisotropic_pyramid : bool
        Plan the levels from ``pixel_size``: ``z`` is halved only once its pixels are no
        coarser than about the ``y``/``x`` pixels of that level (see
        :func:`gpufusion.pyramid.pyramid_factors`). False (default): every spatial axis is
        halved at every level.
    pyramid : {"readback", "inline"}
        ``"readback"`` (default): level ``k + 1`` from level ``k`` read back from the store.
        ``"inline"``: one task per block of ``image`` fuses it (``image`` a
        :class:`gpufusion.fuse.BlockGrid`) or takes it, and writes it and every larger
        level it feeds (see the module notes): level 0 is never read back, and the graph
        has one task per block. Both write the same store.
    downsample : callable, optional
        ``downsample(block, factors)`` for the inline levels, run on ``image``'s blocks:
        default :func:`gpufusion.pyramid.downsample_mean2`; for CuPy blocks
        :func:`gpufusion.backends.cupy_backend.downsample_mean2_gpu`. Read-back levels
        always use :func:`~gpufusion.pyramid.downsample_mean2`.
    to_host : callable, optional
        Turns a block into a NumPy array right before it is stored, e.g. ``cupy.asnumpy``;
        default: blocks are stored as they are (identity).
    shard : int or sequence of int, optional
        NGFF 0.5 only: store the levels with Zarr v3 sharding, shards of this size (an int
        for spatial axes; a multiple of ``chunks``) holding chunks of ``chunks``. The shard
        is the task block: each is written whole by one task (level ``k``'s shards are
        halved ``k`` times, down to the read-back levels, which are not sharded). Default:
        no sharding.
    resume : dict, optional
        Write resumably (``pyramid="inline"`` only): ``resume`` is the fingerprint of the
        run (JSON: its inputs and options; the writer adds its own). The temporary folder
        records it and, after each block's data, that the block is done; on an error or
        interrupt it is kept. A later call with ``resume`` continues the newest such folder
        of ``out``, writing only the blocks not done, so the result is byte for byte that
        of an uninterrupted run; a different fingerprint is an :class:`InputError` naming
        what changed. None (default): the temporary folder is removed on failure.
    backend : str, optional
        The backend whose :func:`gpufusion.backends.task_scope` wraps each block task
        (``numpy`` or ``cupy``); default ``image.backend`` for a
        :class:`gpufusion.fuse.BlockGrid`, else ``numpy``.
    channel_names, channel_colors : sequence of str, optional
        One label and one colour (``RRGGBB``) per channel (``c`` axis; one without it),
        written to the ``omero`` block with a display window per channel estimated from the
        smallest level (:func:`channel_windows`). Default labels ``C0``, ``C1``, ...;
        default colours :func:`default_channel_colors`.
    attributes : dict, optional
        Free JSON attributes stored at the top level of the group's attributes, beside the
        NGFF metadata (beside ``ome`` in NGFF 0.5), e.g. provenance under ``"gpufusion"``.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    InputError
        For bad options, or when ``out`` exists and ``overwrite`` is False; raised before
        anything is computed.

    Examples
    --------
    >>> import tempfile, dask.array as da
    >>> img = da.ones((300, 200), dtype="uint16", chunks=128)
    >>> out = write_ome_zarr(img, tempfile.mkdtemp() + "/m.ome.zarr", axes=["y", "x"],
    ...                      pixel_size=[0.5, 0.5], unit="micrometer")
    >>> [level["shape"] for level in read_ome_zarr_info(out)["levels"]]
    [(300, 200), (150, 100), (75, 50)]
    """
    out = Path(out)
    if ngff_version not in NGFF_VERSIONS:
        raise InputError(f"ngff_version {ngff_version!r} is not one of {list(NGFF_VERSIONS)}")
    _check_image(image)
    geometry = _geometry(image.ndim, axes, pixel_size, origin, unit)
    names, colors = check_channels(channel_names, channel_colors, image.shape, geometry.axes)
    extra = _check_extra_attributes(attributes)
    chunk_shape = _chunk_shape(chunks, image, geometry.axes)
    codec = _codec_settings(compressor, NGFF_VERSIONS[ngff_version], geometry.axes)
    if pyramid not in PYRAMID_MODES:
        raise InputError(f"pyramid {pyramid!r} is not one of {list(PYRAMID_MODES)}")
    shard_shape = _shard_shape(shard, chunk_shape, image.shape, geometry.axes, ngff_version)
    _check_target(out, overwrite)
    block = shard_shape or chunk_shape
    grid = image if isinstance(image, BlockGrid) else None
    if grid is not None and (pyramid != "inline" or grid.chunks != da.core.normalize_chunks(
            block, grid.shape)):
        image = grid.to_dask()  # read-back, or other blocks: through a dask array
        grid = None
    if grid is None:
        if not isinstance(image, da.Array):
            image = da.from_array(np.asarray(image), chunks=block)
        elif image.chunks != da.core.normalize_chunks(block, image.shape):
            image = image.rechunk(block)
    task_backend = backend or getattr(image, "backend", None) or "numpy"

    plan = pyramid_factors(
        image.shape,
        chunk_shape,
        geometry.axes,
        pixel_size=geometry.pixel_size if anisotropic_pyramid else None,
    )
    layouts, _ = _pyramid_layout(image.shape, chunk_shape, plan, shard_shape)
    n_inline = len(_inline_blocks(block, image.shape, plan)) - 1
    multiscale = _multiscale(geometry, _total_factors(plan, image.ndim), name, ngff_version)
    if resume is not None:
        if pyramid != "inline":
            raise InputError("resume: needs pyramid='inline' (one task per block)")
        resume = {**resume, "writer": _writer_fingerprint(
            image, chunk_shape, shard_shape, compressor, ngff_version, geometry, plan)}
    with (
        _output_directory(out, overwrite, resume is not None) as (tmp, resumed),
        _scheduler_for(scheduler, image) as (sched, local),
    ):
        if resumed:
            _check_fingerprint(tmp, resume)
            group = _complete(zarr.open_group, store=str(tmp), mode="r+",
                              zarr_format=NGFF_VERSIONS[ngff_version])
        else:
            group = _complete(
                zarr.create_group,
                store=str(tmp),
                zarr_format=NGFF_VERSIONS[ngff_version],
                attributes=_group_attributes(multiscale, ngff_version, extra=extra),
                overwrite=True,
            )
            if resume is not None:  # before any data: a killed run is found and checked
                _write_json(tmp / RESUME_FILE, resume)
        run = {"scheduler": sched, "progress": progress and local}
        if pyramid == "inline":  # one task per block: fuse, every level it feeds, write
            shapes = [tuple(image.shape)]
            for factors in plan[:n_inline]:
                shapes.append(downsampled_shape(shapes[-1], factors))
            arrays = [group[str(k)] if resumed else
                      _create_level(group, k, shapes[k], image.dtype, layouts[k], codec)
                      for k in range(n_inline + 1)]
            done = None if resume is None else tmp / RESUME_DONE
            if done is not None:
                done.mkdir(exist_ok=True)
            writer = _BlockWriter(arrays, [tuple(f) for f in plan[:n_inline]], block,
                                  task_backend, downsample, to_host,
                                  None if done is None else str(done))
            skip = _done_blocks(done) if resumed and done is not None else None
            graph, keys = block_task_graph(image, writer, skip)
            _run_graph(graph, keys, sched, _pass_label(0, n_inline + 1), run["progress"])
            stored = arrays[-1]
        else:
            n_inline = 0
            if to_host is not None:  # the one device-to-host copy per block
                host_meta = np.empty((0,) * image.ndim, image.dtype)
                image = image.map_blocks(to_host, dtype=image.dtype, meta=host_meta)
            stored = _store_levels([image], group, 0, chunk_shape, codec, **run,
                                   layouts=layouts[:1])[0]
        for level in range(n_inline + 1, len(plan) + 1):
            factors = plan[level - 1]
            out_chunks = layouts[level].shards or layouts[level].chunks
            # Read blocks of 2C straight from the store: no rechunk tasks in the graph.
            read_chunks = tuple(c * f for c, f in zip(out_chunks, factors, strict=True))
            lower = pyramid_level(da.from_zarr(stored, chunks=read_chunks), factors, out_chunks)
            stored = _store_levels([lower], group, level, chunk_shape, codec, **run,
                                   layouts=layouts[level:level + 1])[0]
        # rendering hints last: the display windows come from the smallest level
        omero = _omero(names, colors, channel_windows(stored, geometry.axes), name)
        _complete(group.attrs.put, _group_attributes(multiscale, ngff_version, omero, extra))
    return out


def _describe_codecs(array: zarr.Array) -> str:
    parts = []
    for codec in array.compressors:
        if hasattr(codec, "get_config"):  # numcodecs (Zarr v2)
            config = dict(codec.get_config())
            label = config.pop("id")
        else:  # zarr.codecs (Zarr v3)
            spec = codec.to_dict()
            label, config = spec["name"], dict(spec.get("configuration", {}))
        config.pop("typesize", None)
        config.pop("blocksize", None)
        if label == "blosc" and isinstance(config.get("shuffle"), int):
            config["shuffle"] = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}.get(
                config["shuffle"], config["shuffle"]
            )
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k != "checksum")
        parts.append(f"{label}({settings})")
    return " + ".join(parts) or "none"


def _not_ome_zarr(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not an OME-Zarr image: {why}")


def _bad_field(file: Path, field: str, expected: str, value: Any) -> InputError:
    """One line naming a metadata file, the field at fault, what it must be and what it is."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"{file}: {field} must be {expected}, got {shown}")


def _metadata_json(file: Path) -> Any:
    """A Zarr metadata file's JSON; invalid JSON is named with its line and column."""
    import json

    try:
        return json.loads(file.read_bytes())
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno} "
                         f"({exc.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{file}: not a JSON text (not UTF-8)") from None


def _group_metadata(path: Path) -> tuple[Path, str, dict[str, Any], int]:
    """File holding a group's attributes, the field prefix there, the attributes, format."""
    if (path / "zarr.json").is_file():
        file = path / "zarr.json"
        node = _metadata_json(file)
        if not isinstance(node, dict):
            raise _bad_field(file, "the document", "a JSON object", node)
        if node.get("node_type") != "group":
            raise _not_ome_zarr(path, f"{file.name} has node_type {node.get('node_type')!r}, "
                                      "not 'group'")
        attrs = node.get("attributes", {})
        if not isinstance(attrs, dict):
            raise _bad_field(file, "attributes", "a JSON object", attrs)
        if "ome" not in attrs:
            return file, "attributes.", attrs, 3
        if not isinstance(attrs["ome"], dict):
            raise _bad_field(file, "attributes.ome", "a JSON object", attrs["ome"])
        return file, "attributes.ome.", attrs["ome"], 3
    if (path / ".zgroup").is_file():
        zgroup = _metadata_json(path / ".zgroup")
        if not isinstance(zgroup, dict):
            raise _bad_field(path / ".zgroup", "the document", "a JSON object", zgroup)
        file = path / ".zattrs"
        attrs = _metadata_json(file) if file.is_file() else {}
        if not isinstance(attrs, dict):
            raise _bad_field(file, "the document", "a JSON object", attrs)
        return file, "", attrs, 2
    raise _not_ome_zarr(path, "no Zarr group there")


def _optional_text(file: Path, field: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _bad_field(file, field, "a string", value)


def _info_axes(file: Path, field: str, axes: Any) -> list[dict[str, Any]]:
    """NGFF axes: objects with a string ``name`` (0.4+) or plain names (0.3)."""
    if not isinstance(axes, list):
        raise _bad_field(file, field, "a list", axes)
    out = []
    for k, axis in enumerate(axes):
        if isinstance(axis, str):
            out.append({"name": axis, "type": None, "unit": None})
            continue
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            raise _bad_field(file, f"{field}[{k}]", "an object with a string 'name'", axis)
        out.append({key: _optional_text(file, f"{field}[{k}].{key}", axis.get(key))
                    for key in ("name", "type", "unit")})
    return out


def _info_transforms(file: Path, field: str, transforms: Any, ndim: int) -> list[dict]:
    """``coordinateTransformations``: objects; scale/translation vectors of ``ndim`` numbers."""
    if not isinstance(transforms, list):
        raise _bad_field(file, field, "a list", transforms)
    for k, transform in enumerate(transforms):
        if not isinstance(transform, dict):
            raise _bad_field(file, f"{field}[{k}]", "an object", transform)
        kind = transform.get("type")
        if kind in ("scale", "translation") and kind in transform:
            vector = transform[kind]
            if not (isinstance(vector, list) and len(vector) == ndim and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in vector)):
                raise _bad_field(file, f"{field}[{k}].{kind}", f"a list of {ndim} finite "
                                 f"numbers (the arrays are {ndim}D)", vector)
    return transforms


def _effective_transform(
    dataset: dict[str, Any], global_transforms: list[dict[str, Any]], ndim: int
) -> tuple[list[float], list[float]]:
    """Compose a dataset's scale/translation with the multiscale-wide ones, if any.

    The transforms must have been checked (:func:`_info_transforms`).
    """
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for transform in [*dataset.get("coordinateTransformations", []), *global_transforms]:
        if transform.get("type") == "scale" and "scale" in transform:
            scale = [s * g for s, g in zip(scale, transform["scale"], strict=True)]
            translation = [t * g for t, g in zip(translation, transform["scale"], strict=True)]
        elif transform.get("type") == "translation" and "translation" in transform:
            translation = [
                t + g for t, g in zip(translation, transform["translation"], strict=True)
            ]
    return scale, translation


def _open_level(path: Path, file: Path, field: str, dataset: Any, zarr_format: int) -> Any:
    """The array a ``datasets[k]`` entry names, inside the group; its metadata checked."""
    if not isinstance(dataset, dict):
        raise _bad_field(file, field, "an object with a 'path'", dataset)
    rel = dataset.get("path")
    parts = Path(rel).parts if isinstance(rel, str) else ()
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise _bad_field(file, f"{field}.path", "a path inside the group", rel)
    meta = path / rel / ("zarr.json" if zarr_format == 3 else ".zarray")
    if not meta.is_file():
        if (path / rel / ("zarr.json" if zarr_format == 3 else ".zgroup")).is_file():
            raise _not_ome_zarr(path, f"dataset {rel!r} is not an array")
        raise _not_ome_zarr(path, f"dataset {rel!r} is missing")
    node = _metadata_json(meta)
    if not isinstance(node, dict):
        raise _bad_field(meta, "the document", "a JSON object", node)
    if zarr_format == 3 and node.get("node_type") != "array":
        raise _not_ome_zarr(path, f"dataset {rel!r} is not an array")
    try:
        return zarr.open_array(store=str(path / rel), mode="r", zarr_format=zarr_format)
    except Exception as exc:  # zarr raises several types for malformed array metadata
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise InputError(f"{meta}: unreadable Zarr array metadata ({message})") from None


def read_ome_zarr_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe an OME-Zarr image: version, axes and every level's layout.

    Parameters
    ----------
    path : str or path-like
        Folder of an OME-Zarr image (NGFF 0.4 on Zarr v2, or 0.5 on Zarr v3).

    Returns
    -------
    dict
        ``path``, ``ngff_version``, ``zarr_format``, ``name``, ``downsampling`` (the
        multiscale ``type``), ``axes`` (list of ``{"name", "type", "unit"}``),
        ``compressor`` (of level 0) and ``levels``: one dict per dataset with ``path``,
        ``shape``, ``chunks``, ``dtype``, ``scale``, ``translation`` and ``compressor``.

    Raises
    ------
    InputError
        If ``path`` is missing, not a Zarr group, or has no multiscales metadata; for
        invalid JSON (naming the file, line and column), metadata of the wrong type or
        length (naming the file and the field, e.g. ``multiscales[0].datasets``), a
        dataset path leading out of the group, or a level array zarr cannot open.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> out = write_ome_zarr(np.zeros((4, 6), "uint8"), tempfile.mkdtemp() + "/a.zarr",
    ...                      axes=["y", "x"], ngff_version="0.5")
    >>> info = read_ome_zarr_info(out)
    >>> info["ngff_version"], info["zarr_format"], info["levels"][0]["shape"]
    ('0.5', 3, (4, 6))
    """
    path = Path(path)
    file, prefix, ome, zarr_format = _group_metadata(path)
    multiscales = ome.get("multiscales")
    if multiscales is None:
        raise _not_ome_zarr(path, "no 'multiscales' metadata")
    if not isinstance(multiscales, list) or not multiscales:
        raise _bad_field(file, f"{prefix}multiscales", "a non-empty list", multiscales)
    field = f"{prefix}multiscales[0]"
    multiscale = multiscales[0]
    if not isinstance(multiscale, dict):
        raise _bad_field(file, field, "an object", multiscale)
    datasets = multiscale.get("datasets", [])
    if not isinstance(datasets, list):
        raise _bad_field(file, f"{field}.datasets", "a list", datasets)
    if not datasets:
        raise _not_ome_zarr(path, "the multiscales metadata lists no datasets")
    version = ome.get("version") or multiscale.get("version")
    texts = {key: _optional_text(file, f"{field}.{key}", multiscale.get(key))
             for key in ("name", "type")}
    levels = []
    for k, dataset in enumerate(datasets):
        array = _open_level(path, file, f"{field}.datasets[{k}]", dataset, zarr_format)
        transforms = _info_transforms(
            file, f"{field}.datasets[{k}].coordinateTransformations",
            dataset.get("coordinateTransformations", []), array.ndim)
        global_transforms = _info_transforms(
            file, f"{field}.coordinateTransformations",
            multiscale.get("coordinateTransformations") or [], array.ndim)
        scale, translation = _effective_transform(
            {"coordinateTransformations": transforms}, global_transforms, array.ndim)
        levels.append(
            {
                "path": dataset["path"],
                "shape": tuple(array.shape),
                "chunks": tuple(array.chunks),
                "dtype": str(array.dtype),
                "scale": scale,
                "translation": translation,
                "compressor": _describe_codecs(array),
            }
        )
    axes = _info_axes(file, f"{field}.axes", multiscale.get("axes", []))
    ndim = len(levels[0]["shape"])
    if axes and len(axes) != ndim:
        raise _bad_field(file, f"{field}.axes", f"{ndim} axes (the arrays are {ndim}D)",
                         [a["name"] for a in axes])
    return {
        "path": str(path),
        "ngff_version": _optional_text(file, f"{prefix}version", version),
        "zarr_format": zarr_format,
        "name": texts["name"],
        "downsampling": texts["type"],
        "axes": axes,
        "compressor": levels[0]["compressor"],
        "channels": _info_channels(ome.get("omero")),
        "levels": levels,
    }


def _info_channels(omero: Any) -> list[dict[str, str | None]]:
    """Label and colour of each channel of an ``omero`` block (transitional NGFF metadata,
    so read leniently: what is not a string is left out)."""
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(channels, list):
        return []
    return [{key: value if isinstance(value := c.get(key), str) else None
             for key in ("label", "color")} for c in channels if isinstance(c, dict)]


def _numbers(values: Sequence[float], sep: str = ", ") -> str:
    return sep.join(f"{v:g}" for v in values)


def format_info(info: dict[str, Any]) -> str:
    """Render :func:`read_ome_zarr_info` output as a small text table.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> out = write_ome_zarr(np.zeros((300, 200), "uint16"), tempfile.mkdtemp() + "/a.zarr",
    ...                      axes=["y", "x"], chunks=128, pixel_size=[0.5, 0.5], unit="um")
    >>> print(format_info(read_ome_zarr_info(out)))  # doctest: +ELLIPSIS
    /.../a.zarr
      OME-Zarr NGFF 0.4 (Zarr v2), name 'gpufusion', downsampling 'mean'
      axes: y (space, micrometer), x (space, micrometer)
      compressor: blosc(cname=zstd, clevel=1, shuffle=bitshuffle)
      channels: C0 (#FFFFFF)
      level  shape      chunks     dtype   scale     translation
      0      300 x 200  128 x 128  uint16  0.5, 0.5  0, 0
      1      150 x 100  64 x 64    uint16  1, 1      0.25, 0.25
      2      75 x 50    75 x 50    uint16  2, 2      0.75, 0.75
    """
    axes = ", ".join(
        f"{a['name']} ({', '.join(str(v) for v in (a['type'], a['unit']) if v)})"
        if a["type"] or a["unit"]
        else str(a["name"])
        for a in info["axes"]
    )
    header = ("level", "shape", "chunks", "dtype", "scale", "translation")
    rows = [
        (
            level["path"],
            " x ".join(map(str, level["shape"])),
            " x ".join(map(str, level["chunks"])),
            level["dtype"],
            _numbers(level["scale"]),
            _numbers(level["translation"]),
        )
        for level in info["levels"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    table = [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(
        [
            info["path"],
            f"  OME-Zarr NGFF {info['ngff_version']} (Zarr v{info['zarr_format']}), "
            f"name {info['name']!r}, downsampling {info['downsampling']!r}",
            f"  axes: {axes}",
            f"  compressor: {info['compressor']}",
            *([f"  channels: {channels}"] if (channels := ", ".join(
                f"{c['label'] or '?'}" + (f" (#{c['color']})" if c["color"] else "")
                for c in info.get("channels", []))) else []),
            *table,
        ]
    )
