"""The whole job in one call: fuse a mosaic and write it as a multiscale OME-Zarr image.

This is what ``gpufusion fuse`` and ``gpufusion demo`` run; it only strings together the
public stages (:func:`gpufusion.fuse.fuse`, :func:`gpufusion.writers.ome_zarr.write_ome_zarr`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from .backends import resolve_backend
from .errors import InputError
from .fuse import DEFAULT_CHUNK, fuse
from .layout import Mosaic
from .writers.ome_tiff import COMPRESSIONS as TIFF_COMPRESSIONS
from .writers.ome_tiff import write_ome_tiff
from .writers.ome_zarr import write_ome_zarr
from .writers.target import (
    NO_SPACE_ERRNOS,
    check_not_input,
    check_replaceable,
    is_tiff_path,
    no_space_message,
    output_size_estimate,
    paths_read,
    recover_interrupted,
)

SPATIAL_AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


@dataclass(frozen=True)
class FuseResult:
    """What a fusion run produced."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    n_tiles: int
    backend: str
    seconds: float

    @property
    def megapixels_per_second(self) -> float:
        return float(np.prod(self.shape)) / 1e6 / self.seconds if self.seconds > 0 else 0.0


def check_output_path(out: str | Path, overwrite: bool,
                      inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early (before any work) when ``out`` may not be written.

    Refused: ``out`` equal to, inside or containing one of ``inputs`` (after resolving
    links); an existing ``out`` without ``overwrite``; with ``overwrite``, an existing
    ``out`` that is not an earlier output of its kind (an OME-Zarr image group, or an
    OME-TIFF file for ``*.tif``); a parent folder that does not exist. See
    :mod:`gpufusion.writers.target`.

    Raises
    ------
    InputError
        One line naming ``out`` and what is wrong.
    """
    out = Path(out)
    check_not_input(out, inputs)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{out}: output already exists (use --overwrite to replace it)")
        check_replaceable(out)
    if not out.parent.exists():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    return out


def mosaic_inputs(mosaic: Mosaic | Sequence[Any]) -> list[Path]:
    """Every file and folder the tiles of ``mosaic`` (one, ``[c]`` or ``[t][c]``) read."""
    if isinstance(mosaic, Mosaic):
        return paths_read(t.source for t in mosaic.tiles)
    return [p for m in mosaic for p in mosaic_inputs(m)]


class OutputRecoveryWarning(UserWarning):
    """:func:`fuse_to_file` put back or removed what an interrupted earlier run left."""


def fuse_to_file(
    mosaic: Mosaic | Sequence[Mosaic],
    out: str | Path,
    *,
    chunks: int = DEFAULT_CHUNK,
    blend: str = "linear",
    blend_width: float | Sequence[float] | None = None,
    interpolation: str = "linear",
    dtype: str | np.dtype | None = None,
    backend: str = "numpy",
    ngff_version: str = "0.4",
    compressor: str = "blosc-zstd",
    overwrite: bool = False,
    progress: bool = False,
    scheduler: Any = None,
    allow_sparse: bool = False,
) -> FuseResult:
    """Fuse ``mosaic`` and write it to ``out`` as OME-Zarr or pyramidal OME-TIFF.

    ``out`` ending in ``.tif``/``.tiff`` gives a tiled pyramidal OME-TIFF (BigTIFF, levels as
    SubIFDs; ``compressor`` ``zlib``, ``lzw``, ``zstd`` or ``none``, any other value meaning
    ``zlib``); anything else an OME-Zarr image (NGFF ``ngff_version``).

    The output is written under a temporary name and renamed to ``out`` only when complete;
    with ``overwrite`` an existing ``out`` is replaced only then, and only when it is an
    earlier output of the same kind (an OME-Zarr image, an OME-TIFF file). ``out`` may not
    be, be inside, or contain a file or folder the tiles are read from. An earlier output
    that a killed run left renamed aside is put back first, and with ``overwrite`` its
    leftover temporary folders are removed (each with an :class:`OutputRecoveryWarning`).
    A full disk or a file size limit raises :class:`InputError` naming ``out`` and about
    how much space the output needs; nothing is left behind.

    Parameters
    ----------
    mosaic : Mosaic, sequence of Mosaic, or sequence of sequences of Mosaic
        One mosaic; one per channel (same layout), written as a leading ``c`` axis; or
        ``[t][c]`` for time points, written as ``t, c`` axes (time points are fused into
        their common bounding box, so stage drift between them is kept).
    out : path
        ``*.ome.zarr`` (a folder) or ``*.ome.tif``.
    backend : {"numpy", "cupy", "auto"}
        ``auto`` picks the GPU when one is usable (on every worker, with a cluster client).
    ngff_version : {"0.4", "0.5"}
        NGFF 0.4 is written as Zarr v2, NGFF 0.5 as Zarr v3.
    scheduler : optional
        Dask scheduler for the computation (None: dask's default). A
        ``distributed.Client``: the backend is resolved on its workers
        (:func:`gpufusion.cluster.resolve_cluster_backend`), so this process needs no GPU
        for ``cupy``.
    allow_sparse : bool
        Fuse an output more than 90 % empty instead of refusing it (see :func:`gpufusion.fuse`).

    Other parameters are those of :func:`gpufusion.fuse` and
    :func:`gpufusion.write_ome_zarr`.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from gpufusion.synthetic import make_mosaic
    >>> m = make_mosaic((2, 2), (64, 64)).mosaic()
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> fuse_to_file(m, d / "m.ome.zarr", chunks=32).shape
    (124, 124)
    """
    check_not_input(out, mosaic_inputs(mosaic))
    for message in recover_interrupted(out, overwrite):
        warnings.warn(message, OutputRecoveryWarning, stacklevel=2)
    out = check_output_path(out, overwrite)
    grid, lead = _as_time_channel_grid(mosaic)
    first = grid[0][0]
    on_workers = _is_cluster_client(scheduler)
    if on_workers:
        from .cluster import resolve_cluster_backend

        name, _ = resolve_cluster_backend(scheduler, backend)
    else:
        name, _ = resolve_backend(backend)
    t0 = time.perf_counter()
    fused = [[fuse(m, chunks=chunks, blend=blend, blend_width=blend_width,
                   interpolation=interpolation, dtype=dtype, backend=name,
                   on_workers=on_workers, allow_sparse=allow_sparse) for m in channels]
             for channels in grid]
    # one zarr chunk per time point and channel; no stacking layers for a single mosaic
    if not lead:
        image = fused[0][0]
    elif lead == ("c",):
        image = da.stack(fused[0])
    else:
        image = da.stack([da.stack(channels) for channels in fused])
    axes = (*lead, *SPATIAL_AXES[first.ndim])
    out_chunks = (*(1,) * len(lead), *(chunks,) * first.ndim)
    pixel = first.pixel_size or (1.0,) * first.ndim
    origin = tuple(float(o) * p for o, p in zip(first.origin, pixel, strict=True))
    common = {"axes": axes, "pixel_size": pixel, "unit": first.unit, "origin": origin,
              "overwrite": overwrite, "progress": progress, "scheduler": scheduler}
    tiff = is_tiff_path(out)
    try:
        if tiff:
            if name == "cupy":  # the TIFF writer stores host arrays: one copy per chunk
                from .backends.cupy_backend import to_host

                image = image.map_blocks(to_host, dtype=image.dtype,
                                         meta=np.empty((0,) * image.ndim, image.dtype))
            tiff_codec = compressor if compressor in TIFF_COMPRESSIONS else "zlib"
            write_ome_tiff(image, out, compression=tiff_codec, **common)
        else:
            write_ome_zarr(image, out, ngff_version=ngff_version, chunks=out_chunks,
                           compressor=compressor,
                           anisotropic_pyramid=first.pixel_size is not None,
                           **_zarr_pyramid_options(name), **common)
    except OSError as exc:  # the writers have removed their temporary output by now
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        needed = output_size_estimate(image.shape, np.dtype(image.dtype).itemsize, tiff)
        raise InputError(no_space_message(out, exc, needed)) from exc
    seconds = time.perf_counter() - t0
    return FuseResult(out, tuple(image.shape), np.dtype(image.dtype), len(first), name,
                      seconds)


def _is_cluster_client(scheduler: Any) -> bool:
    """True for a ``distributed.Client`` (duck-typed: distributed need not be installed)."""
    return scheduler is not None and callable(getattr(scheduler, "run", None)) \
        and callable(getattr(scheduler, "scheduler_info", None))


def _as_time_channel_grid(mosaic: Any) -> tuple[list[list[Mosaic]], tuple[str, ...]]:
    """Normalise one mosaic, channels ``[c]`` or time points x channels ``[t][c]``.

    Returns the ``[t][c]`` grid, every mosaic on one shared output grid, and the leading
    axes the output gets: ``()``, ``("c",)`` or ``("t", "c")``.
    """
    if isinstance(mosaic, Mosaic):
        grid, lead = [[mosaic]], ()
    elif all(isinstance(m, Mosaic) for m in mosaic):
        grid, lead = [list(mosaic)], ("c",)
    else:
        grid, lead = [list(channels) for channels in mosaic], ("t", "c")
    flat = [m for channels in grid for m in channels]
    if not flat or any(len(channels) != len(grid[0]) for channels in grid):
        raise InputError("channels: every time point must have the same number of channels")
    first = flat[0]
    if any(m.ndim != first.ndim for m in flat):
        raise InputError("channels: every channel and time point must have the same ndim")
    for channels in grid:
        for m in channels[1:]:
            if m.shape != channels[0].shape or not np.array_equal(m.origin, channels[0].origin):
                raise InputError("channels: every channel must have the same tile layout")
    lo = np.min([m.origin for m in flat], axis=0)
    hi = np.max([m.origin + np.asarray(m.shape) for m in flat], axis=0)
    if len(grid) > 1:  # time points may drift: fuse all into their common bounding box
        grid = [[m.with_grid(lo, hi - lo) for m in channels] for channels in grid]
    return grid, lead


def _zarr_pyramid_options(backend: str) -> dict[str, Any]:
    """How :func:`write_ome_zarr` builds the pyramid for ``backend``: inline.

    Each fused block feeds the larger levels while it is in memory, so level 0 is never
    read back and decompressed (about 15 % faster than read-back for 600 tiles on 2 CPU
    cores, for about 10 % more peak memory; benchmarks/RESULTS.md). CuPy blocks are
    downsampled on the device (``kernels/downsample.cu``), so each block and level crosses
    to the host once, only to be stored. CuPy is imported only where the blocks are (a
    cluster's client may have none).
    """
    if backend != "cupy":
        return {"pyramid": "inline"}
    from .backends.cupy_backend import downsample_mean2_gpu, to_host

    return {"pyramid": "inline", "downsample": downsample_mean2_gpu, "to_host": to_host}


#: The same function; the output format follows ``out``'s extension.
fuse_to_ome_zarr = fuse_to_file
