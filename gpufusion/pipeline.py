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

import numpy as np

from .backends import resolve_backend
from .errors import InputError
from .fuse import DEFAULT_CHUNK, StackedBlocks, fuse_blocks
from .layout import Mosaic
from .writers.ome_tiff import write_ome_tiff
from .writers.ome_zarr import write_ome_zarr
from .writers.target import (
    NO_SPACE_ERRNOS,
    check_compression,
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
    from .writers.target import output_kind

    out = Path(out)
    check_not_input(out, inputs)
    output_kind(out)  # only OME-Zarr and OME-TIFF names: InputError naming the others
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
    compressor: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    scheduler: Any = None,
    allow_sparse: bool = False,
    channel_names: Sequence[str] | None = None,
    name: str | None = None,
    provenance: dict[str, Any] | None = None,
    shard: int | str | None = "auto",
    resume: bool = False,
    rgb: bool = False,
) -> FuseResult:
    """Fuse ``mosaic`` and write it to ``out`` as OME-Zarr or pyramidal OME-TIFF.

    ``out`` ending in ``.tif``/``.tiff`` gives a tiled pyramidal OME-TIFF (BigTIFF, levels as
    SubIFDs; ``compressor`` ``zlib`` (default), ``lzw``, ``zstd`` or ``none``), ending in
    ``.zarr`` an OME-Zarr image (NGFF ``ngff_version``; ``compressor`` ``blosc-zstd``
    (default), ``blosc-lz4``, ``zstd``, ``zlib`` or ``none``); any other name, or a
    ``compressor`` that does not apply to the output's kind, is an :class:`InputError`
    (:func:`gpufusion.writers.target.check_compression`).

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
    channel_names : sequence of str, optional
        One name per channel (one for a single mosaic), written as the OME-TIFF ``Channel
        Name`` or the OME-Zarr ``omero`` channel labels (with default colours: one channel
        white, two green and magenta, three red, green, blue). Default ``C0``, ``C1``, ...
        in OME-Zarr and none in OME-TIFF.
    name : str, optional
        Image name (NGFF multiscales ``name``, OME ``Image Name``); default the output's
        name without its suffixes (``slide`` for ``slide.ome.zarr``).
    provenance : dict, optional
        JSON entries added to the provenance record, which is written under ``"gpufusion"``
        in the OME-Zarr attributes and as an OME ``MapAnnotation`` (namespace
        ``gpufusion``): gpufusion's version, the call's parameters, tile, channel and time
        point counts, the folder the tiles come from, and these entries (the command line
        writes ``command``, ``input`` and ``registration`` here).
    shard : int, "auto", 0 or None
        OME-Zarr with NGFF 0.5 only: Zarr v3 shards of ``shard`` pixels per spatial axis (a
        multiple of ``chunks``), each one fusion block written whole by one task. ``"auto"``
        (default): shards of ``2 * chunks`` when the output would otherwise have more than
        :data:`SHARD_AUTO_CHUNKS` chunks and is NGFF 0.5, none otherwise; 0 or None: none.
        A size with NGFF 0.4 is an :class:`InputError`.
    resume : bool
        OME-Zarr only: write resumably and continue what an earlier ``resume`` run of the
        same ``out`` left (killed, failed or interrupted: its temporary folder is kept).
        Only the blocks not yet written are fused; the result is byte for byte that of an
        uninterrupted run. Refused (:class:`InputError` naming what changed) when the tile
        files (paths, sizes, modification times), the positions or the options differ
        (tiles held in memory are compared by name, shape and position only).
    rgb : bool
        The three channels are the R, G, B samples of colour tiles (``TileSet.rgb``, see
        :mod:`gpufusion.readers.rgb`): OME-Zarr channels coloured red, green, blue (named
        R, G, B unless ``channel_names`` says otherwise); OME-TIFF written as interleaved RGB
        (Photometric RGB, ``SamplesPerPixel=3``) at every level. Needs exactly 3 channels.

    The pixel size and unit are the mosaic's (:attr:`Mosaic.pixel_size
    <gpufusion.layout.Mosaic>`); when it has none, none is written: no ``PhysicalSize`` in
    the OME-XML, a scale of 1 without a unit in OME-Zarr.

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
    if resume and is_tiff_path(out):
        raise InputError(f"{out}: resume applies to OME-Zarr outputs, not OME-TIFF")
    for message in recover_interrupted(out, overwrite, resume=resume):
        warnings.warn(message, OutputRecoveryWarning, stacklevel=2)
    out = check_output_path(out, overwrite)
    compressor = check_compression(out, compressor, option="compressor")
    grid, lead = _as_time_channel_grid(mosaic)
    first = grid[0][0]
    channel_names = _check_channel_names(channel_names, len(grid[0]))
    colour: dict[str, Any] = {}
    if rgb:
        from .readers.rgb import RGB_CHANNELS, RGB_COLORS

        if len(grid[0]) != 3:
            raise InputError(f"rgb: needs 3 channels (R, G, B), got {len(grid[0])}")
        channel_names = channel_names or list(RGB_CHANNELS)
        colour = {"rgb": True} if is_tiff_path(out) else {"channel_colors": list(RGB_COLORS)}
    image_name = _image_name(name, out)
    on_workers = _is_cluster_client(scheduler)
    if on_workers:
        from .cluster import resolve_cluster_backend

        name, _ = resolve_cluster_backend(scheduler, backend)
    else:
        name, _ = resolve_backend(backend)
    t0 = time.perf_counter()
    tiff = is_tiff_path(out)
    if tiff and shard not in (None, 0, "auto"):
        raise InputError(f"shard {shard}: applies to OME-Zarr outputs (NGFF 0.5), not "
                         f"OME-TIFF {out.name}")
    shard = None if tiff else _resolve_shard(shard, ngff_version, chunks, first, lead)
    block = shard or chunks  # the fusion block: one task fuses and writes it
    fused = [[fuse_blocks(m, chunks=block, blend=blend, blend_width=blend_width,
                          interpolation=interpolation, dtype=dtype, backend=name,
                          on_workers=on_workers, allow_sparse=allow_sparse) for m in channels]
             for channels in grid]
    # one zarr chunk per time point and channel; no stacking layers for a single mosaic
    if not lead:
        image: Any = fused[0][0]
    elif lead == ("c",):
        image = StackedBlocks(fused[0])
    else:
        image = StackedBlocks(fused)
    axes = (*lead, *SPATIAL_AXES[first.ndim])
    out_chunks = (*(1,) * len(lead), *(chunks,) * first.ndim)
    # an unknown pixel size stays unknown: no physical size, unit or position is written
    known = first.pixel_size is not None
    pixel = first.pixel_size or (1.0,) * first.ndim
    origin = tuple(float(o) * p for o, p in zip(first.origin, pixel, strict=True))
    record = _provenance(grid, lead, provenance, {
        "chunks": chunks, "blend": blend, "blend_width": blend_width,
        "interpolation": interpolation, "dtype": None if dtype is None else str(dtype),
        "backend": name, "allow_sparse": allow_sparse,
        **({} if shard is None else {"shard": shard}), **({"rgb": True} if rgb else {}),
        "compression": compressor, **({} if tiff else {"ngff_version": ngff_version})})
    common = {"axes": axes, "pixel_size": pixel if known else None,
              "unit": first.unit if known else None, "overwrite": overwrite,
              "progress": progress, "scheduler": scheduler, "name": image_name,
              "channel_names": channel_names, "attributes": {"gpufusion": record}}
    try:
        if tiff:
            image = image.to_dask()
            if name == "cupy":  # the TIFF writer stores host arrays: one copy per chunk
                from .backends.cupy_backend import to_host

                image = image.map_blocks(to_host, dtype=image.dtype,
                                         meta=np.empty((0,) * image.ndim, image.dtype))
            write_ome_tiff(image, out, compression=compressor,
                           origin=origin if known else None, **colour, **common)
        else:
            write_ome_zarr(image, out, ngff_version=ngff_version, chunks=out_chunks,
                           origin=origin,
                           compressor=compressor, shard=shard,
                           resume=_resume_fingerprint(grid, record) if resume else None,
                           anisotropic_pyramid=first.pixel_size is not None,
                           **_zarr_pyramid_options(name), **colour, **common)
    except OSError as exc:  # the writers have removed their temporary output by now
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        needed = output_size_estimate(image.shape, np.dtype(image.dtype).itemsize, tiff)
        raise InputError(no_space_message(out, exc, needed)) from exc
    seconds = time.perf_counter() - t0
    return FuseResult(out, tuple(image.shape), np.dtype(image.dtype), len(first), name,
                      seconds)


#: ``shard="auto"`` shards an NGFF 0.5 output with more chunks than this.
SHARD_AUTO_CHUNKS = 10_000

#: ``shard="auto"``: shards of this many chunks per spatial axis.
SHARD_AUTO_FACTOR = 2


def _resolve_shard(shard: int | str | None, ngff_version: str, chunks: int, first: Mosaic,
                   lead: tuple[str, ...]) -> int | None:
    """The shard size for ``shard`` (see :func:`fuse_to_file`), or None for no sharding."""
    if shard is None or (isinstance(shard, str) and shard == "auto"):
        if shard is None or ngff_version != "0.5":
            return None
        from .writers.ome_zarr import chunk_count

        count = chunk_count((*(1,) * len(lead), *first.shape),
                            (*(1,) * len(lead), *(chunks,) * first.ndim),
                            (*lead, *SPATIAL_AXES[first.ndim]))
        return chunks * SHARD_AUTO_FACTOR if count > SHARD_AUTO_CHUNKS else None
    if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or shard < 0:
        raise InputError(f"shard: need a size in pixels (a multiple of the chunk size "
                         f"{chunks}), 0 for none, or 'auto'; got {shard!r}")
    if shard == 0:
        return None
    if ngff_version != "0.5":
        raise InputError(f"shard {shard}: sharding needs NGFF 0.5 (Zarr v3); the output is "
                         f"NGFF {ngff_version} (use --ngff 0.5)")
    if shard % chunks:
        raise InputError(f"shard {shard}: must be a multiple of the chunk size {chunks}")
    return int(shard)


def _resume_fingerprint(grid: list[list[Mosaic]], record: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the files the tiles are
    read from (size, modification time), every tile's position (its affine), the output
    grid, and the options (the provenance ``parameters``)."""
    import os

    inputs: dict[str, list[int]] = {}
    positions: dict[str, Any] = {}
    for t, channels in enumerate(grid):
        for c, m in enumerate(channels):
            for path in paths_read(tile.source for tile in m.tiles):
                try:
                    st = os.stat(path)
                    inputs[str(path)] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    inputs[str(path)] = [-1, -1]
            prefix = f"t{t}c{c}/" if len(grid) > 1 or len(channels) > 1 else ""
            positions[f"{prefix}grid"] = [[float(o) for o in m.origin], list(m.shape)]
            for k, tile in enumerate(m.tiles):
                key = f"{prefix}{tile.name}"
                key = key if key not in positions else f"{key}#{k}"
                positions[key] = {"affine": np.asarray(tile.affine, float).tolist(),
                                  "shape": list(tile.shape)}
    return {"inputs": inputs, "positions": positions,
            "options": {**record["parameters"],
                        **({"correction": record["correction"]} if "correction" in record
                           else {})}}


