"""Where fusion tasks run: the local threads, local GPUs, or a running Dask scheduler.

:func:`connect` is a context manager around the three choices the command line offers:

* neither ``gpus`` nor ``scheduler``: yields ``None``; dask uses its local threaded
  scheduler (one process, all cores; with the ``cupy`` backend, all threads share the GPU).
* ``gpus=[0, 1]``: starts a ``dask_cuda.LocalCUDACluster`` with one worker process per GPU
  (each sees only its own device) and yields a ``distributed.Client`` on it. The indices
  count the GPUs this process sees, as CUDA numbers them: under ``CUDA_VISIBLE_DEVICES=2,3``
  ``[0, 1]`` are physical GPUs 2 and 3 (:func:`worker_devices`). Each worker
  gets several threads (default: the CPU cores shared out between the GPUs, at least 2;
  dask-cuda's own default is 1), so that while one chunk is on the device, others are
  being read and packed, and finished ones compressed and written: the kernel launches
  of a worker's threads go to per-thread CUDA streams on its one GPU.
* ``scheduler="tcp://host:8786"``: yields a ``distributed.Client`` connected to it.

Fusion tasks read their own tile windows from the tile sources (file paths for files read
from disk), so no tile pixels pass through the scheduler; only the small per-chunk plans do.
Every setup failure (dask-cuda missing, no GPU, an unreachable scheduler) becomes a one-line
:class:`~gpufusion.errors.InputError`.

With a cluster, the backend is chosen where the tasks run: :func:`resolve_cluster_backend`
asks every worker for :func:`gpufusion.backends.gpu_status` (a device, and a trial kernel
compiled and run there), so a login node without a GPU can send CuPy fusion to GPU
workers; the graph is then built with NumPy ``meta`` (``fuse(..., on_workers=True)``).

Examples
--------
>>> with connect() as client:
...     print(client)
None
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from .backends import BACKENDS, one_line
from .errors import InputError

#: Seconds to wait for a scheduler to answer.
CONNECT_TIMEOUT = 10.0


def parse_gpus(text: str) -> tuple[int, ...]:
    """Parse a ``--gpus`` value such as ``"0,1"`` into device indices.

    Examples
    --------
    >>> parse_gpus("0, 2")
    (0, 2)
    """
    try:
        gpus = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--gpus: expected GPU indices such as 0,1, got {text!r}") from None
    _check_gpus(gpus)
    return gpus


def _check_gpus(gpus: Sequence[int]) -> None:
    if not gpus:
        raise InputError("--gpus: give at least one GPU index, such as 0 or 0,1")
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise InputError(f"--gpus: indices must be distinct and >= 0, got {list(gpus)}")


#: The environment variable that lists (and orders) the GPUs a CUDA process sees.
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def _visible_entries(text: str) -> list[str]:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value makes visible, in order, as written.

    As CUDA reads it: comma-separated entries, each a device index (``2``) or a UUID
    (``GPU-...``, ``MIG-...``), up to the first entry it cannot use (a negative index, an
    empty or unknown entry), which hides that entry and every one after it (so ``-1`` and
    ``""`` hide every GPU).
    """
    entries = []
    for raw in text.split(","):
        entry = raw.strip()
        uuid = entry.upper().startswith(("GPU-", "MIG-"))
        if not (uuid or (entry.isascii() and entry.isdigit())):
            break
        entries.append(entry)
    return entries


def worker_devices(gpus: Sequence[int], environ: Mapping[str, str] | None = None
                   ) -> tuple[str, ...]:
    """The ``CUDA_VISIBLE_DEVICES`` entries of the GPUs that ``--gpus`` indices name.

    The indices count the devices this process sees, as CUDA does: without
    ``CUDA_VISIBLE_DEVICES`` they are the machine's own indices; with it, positions in
    its list (``2,3``: index 0 is physical GPU 2). The entries are returned as the parent
    lists them (device UUIDs and MIG instances unchanged), for the workers' own
    ``CUDA_VISIBLE_DEVICES``; the workers inherit ``CUDA_DEVICE_ORDER`` with the rest of
    the environment, so an index means the same device to them as to this process.

    Raises
    ------
    InputError
        An index beyond the parent's list (named, with the list).

    Examples
    --------
    >>> worker_devices([0, 1], {"CUDA_VISIBLE_DEVICES": "2,3"})
    ('2', '3')
    >>> worker_devices([1], {})
    ('1',)
    """
    _check_gpus(gpus)
    env = os.environ if environ is None else environ
    parent = env.get(VISIBLE_ENV)
    if parent is None:
        return tuple(str(g) for g in gpus)
    visible = _visible_entries(parent)
    if not visible:
        raise InputError(f"--gpus: {VISIBLE_ENV}={parent!r} hides every GPU from this process")
    beyond = [g for g in gpus if g >= len(visible)]
    if beyond:
        raise InputError(f"--gpus: GPU {beyond[0]} does not exist here: {VISIBLE_ENV}="
                         f"{parent!r} makes {len(visible)} visible (indices 0.."
                         f"{len(visible) - 1})")
    return tuple(visible[g] for g in gpus)


