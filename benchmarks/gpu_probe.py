"""The Python steps of ``benchmarks/gpu_session.sh`` that are not pytest runs.

Usage (from the staged sources, as the session runs it)::

    python benchmarks/gpu_probe.py preflight          # versions, device; exit 3 if unusable
    python benchmarks/gpu_probe.py probe              # copy bandwidths, one block's kernel
    python benchmarks/gpu_probe.py slide N FOLDER     # write bench_wsi.py's N tiles
    python benchmarks/gpu_probe.py summarize FILE...  # key figures of pytest-benchmark JSON

``preflight`` exits 3 (with one line saying what is missing) when a step after it could
not run at all: CuPy missing or without a usable device (gpufusion's own trial kernel),
or a package the benchmarks import (dask, distributed, zarr, numcodecs, tifffile,
pytest-benchmark). dask-cuda, cuda.core, cuda-bindings and cuCIM are reported but not
required: without dask-cuda only the ``--gpus`` tests skip.

``probe`` times on the device with CUDA events, after a warm-up, median of several runs:
host-to-device and device-to-host copies between pinned host memory and the device,
device-to-device copies (bytes read + written), and the fusion kernel on the fullest
block of a small synthetic mosaic (its tile windows already on the device): effective
bandwidth (window bytes read + output bytes written) against the device copy. On the
host-emulated device (the session's ``--dry-run``) the events return a fixed time, so its
figures say nothing about speed; the probe says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Needed by the steps after the preflight (import name, what it is called in messages).
REQUIRED = (("numpy", "numpy"), ("cupy", "CuPy"), ("dask", "dask"),
            ("distributed", "distributed"), ("zarr", "zarr"), ("numcodecs", "numcodecs"),
            ("tifffile", "tifffile"), ("pytest", "pytest"),
            ("pytest_benchmark", "pytest-benchmark"))
#: Reported, not required.
OPTIONAL = (("dask_cuda", "dask-cuda (the --gpus tests skip without it)"),
            ("cuda.core", "cuda.core"), ("cuda.bindings", "cuda-bindings"),
            ("scipy", "scipy"), ("cucim", "cuCIM (the cuCIM comparison skips without it)"))

HERE = Path(__file__).resolve().parent


def emulated() -> bool:
    return bool(getattr(sys.modules.get("cupy"), "host_emulation", False))


def version_of(module: Any) -> str:
    return str(getattr(module, "__version__", None) or getattr(module, "VERSION", "?"))


def try_import(name: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def device_facts(cupy: Any) -> dict[str, Any]:
    """Name, compute capability, memory, driver and runtime versions of the current device."""
    runtime = cupy.cuda.runtime
    facts: dict[str, Any] = {}
    dev = runtime.getDevice()
    props = runtime.getDeviceProperties(dev)
    name = props.get("name", "?")
    facts["device"] = name.decode() if isinstance(name, bytes) else str(name)
    if "major" in props:
        facts["compute_capability"] = f"{props['major']}.{props['minor']}"
    if "totalGlobalMem" in props:
        facts["memory_GiB"] = round(props["totalGlobalMem"] / 2**30, 1)
    if "multiProcessorCount" in props:
        facts["multiprocessors"] = props["multiProcessorCount"]
    for key, call in (("driver_CUDA", "driverGetVersion"), ("runtime_CUDA", "runtimeGetVersion")):
        try:
            v = int(getattr(runtime, call)())
            facts[key] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception as exc:  # the stand-in lacks them
            facts[key] = f"unknown ({type(exc).__name__})"
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
        facts["nvrtc"] = f"{major}.{minor}"
    except Exception as exc:
        facts["nvrtc"] = f"unknown ({type(exc).__name__})"
    return facts


def nvidia_smi() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.sm,clocks.mem,temperature.gpu,utilization.gpu",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {type(exc).__name__}: {exc}"


def preflight() -> int:
    """Print versions and the device; 0 when the session can go on, 3 when it cannot."""
    print(f"date {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"cpu {platform.processor() or platform.machine()}, {os.cpu_count()} threads")
    missing = []
    for name, label in REQUIRED:
        module, error = try_import(name)
        print(f"{label} {version_of(module) if module else 'MISSING: ' + str(error)}")
        if module is None:
            missing.append(label)
    for name, label in OPTIONAL:
        module, error = try_import(name)
        print(f"{label.split(' ')[0]} {version_of(module) if module else 'missing: ' + str(error)}")
    if emulated():
        print("device: HOST EMULATION (tests/host_emulation): no figure below is a GPU's")
    else:
        print(f"nvidia-smi: {nvidia_smi()}")
    if "CuPy" not in missing:
        import cupy

        try:
            for key, value in device_facts(cupy).items():
                print(f"{key} {value}")
        except Exception as exc:
            print(f"device query failed: {type(exc).__name__}: {exc}")
    gpufusion, error = try_import("gpufusion.backends")
    if gpufusion is None:
        print(f"PREFLIGHT FAILED: gpufusion does not import ({error}); missing: "
              f"{', '.join(missing) or 'nothing listed'}")
        return 3
    ok, why = gpufusion.gpu_status()
    print(f"gpufusion gpu_status: {'usable' if ok else 'NOT usable'}: {why}")
    if missing:
        print(f"PREFLIGHT FAILED: missing {', '.join(missing)} (were the wheels carried? "
              "see the top of benchmarks/gpu_session.sh)")
        return 3
    if not ok:
        print(f"PREFLIGHT FAILED: no usable GPU for gpufusion: {why}")
        return 3
    print("PREFLIGHT OK")
    return 0


# ---------------------------------------------------------------------- the device probe


def event_ms(cupy: Any, fn: Any, repeat: int = 5) -> float:
    """Median device milliseconds of ``fn()`` over ``repeat`` runs (CUDA events), after one
    untimed run."""
    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def copy_bandwidths(cupy: Any, mib: int) -> dict[str, float]:
    """GB/s of H2D and D2H (pinned host memory, bytes moved) and D2D (read + written)."""
    import cupyx

    n = mib << 20
    host = cupyx.empty_pinned((n,), dtype=np.uint8)
    host[...] = 1
    dev = cupy.empty((n,), dtype=np.uint8)
    other = cupy.empty((n,), dtype=np.uint8)
    stream = cupy.cuda.get_current_stream()
    h2d = event_ms(cupy, lambda: dev.set(host, stream=stream))
    d2h = event_ms(cupy, lambda: dev.get(stream=stream, out=host))
    d2d = event_ms(cupy, lambda: cupy.copyto(other, dev))
    assert int(other[-1]) == 1 and int(host[-1]) == 1
    return {"bytes": n, "h2d_GBps": round(n / h2d / 1e6, 1), "d2h_GBps": round(n / d2h / 1e6, 1),
            "d2d_GBps": round(2 * n / d2d / 1e6, 1)}


def kernel_probe(cupy: Any, tile: int, chunk: int) -> dict[str, Any]:
    """The fusion kernel on the fullest block of a 2x2 mosaic of ``tile`` px tiles."""
    from gpufusion.backends import get_backend
    from gpufusion.fuse import fusion_params
    from gpufusion.plan import plan_fusion
    from gpufusion.synthetic import make_mosaic

    mosaic = make_mosaic((2, 2), (tile, tile), overlap=0.1, dtype="uint16", seed=1).mosaic()
    backend, params, plan = get_backend("cupy"), fusion_params(mosaic), plan_fusion(mosaic, chunk)
    idx = max(np.ndindex(*plan.numblocks), key=lambda i: len(plan.chunk(i)))
    table = plan.chunk(idx)
    windows = [mosaic.tiles[int(i)].source.read(w)
               for i, w in zip(table.tiles, table.windows(), strict=True)]
    out_bytes = math.prod(table.shape) * np.dtype(params.out_dtype).itemsize
    facts: dict[str, Any] = {"block": list(table.shape), "entries": len(table)}
    if hasattr(backend, "upload") and hasattr(backend, "launch"):
        device_chunk = backend.upload(windows, table, params)  # resident: the kernel alone
        ms = event_ms(cupy, lambda: backend.launch(device_chunk, params), repeat=20)
        moved = sum(w.nbytes for w in windows) + out_bytes  # windows read once each
        facts["what"] = "kernel alone, windows resident"
    else:  # the backend's API changed: the whole task, upload included
        from gpufusion.fuse import ChunkTask

        sources = tuple(mosaic.tiles[int(i)].source for i in table.tiles)
        task = ChunkTask(table, sources)
        ms = event_ms(cupy, lambda: backend.fuse_task(task, params), repeat=20)
        moved = sum(w.nbytes for w in windows) + out_bytes
        facts["what"] = "whole fuse_task (read, upload, kernel)"
    facts.update(kernel_ms=round(ms, 4), Mpx_per_s=round(math.prod(table.shape) / ms / 1e3, 1),
                 effective_GBps=round(moved / ms / 1e6, 1))
    return facts


def probe() -> int:
    import cupy

    mib = int(os.environ.get("GPUFUSION_PROBE_MIB", "1024"))
    tile = int(os.environ.get("GPUFUSION_PROBE_TILE", "2048"))
    if emulated():
        print("HOST EMULATION: CUDA events return a fixed time; these figures only show the "
              "probe runs")
    status = 0
    results: dict[str, Any] = {}
    for name, fn in (("copy", lambda: copy_bandwidths(cupy, mib)),
                     ("kernel", lambda: kernel_probe(cupy, tile, 1024))):
        try:
            results[name] = fn()
        except Exception as exc:  # reported; the session goes on
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            status = 1
        print(f"probe {name}: {json.dumps(results[name])}", flush=True)
    copy, kernel = results["copy"], results["kernel"]
    if "d2d_GBps" in copy and "effective_GBps" in kernel:
        print(f"probe kernel/copy: {kernel['effective_GBps'] / copy['d2d_GBps']:.3f} of the "
              "device copy bandwidth")
    return status


# ---------------------------------------------------------------------- slide, summaries


def load_benchmark_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"gpufusion_bench_{name}", HERE / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def slide(n_tiles: int, folder: str) -> int:
    t0 = time.perf_counter()
    made = load_benchmark_module("bench_wsi").write_slide(Path(folder), n_tiles)
    print(f"slide: {len(made.truth)} tiles of {made.grid} in {folder} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


#: extra_info keys worth a line in the session summary.
KEY_FIGURES = ("device", "copy_GBps", "fusion_GBps", "fraction_of_copy", "Mpx_per_s",
               "gpu_Mpx_per_s", "numpy_Mpx_per_s", "speedup", "seconds", "pairs_per_s",
               "rms_error_px", "tiles", "stages", "pyramid_check")


def summarize(paths: list[str]) -> int:
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            print(f"{Path(path).name}: not readable ({type(exc).__name__})")
            continue
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            figures = {k: info[k] for k in KEY_FIGURES if k in info}
            if "pyramid_check" in figures:
                figures["pyramid_check"] = [
                    f"{lv['level']}:{lv['max_diff']}{'' if lv['self_consistent'] else '!'}"
                    for lv in figures["pyramid_check"]]
            median = bench.get("stats", {}).get("median")
            print(f"{bench['name']}: median {median:.4g} s; {json.dumps(figures)}"
                  if median is not None else f"{bench['name']}: {json.dumps(figures)}")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, args = argv[0], argv[1:]
    if command == "preflight":
        return preflight()
    if command == "probe":
        return probe()
    if command == "slide" and len(args) == 2:
        return slide(int(args[0]), args[1])
    if command == "summarize":
        return summarize(args)
    print(f"gpu_probe.py: unknown command {' '.join(argv)!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
