"""The CUDA kernels, compiled as C++ for the host, against the NumPy references.

``kernels/*.cu`` are compiled unchanged with g++ and a small shim (tests/host_emulation) and
run through ctypes with the backend's own packing code, on seeded random layouts built by the
real planner. Tolerances come from the shared dtype-keyed table; modes without a
transcendental function must moreover match bit for bit (the kernel mirrors the reference's
float32/float64 operations; compiling with contraction to FMA breaks exactly this).
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from gpufusion import fuse
from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends.numpy_ref import fuse_chunk
from gpufusion.blend import BLEND_MODES, INTERP_CODES, INTERPOLATIONS, MODE_CODES
from gpufusion.pyramid import downsample_mean2

from .conftest import assert_close
from .host_emulation import cases
from .host_emulation.fake_cupy import emulated_gpu
from .host_emulation.harness import HostKernels, gxx_available
from .host_emulation.strict_cupy import DeviceArray
from .kernel_checks import skip_module_unless

# skipped without g++; an error instead under GPUFUSION_REQUIRE_KERNEL_CHECKS=1 (CI)
skip_module_unless(gxx_available(), "g++ is not installed")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    """Every kernel instantiation, compiled once for the whole module."""
    return HostKernels.build(tmp_path_factory.mktemp("host_kernels"), ck.fuse_instantiations(),
                             ck.downsample_instantiations())


# ---------------------------------------------------------------------- fusion kernel


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_fusion_kernel_matches_reference(host: HostKernels, layout: str, ndim: int, mode: str,
                                         interpolation: str) -> None:
    seed = 1000 * cases.LAYOUTS.index(layout) + 10 * ndim + 3 * MODE_CODES[mode] \
        + INTERP_CODES[interpolation]
    for k, pair in enumerate(cases.DTYPE_PAIRS):
        case = cases.make_case(layout, ndim, mode, interpolation, pair, seed + 7919 * k)
        stats = cases.check_case(case, host.fuse_chunk)
        if mode != "cosine":
            assert stats["differ"] == 0, f"{case.name}: not bit-identical: {stats}"


#: Dtype pairs of the separable kernel's checks (the issue's uint8, uint16, float32, uint32).
SEPARABLE_PAIRS = (("uint8", "uint8"), ("uint16", "uint16"), ("float32", "float32"),
                   ("uint32", "uint32"), ("uint16", "float32"))


def assert_separable_twin(host: HostKernels, case: cases.Case) -> int:
    """Every chunk of ``case`` through the separable kernel equals the general kernel bit for
    bit and, except for cosine ramps, the NumPy reference of both algorithms; returns the
    number of chunks the separable kernel took."""
    taken = 0
    for windows, table in cases.chunk_inputs(case):
        if not ck.separable_applies(table):
            assert len(table) == 0 or not table.translation.all(), case.name
            continue
        taken += 1
        got = host.fuse_chunk_separable(windows, table, case.params)
        general = host.fuse_chunk(windows, table, case.params)
        where = f"{case.name}, chunk at {table.start.tolist()}"
        np.testing.assert_array_equal(got, general, err_msg=where)
        for algorithm in ("general", "separable"):
            ref = fuse_chunk(windows, table, case.params, algorithm=algorithm)
            if case.params.mode == "cosine":
                assert_close(got, ref)
            else:
                np.testing.assert_array_equal(got, ref, err_msg=f"{where}, {algorithm}")
    return taken


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", ["translation", "subpixel"])
def test_separable_kernel_equals_general_kernel(host: HostKernels, layout: str, ndim: int,
                                                mode: str, interpolation: str) -> None:
    """fuse_chunk_separable against fuse_chunk and NumPy: integer and sub-pixel positions,
    uneven chunks (rows not a multiple of SEPARABLE_PX; tiles covering part of a chunk)."""
    taken = 0
    for k, pair in enumerate(SEPARABLE_PAIRS):
        seed = 500 + 31 * k + 7 * ndim + 3 * MODE_CODES[mode] + INTERP_CODES[interpolation]
        taken += assert_separable_twin(host, cases.make_case(layout, ndim, mode,
                                                             interpolation, pair, seed))
    assert taken > 0


@pytest.mark.parametrize("position", [(0.0, 0.0), (3.0, -4.0), (2.25, 5.5), (-3.5, 0.75),
                                      (6.9999999, -0.0000001)])
@pytest.mark.parametrize("mode", ["linear", "overlay"])
def test_separable_kernel_partial_coverage(host: HostKernels, position, mode: str) -> None:
    """Two tiles, one shifted so it covers only part of each chunk, at integer, half,
    quarter and nearly-integer positions; blend widths wider than the overlap."""
    from gpufusion.fuse import fusion_params
    from gpufusion.layout import mosaic_from_positions

    rng = np.random.default_rng(3)
    tiles = [cases.random_tile(rng, (13, 11), "uint16") for _ in range(2)]
    mosaic = mosaic_from_positions(tiles, np.array([[0.0, 0.0], [5.0 + position[0],
                                                                 6.0 + position[1]]]))
    for interpolation in INTERPOLATIONS:
        params = fusion_params(mosaic, blend=mode, blend_width=4.0,
                               interpolation=interpolation, dtype="uint16")
        case = cases.Case(f"partial-{position}-{mode}-{interpolation}", mosaic, (6, 5),
                          params)
        assert assert_separable_twin(host, case) > 0


def test_separable_tables_follow_the_general_coordinates() -> None:
    """The per-axis tables of a translation: coverage range, clamped neighbours (as window
    offsets), fractions and ramp weights, checked by hand for one small entry."""
    from gpufusion.fuse import fusion_params
    from gpufusion.layout import mosaic_from_positions
    from gpufusion.plan import plan_fusion

    tile = np.zeros((4, 6), dtype=np.uint16)
    mosaic = mosaic_from_positions([tile, tile], np.array([[0.0, 0.0], [0.0, 2.5]]))
    params = fusion_params(mosaic, blend="linear", blend_width=2.0, dtype="uint16")
    plan = plan_fusion(mosaic, (4, 9))
    table = plan.chunk((0, 0))
    cover, atab, itab = ck.separable_tables(table, params, np.float32)
    k = int(np.flatnonzero(table.offset[:, 1] != 0)[0])  # the shifted tile: q_x = l_x - 2.5
    # (its window starts at tile column win_lo; coordinates are relative to the window)
    assert table.translation.all()
    rows = slice(table.shape[0], table.shape[0] + table.shape[1])
    q = table.offset[k, 1] + np.arange(table.shape[1])
    lo, hi = -table.win_lo[k, 1], table.tile_shape[k, 1] - 1 - table.win_lo[k, 1]
    covered = np.flatnonzero((q >= lo - 1e-9) & (q <= hi + 1e-9))
    assert cover[k, 1].tolist() == [covered[0], covered[-1] + 1]
    qc = np.clip(q, lo, hi)
    np.testing.assert_array_equal(atab[k, rows, 0], (qc - np.floor(qc)).astype(np.float32))
    i0 = np.clip(np.floor(qc).astype(int), 0, table.win_shape[k, 1] - 1)
    np.testing.assert_array_equal(itab[k, rows, 0], i0)  # last axis: stride 1
    np.testing.assert_array_equal(itab[k, rows, 1], np.minimum(i0 + 1,
                                                               table.win_shape[k, 1] - 1))
    from gpufusion.blend import ramp_weights

    np.testing.assert_array_equal(atab[k, rows, 1], ramp_weights(
        qc + table.win_lo[k, 1], float(table.tile_shape[k, 1]), 2.0, "linear"))
    # the leading axis: offsets are row indices times the window's row length
    first = slice(0, table.shape[0])
    assert (itab[k, first, 0] % table.win_shape[k, 1] == 0).all()


def test_separable_does_not_apply_to_affine_or_empty_chunks() -> None:
    case = cases.make_case("affine", 2, "linear", "linear", ("uint16", "uint16"), 1)
    tables = [t for _, t in cases.chunk_inputs(case)]
    assert not any(ck.separable_applies(t) for t in tables)


def test_separable_instantiations_compile_with_nvrtc() -> None:
    """Every separable instantiation, single-block and batched, compiles for sm_90 with
    CuPy's options, cleanly (the general kernel's are compiled by
    tests/test_kernels_nvrtc.py)."""
    if ck.nvrtc_library_paths() is None:
        pytest.skip("the nvidia-cuda-nvrtc wheel is not installed")
    exprs = [f(*key) for key in ck.fuse_instantiations()
             for f in (ck.separable_name_expression, ck.blocks_name_expression)]
    result = ck.nvrtc_compile(ck.kernel_source("fuse"), name="fuse.cu", arch="sm_90",
                              name_expressions=exprs,
                              options=(*ck.COMPILE_OPTIONS, "-ftz=true"))
    assert result.log == "", result.log
    assert set(result.lowered_names) == set(exprs)
    assert len(set(result.lowered_names.values())) == len(exprs)
    assert result.binary[:4] == b"\x7fELF"


@pytest.mark.parametrize("pair", cases.FALLBACK_PAIRS, ids="-".join)
@pytest.mark.parametrize("layout", ["subpixel", "affine"])
def test_converted_dtypes_match_reference(host: HostKernels, layout: str,
                                          pair: tuple[str, str]) -> None:
    """float16 tiles converted to float32 on the host, outputs of another dtype than the
    kernel's rounded, clipped and cast after it: against the per-pixel reference."""
    for ndim in (2, 3):
        case = cases.make_case(layout, ndim, "linear", "linear", pair, 77 + ndim)
        cases.check_case(case, host.fuse_chunk, algorithm="general")


