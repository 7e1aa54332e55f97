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
Level 0 is computed once from the (lazy, expensive) fusion graph and stored chunk by
chunk, so the fusion is never recomputed and no level is ever held in memory whole.
``pyramid="readback"``: level ``k + 1`` is computed from level ``k`` read back from the store.
``pyramid="inline"``: levels 1, 2, ... are downsampled block by block from each level-0 block
while it is in memory (on the GPU for CuPy blocks; :func:`gpufusion.pyramid.blockwise_levels`)
and stored with level 0 in one ``dask.array.store``; blocks cross to the host (``to_host``)
only to be stored, merged there into the same Zarr chunks as read-back writes (identical
stores). This goes on while halved blocks stay >= :data:`INLINE_MIN_CHUNK` and block-wise
equals whole-array downsampling; the small levels left are done by read-back.

Everything is written to a hidden sibling directory ``.NAME.tmp-XXXX`` that is renamed to the
output only when complete; on any error or interrupt it is removed and an existing output is
left untouched.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
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

from gpufusion.errors import InputError
from gpufusion.progress import dask_progress
from gpufusion.pyramid import (
    SPATIAL_AXES,
    blockwise_levels,
    downsample_mean2,
    downsampled_shape,
    pyramid_factors,
    pyramid_level,
)
from gpufusion.units import NGFF_SPACE_UNITS, ngff_unit
from gpufusion.units import UNIT_ALIASES as _UNIT_ALIASES

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

#: Inline levels stop before a halved block would be shorter than this on an axis.
INLINE_MIN_CHUNK = 64

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
    """The NGFF ``omero`` block (rendering hints napari, OMERO and others read)."""
    labels = names if names is not None else [f"C{k}" for k in range(len(colors))]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_dir(out, "tmp")
    try:
        yield tmp
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


# ------------------------------------------------------------------------------- compute


@contextmanager
def _scheduler_for(scheduler: Any, image: da.Array) -> Iterator[tuple[Any, bool]]:
    """Yield ``(scheduler, is_local)``.

    The default threaded scheduler is replaced by a private thread pool that is shut down
    (waiting for running tasks) on exit, so that after a failed block no straggling task
    can write into the temporary folder once it has been removed.
    """
    get = get_scheduler(scheduler=scheduler, collections=[image])
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
) -> list[zarr.Array]:
    """Store ``sources`` as arrays ``first``, ``first + 1``, ... of ``group`` in one pass.

    With ``progress``, one line counts the tasks of the pass, labelled ``label`` (default:
    ``fusing, writing levels 0-2`` for a pass from level 0, else ``writing level 3``).
    """
    targets, regrouped = [], []
    for level, source in enumerate(sources, start=first):
        level_chunks = _level_chunks(chunks, source.shape)
        if source.chunks != da.core.normalize_chunks(level_chunks, source.shape):
            source = source.rechunk(level_chunks)
        regrouped.append(source)
        # write_empty_chunks: skipping empty chunks costs a comparison per chunk
        settings = {"fill_value": 0, "config": {"write_empty_chunks": True}, **codec}
        shape, dtype = source.shape, source.dtype
        targets.append(group.create_array(str(level), shape=shape, chunks=level_chunks,
                                          dtype=dtype, **settings))
    if label is None:
        last = first + len(sources) - 1
        levels = f"level {first}" if last == first else f"levels {first}-{last}"
        label = f"fusing, writing {levels}" if first == 0 else f"writing {levels}"
    with dask_progress(label, progress):  # on stderr: stdout stays for results
        da.store(regrouped, targets, lock=False, scheduler=scheduler)
    return targets


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
    channel_names: Sequence[str] | None = None,
    channel_colors: Sequence[str] | None = None,
    attributes: dict[str, Any] | None = None,
) -> Path:
    """Write ``image`` and its 2x mean pyramid as an OME-Zarr image, atomically.

    Parameters
    ----------
    image : dask.array.Array
        Level 0, usually a lazy fusion graph; each block is computed exactly once. A NumPy
        array is accepted too (chunked by ``chunks``). Integer or float dtype.
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
        ``"inline"``: the larger levels from each block of ``image`` while it is in memory,
        stored with level 0 in one pass (see the module notes): fewer device-to-host copies
        for CuPy blocks, ~15-20% faster on the CPU too, at a somewhat higher peak memory.
        Both write the same store.
    downsample : callable, optional
        ``downsample(block, factors)`` for the inline levels, run on ``image``'s blocks:
        default :func:`gpufusion.pyramid.downsample_mean2`; for CuPy blocks
        :func:`gpufusion.backends.cupy_backend.downsample_mean2_gpu`. Read-back levels
        always use :func:`~gpufusion.pyramid.downsample_mean2`.
    to_host : callable, optional
        Turns a block into a NumPy array right before it is stored, e.g. ``cupy.asnumpy``;
        default: blocks are stored as they are (identity).
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
    _check_target(out, overwrite)
    if not isinstance(image, da.Array):
        image = da.from_array(np.asarray(image), chunks=chunk_shape)
    elif image.chunks != da.core.normalize_chunks(chunk_shape, image.shape):
        image = image.rechunk(chunk_shape)

    plan = pyramid_factors(
        image.shape,
        chunk_shape,
        geometry.axes,
        pixel_size=geometry.pixel_size if anisotropic_pyramid else None,
    )
    multiscale = _multiscale(geometry, _total_factors(plan, image.ndim), name, ngff_version)
    with (
        _atomic_directory(out, overwrite) as tmp,
        _scheduler_for(scheduler, image) as (sched, local),
    ):
        group = zarr.create_group(
            store=str(tmp),
            zarr_format=NGFF_VERSIONS[ngff_version],
            attributes=_group_attributes(multiscale, ngff_version, extra=extra),
            overwrite=True,
        )
        run = {"scheduler": sched, "progress": progress and local}
        levels = [image]
        if pyramid == "inline":  # each block feeds its children while it is in memory
            down = downsample or downsample_mean2
            levels += blockwise_levels(image, plan, down, INLINE_MIN_CHUNK)
        if to_host is not None:  # the one device-to-host copy per block and level
            host_meta = np.empty((0,) * image.ndim, image.dtype)
            levels = [lvl.map_blocks(to_host, dtype=lvl.dtype, meta=host_meta) for lvl in levels]
        stored = _store_levels(levels, group, 0, chunk_shape, codec, **run)[-1]
        for level, factors in enumerate(plan[len(levels) - 1 :], start=len(levels)):
            out_chunks = _level_chunks(chunk_shape, downsampled_shape(stored.shape, factors))
            # Read blocks of 2C straight from the store: no rechunk tasks in the graph.
            read_chunks = tuple(c * f for c, f in zip(out_chunks, factors, strict=True))
            lower = pyramid_level(da.from_zarr(stored, chunks=read_chunks), factors, out_chunks)
            stored = _store_levels([lower], group, level, chunk_shape, codec, **run)[0]
        # rendering hints last: the display windows come from the smallest level
        omero = _omero(names, colors, channel_windows(stored, geometry.axes), name)
        group.attrs.put(_group_attributes(multiscale, ngff_version, omero, extra))
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
      1      150 x 100  128 x 100  uint16  1, 1      0.25, 0.25
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
