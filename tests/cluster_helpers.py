"""Helpers of the cluster tests: where fusion tasks ran, and a dask-cuda stand-in.

:func:`compute_counting_fusion_tasks` is shared by the CPU tests (a ``distributed``
``LocalCluster`` with the NumPy backend) and the GPU tests (dask-cuda workers), so the CPU
run proves the counting the GPU run relies on.
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from typing import Any

import pytest

#: The function of a fusion task; found in a task however dask names or fuses it.
FUSION_FUNCTION = b"_fuse_block"


def fusion_task_keys(collection: Any) -> set:
    """Keys of the tasks that run a fusion step once ``collection`` is optimised.

    Dask fuses the fusion step with what follows it (a to-host ``map_blocks``, the writer's
    steps) into one task named after the last step, so keys do not tell which tasks fuse.
    The task's pickled form does: it names ``gpufusion.fuse._fuse_block``.
    """
    import cloudpickle
    import dask

    (optimized,) = dask.optimize(collection)
    graph = dict(optimized.__dask_graph__())
    return {key for key, task in graph.items() if FUSION_FUNCTION in cloudpickle.dumps(task)}


def compute_counting_fusion_tasks(client: Any, collection: Any) -> tuple[Any, Counter]:
    """Compute ``collection`` on ``client``; also return, per worker address, how many of
    its tasks ran a fusion step (from the task stream, over all tasks)."""
    from distributed import get_task_stream

    fusing = fusion_task_keys(collection)
    assert fusing, "no task of the graph runs a fusion step"
    with get_task_stream(client) as stream:
        result = client.compute(collection).result()
    ran = {t["key"]: t["worker"] for t in stream.data}
    missing = fusing - ran.keys()
    assert not missing, (f"{len(missing)} fusion tasks are not in the task stream (the client "
                         f"optimised differently?), e.g. {next(iter(missing))}")
    return result, Counter(ran[key] for key in fusing)


def install_fake_dask_cuda(monkeypatch: pytest.MonkeyPatch,
                           check_devices: bool = False) -> list[dict]:
    """``dask_cuda.LocalCUDACluster`` stood in for by an in-process ``LocalCluster``
    (worker threads in this process, so they see whatever ``cupy`` this process has).

    ``check_devices``: keep gpufusion's check of the GPU indices against ``cupy``'s device
    count (default: skipped, as no GPU is needed). Returns the list the arguments of every
    start are appended to.
    """
    distributed = pytest.importorskip("distributed")
    from gpufusion import cluster as cluster_module

    calls: list[dict] = []

    class LocalCUDACluster(distributed.LocalCluster):
        def __init__(self, CUDA_VISIBLE_DEVICES: str, **kwargs: Any) -> None:  # noqa: N803
            calls.append({"CUDA_VISIBLE_DEVICES": CUDA_VISIBLE_DEVICES, **kwargs})
            super().__init__(processes=False, dashboard_address=":0", **kwargs)

    module = types.ModuleType("dask_cuda")
    module.LocalCUDACluster = LocalCUDACluster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", module)
    if not check_devices:
        monkeypatch.setattr(cluster_module, "_device_count", lambda: None)
    return calls


def emulated_device() -> bool:
    """True when ``cupy`` is the host-emulation stand-in (tests/host_emulation)."""
    cupy = sys.modules.get("cupy")
    return bool(getattr(cupy, "host_emulation", False))


def dask_cuda_or_stand_in(monkeypatch: pytest.MonkeyPatch) -> str:
    """For GPU tests: the real dask-cuda, or on the emulated device the in-process stand-in
    (skips on a real GPU without dask-cuda). Returns ``"dask-cuda"`` or ``"stand-in"``."""
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        if not emulated_device():
            pytest.skip("dask-cuda is not installed")
        install_fake_dask_cuda(monkeypatch, check_devices=True)
        return "stand-in"
    return "dask-cuda"
