"""The whole-slide benchmark's stage breakdown (benchmarks/bench_wsi.py), on a small mosaic.

The device-to-host stage runs on the host-emulated device in tests/test_kernels_host.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package)."""
    module_name = f"_gpufusion_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wsi() -> ModuleType:
    return load_benchmark("bench_wsi")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fused OME-Zarr image with a pyramid, as the benchmark's run writes it."""
    from gpufusion import fuse_to_file
    from gpufusion.synthetic import make_mosaic

    out = tmp_path_factory.mktemp("wsi") / "m.ome.zarr"
    fuse_to_file(make_mosaic((2, 2), (160, 160), dtype="uint16").mosaic(), out, chunks=64)
    return out


def test_write_stage_stores_every_chunk_of_every_level(wsi: ModuleType, store: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from zarr.storage import LocalStore

    levels = wsi.level_arrays(store)
    assert len(levels) >= 3
    keys = wsi.chunk_keys(store)
    assert len(keys) == sum(a.nchunks for a in levels)
    written: list[tuple[str, int]] = []
    real_set = LocalStore.set

    async def counting_set(self, key, value):
        written.append((key, len(value)))
        await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", counting_set)
    scratch = tmp_path / "again"
    seconds = wsi.write_seconds(store, scratch)
    assert seconds > 0
    assert sorted(written) == sorted((k, (store / k).stat().st_size) for k in keys)
    assert not scratch.exists()  # the copy is removed again


def test_compress_stage_covers_every_level(wsi: ModuleType, store: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import numcodecs

    encoded: list[int] = []
    codec = numcodecs.get_codec(wsi.level_arrays(store)[0].metadata.to_dict()["compressor"])
    real_encode = type(codec).encode

    def counting_encode(self, buf):
        encoded.append(buf.size)
        return real_encode(self, buf)

    monkeypatch.setattr(type(codec), "encode", counting_encode)
    assert wsi.compress_seconds(store) > 0
    levels = wsi.level_arrays(store)
    assert len(encoded) == sum(a.nchunks for a in levels)
    assert sum(encoded) == sum(a.size for a in levels)


def test_breakdown_names_every_stage_in_flow_order(wsi: ModuleType) -> None:
    labels = [label.split()[0] for _, label in wsi.BREAKDOWN]
    assert labels == ["read", "h2d", "kernel", "fuse", "d2h", "compress", "write"]
    gpu = {"gpu_chunks": 4, "read_s": 0.1, "gpu_h2d_s": 0.2, "gpu_kernel_s": 0.3, "fuse_s": 0.4,
           "d2h_s": 0.5, "compress_s": 0.6, "write_s": 0.7}
    line = wsi.format_breakdown("cupy", 2.0, gpu)
    assert line.startswith("whole slide [cupy] 2.00 s end to end")
    assert ", ".join(["read 0.100 s", "h2d 0.200 s", "kernel 0.300 s", "fuse 0.400 s",
                      "d2h 0.500 s", "compress 0.600 s", "write 0.700 s"]) in line
    cpu = wsi.format_breakdown("numpy", 1.0, {"read_s": 0.1, "fuse_s": 0.4, "compress_s": 0.6,
                                              "write_s": 0.7})
    assert "d2h" not in cpu and "h2d" not in cpu and "write 0.700 s" in cpu
