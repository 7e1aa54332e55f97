"""CUDA kernel sources, their argument layout, cached getters and a CPU-side NVRTC compiler.

Everything here imports without CuPy and without a GPU: the ``.cu`` files are read with
:mod:`importlib.resources` (``kernels/`` is installed as ``gpufusion.kernels``), CuPy is
imported only inside the cached getters, and :func:`nvrtc_compile` drives the NVRTC library
of the ``nvidia-cuda-nvrtc`` wheel through :mod:`ctypes`, which needs no device (the tests
compile every kernel for sm_80 and sm_90 this way on CPU-only CI).

Kernels are compiled only through the cached getters :func:`fuse_kernel` and
:func:`downsample_kernel`, keyed on dtypes, ndim, blend mode and interpolation, never on
shapes: shapes are kernel arguments, so uneven edge chunks reuse the compiled kernel.

The fusion kernel reads one buffer per chunk (:func:`fusion_packing`,
:func:`pack_fusion_chunk`)::

    [ idesc: k x (2 + 3 ndim) int64 | fdesc: k x (ndim^2 + ndim) float64 | pad | windows ]

``idesc`` row: window element offset, translation flag, window shape, window origin
(``win_lo``), tile shape; ``fdesc`` row: the inverse affine's linear part (row-major) and the
chunk ``offset`` of :mod:`gpufusion.plan`. :func:`fusion_kernel_args` turns a packed buffer's
address into the kernel's argument tuple; the CuPy backend and the host emulation in the
tests both use it, so the layout is tested without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import importlib.util
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..blend import INTERP_CODES, MODE_CODES
from ..plan import COVER_EPS, ChunkTable
from .numpy_ref import FusionParams, keeps_single_samples

#: NVRTC options of every kernel. ``--fmad=false`` keeps each ``a * b + c`` a rounded multiply
#: then a rounded add, as NumPy computes it (a fused multiply-add rounds once and drifts from
#: the reference by an ulp); ``--std=c++17`` for ``if constexpr``.
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false")

#: C++ spelling of the element types the kernels are instantiated for.
CTYPES = {
    "uint8": "unsigned char",
    "int8": "signed char",
    "uint16": "unsigned short",
    "int16": "short",
    "uint32": "unsigned int",
    "int32": "int",
    "uint64": "unsigned long long",
    "int64": "long long",
    "float32": "float",
    "float64": "double",
}

#: Tile dtypes the fusion kernel reads natively, each with its accumulator
#: (:func:`gpufusion.backends.numpy_ref.accumulator_dtype`): float32 where it holds every
#: value exactly, float64 for wider integers and float64. Others (float16) are converted to
#: float32 on the host first, which is exact.
FUSE_ACCUMULATOR = {
    "uint8": "float32", "int8": "float32", "uint16": "float32", "int16": "float32",
    "float32": "float32", "uint32": "float64", "int32": "float64", "uint64": "float64",
    "int64": "float64", "float64": "float64",
}
FUSE_INPUT_DTYPES = tuple(FUSE_ACCUMULATOR)
#: Dtypes the downsampling kernel handles natively, with the reference's accumulator.
DOWNSAMPLE_ACCUMULATOR = {
    "uint8": "float32", "int8": "float32", "uint16": "float32", "int16": "float32",
    "float32": "float32", "uint32": "float64", "int32": "float64", "float64": "float64",
}
#: Algorithms of gpufusion.pyramid.downsample_mean2, by the kernel's ALGORITHM code.
DOWNSAMPLE_ALGORITHMS = ("corners", "pairwise")
#: Alignment of the windows section of a packed chunk, in bytes.
WINDOW_ALIGN = 256


def kernel_source(name: str) -> str:
    """The CUDA source ``kernels/<name>.cu``."""
    return importlib.resources.files("gpufusion.kernels").joinpath(f"{name}.cu").read_text()


def kernel_names() -> list[str]:
    """Names of all ``.cu`` files shipped in ``gpufusion.kernels``."""
    root = importlib.resources.files("gpufusion.kernels")
    return sorted(p.name[:-3] for p in root.iterdir() if p.name.endswith(".cu"))


# ------------------------------------------------------------------------ fusion kernel


def fusion_kernel_dtypes(in_dtype: Any, out_dtype: Any) -> tuple[str, str]:
    """Element types the fusion kernel runs with for these tile and output dtypes.

    Tiles of a dtype the kernel does not read natively (float16) are converted to float32
    on the host, exactly. The kernel writes ``out_dtype`` when it is the tile dtype or the
    accumulator's (:data:`FUSE_ACCUMULATOR`), else the accumulator's, which the caller
    rounds, clips and casts.

    Examples
    --------
    >>> fusion_kernel_dtypes("uint32", "uint32"), fusion_kernel_dtypes("uint32", "float32")
    (('uint32', 'uint32'), ('uint32', 'float64'))
    """
    kin = np.dtype(in_dtype).name
    kin = kin if kin in FUSE_INPUT_DTYPES else "float32"
    out = np.dtype(out_dtype).name
    acc = FUSE_ACCUMULATOR[kin]
    kout = out if out in (kin, acc) else acc
    return kin, kout


def fuse_name_expression(in_dtype: str, out_dtype: str, ndim: int, mode: str,
                         interpolation: str) -> str:
    """The C++ name of one ``fuse_chunk`` instantiation (a NVRTC name expression)."""
    if ndim not in (2, 3):
        raise ValueError(f"fuse_chunk: ndim must be 2 or 3, got {ndim}")
    acc = CTYPES[FUSE_ACCUMULATOR[in_dtype]]
    return (f"fuse_chunk<{CTYPES[in_dtype]}, {CTYPES[out_dtype]}, {acc}, {ndim}, "
            f"{MODE_CODES[mode]}, {INTERP_CODES[interpolation]}>")


def fuse_instantiations() -> list[tuple[str, str, int, str, str]]:
    """Every ``(in, out, ndim, mode, interpolation)`` the fusion kernel supports."""
    out = []
    for kin in FUSE_INPUT_DTYPES:
        for kout in dict.fromkeys((kin, FUSE_ACCUMULATOR[kin])):
            for ndim in (2, 3):
                for mode in MODE_CODES:
                    for interp in INTERP_CODES:
                        out.append((kin, kout, ndim, mode, interp))
    return out


@dataclass(frozen=True)
class FusionPacking:
    """Where everything of one chunk lies in its packed buffer (offsets in bytes)."""

    ndim: int
    n_entries: int
    window_dtype: np.dtype
    fdesc_offset: int
    windows_offset: int
    nbytes: int
    window_starts: np.ndarray  # element offset of each window in the windows section

    @property
    def idesc_columns(self) -> int:
        return 2 + 3 * self.ndim

    @property
    def fdesc_columns(self) -> int:
        return self.ndim * self.ndim + self.ndim

    @property
    def window_bytes(self) -> int:
        """Bytes of pixel data in the buffer."""
        return self.nbytes - self.windows_offset


def fusion_packing(table: ChunkTable, window_dtype: Any) -> FusionPacking:
    """Lay out the packed buffer of one chunk whose windows are read as ``window_dtype``."""
    dtype = np.dtype(window_dtype)
    ndim, k = len(table.shape), len(table)
    sizes = np.prod(table.win_shape, axis=1, dtype=np.int64) if k else np.zeros(0, np.int64)
    starts = np.zeros(k, dtype=np.int64)
    if k:
        np.cumsum(sizes[:-1], out=starts[1:])
    fdesc = 8 * k * (2 + 3 * ndim)
    windows = -(-(fdesc + 8 * k * (ndim * ndim + ndim)) // WINDOW_ALIGN) * WINDOW_ALIGN
    nbytes = windows + int(sizes.sum()) * dtype.itemsize
    return FusionPacking(ndim, k, dtype, fdesc, windows, nbytes, starts)


def pack_descriptors(table: ChunkTable, packing: FusionPacking, buffer: np.ndarray) -> None:
    """Write the descriptor section (``packing.windows_offset`` bytes) of a packed chunk."""
    k, ndim = packing.n_entries, packing.ndim
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.size < packing.windows_offset:
        raise ValueError("pack_descriptors: buffer must be 1-D uint8 of at least "
                         f"{packing.windows_offset} bytes")
    idesc = buffer[:packing.fdesc_offset].view(np.int64).reshape(k, packing.idesc_columns)
    idesc[:, 0] = packing.window_starts
    idesc[:, 1] = table.translation
    idesc[:, 2:2 + ndim] = table.win_shape
    idesc[:, 2 + ndim:2 + 2 * ndim] = table.win_lo
    idesc[:, 2 + 2 * ndim:] = table.tile_shape
    fend = packing.fdesc_offset + 8 * k * packing.fdesc_columns
    fdesc = buffer[packing.fdesc_offset:fend].view(np.float64).reshape(k, packing.fdesc_columns)
    fdesc[:, :ndim * ndim] = table.matrix.reshape(k, ndim * ndim)
    fdesc[:, ndim * ndim:] = table.offset
    buffer[fend:packing.windows_offset] = 0


def window_views(pixels: Any, table: ChunkTable,
                 packing: FusionPacking | SeparablePacking) -> list[Any]:
    """Views of each window's place in the windows section ``pixels`` (NumPy or CuPy)."""
    out = []
    for start, shape in zip(packing.window_starts, table.win_shape, strict=True):
        size = int(np.prod(shape))
        out.append(pixels[int(start):int(start) + size].reshape(tuple(int(s) for s in shape)))
    return out