@pytest.mark.parametrize("width", [0.0, (2.5, 7.0), (1.0, 3.0, 0.0)], ids=str)
@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_explicit_blend_widths(host: HostKernels, mode: str, width) -> None:
    """Zero width (flat weights) and a different width per axis."""
    ndim = 3 if np.ndim(width) and len(width) == 3 else 2
    case = cases.make_case("subpixel", ndim, mode, "linear", ("uint16", "uint16"), 5,
                           blend_width=width)
    cases.check_case(case, host.fuse_chunk)


def test_reference_algorithms_agree_with_kernel(host: HostKernels) -> None:
    """The kernel equals both NumPy algorithms (per-pixel and slice-based translations)."""
    for layout in ("translation", "subpixel"):
        case = cases.make_case(layout, 2, "linear", "linear", ("uint16", "float32"), 11)
        for algorithm in ("general", "separable"):
            stats = cases.check_case(case, host.fuse_chunk, algorithm=algorithm)
            assert stats["differ"] == 0, (layout, algorithm, stats)


@pytest.mark.parametrize("block,max_blocks", [(32, 3), (1, 1), (256, 1 << 20)])
def test_grid_stride_loop_covers_every_pixel(host: HostKernels, block: int,
                                             max_blocks: int) -> None:
    """Fewer threads than pixels: each thread walks the chunk in grid-sized steps."""
    case = cases.make_case("affine", 2, "average", "linear", ("uint8", "uint8"), 3)
    cases.check_case(case, lambda w, t, p: host.fuse_chunk(w, t, p, block=block,
                                                           max_blocks=max_blocks))


