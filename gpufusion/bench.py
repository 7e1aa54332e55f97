"""Fusion throughput per backend on a synthetic mosaic (``gpufusion bench``).

:func:`run_benchmark` builds a synthetic tiled acquisition
(:func:`gpufusion.synthetic.make_mosaic`), fuses it in memory with each requested backend
and reports the best of ``repeat`` timed runs. Each backend first fuses one chunk untimed
(kernel compilation, memory pools); GPU timings include a device synchronisation, so the
work is finished when the clock stops. Speed-ups are relative to NumPy on all CPU cores.

Examples
--------
>>> results, notes = run_benchmark(tiles=(2, 2), tile=64, chunk=32, backends=("numpy",),
...                                repeat=1)
>>> results[0].backend, results[0].megapixels > 0
('numpy', True)
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask

from .backends import BACKENDS, get_backend, gpu_status
from .errors import InputError
from .fuse import fuse
from .synthetic import make_mosaic

BENCH_DTYPES = ("uint8", "uint16", "float32")


@dataclass(frozen=True)
class BenchResult:
    """Best time of one backend."""

    backend: str
    device: str
    seconds: float
    megapixels: float
    speedup: float | None = None
    stages: dict[str, float] | None = None  # per-run stage breakdown (cupy, with profile)

    @property
    def megapixels_per_second(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else math.inf


def cpu_name() -> str:
    """The CPU model and thread count, e.g. ``'AMD EPYC 7763 (16 threads)'``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} threads)"


def gpu_name() -> str:
    """Name of the current CUDA device."""
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    name = cupy.cuda.runtime.getDeviceProperties(dev)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _timer(backend: str) -> tuple[Callable[[], None], str]:
    """A device synchronisation for ``backend`` and the device's name."""
    if backend == "cupy":
        import cupy

        return cupy.cuda.Device().synchronize, gpu_name()
    return lambda: None, cpu_name()


def time_backend(image: object, backend: str, repeat: int,
                 on_warm: Callable[[], None] | None = None) -> tuple[float, str]:
    """Best wall time of computing the dask array ``image`` (after an untimed warm-up).

    ``on_warm`` is called between the warm-up and the timed runs.
    """
    sync, device = _timer(backend)
    first = tuple(slice(0, c[0]) for c in image.chunks)  # type: ignore[attr-defined]
    image[first].compute()  # type: ignore[index]  # warm-up: compile, pools, threads
    sync()
    if on_warm is not None:
        on_warm()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = image.compute()  # type: ignore[attr-defined]
        sync()
        best = min(best, time.perf_counter() - t0)
        del result
    return best, device


def run_benchmark(
    tiles: Sequence[int] = (8, 8),
    tile: int = 2048,
    dtype: str = "uint16",
    chunk: int = 1024,
    backends: Sequence[str] = ("numpy", "cupy"),
    repeat: int = 3,
    *,
    overlap: float = 0.1,
    seed: int = 0,
    profile: bool = False,
) -> tuple[list[BenchResult], list[str]]:
    """Time in-memory fusion of a synthetic mosaic with each backend.

    Parameters
    ----------
    tiles : sequence of int
        Tile grid (rows, columns).
    tile : int
        Tile size in pixels (square tiles).
    dtype : {"uint8", "uint16", "float32"}
    chunk : int
        Output chunk size.
    backends : sequence of str
        ``numpy`` and/or ``cupy``; ``cupy`` is skipped (with a note) when no GPU is usable.
    repeat : int
        Timed runs per backend; the best is kept.
    profile : bool
        Also record the CUDA backend's stage breakdown (CUDA events per chunk), averaged
        over the timed runs, in ``BenchResult.stages``.

    Returns
    -------
    results : list of BenchResult
    notes : list of str
        One line per skipped backend, saying why.
    """
    _check(tiles, tile, dtype, chunk, backends, repeat)
    notes: list[str] = []
    run = []
    for name in dict.fromkeys(backends):
        if name == "cupy":
            ok, why = gpu_status()
            if not ok:
                notes.append(f"GPU skipped: {why}")
                continue
        run.append(name)
    syn = make_mosaic(tuple(tiles), (tile, tile), overlap=overlap, dtype=dtype, seed=seed)
    mosaic = syn.mosaic()
    mpx = math.prod(mosaic.shape) / 1e6
    results = []
    with dask.config.set(scheduler="threads"):
        for name in run:
            impl = get_backend(name)
            stages = None
            if name == "cupy" and profile:
                impl.profile = True  # type: ignore[attr-defined]
            reset = getattr(impl, "reset_stage_times", None)
            seconds, device = time_backend(fuse(mosaic, chunks=chunk, backend=name), name,
                                           repeat, reset)
            if name == "cupy" and profile:
                totals = impl.stage_times()  # type: ignore[attr-defined]
                stages = {k: v / repeat for k, v in totals.items()}
                impl.profile = False  # type: ignore[attr-defined]
            results.append(BenchResult(name, device, seconds, mpx, stages=stages))
    base = next((r.seconds for r in results if r.backend == "numpy"), None)
    if base is not None:
        results = [BenchResult(r.backend, r.device, r.seconds, r.megapixels,
                               base / r.seconds if r.seconds > 0 else None, r.stages)
                   for r in results]
    return results, notes