def pack_fusion_chunk(windows: Sequence[np.ndarray], table: ChunkTable,
                      packing: FusionPacking, buffer: np.ndarray) -> None:
    """Write the descriptors and the windows of one chunk into ``buffer`` (uint8, 1-D).

    ``buffer`` may be longer than ``packing.nbytes`` (a reused pinned staging buffer).
    Windows are converted to ``packing.window_dtype`` while copying.
    """
    if len(windows) != packing.n_entries:
        raise ValueError(f"pack_fusion_chunk: {len(windows)} windows for "
                         f"{packing.n_entries} entries")
    if buffer.size < packing.nbytes:
        raise ValueError(f"pack_fusion_chunk: buffer must hold {packing.nbytes} bytes")
    pack_descriptors(table, packing, buffer)
    _copy_windows(windows, buffer, table, packing, "pack_fusion_chunk")


def _copy_windows(windows: Sequence[np.ndarray], buffer: np.ndarray, table: ChunkTable,
                  packing: Any, caller: str) -> None:
    """Copy the tile windows into their places in a packed ``buffer`` (either packing)."""
    pixels = buffer[packing.windows_offset:packing.nbytes].view(packing.window_dtype)
    for win, dst in zip(windows, window_views(pixels, table, packing), strict=True):
        if win.shape != dst.shape:
            raise ValueError(f"{caller}: window shape {win.shape} differs from the "
                             f"plan's {dst.shape}")
        np.copyto(dst, win, casting="unsafe")