def _device_count() -> int | None:
    """Number of CUDA devices, or None when it cannot be told (no CuPy)."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError: no driver or no device
        return 0


def _cluster_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, RuntimeError, ValueError, TimeoutError]
    try:
        import pynvml

        errors.append(pynvml.NVMLError)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def default_threads_per_gpu(n_gpus: int) -> int:
    """Worker threads per GPU: the CPU cores shared out between the GPUs, at least 2.

    Examples
    --------
    >>> default_threads_per_gpu(1) >= 2
    True
    """
    return max(2, (os.cpu_count() or 1) // max(1, n_gpus))


#: glibc malloc in worker processes started with ``MALLOC_TRIM_THRESHOLD_`` (distributed's
#: nanny starts them with 64 KiB): that setting also freezes glibc's mmap threshold at
#: 128 KiB, so every array of a task is mmapped, page-faulted and unmapped anew, and the heap
#: is trimmed after each free. Registration pairs were measured 2.5 to 4 times slower there
#: (24 pairs of 1024 px tiles, 2 busy cores: 1.2-2.1 s instead of 0.3-0.8 s in a plain
#: process), fusion to OME-Zarr 2.3 times (36 tiles of 1024 px on one 2-thread worker
#: process: 1.53 s, 0.65 s tuned, 0.53 s in a plain process; benchmarks/bench_workers.py).
#: Registration and fusion tasks set these two thresholds instead (arrays below 32 MiB come
#: from the heap, which keeps up to 128 MiB free).
WORKER_MMAP_THRESHOLD = 32 * 2**20
WORKER_TRIM_THRESHOLD = 128 * 2**20


@functools.cache
def tune_worker_malloc() -> bool:
    """In a process started with ``MALLOC_TRIM_THRESHOLD_`` on glibc, once: ``mallopt``
    :data:`WORKER_MMAP_THRESHOLD` and :data:`WORKER_TRIM_THRESHOLD`. True if done.

    Called at the start of every registration and fusion task; a no-op (False) in a plain
    process, where glibc's own adaptive thresholds are left alone.
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # -3: M_MMAP_THRESHOLD, -1: M_TRIM_THRESHOLD (glibc's malloc.h)
        return bool(libc.mallopt(-3, WORKER_MMAP_THRESHOLD)
                    and libc.mallopt(-1, WORKER_TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False


def local_gpu_cluster(gpus: Sequence[int], stack: ExitStack,
                      threads_per_gpu: int | None = None) -> Any:
    """Start a ``LocalCUDACluster`` on ``gpus`` (closed by ``stack``) and return a Client."""
    _check_gpus(gpus)
    if threads_per_gpu is None:
        threads_per_gpu = default_threads_per_gpu(len(gpus))
    if threads_per_gpu < 1:
        raise InputError(f"--threads-per-gpu: must be >= 1, got {threads_per_gpu}")
    devices = worker_devices(gpus)
    try:
        from dask_cuda import LocalCUDACluster
        from distributed import Client
    except ImportError as exc:
        raise InputError(f"--gpus needs dask-cuda and distributed (pip install "
                         f"'gpufusion[gpu]'): {one_line(exc)}") from None
    count = _device_count()  # of the devices this process sees: the indices' range
    if count == 0:
        raise InputError("--gpus: no usable CUDA device on this machine")
    if count is not None and max(gpus) >= count:
        raise InputError(f"--gpus: GPU {max(gpus)} does not exist; this machine has {count} "
                         f"(indices 0..{count - 1})")
    try:
        cluster = stack.enter_context(LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=",".join(devices), n_workers=len(gpus),
            threads_per_worker=threads_per_gpu))
        return stack.enter_context(Client(cluster))
    except _cluster_errors() as exc:
        raise InputError(f"--gpus {','.join(map(str, gpus))}: could not start the GPU "
                         f"workers ({one_line(exc)})") from None


def remote_client(address: str, stack: ExitStack, timeout: float = CONNECT_TIMEOUT) -> Any:
    """Connect a ``distributed.Client`` to ``address`` (closed by ``stack``)."""
    try:
        from distributed import Client
    except ImportError as exc:
        raise InputError(f"--scheduler needs distributed (pip install 'gpufusion[gpu]'): "
                         f"{one_line(exc)}") from None
    try:
        return stack.enter_context(Client(address, timeout=timeout))
    except _cluster_errors() as exc:
        raise InputError(f"--scheduler {address}: cannot connect ({one_line(exc)})") from None


def _probe_worker() -> tuple[bool, str]:
    """Run on each worker by :func:`worker_gpu_status`."""
    from . import backends

    return backends.gpu_status()


def worker_gpu_status(client: Any) -> dict[str, tuple[bool, str]]:
    """:func:`gpufusion.backends.gpu_status` of every worker of ``client``, by address.

    A worker on which the probe itself fails (gpufusion missing there, say) counts as
    having no usable GPU, with the error as the reason.
    """
    try:
        replies = client.run(_probe_worker, on_error="return")
    except _cluster_errors() as exc:
        raise InputError(f"cannot ask the Dask workers for their GPUs ({one_line(exc)})"
                         ) from None
    status = {}
    for worker, reply in sorted(replies.items()):
        if isinstance(reply, BaseException):
            status[worker] = (False, f"the GPU probe failed there ({one_line(reply)})")
        else:
            status[worker] = (bool(reply[0]), str(reply[1]))
    return status


def resolve_cluster_backend(client: Any, name: str) -> tuple[str, str | None]:
    """Resolve ``name`` for the workers of ``client``: ``(backend, notice or None)``.

    ``numpy`` needs nothing. ``cupy`` needs a usable GPU on every worker; ``auto`` picks
    ``cupy`` only when every worker has one, else ``numpy`` with a one-line notice naming
    a worker without.

    Raises
    ------
    InputError
        ``cupy`` with a worker lacking a usable GPU (named, with the reason), or a cluster
        without workers (``auto`` and ``cupy``).
    """
    if name not in BACKENDS:
        raise InputError(f"backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return "numpy", None
    status = worker_gpu_status(client)
    if not status:
        raise InputError(f"backend {name}: the Dask cluster has no workers to run on (start "
                         "workers first)")
    lacking = [(w, why) for w, (ok, why) in status.items() if not ok]
    if not lacking:
        first = next(iter(status.values()))[1]
        return "cupy", f"using the GPU backend on {len(status)} worker(s) ({first} each)"
    worker, why = lacking[0]
    others = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
    if name == "cupy":
        raise InputError(f"backend cupy: worker {worker}{others} has no usable GPU: {why}")
    return "numpy", (f"worker {worker}{others} has no usable GPU ({why}); using the NumPy "
                     "backend")


@contextmanager
def connect(gpus: Sequence[int] | None = None, scheduler: str | None = None,
            *, timeout: float | None = None,
            threads_per_gpu: int | None = None) -> Iterator[Any]:
    """Set up where dask runs fusion tasks; yields a ``distributed.Client`` or ``None``.

    Parameters
    ----------
    gpus : sequence of int, optional
        Local GPU indices, counted among the GPUs this process sees (relative to its
        ``CUDA_VISIBLE_DEVICES``, as CUDA counts them): one ``dask_cuda`` worker process
        per GPU.
    scheduler : str, optional
        Address of a running Dask scheduler, e.g. ``tcp://10.0.0.5:8786``.
    timeout : float, optional
        Seconds to wait for ``scheduler`` to answer (default ``CONNECT_TIMEOUT``).
    threads_per_gpu : int, optional
        Threads of each local GPU worker (default :func:`default_threads_per_gpu`); only
        with ``gpus``.

    Raises
    ------
    InputError
        When both are given, or the cluster cannot be started or reached.

    Examples
    --------
    >>> with connect(gpus=None, scheduler=None) as client:
    ...     client is None
    True
    """
    if gpus and scheduler:
        raise InputError("--gpus and --scheduler are exclusive: start GPU workers locally, "
                         "or connect to a running scheduler")
    if threads_per_gpu is not None and not gpus:
        raise InputError("--threads-per-gpu: applies to local GPU workers (--gpus)")
    with ExitStack() as stack:
        if scheduler:
            yield remote_client(scheduler, stack,
                                CONNECT_TIMEOUT if timeout is None else timeout)
        elif gpus:
            yield local_gpu_cluster(gpus, stack, threads_per_gpu)
        else:
            yield None