def _check(tiles: Sequence[int], tile: int, dtype: str, chunk: int, backends: Sequence[str],
           repeat: int) -> None:
    if len(tiles) != 2 or min(tiles) < 1:
        raise InputError(f"--tiles: expected ROWSxCOLS of at least 1x1, got {tuple(tiles)}")
    if tile < 8 or chunk < 1 or repeat < 1:
        raise InputError(f"--tile must be >= 8, --chunk and --repeat >= 1 "
                         f"(got {tile}, {chunk}, {repeat})")
    if dtype not in BENCH_DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(BENCH_DTYPES)}")
    bad = [b for b in backends if b not in BACKENDS or b == "auto"]
    if bad or not backends:
        raise InputError(f"--backends: expected a list of numpy, cupy; got {list(backends)}")


def format_table(results: Sequence[BenchResult]) -> str:
    """The results as an aligned text table."""
    rows = [("backend", "device", "seconds", "Mpx/s", "speed-up")]
    for r in results:
        speed = f"{r.speedup:.1f}x" if r.speedup is not None else "-"
        rows.append((r.backend, r.device, f"{r.seconds:.3f}",
                     f"{r.megapixels_per_second:.1f}", speed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_stages(stages: dict[str, float]) -> str:
    """The CUDA backend's stage breakdown of one run, one stage per line.

    Host stages are summed over worker threads (they overlap each other and the device);
    ``h2d`` and ``kernel`` are device time from CUDA events.
    """
    lines = [f"stages per run: {stages['chunks']:.0f} chunks, "
             f"{stages['bytes_h2d'] / 2**20:.1f} MiB host->device"]
    for key, what in (("read_s", "read windows (host threads)"),
                      ("pack_s", "pack into pinned memory (host threads)"),
                      ("launch_s", "enqueue copy + kernel (host threads)"),
                      ("wait_s", "wait for the stream (host threads)"),
                      ("h2d_s", "host->device copies (device)"),
                      ("kernel_s", "fusion kernels (device)")):
        lines.append(f"  {what:<42} {stages[key]:8.3f} s")
    return "\n".join(lines)


def check_plot_path(path: str | Path) -> Path:
    """Check, before any benchmarking, that a bar chart can be written to ``path``.

    Raises :class:`~gpufusion.errors.InputError` when ``path`` does not end in ``.png``, its
    folder does not exist or is not writable, it names a folder, or matplotlib (the ``plot``
    extra) is not installed.

    Examples
    --------
    >>> check_plot_path("/nonexistent/b.png")
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: --plot: folder /nonexistent of /nonexistent/b.png does not exist
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"--plot: expected a .png path, got {str(path)!r}")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"--plot: folder {folder} of {path} {what}")
    if path.is_dir():
        raise InputError(f"--plot: {path} is a folder")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--plot: folder {folder} of {path} is not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError("--plot needs matplotlib, which is not installed "
                         "(pip install 'gpufusion[plot]')") from exc
    return path


def plot_results(results: Sequence[BenchResult], path: str | Path, title: str = "") -> bool:
    """Write a bar plot of Mpx/s per backend to ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r.backend}\n{r.device}" for r in results]
    ax.bar(labels, [r.megapixels_per_second for r in results], color="#4477aa")
    ax.set_ylabel("Mpx/s (higher is better)")
    ax.set_title(title or "gpufusion in-memory fusion")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def describe(tiles: Sequence[int], tile: int, dtype: str, chunk: int, overlap: float,
             megapixels: float) -> str:
    """One line saying what was benchmarked."""
    return (f"{tiles[0]}x{tiles[1]} tiles of {tile}x{tile} {dtype}, {overlap:.0%} overlap, "
            f"chunks {chunk}: {megapixels:.1f} Mpx fused per run")