def fusion_kernel_args(base: int, out: Any, packing: FusionPacking,
                       shape: Sequence[int], params: FusionParams) -> tuple:
    """Arguments of ``fuse_chunk`` for a packed buffer at address ``base``.

    ``out`` is the output (a CuPy array, or an address); ``params`` gives the blend widths
    and, with the windows' dtype, whether single-tile pixels keep their sample
    (:func:`~gpufusion.backends.numpy_ref.keeps_single_samples`). Integers are passed as
    int64 and floats as float64 NumPy scalars, matching the kernel's ``long long`` and
    ``double``.
    """
    s = [int(v) for v in shape] + [1] * (3 - len(shape))
    bw = params.blend_width
    w = [float(v) for v in bw] + [0.0] * (3 - len(bw))
    keep = keeps_single_samples(params.mode, packing.window_dtype, params.out_dtype)
    return (np.uint64(base + packing.windows_offset), np.uint64(base),
            np.uint64(base + packing.fdesc_offset), np.int64(packing.n_entries), out,
            np.int64(s[0]), np.int64(s[1]), np.int64(s[2]),
            np.float64(w[0]), np.float64(w[1]), np.float64(w[2]), np.float64(COVER_EPS),
            np.int64(keep))


# ------------------------------------------------------------- separable (translation) twin

#: Output pixels per thread of ``fuse_chunk_separable`` (consecutive along the last axis).
SEPARABLE_PX = 4
#: Index arithmetic of the separable kernel is 32-bit: chunks and windows stay below this.
_INT32_LIMIT = 2**31 - 1


def separable_name_expression(in_dtype: str, out_dtype: str, ndim: int, mode: str,
                              interpolation: str) -> str:
    """The C++ name of one ``fuse_chunk_separable`` instantiation."""
    general = fuse_name_expression(in_dtype, out_dtype, ndim, mode, interpolation)
    return general.replace("fuse_chunk<", "fuse_chunk_separable<")[:-1] + f", {SEPARABLE_PX}>"