def test_overlaps_are_exercised() -> None:
    """The random layouts really put several tiles in a chunk and leave some pixels empty."""
    for ndim in (2, 3):
        case = cases.make_case("affine", ndim, "linear", "linear", ("uint8", "uint8"), 1)
        counts = [len(t) for _, t in cases.chunk_inputs(case)]
        assert max(counts) >= 2 ** ndim // 2 + 1 and min(counts) <= 1


def test_empty_chunk_is_zero(host: HostKernels) -> None:
    case = cases.make_case("translation", 2, "linear", "linear", ("uint16", "uint16"), 0)
    windows, table = cases.chunk_inputs(case)[0]
    empty = type(table)(table.start, table.shape, table.tiles[:0], table.win_lo[:0],
                        table.win_shape[:0], table.matrix[:0], table.offset[:0],
                        table.tile_shape[:0], table.translation[:0])
    out = host.fuse_chunk([], empty, case.params)
    assert out.shape == table.shape and not out.any()


# ---------------------------------------------------------------------- layout and constants


def test_kernel_mode_codes_match_python() -> None:
    source = ck.kernel_source("fuse")
    for name, code in MODE_CODES.items():
        assert re.search(rf"#define GF_MODE_{name.upper()} {code}\b", source), name
    for name, code in INTERP_CODES.items():
        assert re.search(rf"#define GF_INTERP_{name.upper()} {code}\b", source), name


