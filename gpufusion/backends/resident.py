"""Fusion with every tile resident in device memory, many blocks per kernel launch.

The per-block path (:meth:`~gpufusion.backends.cupy_backend.CupyBackend.fuse_windows`, one
dask task per block) pays Python's price per block: reading and packing the windows on the
host, one copy and one launch. When the tiles fit on the device (an H200 holds 141 GB:
600 tiles of 2048² uint16 take 5 GB), they can be uploaded once and the output fused from
them in place, with one launch of ``fuse_blocks_separable`` (``kernels/fuse.cu``) for a
whole batch of blocks, driven by a device-side block table
(:func:`~gpufusion.backends.cuda_kernels.pack_resident_blocks`): per block its entries,
its output offset and shape; per entry where its window starts inside its tile and the
per-axis tables in the tile's strides. Each block is computed by the same body as
``fuse_chunk_separable``, so the result is bit-identical to the per-block kernels and to
the NumPy reference. Blocks with an entry that is not a pure translation go through
:meth:`~gpufusion.backends.cupy_backend.CupyBackend.fuse_device_windows` (the general
kernel) with windows that are views of the resident tiles.

Everything is enqueued on one stream (the calling thread's :func:`thread_stream`, made
current), so no array crosses streams; :func:`fuse_on_device` synchronises it before it
returns. CuPy is imported where these functions run, never at module import.

Examples
--------
On a machine with a GPU (``backend="cupy"`` usable)::

    from gpufusion import mosaic_from_positions
    from gpufusion.backends.resident import fuse_on_device
    image = fuse_on_device(mosaic)          # a cupy.ndarray of the whole fused mosaic
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..plan import ChunkTable, plan_fusion
from . import cuda_kernels as ck
from .numpy_ref import FusionParams

#: Most blocks packed into one launch, and most bytes of block tables per launch.
MAX_BATCH_BLOCKS = 4096
MAX_BATCH_BYTES = 256 << 20
#: Share of the device's free memory the resident tiles may take (the rest: output, tables).
RESIDENT_FRACTION = 0.5


@dataclass(frozen=True)
class ResidentTiles:
    """Every tile of a mosaic in one 1-D device buffer of the kernel's input dtype.

    Attributes
    ----------
    buffer : cupy.ndarray
        The tiles, each C-contiguous, one after another.
    offsets : ndarray of int64, ``(n,)``
        Element offset of each tile in ``buffer``.
    shapes, strides : ndarray of int64, ``(n, ndim)``
        Each tile's shape and C-order element strides.
    """

    buffer: Any
    offsets: np.ndarray
    shapes: np.ndarray
    strides: np.ndarray

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.buffer.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def tile(self, t: int) -> Any:
        """Tile ``t`` as a device array view of its shape."""
        size = int(np.prod(self.shapes[t]))
        start = int(self.offsets[t])
        return self.buffer[start:start + size].reshape(tuple(int(n) for n in self.shapes[t]))


def _input_dtype(mosaic: Any) -> str:
    """The kernel's input dtype for ``mosaic``'s pixels as their sources read them: the
    tiles' dtype, or the float dtype a flat-field corrected source
    (:class:`gpufusion.correction.CorrectedSource`, ``work_dtype``) returns."""
    read = np.dtype(getattr(mosaic.tiles[0].source, "work_dtype", mosaic.dtype))
    return ck.fusion_kernel_dtypes(read, read)[0]


def resident_bytes(mosaic: Any) -> int:
    """Device bytes :func:`upload_tiles` needs for ``mosaic`` (in the kernel's dtype)."""
    return int(np.prod(mosaic.tile_shapes, axis=1).sum()) * np.dtype(_input_dtype(mosaic)).itemsize


def resident_fits(mosaic: Any, free_bytes: int | None = None,
                  fraction: float = RESIDENT_FRACTION) -> bool:
    """Whether ``mosaic``'s tiles fit in ``fraction`` of the device's free memory
    (``free_bytes``: the current device's, from ``cudaMemGetInfo``, when not given)."""
    if free_bytes is None:
        import cupy

        free_bytes = int(cupy.cuda.runtime.memGetInfo()[0])
    return resident_bytes(mosaic) <= fraction * free_bytes


def upload_tiles(mosaic: Any) -> ResidentTiles:
    """Read every tile of ``mosaic`` and copy it into one device buffer (current stream).

    Tiles are read one at a time through their sources (host memory holds one tile at a
    time) and converted to the kernel's input dtype (:func:`~gpufusion.backends.
    cuda_kernels.fusion_kernel_dtypes`: float16 becomes float32, exactly). Flat-field
    corrected tiles are read corrected (float32), once each: the upload is the only time a
    resident tile crosses the bus, so correcting it there costs one pass per tile.
    """
    import cupy

    kin = _input_dtype(mosaic)
    shapes = np.asarray(mosaic.tile_shapes, dtype=np.int64)
    sizes = np.prod(shapes, axis=1)
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    strides = np.ones_like(shapes)
    for d in range(shapes.shape[1] - 2, -1, -1):
        strides[:, d] = strides[:, d + 1] * shapes[:, d + 1]
    buffer = cupy.empty(int(sizes.sum()), dtype=kin)
    stream = cupy.cuda.get_current_stream()
    for t, tile in enumerate(mosaic.tiles):
        pixels = np.ascontiguousarray(tile.source.read(tuple(slice(0, int(n))
                                                             for n in shapes[t])), dtype=kin)
        # from pageable memory: returns once `pixels` is consumed, ordered on `stream`
        buffer[int(offsets[t]):int(offsets[t] + sizes[t])].set(pixels.reshape(-1),
                                                               stream=stream)
    return ResidentTiles(buffer, offsets, shapes, strides)


def _batches(tables: Sequence[ChunkTable], max_blocks: int, max_bytes: int
             ) -> list[list[int]]:
    """Indices of ``tables`` grouped into launches of at most ``max_blocks`` blocks and about
    ``max_bytes`` of tables each (a block bigger than that goes alone)."""
    out: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, table in enumerate(tables):
        nbytes = 64 + len(table) * (24 + 2 * sum(int(n) for n in table.shape) * 16)
        if current and (len(current) >= max_blocks or size + nbytes > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        out.append(current)
    return out


def _batched(table: ChunkTable) -> bool:
    """Whether a block goes into a batched launch: empty, or every entry a translation
    that the separable kernel's 32-bit indices can hold."""
    return len(table) == 0 or ck.separable_applies(table)


def fuse_resident(tiles: ResidentTiles, tables: Sequence[ChunkTable], params: FusionParams,
                  *, algorithm: str = "auto", max_batch_blocks: int = MAX_BATCH_BLOCKS,
                  max_batch_bytes: int = MAX_BATCH_BYTES) -> list[Any]:
    """Fuse ``tables`` (blocks of one mosaic, as planned) from resident ``tiles``.

    Returns one device array per table, in order, rounded and clipped to
    ``params.out_dtype``. Blocks of translations (``algorithm`` ``auto`` or ``separable``)
    go in batches, one ``fuse_blocks_separable`` launch each; the others (``general``, or
    an entry with rotation, scale or shear) one ``fuse_chunk`` launch each. Everything is
    enqueued on the current stream; nothing is synchronised.
    """
    import cupy

    from .cupy_backend import BLOCK, CupyBackend, cast_output_gpu

    if algorithm not in ("auto", "general", "separable"):
        raise ValueError(f"algorithm: unknown {algorithm!r}")
    kin = tiles.dtype.name
    out_dtype = np.dtype(params.out_dtype)
    _, kout = ck.fusion_kernel_dtypes(kin, out_dtype)
    results: list[Any] = [None] * len(tables)
    batched = [i for i, t in enumerate(tables) if algorithm != "general" and _batched(t)]
    others = sorted(set(range(len(tables))) - set(batched))
    if others:
        backend = CupyBackend(profile=False)
        for i in others:
            table = tables[i]
            views = [tiles.tile(int(t))[w] for t, w in zip(table.tiles, table.windows(),
                                                           strict=True)]
            if not views:
                results[i] = cupy.zeros(table.shape, dtype=out_dtype)
                continue
            results[i] = backend.fuse_device_windows(views, table, params, "general")
    if not batched:
        return results
    ndim = len(tables[batched[0]].shape)
    kernel = ck.blocks_kernel(kin, kout, ndim, params.mode, params.interpolation)
    stream = cupy.cuda.get_current_stream()
    for group in _batches([tables[i] for i in batched], max_batch_blocks, max_batch_bytes):
        members = [batched[j] for j in group]
        batch = ck.pack_resident_blocks([tables[i] for i in members], params, tiles.offsets,
                                        tiles.strides, kin)
        device = cupy.empty(batch.buffer.size, dtype=np.uint8)
        device.set(batch.buffer, stream=stream)  # pageable: consumed on return
        out = cupy.empty(max(batch.out_size, 1), dtype=kout)
        grid, block, per = ck.blocks_launch_config(batch, BLOCK)
        kernel((grid,), (block,), ck.blocks_kernel_args(tiles.buffer.data.ptr,
                                                        device.data.ptr, out, batch, per,
                                                        params, kin))
        if kout != out_dtype.name:
            out = cast_output_gpu(out, out_dtype)
        for i, start, shape in zip(members, batch.out_offsets, batch.shapes, strict=True):
            results[i] = out[int(start):int(start) + math.prod(shape)].reshape(shape)
    return results


def fuse_on_device(mosaic: Any, *, chunks: int | Sequence[int] = 1024, blend: str = "linear",
                   blend_width: float | Sequence[float] | None = None,
                   interpolation: str = "linear", dtype: Any = None,
                   algorithm: str = "auto", max_batch_blocks: int = MAX_BATCH_BLOCKS) -> Any:
    """Fuse a whole mosaic on the GPU with its tiles resident: a ``cupy.ndarray``.

    The tiles are uploaded once (:func:`upload_tiles`), the output is planned in blocks of
    ``chunks`` (as :func:`gpufusion.fuse` plans it) and fused a batch of blocks per launch
    (:func:`fuse_resident`), then assembled in one device array. Same options and the same
    result, bit for bit, as ``gpufusion.fuse(mosaic, ...).compute()`` on NumPy. Needs the
    tiles and the output to fit on the device (:func:`resident_fits` says whether the
    tiles do): for larger slides use the block tasks (``fuse_to_file``).
    """
    import cupy

    from ..fuse import fusion_params
    from .cupy_backend import thread_stream

    params = fusion_params(mosaic, blend=blend, blend_width=blend_width,
                           interpolation=interpolation, dtype=dtype)
    plan = plan_fusion(mosaic, chunks)
    free = int(cupy.cuda.runtime.memGetInfo()[0])
    need = resident_bytes(mosaic) + math.prod(mosaic.shape) * np.dtype(params.out_dtype).itemsize
    if need > free:
        raise InputError(f"the tiles and the output need {need / 2**30:.1f} GiB of device "
                         f"memory, {free / 2**30:.1f} GiB is free: fuse to a file instead")
    indices = list(np.ndindex(*plan.numblocks))
    tables = [plan.chunk(idx) for idx in indices]
    stream = thread_stream()
    with stream:
        tiles = upload_tiles(mosaic)
        blocks = fuse_resident(tiles, tables, params, algorithm=algorithm,
                               max_batch_blocks=max_batch_blocks)
        image = cupy.empty(tuple(mosaic.shape), dtype=params.out_dtype)
        for table, block in zip(tables, blocks, strict=True):
            where = tuple(slice(int(a), int(a) + int(n))
                          for a, n in zip(table.start, table.shape, strict=True))
            image[where] = block
    stream.synchronize()
    return image
