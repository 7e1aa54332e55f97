"""Single-pass ("inline") pyramids in the OME-Zarr writer against the read-back path.

``write_ome_zarr(pyramid="inline")`` derives the larger levels from each level-0 block while
it is in memory and stores them with level 0 in one pass; ``pyramid="readback"`` computes
each level from the one above read back from the store. Both must write byte-identical
stores. The CuPy path (``downsample_mean2_gpu`` + ``to_host``) runs here on the host
emulation of the kernels (tests/host_emulation), and on a real GPU in the ``gpu`` test.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest

from gpufusion import pipeline
from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends import gpu_status
from gpufusion.pyramid import (
    blockwise_level,
    blockwise_level_chunks,
    blockwise_levels,
    downsample_mean2,
    pyramid_factors,
    pyramid_level,
)
from gpufusion.synthetic import make_mosaic
from gpufusion.writers import ome_zarr as writer
from gpufusion.writers.ome_zarr import INLINE_MIN_CHUNK, read_ome_zarr_info, write_ome_zarr

from .host_emulation.fake_cupy import emulated_gpu
from .host_emulation.harness import HostKernels, gxx_available

GPU_OK, GPU_WHY = gpu_status()

# ---------------------------------------------------------------------------- helpers


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (metadata and chunks), by relative path; the group's provenance
    record (``"gpufusion"``: backend, time) is left out of its attributes."""
    files = {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
             if p.is_file()}
    for name in (".zattrs", "zarr.json"):
        if name in files:
            node = json.loads(files[name])
            (node.get("attributes", node)).pop("gpufusion", None)
            files[name] = json.dumps(node, sort_keys=True).encode()
    return files


def assert_same_store(actual: Path, expected: Path) -> None:
    got, want = store_files(actual), store_files(expected)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files differ: {differ[:5]}"


def random_image(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt)
    return (rng.standard_normal(shape) * 1000).astype(dt)