def test_packing_layout_round_trips() -> None:
    case = cases.make_case("affine", 3, "linear", "linear", ("uint16", "uint16"), 2)
    windows, table = max(cases.chunk_inputs(case), key=lambda wt: len(wt[1]))
    packing = ck.fusion_packing(table, "uint16")
    buf = np.zeros(packing.nbytes, dtype=np.uint8)
    ck.pack_fusion_chunk(windows, table, packing, buf)
    k = len(table)
    idesc = buf[:packing.fdesc_offset].view(np.int64).reshape(k, -1)
    np.testing.assert_array_equal(idesc[:, 2:5], table.win_shape)
    np.testing.assert_array_equal(idesc[:, 5:8], table.win_lo)
    np.testing.assert_array_equal(idesc[:, 8:11], table.tile_shape)
    fdesc = buf[packing.fdesc_offset:packing.windows_offset].view(np.float64)[:k * 12]
    np.testing.assert_array_equal(fdesc.reshape(k, 12)[:, 9:], table.offset)
    assert packing.windows_offset % ck.WINDOW_ALIGN == 0
    pixels = buf[packing.windows_offset:].view(np.uint16)
    for win, start in zip(windows, idesc[:, 0], strict=True):
        np.testing.assert_array_equal(pixels[start:start + win.size].reshape(win.shape), win)


@pytest.mark.parametrize("in_dtype,out_dtype,expected", [
    ("uint16", "uint16", ("uint16", "uint16")),
    ("uint16", "float32", ("uint16", "float32")),
    ("uint8", "uint16", ("uint8", "float32")),
    ("float64", "float64", ("float64", "float64")),
    ("float64", "float32", ("float64", "float64")),
    ("int32", "int32", ("int32", "int32")),
    ("uint32", "uint16", ("uint32", "float64")),
    ("int64", "float64", ("int64", "float64")),
    ("float16", "float16", ("float32", "float32")),
])
def test_kernel_dtype_choice(in_dtype: str, out_dtype: str, expected: tuple[str, str]) -> None:
    assert ck.fusion_kernel_dtypes(in_dtype, out_dtype) == expected


# ---------------------------------------------------------------------- downsampling


def _random_block(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dt)
    return (rng.standard_normal(shape) * 1000).astype(dt)


@pytest.mark.parametrize("algorithm", ck.DOWNSAMPLE_ALGORITHMS)
@pytest.mark.parametrize("dtype", list(ck.DOWNSAMPLE_ACCUMULATOR))
def test_downsample_kernel_matches_reference(host: HostKernels, dtype: str,
                                             algorithm: str) -> None:
    rng = np.random.default_rng(len(dtype))
    checked = 0
    for shape in [(7,), (6, 9), (5, 8, 7), (3, 5, 6, 9), (2, 3, 5, 7, 6), (1, 5, 1, 6)]:
        for factors in itertools.product((1, 2), repeat=len(shape)):
            if ck.downsample_geometry(shape, factors) is None:
                continue
            block = _random_block(rng, shape, dtype)
            expected = downsample_mean2(block, factors, algorithm=algorithm)
            actual = host.downsample_mean2(block, factors, algorithm)
            assert actual.dtype == expected.dtype
            tol = {"rtol": 0, "atol": 0}  # identical operation order: exact
            np.testing.assert_allclose(actual, expected, **tol, err_msg=f"{shape} {factors}")
            checked += 1
    assert checked == 65


