"""One task, one stream: :func:`gpufusion.backends.task_scope` on the host-emulated device.

The emulated device (tests/host_emulation) keeps CuPy's stream rules: each device array is
tied to the stream it was allocated on, and a use on another stream that races on a GPU
(read before its stream was waited for, freed while another stream still uses it) is
reported (``STREAMS.violations``; raised at once with ``STREAMS.strict``). The kernels run on
the host, so results are checked bit for bit against the NumPy fusion and pyramid.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends import task_scope
from gpufusion.backends.numpy_ref import fuse_chunk
from gpufusion.errors import InputError
from gpufusion.pyramid import downsample_mean2

from .host_emulation import cases
from .host_emulation.fake_cupy import emulated_gpu
from .host_emulation.harness import HostKernels, gxx_available
from .host_emulation.strict_cupy import NULL_STREAM, STATS, STREAMS, StreamViolation
from .kernel_checks import skip_module_unless

#: The fusion instantiations these tests launch (uint16 and float32 tiles, 2-D and 3-D).
FUSE_KEYS = [(k, k, nd, "linear", "linear") for k in ("uint16", "float32") for nd in (2, 3)]


def test_numpy_task_scope_does_nothing() -> None:
    with task_scope("numpy") as stream:
        assert stream is None


def test_unknown_backend_task_scope_is_input_error() -> None:
    with pytest.raises(InputError, match="backend: unknown 'auto'"), task_scope("auto"):
        pass


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    skip_module_unless(gxx_available(), "g++ is not installed")
    return HostKernels.build(tmp_path_factory.mktemp("host_kernels"), FUSE_KEYS,
                             ck.downsample_instantiations())


@pytest.fixture
def gpu(host: HostKernels, monkeypatch: pytest.MonkeyPatch):
    """The emulated device with the stream rules strict (a crossing raises at once)."""
    with emulated_gpu(host, monkeypatch) as cupy:
        STREAMS.reset()
        monkeypatch.setattr(STREAMS, "strict", True)
        yield cupy
    STREAMS.reset()


def pyramid_reference(block: np.ndarray, levels: int) -> list[np.ndarray]:
    """The NumPy pyramid of a block: 2x means over every axis, ``levels`` times."""
    out = [block]
    for _ in range(levels):
        out.append(downsample_mean2(out[-1], (2,) * block.ndim))
    return out


def run_task(backend, windows, table, params, levels: int) -> list[np.ndarray]:
    """One whole-block task as the writer runs it: fuse, downsample, copy each level."""
    from gpufusion.backends.cupy_backend import downsample_mean2_gpu, to_host

    with task_scope("cupy"):
        block = backend.fuse_windows(windows, table, params)
        host = [to_host(block)]
        for _ in range(levels):
            block = downsample_mean2_gpu(block, (2,) * block.ndim)
            host.append(to_host(block))
    return host


def case_chunks(ndim: int, dtype: str, seed: int):
    case = cases.make_case("subpixel", ndim, "linear", "linear", (dtype, dtype), seed)
    return case, [(w, t) for w, t in cases.chunk_inputs(case) if len(t) > 0]


@pytest.mark.parametrize(("ndim", "dtype"), [(2, "uint16"), (3, "float32"), (2, "float32")])
def test_task_scope_fuse_downsample_to_host_equal_numpy(gpu, ndim: int, dtype: str) -> None:
    from gpufusion.backends.cupy_backend import CupyBackend, thread_stream

    backend = CupyBackend()
    case, chunks = case_chunks(ndim, dtype, 40 + ndim)
    stream = thread_stream()
    before = (STATS["pinned_to_host"], STATS["pageable_to_host"], stream.synchronized)
    for windows, table in chunks:
        got = run_task(backend, windows, table, case.params, levels=3)
        want = pyramid_reference(fuse_chunk(windows, table, case.params), 3)
        for level, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.dtype == w.dtype and g.shape == w.shape, level
            np.testing.assert_array_equal(g, w, err_msg=f"level {level}")
    n = len(chunks)
    assert STATS["pinned_to_host"] - before[0] == 4 * n  # every copy into pinned memory
    assert STATS["pageable_to_host"] == before[1]
    # waits: one per copy (to_host must return data) and one at each task's end, no more
    assert stream.synchronized - before[2] <= 5 * n + n
    assert STREAMS.violations == []


def test_task_scope_runs_every_step_on_the_thread_stream(gpu, monkeypatch) -> None:
    """Inside a scope every launch, allocation and copy is on the one stream, and nothing
    is left on the legacy default stream; the stream is waited for when the scope exits."""
    from gpufusion.backends import cupy_backend
    from gpufusion.backends.cupy_backend import CupyBackend, downsample_mean2_gpu, to_host

    from .host_emulation.strict_cupy import allocation_stream, current_stream

    backend = CupyBackend()
    case, chunks = case_chunks(2, "uint16", 7)
    windows, table = chunks[0]
    on_null = NULL_STREAM.enqueued
    with task_scope("cupy") as stream:
        assert current_stream() is stream is cupy_backend.thread_stream()
        assert cupy_backend.in_task_scope()
        with task_scope("cupy") as inner:  # nested: the same stream, no wait at its exit
            assert inner is stream
            waits = stream.synchronized
        assert stream.synchronized == waits
        block = backend.fuse_windows(windows, table, case.params)
        level = downsample_mean2_gpu(block, (2, 2))
        assert allocation_stream(block) is stream and allocation_stream(level) is stream
        assert stream.synchronized == waits  # no wait between the task's steps
        to_host(level)
        waits = stream.synchronized
    assert stream.synchronized == waits + 1
    assert current_stream() is NULL_STREAM and not cupy_backend.in_task_scope()
    assert NULL_STREAM.enqueued == on_null and STREAMS.violations == []


def test_task_scope_waits_for_its_stream_on_error(gpu) -> None:
    from gpufusion.backends.cupy_backend import thread_stream

    stream = thread_stream()
    waits = stream.synchronized
    with pytest.raises(RuntimeError, match="boom"), task_scope("cupy"):
        raise RuntimeError("boom")
    assert stream.synchronized == waits + 1


def test_old_pattern_is_reported_as_a_race(gpu, monkeypatch) -> None:
    """The race of issue #12, replayed on the emulated device: the fused block (made on the
    thread's stream) downsampled on the legacy stream with nothing waited for, then freed.
    The stream rules report it, so the tests above would see a regression."""
    from gpufusion.backends.cupy_backend import CupyBackend

    monkeypatch.setattr(STREAMS, "strict", False)
    backend = CupyBackend()
    case, chunks = case_chunks(2, "uint16", 9)
    windows, table = chunks[0]
    block = backend.fuse_windows(windows, table, case.params)  # complete: its stream waited
    out = gpu.empty(tuple(-(-n // 2) for n in block.shape), dtype=block.dtype)
    shape4, factors4 = ck.downsample_geometry(block.shape, (2, 2))
    kernel = ck.downsample_kernel("uint16", "corners")
    kernel((1,), (64,), (block, out, *(np.int64(v) for v in (*shape4, *factors4))))
    assert STREAMS.violations == []  # reading a finished block on another stream is fine
    del block  # ... but its memory goes back to the fusion stream's free list in use
    assert len(STREAMS.violations) == 1 and "freed while in use" in STREAMS.violations[0]


def test_reading_a_block_before_its_stream_is_waited_for_raises(gpu) -> None:
    """A block made in a task scope is not complete until the scope exits: a use on another
    stream meanwhile is a crossing."""
    from gpufusion.backends.cupy_backend import CupyBackend, downsample_mean2_gpu

    backend = CupyBackend()
    case, chunks = case_chunks(2, "uint16", 11)
    windows, table = chunks[0]
    with task_scope("cupy"):
        block = backend.fuse_windows(windows, table, case.params)
        other = gpu.cuda.Stream(non_blocking=True)
        with other, pytest.raises(StreamViolation, match="before .* was waited for"):
            downsample_mean2_gpu(block, (2, 2))


def test_to_host_result_survives_buffer_reuse(gpu) -> None:
    from gpufusion.backends.cupy_backend import _download_buffer, to_host

    a = np.arange(60, dtype=np.uint16).reshape(6, 10)
    b = np.full((6, 10), 7, dtype=np.uint16)
    with task_scope("cupy"):
        got_a = to_host(gpu.asarray(a))
        got_b = to_host(gpu.asarray(b).T)  # not contiguous: copied on the device first
        empty = to_host(gpu.empty((0, 3), dtype=np.float32))
    assert not np.shares_memory(got_a, _download_buffer(1))
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b.T)
    assert empty.shape == (0, 3) and empty.dtype == np.float32
    host = np.ones(3)
    assert to_host(host) is host


def test_outside_a_scope_results_are_complete_on_return(gpu) -> None:
    """Without a task scope each function waits for its stream, so a block may move
    between threads (separate dask tasks) without a race, as before."""
    from gpufusion.backends.cupy_backend import CupyBackend, downsample_mean2_gpu, to_host

    backend = CupyBackend()
    case, chunks = case_chunks(2, "uint16", 13)
    windows, table = chunks[0]
    blocks = [backend.fuse_windows(windows, table, case.params)]
    results: list[np.ndarray] = []

    def other_thread() -> None:
        results.append(to_host(downsample_mean2_gpu(blocks[0], (2, 2))))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    blocks.clear()  # freed after another thread's stream used it: reported if not waited for
    expected = downsample_mean2(fuse_chunk(windows, table, case.params), (2, 2))
    np.testing.assert_array_equal(results[0], expected)
    assert STREAMS.violations == []


def test_many_threads_many_small_blocks(gpu) -> None:
    """Sixteen threads, each running whole-block tasks on its own stream: every level of
    every block equals NumPy's and no stream rule is broken."""
    from gpufusion.backends.cupy_backend import CupyBackend

    backend = CupyBackend()
    case, chunks = case_chunks(2, "uint16", 21)
    expected = [pyramid_reference(fuse_chunk(w, t, case.params), 2) for w, t in chunks]
    errors: list[BaseException] = []
    streams = set()

    def worker(k: int) -> None:
        from gpufusion.backends.cupy_backend import thread_stream

        streams.add(thread_stream())
        try:
            for i in range(k, k + 3 * len(chunks)):
                j = i % len(chunks)
                got = run_task(backend, *chunks[j], case.params, levels=2)
                for g, w in zip(got, expected[j], strict=True):
                    np.testing.assert_array_equal(g, w)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(streams) == 16
    assert STREAMS.violations == []