class Counting:
    """Wrap a block function and count its calls (thread-safe)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls, self.lock = fn, 0, threading.Lock()
        self.__name__ = getattr(fn, "__name__", "counting")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
        return self.fn(*args, **kwargs)


def write_both(tmp_path: Path, image: Any, **options: Any) -> tuple[Path, Path]:
    inline = write_ome_zarr(image, tmp_path / "inline.ome.zarr", pyramid="inline", **options)
    readback = write_ome_zarr(image, tmp_path / "readback.ome.zarr", pyramid="readback",
                              **options)
    return inline, readback


def n_inline_levels(shape, chunks, axes, pixel_size=None) -> int:
    plan = pyramid_factors(shape, chunks, axes, pixel_size=pixel_size)
    image = da.zeros(shape, dtype="uint8", chunks=chunks)
    return len(blockwise_levels(image, plan, min_chunk=INLINE_MIN_CHUNK))


# ---------------------------------------------------------------------------- block rule


@pytest.mark.parametrize("n,chunk", [(1000, 128), (731, 128), (129, 128), (7, 4), (9, 2),
                                     (5, 8), (256, 64)])
def test_blockwise_equals_whole_array(n: int, chunk: int) -> None:
    """Even blocks but the last: per-block downsampling equals whole-array downsampling."""
    a = random_image((n, n + 3), "uint16", n)
    arr = da.from_array(a, chunks=chunk)
    for factors in [(2, 2), (1, 2), (2, 1)]:
        low = blockwise_level(arr, factors)
        assert low is not None
        np.testing.assert_array_equal(low.compute(), downsample_mean2(a, factors))
        np.testing.assert_array_equal(low.compute(), pyramid_level(arr, factors).compute())


def test_blockwise_refuses_odd_or_small_blocks() -> None:
    assert blockwise_level_chunks(((5, 5, 3),), (2,)) is None  # odd inner block
    assert blockwise_level_chunks(((5, 5, 3),), (1,)) == ((5, 5, 3),)  # axis kept
    assert blockwise_level_chunks(((7,),), (2,)) == ((4,),)  # a single block may be odd
    assert blockwise_level_chunks(((128, 72),), (2,), min_chunk=64) == ((64, 36),)
    assert blockwise_level_chunks(((64, 64, 8),), (2,), min_chunk=64) is None
    assert blockwise_level(da.zeros((10, 10), chunks=(3, 4)), (2, 2)) is None


@pytest.mark.parametrize("shape,chunks,axes,expected", [
    ((1000, 731), 128, "yx", 1),  # 128 -> 64; 32 would be below INLINE_MIN_CHUNK
    ((4000, 3000), 512, "yx", 3),  # 256, 128, 64
    ((1000, 1000), 130, "yx", 1),  # 65 is odd: level 2 is read back
    ((3000, 2100), 516, "yx", 2),  # 258, 129; level 3 would need 129 to be even
    ((1000, 731), 129, "yx", 0),  # odd level-0 blocks
    ((1000, 1000), 99, "yx", 0),  # odd chunk: everything read back
])
def test_how_many_levels_are_inline(shape, chunks, axes, expected) -> None:
    chunk_shape = (chunks,) * len(shape)
    assert n_inline_levels(shape, chunk_shape, tuple(axes)) == expected


# ---------------------------------------------------------------------------- inline == readback


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_inline_equals_readback_2d_uneven(tmp_path: Path, dtype: str, ngff_version: str) -> None:
    image = random_image((1000, 731), dtype, seed=len(dtype))
    inline, readback = write_both(tmp_path, da.from_array(image, chunks=128), axes=["y", "x"],
                                  chunks=128, ngff_version=ngff_version, pixel_size=[0.5, 0.5],
                                  unit="um", origin=[3.0, -2.0])
    assert_same_store(inline, readback)
    levels = read_ome_zarr_info(inline)["levels"]
    assert [lvl["shape"] for lvl in levels] == [(1000, 731), (500, 366), (250, 183), (125, 92)]


@pytest.mark.parametrize("chunks", [256, (128, 256, 256), 100])
def test_inline_equals_readback_3d(tmp_path: Path, chunks) -> None:
    image = random_image((130, 600, 517), "uint16", seed=3)
    inline, readback = write_both(tmp_path, image, axes=["z", "y", "x"], chunks=chunks)
    assert_same_store(inline, readback)


def test_inline_equals_readback_anisotropic_3d(tmp_path: Path) -> None:
    """z kept on the first levels (factor 1), halved later."""
    image = random_image((40, 1100, 1030), "uint8", seed=4)
    options = {"axes": ["z", "y", "x"], "chunks": (16, 256, 256), "pixel_size": [2, 0.5, 0.5],
               "anisotropic_pyramid": True}
    plan = pyramid_factors(image.shape, (16, 256, 256), "zyx", pixel_size=(2, 0.5, 0.5))
    assert plan[0][0] == 1 and any(f[0] == 2 for f in plan)
    assert_same_store(*write_both(tmp_path, image, **options))


def test_inline_equals_readback_channels(tmp_path: Path) -> None:
    """The c axis is never downsampled: one chunk per channel at every level."""
    image = da.stack([da.from_array(random_image((1000, 731), "uint16", seed=c), chunks=128)
                      for c in range(3)])
    inline, readback = write_both(tmp_path, image, axes=["c", "y", "x"], chunks=(1, 128, 128))
    assert_same_store(inline, readback)
    assert [lvl["shape"][0] for lvl in read_ome_zarr_info(inline)["levels"]] == [3, 3, 3, 3]


def test_odd_halved_blocks_stop_inline(tmp_path: Path) -> None:
    """Blocks of 129 at level 2 (>= INLINE_MIN_CHUNK but odd): level 3 is read back."""
    image = da.from_array(random_image((3000, 2100), "uint16", seed=10), chunks=516)
    inline, readback = write_both(tmp_path, image, axes=["y", "x"], chunks=516)
    assert len(read_ome_zarr_info(inline)["levels"]) == 4
    assert_same_store(inline, readback)
    odd = da.from_array(random_image((1000, 731), "uint16", seed=11), chunks=129)
    assert_same_store(*write_both(tmp_path / "odd", odd, axes=["y", "x"], chunks=129))


def test_irregular_input_chunks_are_regrouped_first(tmp_path: Path) -> None:
    image = da.from_array(random_image((700, 650), "float32", seed=5),
                          chunks=((300, 400), (100, 550)))
    inline, readback = write_both(tmp_path, image, axes=["y", "x"], chunks=128)
    assert_same_store(inline, readback)


def test_pyramid_option_is_validated(tmp_path: Path) -> None:
    from gpufusion.errors import InputError

    with pytest.raises(InputError, match="pyramid 'gpu'"):
        write_ome_zarr(np.zeros((8, 8)), tmp_path / "a.zarr", axes="yx", pyramid="gpu")
    assert not (tmp_path / "a.zarr").exists()


# ---------------------------------------------------------------------------- one pass


def test_each_block_computed_once_and_children_derived_from_it(tmp_path: Path) -> None:
    data = random_image((2000, 1500), "uint16", seed=6)
    seen: Counter[tuple[int, ...]] = Counter()
    lock = threading.Lock()

    def fused(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        with lock:
            seen[tuple(block_info[0]["chunk-location"])] += 1
        return block + 1

    image = da.from_array(data, chunks=256).map_blocks(fused, dtype=data.dtype)
    downsample = Counting(downsample_mean2)
    write_ome_zarr(image, tmp_path / "a.zarr", axes=["y", "x"], chunks=256,
                   pyramid="inline", downsample=downsample)
    assert len(seen) == image.npartitions and set(seen.values()) == {1}
    inline = n_inline_levels(data.shape, (256, 256), ("y", "x"))
    assert inline == 2 and downsample.calls == inline * image.npartitions
    expected = write_ome_zarr(data + 1, tmp_path / "b.zarr", axes=["y", "x"], chunks=256,
                              pyramid="readback")
    assert_same_store(tmp_path / "a.zarr", expected)


def test_to_host_sees_every_stored_block_once(tmp_path: Path) -> None:
    image = da.from_array(random_image((1000, 731), "uint16", seed=7), chunks=128)
    to_host = Counting(np.asarray)
    write_ome_zarr(image, tmp_path / "a.zarr", axes=["y", "x"], chunks=128, pyramid="inline",
                   to_host=to_host)
    # Level 0 and level 1 (inline) per block; levels 2 and 3 are read back from the store.
    assert to_host.calls == 2 * image.npartitions


# ---------------------------------------------------------------------------- CuPy path, emulated


def _fake_fuse_keys() -> list[tuple[str, str, int, str, str]]:
    return [k for k in ck.fuse_instantiations() if k[2:] == (2, "linear", "linear")]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    if not gxx_available():
        pytest.skip("g++ is not installed")
    return HostKernels.build(tmp_path_factory.mktemp("host_kernels"), _fake_fuse_keys(),
                             ck.downsample_instantiations())


@pytest.fixture
def fake_gpu(host: HostKernels, monkeypatch: pytest.MonkeyPatch):
    """CuPy replaced by NumPy plus the host-compiled kernels; kernel launches counted."""
    with emulated_gpu(host, monkeypatch) as cupy:
        cupy.downsample_launches = Counter()  # type: ignore[attr-defined]
        getter = ck.downsample_kernel

        def counted(name: str, algorithm: str) -> Callable[..., None]:
            kernel = getter(name, algorithm)

            def launch(grid: tuple, block: tuple, args: tuple) -> None:
                assert isinstance(args[0], cupy.ndarray)
                cupy.downsample_launches[tuple(args[0].shape)] += 1  # type: ignore
                kernel(grid, block, args)

            return launch

        monkeypatch.setattr(ck, "downsample_kernel", counted)
        yield cupy


@pytest.mark.parametrize("mode", ["inline", "readback"])
def test_device_blocks_equal_numpy_readback(fake_gpu, tmp_path: Path, mode: str) -> None:
    from gpufusion.backends.cupy_backend import downsample_mean2_gpu

    data = random_image((1000, 731), "uint16", seed=8)
    on_device = da.from_array(data, chunks=128).map_blocks(
        fake_gpu.asarray, dtype=data.dtype, meta=fake_gpu.empty((0, 0), data.dtype))
    to_host = Counting(fake_gpu.asnumpy)
    out = write_ome_zarr(on_device, tmp_path / "gpu.zarr", axes=["y", "x"], chunks=128,
                         pyramid=mode, downsample=downsample_mean2_gpu, to_host=to_host)
    expected = write_ome_zarr(data, tmp_path / "cpu.zarr", axes=["y", "x"], chunks=128,
                              pyramid="readback")
    assert_same_store(out, expected)
    n, inline = on_device.npartitions, int(mode == "inline")  # 1 inline level (64 px blocks)
    assert sum(fake_gpu.downsample_launches.values()) == inline * n  # one launch per block
    assert to_host.calls == (1 + inline) * n  # one device-to-host copy per block and level


def test_fuse_to_file_cupy_downsamples_on_device(fake_gpu, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mosaic = make_mosaic((3, 3), (400, 400)).mosaic()
    gpu = pipeline.fuse_to_file(mosaic, tmp_path / "gpu.ome.zarr", chunks=256, backend="cupy",
                                name="m")
    shape = gpu.shape
    n_blocks = int(np.prod([-(-n // 256) for n in shape]))
    inline = n_inline_levels(shape, (256, 256), ("y", "x"))
    assert inline == 2
    assert sum(fake_gpu.downsample_launches.values()) == inline * n_blocks

    write = writer.write_ome_zarr
    monkeypatch.setattr(pipeline, "write_ome_zarr",
                        lambda *a, **k: write(*a, **{**k, "pyramid": "readback"}))
    cpu = pipeline.fuse_to_file(mosaic, tmp_path / "cpu.ome.zarr", chunks=256,
                                backend="numpy", name="m")
    assert_same_store(gpu.path, cpu.path)


def test_fuse_to_ome_tiff_cupy_copies_blocks_to_host(fake_gpu, tmp_path: Path) -> None:
    """The OME-TIFF writer stores host arrays: the CuPy path copies each block once, and
    the file holds the same pixels (every level) as the NumPy path's."""
    import tifffile

    mosaic = make_mosaic((2, 3), (300, 300), seed=5).mosaic()
    gpu = pipeline.fuse_to_file(mosaic, tmp_path / "gpu.ome.tif", chunks=256, backend="cupy")
    cpu = pipeline.fuse_to_file(mosaic, tmp_path / "cpu.ome.tif", chunks=256, backend="numpy")
    assert gpu.shape == cpu.shape
    with tifffile.TiffFile(gpu.path) as a, tifffile.TiffFile(cpu.path) as b:
        levels_a, levels_b = a.series[0].levels, b.series[0].levels
        assert len(levels_a) == len(levels_b) >= 2
        for la, lb in zip(levels_a, levels_b, strict=True):
            np.testing.assert_array_equal(la.asarray(), lb.asarray())