def test_downsample_constant_and_ragged_edges(host: HostKernels) -> None:
    block = np.full((5, 7), 200, dtype=np.uint8)
    np.testing.assert_array_equal(host.downsample_mean2(block, (2, 2)),
                                  np.full((3, 4), 200, np.uint8))
    a = np.array([[0, 2, 4], [2, 4, 7]], dtype=np.uint8)
    np.testing.assert_array_equal(host.downsample_mean2(a, (2, 2)), [[2, 6]])
    assert_close(host.downsample_mean2(a, (1, 2)), np.array([[1, 4], [3, 7]], np.uint8))


def test_downsample_geometry_merges_kept_axes() -> None:
    assert ck.downsample_geometry((2, 3, 5, 100, 90), (1, 1, 2, 2, 2)) == \
        ((6, 5, 100, 90), (1, 2, 2, 2))
    assert ck.downsample_geometry((100, 90), (2, 2)) == ((1, 1, 100, 90), (1, 1, 2, 2))
    assert ck.downsample_geometry((1, 7, 9), (2, 1, 2)) == ((1, 1, 7, 9), (1, 1, 1, 2))
    assert ck.downsample_geometry((4, 4, 4, 4, 4), (2, 1, 2, 1, 2)) is None


# ---------------------------------------------------------------------- the CuPy backend's code


@pytest.fixture
def fake_gpu(host: HostKernels, monkeypatch: pytest.MonkeyPatch):
    """CuPy replaced by NumPy plus the host-compiled kernels (tests/host_emulation)."""
    with emulated_gpu(host, monkeypatch) as cupy:
        yield cupy


def test_cupy_backend_code_on_emulated_device(fake_gpu) -> None:
    """CupyBackend's packing, arguments and casts, per chunk and for resident chunks."""
    from gpufusion.backends.cupy_backend import CupyBackend

    backend = CupyBackend(profile=True)
    n_chunks = 0
    pairs = cases.DTYPE_PAIRS + cases.FALLBACK_PAIRS
    for k, (layout, mode, interp) in enumerate(itertools.product(
            cases.LAYOUTS, BLEND_MODES, INTERPOLATIONS)):
        case = cases.make_case(layout, 2 + k % 2, mode, interp, pairs[k % len(pairs)], k)
        n_chunks += sum(len(t) > 0 for _, t in cases.chunk_inputs(case))
        cases.check_case(case, lambda w, t, p: fake_gpu.asnumpy(backend.fuse_windows(w, t, p)),
                         algorithm="general")

    def resident(windows, table, params):
        if not len(table):
            return fake_gpu.asnumpy(backend.fuse_windows(windows, table, params))
        return fake_gpu.asnumpy(backend.launch(backend.upload(windows, table, params), params))

    def device_windows(windows, table, params):
        dev = [fake_gpu.asarray(w) for w in windows]
        return fake_gpu.asnumpy(backend.fuse_device_windows(dev, table, params))

    case = cases.make_case("affine", 3, "cosine", "linear", ("uint16", "int16"), 3)
    cases.check_case(case, resident)
    for algorithm in ("auto", "separable"):  # the separable kernel, all three ways
        case = cases.make_case("subpixel", 3, "linear", "linear", ("uint16", "uint16"), 5)
        n_chunks += sum(len(t) > 0 for _, t in cases.chunk_inputs(case))
        cases.check_case(case, lambda w, t, p, a=algorithm: fake_gpu.asnumpy(
            backend.fuse_windows(w, t, p, a)), algorithm="general")
        cases.check_case(case, resident)
        cases.check_case(case, device_windows)
    assert any(b.startswith("fuse_chunk_separable<") for b in fake_gpu.builds)
    assert any(b.startswith("fuse_chunk<") for b in fake_gpu.builds)
    case = cases.make_case("subpixel", 2, "linear", "nearest", ("float64", "float32"), 4)
    cases.check_case(case, device_windows, algorithm="general")
    times = backend.stage_times()
    assert times["chunks"] == n_chunks
    assert times["kernel_s"] == pytest.approx(0.5e-3 * n_chunks)
    assert len(set(fake_gpu.builds)) == len(fake_gpu.builds)  # each kernel built once