def separable_applies(table: ChunkTable) -> bool:
    """Whether ``fuse_chunk_separable`` can fuse this chunk: at least one entry, every entry a
    pure translation, and the chunk, every window and each table fit 32-bit indices."""
    k = len(table)
    if k == 0 or not bool(np.all(table.translation)):
        return False
    shape = [int(n) for n in table.shape]
    rows = int(np.prod(shape[:-1]))
    groups = -(-shape[-1] // SEPARABLE_PX)
    sizes = np.prod(table.win_shape, axis=1, dtype=np.int64)
    return (int(np.prod(shape)) <= _INT32_LIMIT and rows * groups <= _INT32_LIMIT
            and int(sizes.max()) <= _INT32_LIMIT and 2 * k * sum(shape) <= _INT32_LIMIT)


def _kernel_min(a: np.ndarray, b: Any) -> np.ndarray:
    """``gf_min(a, b)`` element-wise: ``b < a ? b : a`` (not ``np.minimum``'s NaN rules)."""
    return np.where(b < a, b, a)


def separable_tables(table: ChunkTable, params: FusionParams, acc_dtype: Any,
                     strides: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-axis tables of ``fuse_chunk_separable`` for a chunk of translations.

    Every value is computed with the general kernel's operations, in float64 where it uses
    doubles: ``q = offset_d + l`` (one rounded add), coverage ``lo - eps <= q <= hi + eps``,
    the clamp into ``[lo, hi]``, ``floor``, the neighbours' indices clamped into the window,
    the fraction ``(A)(q - floor(q))`` and the ramp (``gf_ramp``) cast to ``A``; so the
    kernel's result equals the general kernel's bit for bit (cosine ramps: NumPy's ``cos``,
    which may differ from the device's by an ulp, as the general kernel from the reference).

    Returns
    -------
    cover : ndarray, int32, ``(k, ndim, 2)``
        Covered range ``[lo, hi)`` of chunk coordinates along each axis (empty: ``[0, 0)``).
    atab : ndarray, ``acc_dtype``, ``(k, sum(shape), 2)``
        Fraction and ramp weight at each coordinate of each axis (axes one after another).
    itab : ndarray, int32, ``(k, sum(shape), 2)``
        Window element offsets (index times the window's stride along the axis) of the lower
        and upper neighbour; for nearest both are the nearest pixel's. With ``strides``
        (``(k, ndim)`` element strides, e.g. each entry's whole tile for windows read in
        place, :func:`pack_resident_blocks`) those strides instead of the packed window's.
    """
    adt = np.dtype(acc_dtype)
    ndim, k = len(table.shape), len(table)
    shape = [int(n) for n in table.shape]
    total = sum(shape)
    cover = np.zeros((k, ndim, 2), dtype=np.int32)
    atab = np.zeros((k, total, 2), dtype=adt)
    itab = np.zeros((k, total, 2), dtype=np.int32)
    ramp = params.mode in ("linear", "cosine")
    w0 = table.win_lo.astype(np.int64)
    ts = table.tile_shape.astype(np.int64)
    ws = table.win_shape.astype(np.int64)
    start = 0
    for d in range(ndim):  # all entries at once, one axis at a time
        n = shape[d]
        rows = slice(start, start + n)
        start += n
        q = table.offset[:, d:d + 1].astype(np.float64) + np.arange(n, dtype=np.float64)
        lo = (-w0[:, d:d + 1]).astype(np.float64)
        hi = (ts[:, d:d + 1] - 1 - w0[:, d:d + 1]).astype(np.float64)
        ok = (q >= lo - COVER_EPS) & (q <= hi + COVER_EPS)
        any_ok = ok.any(axis=1)
        # q increases with l: the covered coordinates of an entry are one range
        first = np.argmax(ok, axis=1)
        last_ok = n - np.argmax(ok[:, ::-1], axis=1)
        cover[:, d, 0] = np.where(any_ok, first, 0)
        cover[:, d, 1] = np.where(any_ok, last_ok, 0)
        q = _kernel_min(np.where(q < lo, lo, q), hi)  # gf_min(gf_max(q, lo), hi)
        last = ws[:, d:d + 1] - 1
        stride = (np.prod(ws[:, d + 1:], axis=1, dtype=np.int64)[:, None] if strides is None
                  else np.asarray(strides, dtype=np.int64)[:, d:d + 1])
        if params.interpolation == "nearest":
            i0 = i1 = np.clip(np.floor(q + 0.5).astype(np.int64), 0, last)
            frac = np.zeros(q.shape, dtype=adt)
        else:
            fl = np.floor(q)
            i0 = np.clip(fl.astype(np.int64), 0, last)
            i1 = np.minimum(i0 + 1, last)
            frac = (q - fl).astype(adt)
        itab[:, rows, 0] = i0 * stride
        itab[:, rows, 1] = i1 * stride
        atab[:, rows, 0] = frac
        width = float(params.blend_width[d])
        if ramp and width > 0.0:
            t = q + w0[:, d:d + 1].astype(np.float64)
            dist = _kernel_min(t + 0.5, ts[:, d:d + 1].astype(np.float64) - 0.5 - t)
            r = _kernel_min(dist / width, 1.0)
            if params.mode == "cosine":
                r = 0.5 - 0.5 * np.cos(np.pi * r)
            atab[:, rows, 1] = r.astype(adt)
        else:
            atab[:, rows, 1] = 1
    return cover, atab, itab


@dataclass(frozen=True)
class SeparablePacking:
    """Where everything of one chunk lies in its separable buffer (offsets in bytes)::

        [ woff: k int64 | cover: k x ndim x 2 int32 | pad | atab | itab | pad | windows ]
    """

    ndim: int
    n_entries: int
    window_dtype: np.dtype
    acc_dtype: np.dtype
    cover_offset: int
    atab_offset: int
    itab_offset: int
    windows_offset: int
    nbytes: int
    window_starts: np.ndarray


def separable_packing(table: ChunkTable, window_dtype: Any) -> SeparablePacking:
    """Lay out the separable buffer of one chunk whose windows are read as ``window_dtype``."""
    dtype = np.dtype(window_dtype)
    acc = np.dtype(FUSE_ACCUMULATOR[dtype.name])
    ndim, k = len(table.shape), len(table)
    sizes = np.prod(table.win_shape, axis=1, dtype=np.int64) if k else np.zeros(0, np.int64)
    starts = np.zeros(k, dtype=np.int64)
    if k:
        np.cumsum(sizes[:-1], out=starts[1:])
    tlen = 2 * k * sum(int(n) for n in table.shape)
    cover = 8 * k
    atab = -(-(cover + 4 * k * ndim * 2) // 8) * 8
    itab = atab + tlen * acc.itemsize
    windows = -(-(itab + 4 * tlen) // WINDOW_ALIGN) * WINDOW_ALIGN
    nbytes = windows + int(sizes.sum()) * dtype.itemsize
    return SeparablePacking(ndim, k, dtype, acc, cover, atab, itab, windows, nbytes, starts)


def pack_separable_chunk(windows: Sequence[Any] | None, table: ChunkTable,
                         packing: SeparablePacking, buffer: np.ndarray,
                         params: FusionParams) -> None:
    """Write the tables (and, unless ``windows`` is None, the windows) of one chunk into
    ``buffer`` (uint8, 1-D, at least ``packing.windows_offset`` or ``packing.nbytes`` bytes)."""
    need = packing.windows_offset if windows is None else packing.nbytes
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.size < need:
        raise ValueError(f"pack_separable_chunk: buffer must be 1-D uint8 of {need} bytes")
    k = packing.n_entries
    cover, atab, itab = separable_tables(table, params, packing.acc_dtype)
    buffer[:packing.cover_offset].view(np.int64)[:] = packing.window_starts
    buffer[packing.cover_offset:packing.cover_offset + cover.nbytes].view(np.int32)[:] = \
        cover.reshape(-1)
    buffer[packing.cover_offset + cover.nbytes:packing.atab_offset] = 0
    buffer[packing.atab_offset:packing.itab_offset].view(packing.acc_dtype)[:] = \
        atab.reshape(-1)
    iend = packing.itab_offset + itab.nbytes
    buffer[packing.itab_offset:iend].view(np.int32)[:] = itab.reshape(-1)
    buffer[iend:packing.windows_offset] = 0
    if windows is None:
        return
    if len(windows) != k:
        raise ValueError(f"pack_separable_chunk: {len(windows)} windows for {k} entries")
    _copy_windows(windows, buffer, table, packing, "pack_separable_chunk")


def separable_kernel_args(base: int, out: Any, packing: SeparablePacking,
                          shape: Sequence[int], params: FusionParams) -> tuple:
    """Arguments of ``fuse_chunk_separable`` for a separable buffer at address ``base``."""
    s = [int(v) for v in shape] + [1] * (3 - len(shape))
    keep = keeps_single_samples(params.mode, packing.window_dtype, params.out_dtype)
    return (np.uint64(base + packing.windows_offset), np.uint64(base),
            np.uint64(base + packing.cover_offset), np.uint64(base + packing.atab_offset),
            np.uint64(base + packing.itab_offset), np.int64(packing.n_entries), out,
            np.int64(s[0]), np.int64(s[1]), np.int64(s[2]), np.int64(keep))


def blocks_name_expression(in_dtype: str, out_dtype: str, ndim: int, mode: str,
                           interpolation: str) -> str:
    """The C++ name of one ``fuse_blocks_separable`` instantiation (many blocks per launch)."""
    one = separable_name_expression(in_dtype, out_dtype, ndim, mode, interpolation)
    return one.replace("fuse_chunk_separable<", "fuse_blocks_separable<")


@dataclass(frozen=True)
class BlockBatch:
    """Many output blocks of translations packed for one ``fuse_blocks_separable`` launch
    (:func:`pack_resident_blocks`); offsets in bytes into ``buffer``::

        [ btab: n x 8 int64 | woff: K int64 | cover: K x ndim x 2 int32 | pad | atab | itab ]

    ``out_offsets``/``shapes``: where each block lies in the launch's output (elements).
    """

    buffer: np.ndarray
    n_blocks: int
    acc_dtype: np.dtype
    woff_offset: int
    cover_offset: int
    atab_offset: int
    itab_offset: int
    out_offsets: np.ndarray
    shapes: tuple[tuple[int, ...], ...]
    out_size: int


def pack_resident_blocks(tables: Sequence[ChunkTable], params: FusionParams,
                         tile_offsets: np.ndarray, tile_strides: np.ndarray,
                         window_dtype: Any) -> BlockBatch:
    """Pack the block table of ``fuse_blocks_separable`` for ``tables`` (blocks of pure
    translations, or empty) whose tiles lie in one device buffer.

    ``tile_offsets[t]`` is the element offset of tile ``t`` in that buffer and
    ``tile_strides[t]`` its C-order element strides: each entry's window is read in place,
    at ``tile_offsets + win_lo @ strides``, with the per-axis tables of
    :func:`separable_tables` in the tile's strides, so every block is computed with the
    values ``fuse_chunk_separable`` computes it with (bit-identical results).
    """
    acc = np.dtype(FUSE_ACCUMULATOR[np.dtype(window_dtype).name])
    n = len(tables)
    ndim = len(tables[0].shape) if n else 2
    counts = np.array([len(t) for t in tables], dtype=np.int64)
    k_total = int(counts.sum())
    tlens = np.array([2 * sum(int(v) for v in t.shape) for t in tables], dtype=np.int64)
    tab_sizes = counts * tlens
    tab_starts = np.concatenate(([0], np.cumsum(tab_sizes)[:-1])).astype(np.int64)
    sizes = np.array([math.prod(t.shape) for t in tables], dtype=np.int64)
    out_offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    entry_starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    tab_total = int(tab_sizes.sum())
    woff_offset = 64 * n
    cover_offset = woff_offset + 8 * k_total
    atab_offset = -(-(cover_offset + 4 * k_total * ndim * 2) // 8) * 8
    itab_offset = atab_offset + tab_total * acc.itemsize
    nbytes = itab_offset + 4 * tab_total
    if tab_total > _INT32_LIMIT or int(sizes.max(initial=0)) > _INT32_LIMIT:
        raise ValueError("pack_resident_blocks: a block or its tables exceed 32-bit indices")
    buffer = np.zeros(nbytes, dtype=np.uint8)
    btab = buffer[:woff_offset].view(np.int64).reshape(n, 8)
    woff = buffer[woff_offset:cover_offset].view(np.int64)
    cover_all = buffer[cover_offset:cover_offset + 8 * k_total * ndim].view(np.int32)
    atab_all = buffer[atab_offset:itab_offset].view(acc)
    itab_all = buffer[itab_offset:nbytes].view(np.int32)
    for b, table in enumerate(tables):
        if len(table.shape) != ndim:
            raise ValueError("pack_resident_blocks: blocks of different ndim")
        s = [int(v) for v in table.shape] + [1] * (3 - ndim)
        btab[b] = (entry_starts[b], counts[b], out_offsets[b], *s, tab_starts[b], 0)
        k = int(counts[b])
        if k == 0:
            continue
        if not bool(np.all(table.translation)):
            raise ValueError("pack_resident_blocks: a block has an entry that is not a "
                             "pure translation")
        strides = np.asarray(tile_strides, dtype=np.int64)[table.tiles]
        cover, atab, itab = separable_tables(table, params, acc, strides)
        if int(np.abs(itab).max(initial=0)) >= _INT32_LIMIT:
            raise ValueError("pack_resident_blocks: a tile exceeds 32-bit indices")
        e0 = int(entry_starts[b])
        woff[e0:e0 + k] = (np.asarray(tile_offsets, dtype=np.int64)[table.tiles]
                           + np.sum(table.win_lo.astype(np.int64) * strides, axis=1))
        cover_all[2 * ndim * e0:2 * ndim * (e0 + k)] = cover.reshape(-1)
        t0 = int(tab_starts[b])
        atab_all[t0:t0 + int(tab_sizes[b])] = atab.reshape(-1)
        itab_all[t0:t0 + int(tab_sizes[b])] = itab.reshape(-1)
    return BlockBatch(buffer, n, acc, woff_offset, cover_offset, atab_offset, itab_offset,
                      out_offsets, tuple(tuple(int(v) for v in t.shape) for t in tables),
                      int(sizes.sum()))


def blocks_kernel_args(tiles: int, base: int, out: Any, batch: BlockBatch, per_block: int,
                       params: FusionParams, window_dtype: Any) -> tuple:
    """Arguments of ``fuse_blocks_separable``: resident tiles at address ``tiles``, the
    batch's packed buffer at ``base`` on the device, ``out`` the launch's output."""
    keep = keeps_single_samples(params.mode, np.dtype(window_dtype), params.out_dtype)
    return (np.uint64(tiles), np.uint64(base), np.uint64(base + batch.woff_offset),
            np.uint64(base + batch.cover_offset), np.uint64(base + batch.atab_offset),
            np.uint64(base + batch.itab_offset), np.int64(batch.n_blocks),
            np.int64(per_block), out, np.int64(keep))


def blocks_launch_config(batch: BlockBatch, block: int = 256, max_blocks: int = 1 << 20
                         ) -> tuple[int, int, int]:
    """``(grid, block, per_block)`` of a ``fuse_blocks_separable`` launch: enough CUDA blocks
    per output block for its largest block's work, and a grid that is a multiple of it."""
    work = max((separable_launch_total(s) for s in batch.shapes), default=1)
    per = max(1, -(-work // block))
    per = min(per, max_blocks)
    span = max(1, min(batch.n_blocks, max_blocks // per))
    return per * span, block, per


def separable_launch_total(shape: Sequence[int]) -> int:
    """Threads ``fuse_chunk_separable`` needs: one per ``SEPARABLE_PX`` pixels of a row."""
    shape = [int(n) for n in shape]
    return int(np.prod(shape[:-1])) * -(-shape[-1] // SEPARABLE_PX)


def launch_config(total: int, block: int = 256, max_blocks: int = 1 << 20) -> tuple[int, int]:
    """``(blocks, threads)`` for a grid-stride kernel over ``total`` items."""
    return max(1, min(-(-int(total) // block), max_blocks)), block


# ------------------------------------------------------------------------ downsampling


def downsample_name_expression(dtype: str, algorithm: str = "corners") -> str:
    """The C++ name of one ``downsample_mean2`` instantiation."""
    code = DOWNSAMPLE_ALGORITHMS.index(algorithm)
    return (f"downsample_mean2<{CTYPES[dtype]}, {CTYPES[DOWNSAMPLE_ACCUMULATOR[dtype]]}, "
            f"{code}>")


def downsample_instantiations() -> list[tuple[str, str]]:
    """Every ``(dtype, algorithm)`` the downsampling kernel supports."""
    return [(d, a) for d in DOWNSAMPLE_ACCUMULATOR for a in DOWNSAMPLE_ALGORITHMS]


def downsample_geometry(shape: Sequence[int], factors: Sequence[int]
                        ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The 4-D view ``(shape4, factors4)`` the downsampling kernel works on, or None.

    Neighbouring kept axes (factor 1, or length 1) are merged and leading axes of length 1
    added; None when more than four axes remain (the caller falls back to the generic
    array code).
    """
    merged: list[list[int]] = []
    for n, f in zip(shape, factors, strict=True):
        f = 1 if int(n) == 1 else int(f)
        if f == 1 and merged and merged[-1][1] == 1:
            merged[-1][0] *= int(n)
        else:
            merged.append([int(n), f])
    if len(merged) > 4:
        return None
    merged = [[1, 1]] * (4 - len(merged)) + merged
    return tuple(m[0] for m in merged), tuple(m[1] for m in merged)


# ------------------------------------------------------------------------ cached getters


class CacheInfo(NamedTuple):
    """Statistics of a :class:`CachedGetter` (as ``functools.lru_cache`` reports them)."""

    hits: int
    misses: int
    currsize: int


class CachedGetter:
    """A thread-safe memo around a kernel builder: one build per key, ever.

    Unlike ``functools.lru_cache``, concurrent first calls with the same key (several dask
    threads starting at once) build the kernel once: the others wait for it, and count as
    hits. ``cache_info()`` and ``cache_clear()`` behave as lru_cache's.
    """

    def __init__(self, build: Callable[..., Any]) -> None:
        self._build = build
        self._cache: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._hits = self._misses = 0
        functools.update_wrapper(self, build)

    def __call__(self, *key: Any) -> Any:
        with self._lock:
            if key in self._cache:
                self._hits += 1
                return self._cache[key]
            self._misses += 1
            value = self._cache[key] = self._build(*key)
            return value

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache))

    def cache_clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0


@CachedGetter
def fuse_kernel(in_dtype: str, out_dtype: str, ndim: int, mode: str, interpolation: str) -> Any:
    """The compiled ``fuse_chunk`` kernel (a ``cupy.RawKernel``) for one configuration.

    Keyed on dtypes (names), ndim, blend mode and interpolation only; CuPy compiles it once
    per device on first use and caches the binary on disk.
    """
    return _compiled("fuse", fuse_name_expression(in_dtype, out_dtype, ndim, mode,
                                                  interpolation))


@CachedGetter
def separable_kernel(in_dtype: str, out_dtype: str, ndim: int, mode: str,
                     interpolation: str) -> Any:
    """The compiled ``fuse_chunk_separable`` kernel for one configuration (as
    :func:`fuse_kernel`, from the same source)."""
    return _compiled("fuse", separable_name_expression(in_dtype, out_dtype, ndim, mode,
                                                  interpolation))


@CachedGetter
def blocks_kernel(in_dtype: str, out_dtype: str, ndim: int, mode: str,
                  interpolation: str) -> Any:
    """The compiled ``fuse_blocks_separable`` kernel for one configuration (as
    :func:`fuse_kernel`, from the same source)."""
    return _compiled("fuse", blocks_name_expression(in_dtype, out_dtype, ndim, mode,
                                                  interpolation))


@CachedGetter
def downsample_kernel(dtype: str, algorithm: str = "corners") -> Any:
    """The compiled ``downsample_mean2`` kernel for ``dtype`` (a dtype name)."""
    return _compiled("downsample", downsample_name_expression(dtype, algorithm))


def _compiled(kernel: str, expr: str) -> Any:
    """``expr`` of ``kernels/<kernel>.cu`` compiled by CuPy (a ``cupy.RawKernel``); only the
    cached getters above call it."""
    import cupy

    module = cupy.RawModule(code=kernel_source(kernel), options=COMPILE_OPTIONS,
                            name_expressions=(expr,))
    return module.get_function(expr)


# ------------------------------------------------------------------------ NVRTC (no GPU)


class NvrtcError(RuntimeError):
    """NVRTC failed to compile; the message holds its log."""


@dataclass(frozen=True)
class NvrtcResult:
    """What :func:`nvrtc_compile` produced."""

    log: str
    lowered_names: dict[str, str]
    binary: bytes  # CUBIN for an sm_XX target, PTX for compute_XX


def nvrtc_library_paths() -> tuple[Path, Path] | None:
    """``(libnvrtc, libnvrtc-builtins)`` of the ``nvidia-cuda-nvrtc`` wheel, or None."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for sub in ("cu13/lib", "cuda_nvrtc/lib"):
            lib = Path(root) / sub
            main = sorted(p for p in lib.glob("libnvrtc.so.*") if ".alt." not in p.name)
            builtins = sorted(p for p in lib.glob("libnvrtc-builtins.so.*")
                              if ".alt." not in p.name)
            if main and builtins:
                return main[0], builtins[0]
    return None


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    paths = nvrtc_library_paths()
    if paths is None:
        raise OSError("the NVRTC library was not found (pip install 'nvidia-cuda-nvrtc==13.0.*')")
    ctypes.CDLL(str(paths[1]), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(paths[0]))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def nvrtc_version() -> tuple[int, int]:
    """Version of the NVRTC library found by :func:`nvrtc_library_paths`."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(status: int, what: str, log: str = "") -> None:
    if status != 0:
        msg = _nvrtc().nvrtcGetErrorString(status).decode()
        raise NvrtcError(f"{what}: {msg}" + (f"\n{log}" if log else ""))


def _strings(items: Sequence[str]) -> Any:
    return (ctypes.c_char_p * max(1, len(items)))(*[s.encode() for s in items])


def nvrtc_compile(source: str, *, name: str = "kernel.cu", name_expressions: Sequence[str] = (),
                  arch: str = "sm_90", options: Sequence[str] = COMPILE_OPTIONS) -> NvrtcResult:
    """Compile CUDA ``source`` with NVRTC on the host (no GPU needed).

    Parameters
    ----------
    source : str
    name : str
        File name shown in diagnostics.
    name_expressions : sequence of str
        Template instantiations to force, e.g. ``"fuse_chunk<float, float, 2, 0, 0>"``.
    arch : str
        ``sm_XX`` produces CUBIN, ``compute_XX`` PTX.
    options : sequence of str
        NVRTC options besides the architecture (default :data:`COMPILE_OPTIONS`).

    Returns
    -------
    NvrtcResult
        The compiler log (empty when there is nothing to say), the mangled name of each name
        expression and the binary.

    Raises
    ------
    NvrtcError
        With the compiler log, when compilation fails.
    """
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0,
                                  None, None), "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            _check(lib.nvrtcAddNameExpression(prog, expr.encode()), f"name expression {expr}")
        opts = [f"--gpu-architecture={arch}", *options]
        status = lib.nvrtcCompileProgram(prog, len(opts), _strings(opts))
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(max(1, size.value))
        _check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace").strip()
        _check(status, f"compiling {name} for {arch}", log)
        lowered = {}
        for expr in name_expressions:
            out = ctypes.c_char_p()
            _check(lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)),
                   f"lowered name of {expr}")
            lowered[expr] = out.value.decode()
        kind = "CUBIN" if arch.startswith("sm_") else "PTX"
        nbytes = ctypes.c_size_t()
        _check(getattr(lib, f"nvrtcGet{kind}Size")(prog, ctypes.byref(nbytes)), f"{kind} size")
        data = ctypes.create_string_buffer(nbytes.value)
        _check(getattr(lib, f"nvrtcGet{kind}")(prog, data), kind)
        return NvrtcResult(log, lowered, data.raw)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