# ---------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=f"no usable GPU: {GPU_WHY}")
def test_inline_pyramid_on_gpu_equals_numpy_readback(tmp_path: Path) -> None:
    import cupy

    from gpufusion.backends.cupy_backend import downsample_mean2_gpu

    for dtype in ("uint16", "float32"):
        data = random_image((1000, 731), dtype, seed=9)
        on_device = da.from_array(data, chunks=128).map_blocks(
            cupy.asarray, dtype=data.dtype, meta=cupy.empty((0, 0), data.dtype))
        out = write_ome_zarr(on_device, tmp_path / f"gpu-{dtype}.zarr", axes=["y", "x"],
                             chunks=128, pyramid="inline", downsample=downsample_mean2_gpu,
                             to_host=cupy.asnumpy)
        expected = write_ome_zarr(data, tmp_path / f"cpu-{dtype}.zarr", axes=["y", "x"],
                                  chunks=128, pyramid="readback")
        assert_same_store(out, expected)

    mosaic = make_mosaic((3, 3), (400, 400)).mosaic()
    gpu = pipeline.fuse_to_file(mosaic, tmp_path / "gpu.ome.zarr", chunks=256, backend="cupy")
    level0 = da.from_zarr(str(gpu.path / "0"))
    again = write_ome_zarr(level0, tmp_path / "again.ome.zarr", axes=["y", "x"], chunks=256,
                           pyramid="readback")
    for level in read_ome_zarr_info(gpu.path)["levels"]:
        np.testing.assert_array_equal(da.from_zarr(str(gpu.path / level["path"])).compute(),
                                      da.from_zarr(str(again / level["path"])).compute())