def test_fuse_graph_with_cupy_backend_on_emulated_device(fake_gpu) -> None:
    """The dask graph with backend='cupy': device meta, one kernel for all chunk shapes."""
    case = cases.make_case("subpixel", 2, "linear", "linear", ("uint16", "uint16"), 8)
    image = fuse(case.mosaic, chunks=case.chunks, backend="cupy")
    assert isinstance(image._meta, fake_gpu.ndarray)
    shapes = {tuple(c[i] for c, i in zip(image.chunks, idx, strict=True))
              for idx in np.ndindex(*image.numblocks)}
    result = image.compute(scheduler="threads")
    assert len(shapes) >= 3
    # translations only: the separable kernel, built once for every chunk shape
    assert ck.separable_kernel.cache_info().misses == 1 and len(fake_gpu.builds) == 1
    assert ck.fuse_kernel.cache_info().misses == 0
    expected = fuse(case.mosaic, chunks=case.chunks, backend="numpy").compute()
    np.testing.assert_array_equal(fake_gpu.asnumpy(result), expected)
    general = fuse(case.mosaic, chunks=case.chunks, backend="cupy", algorithm="general")
    np.testing.assert_array_equal(fake_gpu.asnumpy(general.compute(scheduler="threads")),
                                  expected)
    assert ck.fuse_kernel.cache_info().misses == 1 and len(fake_gpu.builds) == 2


def test_downsample_gpu_wrapper_on_emulated_device(fake_gpu) -> None:
    from gpufusion.backends.cupy_backend import downsample_mean2_gpu

    rng = np.random.default_rng(4)
    for dtype in [*ck.DOWNSAMPLE_ACCUMULATOR, "float16", "int64"]:
        for shape, factors in [((6, 9), (2, 2)), ((3, 5, 6, 9), (1, 2, 1, 2)),
                               ((2, 3, 4, 5, 6), (2, 1, 2, 1, 2)), ((1, 7), (2, 2))]:
            block = _random_block(rng, shape, dtype)
            for algorithm in ck.DOWNSAMPLE_ALGORITHMS:
                expected = downsample_mean2(block, factors, algorithm=algorithm)
                actual = downsample_mean2_gpu(fake_gpu.asarray(block), factors, algorithm)
                assert actual.dtype == expected.dtype
                np.testing.assert_array_equal(fake_gpu.asnumpy(actual), expected)
    assert any(b.startswith("downsample_mean2<float,") for b in fake_gpu.builds)
    with pytest.raises(ValueError, match="factors"):
        downsample_mean2_gpu(fake_gpu.asarray(np.zeros((4, 4))), (2, 3))


def test_bench_times_both_backends_on_emulated_device(fake_gpu, capsys, monkeypatch) -> None:
    from gpufusion import cli
    from gpufusion.plan import plan_fusion
    from gpufusion.synthetic import make_mosaic

    monkeypatch.setattr(cli, "COMMANDS", tuple(dict.fromkeys((*cli.COMMANDS, "bench"))))
    assert cli.main(["bench", "--tiles", "2x2", "--tile", "40", "--chunk", "32", "--repeat", "2",
                 "--profile"]) == 0
    out = capsys.readouterr().out
    assert "Host emulation" in out and "fusion kernels (device)" in out
    from gpufusion.bench import run_benchmark

    results, notes = run_benchmark((2, 2), 40, "uint16", 32, ("numpy", "cupy"), 2,
                                   profile=True)
    assert notes == [] and [r.backend for r in results] == ["numpy", "cupy"]
    assert results[1].device == "Host emulation" and results[0].speedup == 1.0
    plan = plan_fusion(make_mosaic((2, 2), (40, 40)).mosaic(), 32)
    n_chunks = sum(len(plan.chunk(i)) > 0 for i in np.ndindex(*plan.numblocks))
    assert results[1].stages is not None and results[1].stages["chunks"] == n_chunks
    assert results[0].megapixels == results[1].megapixels == pytest.approx(
        np.prod(plan.shape) / 1e6)


