"""Pairwise registration as Dask tasks on a ``distributed`` cluster (``--scheduler``, ``--gpus``).

Inside ``with on_cluster(client):`` every :func:`~gpufusion.registration.measure_pairs` call
of this thread (those :func:`~gpufusion.registration.register_mosaic` makes, at every stage
of its search) runs on the workers of ``client`` (:func:`measure_pairs_on_cluster`); the
candidate pairs, the search strategy and the global solve stay on the client::

    client: pairs (m, 2) -> contiguous batches of PAIRS_PER_TASK pairs -> one task each
            (per-pair options, such as a per-pair max_shift or expected offset, cut alike)
    worker: measure_pairs(mosaic, batch)   tile windows read there, batched FFTs
            (NumPy, or CuPy on GPU workers: the backend is resolved on the workers, as
            fusion's is, :func:`gpufusion.cluster.resolve_cluster_backend`)
    client: the batches' measurements, concatenated in pair order -> global solve

The mosaic is sent to the workers once per call (``client.scatter``); it holds tile sources
(file paths for tiles read from disk), so no pixels pass through the scheduler, only the
small per-pair results. Every pair is measured on its own (its windows, FFT, NCC scores and
refinement do not depend on the other pairs of its batch), so the result is the one
:func:`~gpufusion.registration.measure_pairs` gives in one process, bit for bit on the same
backend.

Examples
--------
>>> from distributed import Client, LocalCluster          # doctest: +SKIP
>>> from gpufusion.registration import register_mosaic    # doctest: +SKIP
>>> with LocalCluster(n_workers=2) as cluster, Client(cluster) as client:  # doctest: +SKIP
...     with on_cluster(client, "auto") as backend:
...         result = register_mosaic(mosaic, backend=backend)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..cluster import tune_worker_malloc
from ..errors import InputError
from ..layout import Mosaic
from ..progress import Progress
from .pairwise import PairMeasurements, candidate_pairs, check_max_shift, translation_positions

__all__ = ["PAIRS_PER_TASK", "ClusterRegistration", "active_cluster",
           "concatenate_measurements", "measure_pairs_on_cluster", "on_cluster"]

#: Pairs per Dask task: large enough for batched FFTs to pay off on a worker (a few hundred
#: windows), small enough that a mosaic of a few thousand tiles keeps every worker busy.
PAIRS_PER_TASK = 256


def _measure_batch(mosaic: Mosaic, pairs: np.ndarray, backend: str, options: dict
                   ) -> PairMeasurements:
    """One task: :func:`measure_pairs` of ``pairs`` on the worker (its backend resolved and
    its tile windows read there), in an empty context, so never sent on to a cluster."""
    from .pairwise import measure_pairs

    tune_worker_malloc()
    return contextvars.Context().run(measure_pairs, mosaic, pairs, backend=backend,
                                     **options)


def _per_pair(name: str, value: Any, m: int) -> bool:
    """Whether option ``name`` holds one row per pair (cut with the pairs): an array of
    shape (m, ndim), or for any option but ``max_shift`` (whose 1-D form is per axis) of
    shape (m,)."""
    if not isinstance(value, np.ndarray) or value.ndim == 0 or len(value) != m:
        return False
    return value.ndim >= 2 or name != "max_shift"


def measure_pairs_on_cluster(
    client: Any,
    mosaic: Mosaic,
    pairs: np.ndarray | None = None,
    *,
    backend: str = "numpy",
    progress: bool | Progress = False,
    label: str = "registering pairs",
    pairs_per_task: int = PAIRS_PER_TASK,
    **options: Any,
) -> PairMeasurements:
    """:func:`~gpufusion.registration.measure_pairs` with the pairs measured by the workers
    of ``client`` (a ``distributed.Client``), ``pairs_per_task`` pairs per task.

    Parameters
    ----------
    client : distributed.Client
    mosaic, pairs
        As :func:`~gpufusion.registration.measure_pairs`.
    backend : {"numpy", "cupy", "auto"}
        Resolved on each worker (``auto``: its GPU when usable). Resolve it for the whole
        cluster first (:func:`gpufusion.cluster.resolve_cluster_backend`, as
        :func:`on_cluster` does) so that all workers use one.
    progress : bool or Progress
        Show a ``label`` line on stderr, counted as tasks finish; or count on this open
        line (its total grows by the pairs), as :func:`measure_pairs` does.
    label : str
        What the progress line calls this step.
    pairs_per_task : int
        Pairs per Dask task (:data:`PAIRS_PER_TASK`).
    **options
        The other keyword arguments of :func:`~gpufusion.registration.measure_pairs`
        (``max_shift``, ``n_peaks``, ...); arrays with one row per pair are cut with the
        pairs.

    Returns
    -------
    PairMeasurements
        In the order of ``pairs``; ``seconds`` is the wall time on the client,
        ``read_seconds`` the workers' time reading tiles, summed.

    Raises
    ------
    InputError
        As :func:`~gpufusion.registration.measure_pairs` (raised on a worker, re-raised
        here), or for a cluster without workers.
    """
    from distributed import as_completed

    t0 = time.perf_counter()
    translation_positions(mosaic)  # refused here, before any task, if not translations
    if pairs is None:
        max_shift = options.get("max_shift")
        if max_shift is not None and np.ndim(max_shift) == 2:
            raise InputError("max_shift: one row per pair needs the pairs")
        pairs = candidate_pairs(mosaic, max_shift=check_max_shift(max_shift, mosaic))
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    m = len(pairs)
    rows = {k: v for k, v in options.items() if _per_pair(k, v, m)}
    shared_options = {k: v for k, v in options.items() if k not in rows}
    if m == 0:  # nothing to send: the empty result, as measure_pairs gives it
        empty = _measure_batch(mosaic, pairs, "numpy", options)
        return dataclasses.replace(empty, backend=backend if backend != "auto" else "numpy")
    if not client.scheduler_info().get("workers"):
        raise InputError("registration: the Dask cluster has no workers to run on (start "
                         "workers first)")
    run = uuid.uuid4().hex
    shared = client.scatter(mosaic, broadcast=False, hash=False)
    if pairs_per_task < 1:
        raise InputError(f"pairs_per_task: must be >= 1, got {pairs_per_task}")
    futures = []
    for k in range(0, m, pairs_per_task):
        part = slice(k, k + pairs_per_task)
        task_options = {**shared_options, **{n: v[part] for n, v in rows.items()}}
        futures.append(client.submit(_measure_batch, shared, pairs[part], backend,
                                     task_options, pure=False, key=f"register-pairs-{run}-{k}"))
    index = {f.key: k for k, f in enumerate(futures)}
    parts: list[PairMeasurements | None] = [None] * len(futures)
    try:
        if isinstance(progress, Progress):  # a line shared by several measurements
            progress.add_total(m)
            line: Any = contextlib.nullcontext(progress)
        else:
            line = Progress(label, m, unit="pairs", enabled=progress)
        with line as bar:
            for future in as_completed(futures):
                part_result = future.result()  # a worker's InputError is raised here
                parts[index[future.key]] = part_result
                bar.update(len(part_result))
    except BaseException:  # a failed task or Ctrl-C: drop the others (done ones are freed)
        client.cancel([*futures, shared])
        raise
    done = [p for p in parts if p is not None]
    names = {p.backend for p in done}
    if len(names) > 1:
        raise InputError(f"registration: the Dask workers used different backends "
                         f"({', '.join(sorted(names))}); give --backend numpy or cupy")
    return concatenate_measurements(done, time.perf_counter() - t0)


def concatenate_measurements(parts: Sequence[PairMeasurements], seconds: float
                             ) -> PairMeasurements:
    """One :class:`PairMeasurements` of ``parts`` (in order): every per-pair array field
    concatenated, other times (``read_seconds``) summed, the rest (``backend``) from the
    first part; ``seconds`` as given."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(PairMeasurements):
        first = getattr(parts[0], f.name)
        if f.name == "seconds":
            values[f.name] = seconds
        elif isinstance(first, np.ndarray) and first.ndim >= 1 \
                and all(len(getattr(p, f.name)) == len(p.pairs) for p in parts):
            values[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
        elif f.name.endswith("seconds"):
            values[f.name] = sum(getattr(p, f.name) for p in parts)
        else:
            values[f.name] = first
    return PairMeasurements(**values)


# ----------------------------------------------------------------------------------------
# The active cluster: measure_pairs and resolve_registration_backend consult it (their
# scale-out hooks), so every stage of a registration runs there without being told.


@dataclasses.dataclass(frozen=True)
class ClusterRegistration:
    """Where this thread's pair measurements run: a client and its workers' backend."""

    client: Any
    backend: str
    pairs_per_task: int = PAIRS_PER_TASK

    def measure(self, mosaic: Mosaic, pairs: np.ndarray | None = None, *, backend: str = "",
                **options: Any) -> PairMeasurements:
        """:func:`measure_pairs_on_cluster` on the workers' backend (``backend`` as asked
        of :func:`measure_pairs` is ignored: the workers' was resolved once)."""
        return measure_pairs_on_cluster(self.client, mosaic, pairs, backend=self.backend,
                                        pairs_per_task=self.pairs_per_task, **options)


_ACTIVE: contextvars.ContextVar[ClusterRegistration | None] = contextvars.ContextVar(
    "gpufusion_registration_cluster", default=None)


def active_cluster() -> ClusterRegistration | None:
    """The cluster this thread's pair measurements run on (None: here)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def on_cluster(client: Any, backend: str = "auto", *,
               pairs_per_task: int = PAIRS_PER_TASK) -> Iterator[str]:
    """Measure pairs on the workers of ``client`` within the block; yields the backend
    (``numpy`` or ``cupy``) resolved on the workers for ``backend``.

    ``client`` None: nothing changes (the pairs are measured here) and ``backend`` is
    yielded as :func:`~gpufusion.registration.pairwise.resolve_registration_backend`
    resolves it here.

    Examples
    --------
    >>> with on_cluster(None, "numpy") as name:
    ...     name, active_cluster()
    ('numpy', None)
    """
    from .pairwise import resolve_registration_backend

    if client is None:
        yield resolve_registration_backend(backend)
        return
    from ..cluster import resolve_cluster_backend

    if pairs_per_task < 1:
        raise InputError(f"pairs_per_task: must be >= 1, got {pairs_per_task}")
    name = resolve_cluster_backend(client, backend)[0]
    token = _ACTIVE.set(ClusterRegistration(client, name, pairs_per_task))
    try:
        yield name
    finally:
        _ACTIVE.reset(token)
