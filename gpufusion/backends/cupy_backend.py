"""CUDA backend: fuse each chunk with ``kernels/fuse.cu`` through CuPy.

Per chunk (one dask task), :meth:`CupyBackend.fuse_task`

1. reads the chunk's tile windows on the host (``task.read_windows()``),
2. packs descriptors and windows into one pinned host buffer
   (:func:`~gpufusion.backends.cuda_kernels.pack_fusion_chunk`; for a chunk of pure
   translations the separable kernel's per-axis tables instead of the descriptors,
   :func:`~gpufusion.backends.cuda_kernels.pack_separable_chunk`),
3. copies it to the device asynchronously on the calling thread's own non-blocking stream,
4. launches ``fuse_chunk_separable`` (translations, unless ``algorithm="general"``) or
   ``fuse_chunk`` once for the whole chunk on that stream,
5. outside a task scope, waits for that stream only; returns the block as a
   ``cupy.ndarray``.

Each dask worker thread has its own stream and pinned staging buffer, so one thread's
transfer overlaps another's kernel and nothing waits on the legacy default stream. Outside
a task scope the block is complete when returned, so consumers on other streams may use it
at once; inside one (below) the rest of the task follows on the same stream.

Set ``GPUFUSION_PROFILE=1`` (or ``backend.profile = True``) to time the device stages with
CUDA events as well; :meth:`CupyBackend.stage_times` reports the breakdown.

For tiles that stay on the device, :meth:`CupyBackend.upload` + :meth:`CupyBackend.launch`
(a packed chunk kept resident) and :meth:`CupyBackend.fuse_device_windows` (windows that are
``cupy.ndarray`` views of resident tiles) skip the host path. :func:`downsample_mean2_gpu`
is the device twin of :func:`gpufusion.pyramid.downsample_mean2`.

CuPy is imported when the backend is created, never at module import, so this module (and
:func:`downsample_mean2_gpu`'s docs) import on machines without a GPU.

Streams: one task, one stream
-----------------------------
A whole-block task (fuse, downsample every level it contributes to, copy each to the host)
runs inside :func:`task_scope` (:func:`gpufusion.backends.task_scope` with ``"cupy"``): the
calling thread's non-blocking stream (:func:`thread_stream`, the same one
:meth:`CupyBackend.fuse_windows` uses) is made current for the whole task, so

* every allocation from CuPy's memory pool (the packed chunk, the fused block, each level,
  a contiguous copy for the download) is made on that stream;
* the fusion kernel, the downsampling kernels (:func:`downsample_mean2_gpu`), CuPy's own
  element-wise kernels (casts) and the device-to-host copies (:func:`to_host`) are all
  enqueued on it (``RawKernel`` launches and CuPy functions use the current stream when
  given none; nothing here names another stream or the legacy default one);
* the stream is synchronised when the task's scope exits.

This is race-free by construction. CuPy's pool gives a freed block back to the free list
of the stream it was allocated on, and hands it out again only to allocations on that same
stream. A block freed by Python while a kernel that reads it is still queued can therefore
only be reused by work queued *after* that kernel on the same stream, which the stream runs
after it. With one stream per task no array crosses streams, so no event is needed; the old
race (the fused block allocated on the thread's stream, read by a downsampling kernel on
the legacy stream, freed, and reallocated by the next fusion on the thread's stream while
still being read) cannot happen. Host memory follows the same rule: the pinned staging
buffer of the upload is reused only after an event recorded behind its copy has completed,
and :func:`to_host` waits for its copy before the pinned download buffer is read.

Outside a task scope every function here is complete on return (``fuse_windows``
synchronises its stream; :func:`downsample_mean2_gpu` and :func:`to_host` synchronise the
current stream), so the result may be used on any stream or thread; inside one, nothing is
synchronised before the scope exits except what :func:`to_host` must wait for.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cuda_kernels as ck
from .numpy_ref import ALGORITHMS, FusionParams, integer_bounds

#: Threads per block of every kernel launch.
BLOCK = 256

#: Per-thread CUDA state shared by every :class:`CupyBackend` and the module functions:
#: ``streams`` (device -> (cupy module, stream)), ``depth`` (task scopes entered),
#: ``download`` (the pinned buffer of :func:`to_host`).
_THREAD = threading.local()


def thread_stream() -> Any:
    """This thread's non-blocking CUDA stream on the current device (created once).

    Every task that runs on this thread uses it (:func:`task_scope`), as does
    :meth:`CupyBackend.fuse_windows`. Kept per ``cupy`` module as well, so a stand-in
    module in tests gets its own streams.
    """
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    streams = _THREAD.__dict__.setdefault("streams", {})
    held = streams.get(dev)
    if held is None or held[0] is not cupy:
        held = streams[dev] = (cupy, cupy.cuda.Stream(non_blocking=True))
    return held[1]


def in_task_scope() -> bool:
    """Whether this thread is inside a :func:`task_scope`."""
    return getattr(_THREAD, "depth", 0) > 0


@contextlib.contextmanager
def task_scope() -> Iterator[Any]:
    """One task's stream: :func:`thread_stream` made current, synchronised at exit.

    Yields the stream. A nested scope yields the same stream and synchronises nothing (the
    outer one does). The stream is synchronised also when the task raises, so no queued
    work still reads memory or a pinned buffer that the next task on this thread reuses.
    See the module docstring for why this is race-free.
    """
    stream = thread_stream()
    depth = getattr(_THREAD, "depth", 0)
    _THREAD.depth = depth + 1
    try:
        with stream:
            yield stream
    finally:
        _THREAD.depth = depth
        if depth == 0:
            stream.synchronize()


@dataclass
class StageTimes:
    """Where the time of :meth:`CupyBackend.fuse_task` went, summed over chunks.

    Host stages are wall-clock seconds summed over worker threads (they overlap each other
    and the device): ``read`` is ``task.read_windows()`` (for memory-mapped TIFF tiles this
    only maps pages; the disk reads then land in ``pack``), ``pack`` the copy into pinned
    memory, ``launch`` enqueueing the copy and the kernel, ``wait`` the stream
    synchronisation. ``h2d_s`` and ``kernel_s`` are device time from CUDA events, recorded
    only while profiling.
    """

    chunks: int = 0
    pixels: int = 0
    bytes_h2d: int = 0
    read_s: float = 0.0
    pack_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0
    h2d_s: float = 0.0
    kernel_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **values: float) -> None:
        with self._lock:
            for k, v in values.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: getattr(self, k) for k in ("chunks", "pixels", "bytes_h2d", "read_s",
                                                  "pack_s", "launch_s", "wait_s", "h2d_s",
                                                  "kernel_s")}

    def format(self) -> str:
        """A short multi-line report."""
        d = self.as_dict()
        lines = [f"chunks {int(d['chunks'])}, {d['pixels'] / 1e6:.1f} Mpx, "
                 f"{d['bytes_h2d'] / 2**20:.1f} MiB host->device"]
        for key in ("read_s", "pack_s", "launch_s", "wait_s", "h2d_s", "kernel_s"):
            lines.append(f"  {key[:-2]:<7} {d[key]:9.4f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class DeviceChunk:
    """One chunk packed and resident in device memory, ready to launch (general layout, or
    the separable one for :func:`~gpufusion.backends.cuda_kernels.separable_applies`)."""

    buffer: Any  # cupy.ndarray, uint8
    packing: ck.FusionPacking | ck.SeparablePacking
    shape: tuple[int, ...]
    kernel_dtypes: tuple[str, str]


def _packing(table: Any, kin: str, algorithm: str) -> ck.FusionPacking | ck.SeparablePacking:
    """The buffer layout of a chunk for ``algorithm``: separable (``fuse_chunk_separable``)
    unless ``general`` is asked for or an entry is not a translation (or 32-bit indices do
    not suffice), else general (``fuse_chunk``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: unknown {algorithm!r}; choose one of {ALGORITHMS}")
    if algorithm != "general" and ck.separable_applies(table):
        return ck.separable_packing(table, kin)
    return ck.fusion_packing(table, kin)


def _pack(windows: Sequence[np.ndarray] | None, table: Any,
          packing: ck.FusionPacking | ck.SeparablePacking, buffer: np.ndarray,
          params: FusionParams) -> None:
    """Write a chunk's descriptors (and its windows unless None) in ``packing``'s layout."""
    if isinstance(packing, ck.SeparablePacking):
        ck.pack_separable_chunk(windows, table, packing, buffer, params)
    elif windows is None:
        ck.pack_descriptors(table, packing, buffer)
    else:
        ck.pack_fusion_chunk(windows, table, packing, buffer)


class CupyBackend:
    """Fusion on an NVIDIA GPU (see the module docstring).

    Parameters
    ----------
    profile : bool, optional
        Record CUDA events per stage (default: the ``GPUFUSION_PROFILE`` environment
        variable).
    """

    name = "cupy"

    def __init__(self, profile: bool | None = None) -> None:
        import cupy

        self._cp = cupy
        self._local = threading.local()
        self.profile = bool(os.environ.get("GPUFUSION_PROFILE")) if profile is None else profile
        self.times = StageTimes()

    # -- the Backend protocol --------------------------------------------------------------

    def empty_meta(self, ndim: int, dtype: np.dtype) -> Any:
        """A zero-size ``cupy.ndarray`` (the dask ``meta`` of fused arrays)."""
        return self._cp.empty((0,) * ndim, dtype=dtype)

    def fuse_task(self, task: Any, params: FusionParams, algorithm: str = "auto") -> Any:
        """Fuse one :class:`~gpufusion.fuse.ChunkTask` into a ``cupy.ndarray`` block.

        Tiles corrected as they are read (:mod:`gpufusion.correction`: flat-field,
        dark-field, gains) are uploaded raw and corrected on the device, on this thread's
        stream, before the windows are packed on the device (:meth:`fuse_device_windows`).
        """
        from ..correction import device_corrected_windows, is_corrected

        t0 = time.perf_counter()
        if is_corrected(task.sources):
            stream = self._stream()
            with stream:
                profiles = self._local.__dict__.setdefault("profiles", {})
                windows = device_corrected_windows(task, self._cp, profiles)
                self.times.add(read_s=time.perf_counter() - t0)
                out = self.fuse_device_windows(windows, task.table, params, algorithm)
            if not in_task_scope():
                stream.synchronize()
            return out
        windows = task.read_windows()
        self.times.add(read_s=time.perf_counter() - t0)
        return self.fuse_windows(windows, task.table, params, algorithm)

    # -- building blocks -------------------------------------------------------------------

    def fuse_windows(self, windows: Sequence[np.ndarray], table: Any, params: FusionParams,
                     algorithm: str = "auto") -> Any:
        """Fuse one chunk from host windows (its :class:`~gpufusion.plan.ChunkTable`).

        ``algorithm``: ``general`` runs ``fuse_chunk`` (any affine, the reference twin);
        ``auto`` and ``separable`` run ``fuse_chunk_separable`` when every entry is a pure
        translation (per-axis tables, several pixels per thread, 32-bit indices), else
        ``fuse_chunk``. All give the same result, bit for bit.
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: unknown {algorithm!r}; choose one of {ALGORITHMS}")
        cp = self._cp
        stream = self._stream()
        out_dtype = np.dtype(params.out_dtype)
        if len(table) == 0:
            with stream:
                out = cp.zeros(table.shape, dtype=out_dtype)
            if not in_task_scope():
                stream.synchronize()
            return out
        events = [cp.cuda.Event() for _ in range(3)] if self.profile else None
        t0 = time.perf_counter()
        kin, kout = ck.fusion_kernel_dtypes(windows[0].dtype, out_dtype)
        packing = _packing(table, kin, algorithm)
        staging = self._staging(packing.nbytes)
        _pack(windows, table, packing, staging, params)
        t1 = time.perf_counter()
        with stream:
            if events:
                events[0].record(stream)
            device = cp.empty(packing.nbytes, dtype=np.uint8)
            device.set(staging[:packing.nbytes], stream=stream)  # async: pinned source
            self._staged(stream)
            if events:
                events[1].record(stream)
            out = self.launch(DeviceChunk(device, packing, tuple(table.shape), (kin, kout)),
                              params)
            if events:
                events[2].record(stream)
        t2 = time.perf_counter()
        # In a task scope the rest of the task follows on this stream: nothing to wait for
        # (`device` may be freed now: its pool block is reused only by later work on this
        # stream). Outside one, the block must be complete for consumers on other streams.
        if events or not in_task_scope():
            stream.synchronize()
        t3 = time.perf_counter()
        timing = {"chunks": 1, "pixels": math.prod(table.shape), "bytes_h2d": packing.nbytes,
                  "pack_s": t1 - t0, "launch_s": t2 - t1, "wait_s": t3 - t2}
        if events:
            timing["h2d_s"] = cp.cuda.get_elapsed_time(events[0], events[1]) / 1e3
            timing["kernel_s"] = cp.cuda.get_elapsed_time(events[1], events[2]) / 1e3
        self.times.add(**timing)
        return out

    def fuse_device_windows(self, windows: Sequence[Any], table: Any,
                            params: FusionParams, algorithm: str = "auto") -> Any:
        """Fuse one chunk from windows already in device memory (``cupy.ndarray`` views).

        For tiles resident on the GPU: only the descriptors cross the bus; the windows are
        copied into the chunk's buffer on the device. Everything is enqueued on the current
        stream; nothing is synchronised. ``algorithm`` as in :meth:`fuse_windows`.
        """
        cp = self._cp
        if len(table) == 0:
            return cp.zeros(table.shape, dtype=params.out_dtype)
        kin, kout = ck.fusion_kernel_dtypes(windows[0].dtype, params.out_dtype)
        packing = _packing(table, kin, algorithm)
        header = np.empty(packing.windows_offset, dtype=np.uint8)
        _pack(None, table, packing, header, params)
        device = cp.empty(packing.nbytes, dtype=np.uint8)
        # from pageable memory, ordered on the current stream; `header` is consumed on return
        device[:packing.windows_offset].set(header, stream=cp.cuda.get_current_stream())
        pixels = device[packing.windows_offset:].view(kin)
        for win, dst in zip(windows, ck.window_views(pixels, table, packing), strict=True):
            dst[...] = win
        return self.launch(DeviceChunk(device, packing, tuple(table.shape), (kin, kout)),
                           params)

    def upload(self, windows: Sequence[np.ndarray], table: Any,
               params: FusionParams, algorithm: str = "auto") -> DeviceChunk:
        """Pack one chunk and copy it to the device (synchronously): for resident benchmarks.

        ``algorithm`` as in :meth:`fuse_windows` (the layout decides the kernel)."""
        kin, kout = ck.fusion_kernel_dtypes(windows[0].dtype, params.out_dtype)
        packing = _packing(table, kin, algorithm)
        staging = np.empty(packing.nbytes, dtype=np.uint8)
        _pack(windows, table, packing, staging, params)
        return DeviceChunk(self._cp.asarray(staging), packing, tuple(table.shape), (kin, kout))

    def launch(self, chunk: DeviceChunk, params: FusionParams) -> Any:
        """Enqueue the fusion kernel for a resident chunk on the current stream.

        Returns the output block (rounded and clipped to ``params.out_dtype``); nothing is
        synchronised.
        """
        cp = self._cp
        kin, kout = chunk.kernel_dtypes
        key = (kin, kout, len(chunk.shape), params.mode, params.interpolation)
        out = cp.empty(chunk.shape, dtype=kout)
        if isinstance(chunk.packing, ck.SeparablePacking):
            kernel = ck.separable_kernel(*key)
            args = ck.separable_kernel_args(chunk.buffer.data.ptr, out, chunk.packing,
                                            chunk.shape, params)
            total = ck.separable_launch_total(chunk.shape)
        else:
            kernel = ck.fuse_kernel(*key)
            args = ck.fusion_kernel_args(chunk.buffer.data.ptr, out, chunk.packing,
                                         chunk.shape, params)
            total = math.prod(chunk.shape)
        grid, block = ck.launch_config(total, BLOCK)
        kernel((grid,), (block,), args)  # on the current stream (the task's, in a scope)
        out_dtype = np.dtype(params.out_dtype)
        return out if kout == out_dtype.name else cast_output_gpu(out, out_dtype)

    def stage_times(self) -> dict[str, float]:
        """The accumulated :class:`StageTimes` as a dict (see also ``self.times.format()``)."""
        return self.times.as_dict()

    def reset_stage_times(self) -> None:
        self.times = StageTimes()

    # -- per-thread resources --------------------------------------------------------------

    def _stream(self) -> Any:
        """This thread's non-blocking stream on the current device (:func:`thread_stream`)."""
        return thread_stream()

    def _staging(self, nbytes: int) -> np.ndarray:
        """This thread's pinned host buffer, grown to at least ``nbytes``.

        Waits first for the upload last queued from it (:meth:`_staged`), so it is never
        rewritten (or given back to CuPy's pinned pool when grown) while a copy reads it.
        """
        import cupyx

        done = getattr(self._local, "staged", None)
        if done is not None:
            done.synchronize()
            self._local.staged = None
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.size < nbytes:
            size = max(nbytes, 2 * (buf.size if buf is not None else 0), 1 << 20)
            buf = cupyx.empty_pinned((size,), dtype=np.uint8)
            self._local.staging = buf
        return buf

    def _staged(self, stream: Any) -> None:
        """Record that an upload from the staging buffer is queued on ``stream``."""
        event = self._cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self._local.staged = event


def to_host(block: Any) -> np.ndarray:
    """Copy a ``cupy.ndarray`` block to a new NumPy array (NumPy arrays pass through).

    The copy runs on the current stream (the task's, in a :func:`task_scope`) into this
    thread's pinned download buffer (a true asynchronous DMA, ordered after the kernels
    that made ``block``); the stream is then synchronised and the data copied out of the
    pinned buffer, so the result stays valid when the buffer is reused by the next call.
    The pinned buffer grows to the largest block seen (one per thread: bounded memory).

    CuPy is imported where this runs, so graphs that name it can be built on a client
    without CuPy and run on GPU workers.
    """
    import cupy

    if not isinstance(block, cupy.ndarray):
        return np.asarray(block)
    dtype = np.dtype(block.dtype)
    if block.size == 0:
        return np.empty(block.shape, dtype=dtype)
    stream = cupy.cuda.get_current_stream()
    src = block if block.flags.c_contiguous else cupy.ascontiguousarray(block)
    pinned = _download_buffer(src.nbytes)[:src.nbytes].view(dtype).reshape(src.shape)
    src.get(stream=stream, out=pinned)
    stream.synchronize()  # the copy (and all before it on the stream) is done
    return pinned.copy()


def _download_buffer(nbytes: int) -> np.ndarray:
    """This thread's pinned host buffer for :func:`to_host`, grown to at least ``nbytes``.

    Only :func:`to_host` uses it, which synchronises before returning, so no copy into it
    is pending when it is reused or replaced.
    """
    import cupyx

    buf = getattr(_THREAD, "download", None)
    if buf is None or buf.size < nbytes:
        size = max(nbytes, 2 * (buf.size if buf is not None else 0), 1 << 20)
        buf = cupyx.empty_pinned((size,), dtype=np.uint8)
        _THREAD.download = buf
    return buf


def cast_output_gpu(values: Any, dtype: np.dtype) -> Any:
    """Round half to even and clip float device ``values`` into ``dtype`` (the dtype policy;
    the device twin of :func:`gpufusion.backends.numpy_ref.cast_output`)."""
    import cupy

    dtype = np.dtype(dtype)
    if dtype.kind in "iub":
        lo, hi = integer_bounds(values.dtype, dtype)
        return cupy.clip(cupy.rint(values), lo, hi).astype(dtype)
    return values.astype(dtype, copy=False)


def downsample_mean2_gpu(arr: Any, factors: Sequence[int], algorithm: str = "corners") -> Any:
    """2x mean downsampling of a CuPy array with ``kernels/downsample.cu``.

    The GPU twin of :func:`gpufusion.pyramid.downsample_mean2`: same arguments, same result
    (same accumulator, same order of operations, rint and clip for integers). Dtypes or
    axis layouts the kernel does not handle (float16, 64-bit integers, more than four axes
    after merging kept ones) run the reference's array code on the device instead.

    Parameters
    ----------
    arr : cupy.ndarray
        Integer or floating-point block.
    factors : sequence of int
        One factor (1 or 2) per axis.
    algorithm : {"corners", "pairwise"}
        Which of the reference's algorithms to mirror (they differ by float rounding only).

    Returns
    -------
    cupy.ndarray
        Shape ``ceil(n / f)`` per axis, dtype of ``arr``.
    """
    import cupy

    from ..pyramid import downsample_mean2

    factors = tuple(int(f) for f in factors)
    if len(factors) != arr.ndim or any(f not in (1, 2) for f in factors):
        raise ValueError(f"factors {factors} must be 1 or 2 for each of the {arr.ndim} axes")
    if algorithm not in ck.DOWNSAMPLE_ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {ck.DOWNSAMPLE_ALGORITHMS}")
    name = np.dtype(arr.dtype).name
    geometry = ck.downsample_geometry(arr.shape, factors)
    if name not in ck.DOWNSAMPLE_ACCUMULATOR or geometry is None or arr.size == 0:
        result = downsample_mean2(arr, factors, algorithm=algorithm)  # CuPy on the device
        if not in_task_scope():
            cupy.cuda.get_current_stream().synchronize()
        return result
    shape4, factors4 = geometry
    src = cupy.ascontiguousarray(arr)
    out = cupy.empty(tuple(-(-n // f) for n, f in zip(arr.shape, factors, strict=True)),
                     dtype=arr.dtype)
    grid, block = ck.launch_config(out.size, BLOCK)
    kernel = ck.downsample_kernel(name, algorithm)
    # on the current stream (``stream=None``): the task's in a task scope, where `arr` was
    # made and `out` is consumed; outside one, complete on return (see the module docstring)
    kernel((grid,), (block,), (src, out, *(np.int64(v) for v in shape4),
                               *(np.int64(v) for v in factors4)))
    if not in_task_scope():
        cupy.cuda.get_current_stream().synchronize()
    return out