def test_bench_wsi_d2h_copies_what_the_run_copies(fake_gpu, monkeypatch, tmp_path) -> None:
    """The whole-slide benchmark's ``d2h`` stage copies exactly the blocks (every level) that
    the CuPy run to OME-Zarr copies to the host."""
    from gpufusion import fuse_to_file
    from gpufusion.synthetic import make_mosaic

    from .test_bench_wsi import load_benchmark

    wsi = load_benchmark("bench_wsi")
    monkeypatch.setattr(wsi, "CHUNK", 128)
    mosaic = make_mosaic((2, 2), (256, 256), dtype="uint16").mosaic()
    copies: list[tuple[int, ...]] = []
    get = DeviceArray.get

    def counting(block, *args, **kwargs):  # every device-to-host copy (asnumpy, to_host)
        copies.append(tuple(block.shape))
        return get(block, *args, **kwargs)

    monkeypatch.setattr(DeviceArray, "get", counting)
    fuse_to_file(mosaic, tmp_path / "m.ome.zarr", chunks=128, backend="cupy")
    in_run, copies[:] = sorted(copies), []
    seconds = wsi.d2h_seconds(tmp_path / "m.ome.zarr")
    assert sorted(copies) == in_run
    assert len({shape for shape in in_run if max(shape) <= 64}) > 0  # a device-made level
    assert seconds > 0


# ---------------------------------------------------------------- the GPU suite, emulated