def _check_channel_names(names: Sequence[str] | None, n: int) -> list[str] | None:
    """``channel_names`` for ``n`` channels: a list of ``n`` non-empty names, or None."""
    if names is None:
        return None
    if isinstance(names, str) or len(names) != n:
        shown = [names] if isinstance(names, str) else list(names)
        raise InputError(f"channel_names: {len(shown)} name(s) {shown} for {n} channel(s); "
                         "give one name per channel")
    checked = [str(name).strip() for name in names]
    if not all(checked):
        raise InputError(f"channel_names: every name must be non-empty, got {list(names)}")
    return checked


def _image_name(name: str | None, out: Path) -> str:
    """The image name: ``name``, or ``out``'s file name without its image suffixes."""
    if name is not None:
        text = str(name).strip()
        if not text or "\n" in text:
            raise InputError(f"name: need a non-empty one-line image name, got {name!r}")
        return text
    stem = out.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _provenance(grid: list[list[Mosaic]], lead: tuple[str, ...], extra: dict[str, Any] | None,
                parameters: dict[str, Any]) -> dict[str, Any]:
    """What made the image: gpufusion version, the call's parameters, the inputs, and
    ``extra`` (the command line adds its own entries)."""
    import datetime
    import os

    from . import __version__

    first = grid[0][0]
    files = [str(p) for p in paths_read(t.source for t in first.tiles)]
    try:
        folder = os.path.commonpath(files) if files else None
    except ValueError:  # paths on different drives
        folder = None
    if folder is not None and len(files) == 1:
        folder = str(Path(folder).parent)
    blend_width = parameters["blend_width"]
    if blend_width is not None and not isinstance(blend_width, int | float):
        parameters["blend_width"] = [float(w) for w in blend_width]
    record: dict[str, Any] = {
        "software": "gpufusion",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "call": "gpufusion.fuse_to_file",
        "parameters": parameters,
        "tiles": len(first),
        "channels": len(grid[0]),
        "timepoints": len(grid) if "t" in lead else 1,
        "tile_folder": folder,
    }
    from .correction import mosaic_corrections

    corrections = mosaic_corrections(first)  # flat-field, dark-field, gains: what and whence
    if corrections:
        record["correction"] = corrections
    if extra:
        record |= dict(extra)
    return record


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