def test_gpu_suite_passes_on_emulated_device() -> None:
    """Every ``gpu``-marked test, run on the host-emulated device (tests/host_emulation/
    gpu_plugin.py) in a fresh interpreter: the GPU tests' own code is proven here, and on a
    real GPU only the device itself is new. The 2-worker dask-cuda test needs real GPUs."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = ["tests/test_gpu.py", "tests/test_pyramid_inline.py", "tests/test_register.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.host_emulation.gpu_plugin", "-m", "gpu",
         "-k", "not two_worker_local_cuda_cluster", "-q", "-p", "no:cacheprovider", "-rs",
         *files], cwd=root, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 60, summary
    assert "skipped" not in summary and "failed" not in summary, summary



# ------------------------------------------- tiles resident, many blocks per launch


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record each fuse_blocks_separable launch configuration (one per launch)."""
    seen: list = []
    original = ck.blocks_launch_config

    def spy(batch, *args, **kwargs):
        seen.append(batch.n_blocks)
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(ck, "blocks_launch_config", spy)
    return seen


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("layout", cases.LAYOUTS)
def test_resident_batched_fusion_equals_reference(fake_gpu, monkeypatch, layout: str,
                                                  ndim: int) -> None:
    """fuse_on_device (tiles uploaded once, a batch of blocks per fuse_blocks_separable
    launch from a block table) equals the NumPy fusion: bit for bit for translations
    (except cosine ramps, an ulp), within the dtype tolerance through the general kernel
    for affine tiles; and equals the per-block separable kernel bit for bit."""
    from gpufusion.backends.resident import fuse_on_device

    launches = _count_launches(monkeypatch)
    for k, (mode, interp) in enumerate(itertools.product(BLEND_MODES, INTERPOLATIONS)):
        pair = (("uint16", "uint16"), ("float32", "float32"), ("uint16", "float32"),
                ("uint8", "uint8"))[k % 4]
        case = cases.make_case(layout, ndim, mode, interp, pair, 700 + 10 * k + ndim)
        expected = fuse(case.mosaic, chunks=case.chunks, blend=mode, interpolation=interp,
                        dtype=pair[1]).compute(scheduler="synchronous")
        before = len(launches)
        got = fake_gpu.asnumpy(fuse_on_device(case.mosaic, chunks=case.chunks, blend=mode,
                                              interpolation=interp, dtype=pair[1],
                                              max_batch_blocks=5))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if layout == "affine" or mode == "cosine":
            assert_close(got, expected)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=case.name)
        n_blocks = int(np.prod([-(-n // c) for n, c in zip(expected.shape, case.chunks,
                                                           strict=True)]))
        if layout == "affine":  # every non-empty block has a rotated entry: general kernel;
            # only the empty ones are batched (written as zeros by the batched kernel)
            empty = sum(len(t) == 0 for _, t in cases.chunk_inputs(case))
            assert sum(launches[before:]) == empty
        else:  # every block batched, at most 5 per launch, and several launches
            assert sum(launches[before:]) == n_blocks
            assert len(launches) - before == -(-n_blocks // 5) and max(launches) <= 5
        if layout != "affine":
            for windows, table in cases.chunk_inputs(case):
                if not ck.separable_applies(table):
                    continue
                one = fake_gpu.asnumpy(fake_gpu.asarray(got))[
                    tuple(slice(int(a), int(a) + n) for a, n in zip(table.start, table.shape,
                                                                   strict=True))]
                from gpufusion.backends.cupy_backend import CupyBackend

                single = fake_gpu.asnumpy(CupyBackend(profile=False).fuse_windows(
                    windows, table, case.params, "separable"))
                np.testing.assert_array_equal(one, single, err_msg=case.name)
    assert ck.blocks_kernel.cache_info().misses >= 1


def test_resident_block_table_layout(fake_gpu) -> None:
    """The packed block table: entries in block order, each window read in place inside
    its tile (offset = tile offset + window start times the tile's strides), empty blocks
    with no entries, outputs one after another."""
    from gpufusion.backends.resident import upload_tiles
    from gpufusion.plan import plan_fusion

    case = cases.make_case("translation", 2, "linear", "linear", ("uint16", "uint16"), 9)
    tiles = upload_tiles(case.mosaic)
    plan = plan_fusion(case.mosaic, case.chunks)
    tables = [plan.chunk(i) for i in np.ndindex(*plan.numblocks)]
    batch = ck.pack_resident_blocks(tables, case.params, tiles.offsets, tiles.strides,
                                    "uint16")
    btab = batch.buffer[:64 * len(tables)].view(np.int64).reshape(-1, 8)
    woff = batch.buffer[batch.woff_offset:batch.cover_offset].view(np.int64)
    assert btab[:, 1].tolist() == [len(t) for t in tables]
    assert btab[:, 0].tolist() == np.concatenate(([0], np.cumsum(btab[:-1, 1]))).tolist()
    host = np.concatenate([t.source.read(tuple(slice(0, n) for n in t.shape)).ravel()
                           for t in case.mosaic.tiles])
    for b, table in enumerate(tables):
        assert btab[b, 2] == batch.out_offsets[b] and tuple(btab[b, 3:5]) == table.shape
        for e, (t, lo) in enumerate(zip(table.tiles, table.win_lo, strict=True)):
            tile = case.mosaic.tiles[int(t)].source.read(
                tuple(slice(0, n) for n in case.mosaic.tiles[int(t)].shape))
            assert host[woff[btab[b, 0] + e]] == tile[tuple(int(v) for v in lo)]
    with pytest.raises(ValueError, match="not a pure translation"):
        affine = cases.make_case("affine", 2, "linear", "linear", ("uint16", "uint16"), 9)
        plan = plan_fusion(affine.mosaic, affine.chunks)
        ck.pack_resident_blocks([t for i in np.ndindex(*plan.numblocks)
                                 if len(t := plan.chunk(i))], affine.params, tiles.offsets,
                                tiles.strides, "uint16")


def test_resident_fusion_of_flat_field_corrected_tiles(fake_gpu) -> None:
    """Corrected tiles (float32 as read, uint16 as output) are uploaded corrected, not cast
    back to the raw dtype: the result equals the NumPy fusion of the same corrected mosaic."""
    from gpufusion import correct_mosaic
    from gpufusion.backends.resident import fuse_on_device, upload_tiles

    case = cases.make_case("subpixel", 2, "linear", "linear", ("uint16", "uint16"), 12)
    shape = case.mosaic.tiles[0].shape
    yy, xx = np.mgrid[:shape[0], :shape[1]] / np.array(shape).reshape(2, 1, 1)
    flat = (1 - 0.3 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)).astype(np.float32)
    corrected = correct_mosaic(case.mosaic, flatfield=flat, darkfield=np.full(shape, 100.0),
                               gains=np.linspace(0.9, 1.1, len(case.mosaic)))
    assert upload_tiles(corrected).dtype == np.float32
    expected = fuse(corrected, chunks=case.chunks).compute(scheduler="synchronous")
    got = fake_gpu.asnumpy(fuse_on_device(corrected, chunks=case.chunks))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, expected)
