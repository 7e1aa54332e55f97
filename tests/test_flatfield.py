"""Flat-field and dark-field correction (:mod:`gpufusion.correction`, :mod:`gpufusion.flatfield`,
``fuse --flatfield``, ``gpufusion flatfield``) against synthetic truth and real data.

The synthetic mosaic is cut from a known textured specimen (structure up to ~33 px, so tiles
see independent content), darkened by a known radial vignetting (30 % at the corners) and
lifted by a known dark offset. Errors are relative RMS at 8x downsampling after one global
gain (a flat-field normalised to mean 1 keeps the mean brightness, not the truth's scale).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from gpufusion import correct_mosaic, fuse, mosaic_from_positions
from gpufusion.correction import CorrectedSource, Profile
from gpufusion.errors import InputError
from gpufusion.flatfield import estimate_profiles
from gpufusion.synthetic import Specimen

from .test_cli import run_cli
from .tile_files import write_tile_csv

DARK = 500.0
TILE = 128
STEP = 109  # 15 % overlap


def vignetting(shape: tuple[int, int], strength: float = 0.3) -> np.ndarray:
    """``1 - strength * r^2``, r = 1 at the corners: 30 % darker corners."""
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return 1 - strength * (yy**2 + xx**2) / 2


def shaded_mosaic(grid: int = 5, seed: int = 5):
    """Tiles ``rint(S * truth + DARK)`` (uint16), their positions, ``S`` and the truth on the
    output grid."""
    spec = Specimen.random(2, min_frequency=0.03, max_frequency=0.12, lo=0, hi=1, seed=seed)
    flat = vignetting((TILE, TILE))
    pos = np.array([(i * STEP, j * STEP) for i in range(grid) for j in range(grid)], float)
    tiles = [np.rint(flat * (2000 + 20000 * spec.sample(p, (TILE, TILE))) + DARK)
             .astype(np.uint16) for p in pos]
    mosaic = mosaic_from_positions(tiles, pos)
    truth = 2000 + 20000 * spec.sample(mosaic.origin, mosaic.shape)
    return tiles, pos, flat, truth


def block_mean(a: np.ndarray, f: int = 8) -> np.ndarray:
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return a[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def relative_rms(fused: np.ndarray, truth: np.ndarray) -> float:
    a, b = block_mean(fused), block_mean(truth)
    gain = (a * b).sum() / (a * a).sum()
    return float(np.sqrt(np.mean((gain * a - b) ** 2)) / b.mean())


@pytest.fixture(scope="module")
def shaded():
    return shaded_mosaic()


@pytest.fixture
def shaded_files(tmp_path: Path, shaded) -> Path:
    tiles, pos, flat, _ = shaded
    csv = write_tile_csv(tmp_path, tiles, pos)
    tifffile.imwrite(tmp_path / "flat.tif", (flat * 3.0).astype(np.float32))  # any scale
    tifffile.imwrite(tmp_path / "dark.tif", np.full(flat.shape, DARK, np.float32))
    return csv


def read_fused(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["0"])


# -- accuracy against the synthetic truth ---------------------------------------------------


def test_uncorrected_fusion_shows_the_vignetting(shaded) -> None:
    tiles, pos, _, truth = shaded
    err = relative_rms(fuse(mosaic_from_positions(tiles, pos), chunks=512).compute(), truth)
    assert 0.04 < err < 0.08, err  # ~6 %: what the correction must remove


def test_true_profiles_from_files_within_half_percent(shaded, shaded_files: Path,
                                                      capsys) -> None:
    out = shaded_files.parent / "out.ome.zarr"
    code, _, err = run_cli(["fuse", shaded_files, "-o", out, "--flatfield",
                            shaded_files.parent / "flat.tif", "--darkfield",
                            shaded_files.parent / "dark.tif", "-q"], capsys)
    assert code == 0, err
    fused = read_fused(out)
    assert fused.dtype == np.uint16  # the raw tiles' dtype, not float32
    assert relative_rms(fused, shaded[3]) < 0.005
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    record = attrs["gpufusion"]["correction"]
    assert "flat.tif" in record["flatfield"][0]["source"]
    assert "dark.tif" in record["darkfield"][0]["source"]


@pytest.mark.parametrize("dark_option", [[], ["--darkfield", "auto"], ["--darkfield", "500"]])
def test_auto_flatfield_within_1_5_percent(shaded, shaded_files: Path, capsys,
                                           dark_option: list[str]) -> None:
    out = shaded_files.parent / "auto.ome.zarr"
    code, _, err = run_cli(["fuse", shaded_files, "-o", out, "--flatfield", "auto",
                            *dark_option], capsys)
    assert code == 0, err
    assert "--flatfield auto: channel 0: estimated from" in err
    assert relative_rms(read_fused(out), shaded[3]) < 0.015


@pytest.mark.parametrize("darkfield", [False, True])
def test_estimated_flatfield_within_2_percent(shaded, darkfield: bool) -> None:
    tiles, pos, flat, _ = shaded
    est = estimate_profiles(mosaic_from_positions(tiles, pos), darkfield=darkfield)
    truth = flat / flat.mean()
    assert est.flatfield.dtype == np.float32 and est.flatfield.shape == (TILE, TILE)
    assert abs(float(est.flatfield.mean()) - 1) < 1e-5
    assert np.sqrt(np.mean((est.flatfield / truth - 1) ** 2)) < 0.02
    if darkfield:
        assert abs(est.dark - DARK) < 0.25 * DARK, est.dark
    else:
        assert est.dark == 0


def test_estimate_without_overlaps_uses_tile_statistics() -> None:
    """Tiles that do not overlap: the per-pixel statistics across tiles alone (BaSiC-like)."""
    rng = np.random.default_rng(1)
    flat = vignetting((64, 64))
    spec = Specimen.random(2, min_frequency=0.05, max_frequency=0.2, lo=0, hi=1, seed=3)
    pos = [(0, 80 * i) for i in range(60)]
    tiles = [(flat * (1000 + 8000 * spec.sample(p, (64, 64)))
              + rng.normal(0, 5, (64, 64))).astype(np.uint16) for p in pos]
    est = estimate_profiles(mosaic_from_positions(tiles, pos))
    assert "overlap" not in est.sources and "60 tile images" in est.sources
    assert np.sqrt(np.mean((est.flatfield / (flat / flat.mean()) - 1) ** 2)) < 0.02


# -- the correction itself ------------------------------------------------------------------


def test_correction_equals_fusing_precorrected_tiles(shaded) -> None:
    """The read-time correction gives exactly the fusion of tiles corrected beforehand in
    float32 ((raw - dark) / flat * gain + offset), rounded to the raw dtype."""
    tiles, pos, flat, _ = shaded
    tiles, pos = tiles[:4], pos[:4] + np.array([0.0, 0.4])  # sub-pixel: resampling too
    gains = np.array([1.0, 1.1, 0.9, 1.05])
    offsets = np.array([0.0, 3.0, -2.0, 0.5])
    dark = np.full(flat.shape, DARK, np.float32)
    corrected = correct_mosaic(mosaic_from_positions(tiles, pos), flatfield=flat,
                               darkfield=dark, gains=gains, offsets=offsets)
    f32 = flat.astype(np.float32)
    pre = [((t.astype(np.float32) - dark) / f32) * np.float32(g) + np.float32(o)
           for t, g, o in zip(tiles, gains, offsets, strict=True)]
    want = fuse(mosaic_from_positions(pre, pos), chunks=96, dtype="uint16").compute()
    got = fuse(corrected, chunks=96).compute()
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, want)


def test_composing_folds_gains_and_chains_profiles() -> None:
    raw = np.array([[110.0, 210.0], [310.0, 410.0]], np.float32).astype(np.uint16)
    m = mosaic_from_positions([raw, raw], [(0, 0), (0, 1)])
    flat = np.array([[0.5, 1.0], [2.0, 4.0]])
    dark = np.full((2, 2), 10.0)
    window = (slice(0, 2), slice(0, 2))
    once = correct_mosaic(m, flatfield=flat, darkfield=dark)
    twice = correct_mosaic(once, gains=[2.0, 0.5], offsets=[1.0, -1.0])
    thrice = correct_mosaic(twice, gains=[3.0, 1.0])
    src = thrice.tiles[0].source
    assert isinstance(src, CorrectedSource) and len(src.steps) == 1  # folded, not wrapped
    assert src.base is m.tiles[0].source
    base = (raw - dark) / flat
    np.testing.assert_allclose(src.read(window), (base * 2 + 1) * 3, rtol=1e-6)
    np.testing.assert_allclose(thrice.tiles[1].source.read(window), base * 0.5 - 1, rtol=1e-6)
    # gains first, then a flat-field: applied in that order (a second step)
    gains_first = correct_mosaic(correct_mosaic(m, gains=[2.0, 2.0]), flatfield=flat)
    src = gains_first.tiles[0].source
    assert len(src.steps) == 2 and src.base is m.tiles[0].source
    np.testing.assert_allclose(src.read(window), raw * 2.0 / flat, rtol=1e-6)
    # picklable (dask workers), profiles shared: one copy per pickle of many tiles
    again = pickle.loads(pickle.dumps(list(thrice.tiles)))
    np.testing.assert_array_equal(again[0].source.read(window), thrice.tiles[0].source.read(
        window))
    assert again[0].source.steps[0].flat is again[1].source.steps[0].flat


def test_3d_tiles_one_profile_per_plane_or_a_z_stack() -> None:
    rng = np.random.default_rng(2)
    tiles = [rng.integers(1000, 5000, (3, 16, 20)).astype(np.uint16) for _ in range(2)]
    pos = [(0, 0, 0), (0, 0, 15)]
    m = mosaic_from_positions(tiles, pos)
    flat2d = 0.5 + rng.random((16, 20))
    stack = 0.5 + rng.random((3, 16, 20))
    for profile in (flat2d, stack):
        got = fuse(correct_mosaic(m, flatfield=profile), chunks=32).compute()
        pre = [t.astype(np.float32) / profile.astype(np.float32) for t in tiles]
        want = fuse(mosaic_from_positions(pre, pos), chunks=32, dtype="uint16").compute()
        np.testing.assert_array_equal(got, want)


def test_api_refusals() -> None:
    m = mosaic_from_positions([np.ones((8, 8), np.uint16)] * 2, [(0, 0), (0, 6)])
    with pytest.raises(InputError, match=r"profile shape \(8, 9\) does not match the tile "
                                         r"shape \(8, 8\)"):
        correct_mosaic(m, flatfield=np.ones((8, 9)))
    with pytest.raises(InputError, match="values <= 0"):
        correct_mosaic(m, flatfield=np.zeros((8, 8)))
    with pytest.raises(InputError, match="NaN"):
        correct_mosaic(m, darkfield=np.full((8, 8), np.nan))
    with pytest.raises(InputError, match=r"gains: expected 2 numbers"):
        correct_mosaic(m, gains=[1.0])
    with pytest.raises(InputError, match="finite and > 0"):
        correct_mosaic(m, gains=[1.0, 0.0])
    assert correct_mosaic(m) is m


# -- the GPU path, on the host-emulated device ----------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory):
    from gpufusion.backends import cuda_kernels as ck

    from .host_emulation.harness import HostKernels, gxx_available
    from .kernel_checks import skip_module_unless

    skip_module_unless(gxx_available(), "g++ is not installed")
    keys = [("float32", "float32", nd, "linear", "linear") for nd in (2, 3)]
    return HostKernels.build(tmp_path_factory.mktemp("host_kernels"), keys,
                             ck.downsample_instantiations())


@pytest.mark.parametrize("ndim", [2, 3])
def test_cupy_backend_corrects_on_the_device(host, monkeypatch, ndim: int) -> None:
    """Raw windows are uploaded and corrected on the device (the host never calls the
    corrected ``read``); each profile is uploaded once per thread; the result equals NumPy's."""
    from gpufusion.backends import get_backend, task_scope
    from gpufusion.fuse import fuse_blocks

    from .host_emulation.fake_cupy import emulated_gpu
    from .host_emulation.strict_cupy import STATS, STREAMS

    rng = np.random.default_rng(ndim)
    shape = (24, 40) if ndim == 2 else (3, 24, 40)
    tiles = [rng.integers(500, 4000, shape).astype(np.uint16) for _ in range(4)]
    pos = [(0, 0), (0, 33.5), (20.25, 0), (20, 33)] if ndim == 2 else \
        [(0, 0, 0), (0, 0, 33.5), (0, 20.25, 0), (0, 20, 33)]
    flat = Profile(0.6 + 0.4 * rng.random(shape[-2:]), "flat")
    dark = Profile(np.full(shape[-2:], 300.0), "dark")
    m = correct_mosaic(mosaic_from_positions(tiles, pos), flatfield=flat, darkfield=dark,
                       gains=[1.0, 1.2, 0.8, 1.1])
    want = fuse(m, chunks=16, backend="numpy").compute()
    with emulated_gpu(host, monkeypatch):
        STREAMS.reset()
        monkeypatch.setattr(STREAMS, "strict", True)

        def refuse(self, window):
            raise AssertionError("corrected on the host")

        monkeypatch.setattr(CorrectedSource, "read", refuse)
        grid = fuse_blocks(m, chunks=16, backend="cupy")
        backend = get_backend("cupy")
        before = STATS["to_device"]
        blocks = {}
        for k, idx in enumerate(np.ndindex(*grid.numblocks)):
            if k % 2:  # as the block-task writers run it: one stream for the whole task
                with task_scope("cupy"):
                    blocks[idx] = backend_to_host(grid.block_function(idx)())
            else:
                blocks[idx] = backend_to_host(grid.block_function(idx)())
        uploads = STATS["to_device"] - before
        assert STREAMS.violations == []
    got = np.block(nest(blocks, grid.numblocks))
    assert got.dtype == want.dtype == np.uint16
    assert np.abs(got.astype(np.int64) - want.astype(np.int64)).max() <= 1
    sizes = [len(grid._table(idx)) for idx in np.ndindex(*grid.numblocks)]
    # per chunk its raw windows and its descriptors; the two profiles once in all
    assert uploads == sum(sizes) + sum(n > 0 for n in sizes) + 2
    assert backend.stage_times()["read_s"] > 0


@pytest.mark.gpu
def test_flatfield_fusion_to_ome_zarr_on_the_gpu(shaded, tmp_path: Path) -> None:
    """The whole writer path on the GPU (real, or the host-emulated device under
    ``-p tests.host_emulation.gpu_plugin``): every level within 1 DN of the NumPy run."""
    from gpufusion import fuse_to_file
    from gpufusion.backends import gpu_status

    ok, why = gpu_status()
    if not ok:
        pytest.skip(f"no usable GPU: {why}")
    tiles, pos, flat, _ = shaded
    m = correct_mosaic(mosaic_from_positions(tiles[:9], pos[:9] + 0.3), flatfield=flat,
                       darkfield=np.full(flat.shape, DARK), gains=np.linspace(0.9, 1.1, 9))
    for backend in ("numpy", "cupy"):
        fuse_to_file(m, tmp_path / f"{backend}.ome.zarr", chunks=128, backend=backend,
                     progress=False)
    a = zarr.open_group(str(tmp_path / "numpy.ome.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "cupy.ome.zarr"), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for level in a.array_keys():
        diff = np.abs(a[level][...].astype(np.int64) - b[level][...].astype(np.int64))
        assert diff.max() <= 1, level


def backend_to_host(block):
    from gpufusion.backends.cupy_backend import to_host

    return to_host(block)


def nest(blocks: dict, numblocks: tuple[int, ...]):
    def build(prefix: tuple[int, ...]):
        if len(prefix) == len(numblocks):
            return blocks[prefix]
        return [build((*prefix, i)) for i in range(numblocks[len(prefix)])]
    return build(())


# -- the flatfield command and bad input ----------------------------------------------------


def test_flatfield_command_saves_profiles_for_reuse(shaded, shaded_files: Path, capsys) -> None:
    folder = shaded_files.parent
    code, out, err = run_cli(["flatfield", shaded_files, "-o", folder / "scope.tif",
                              "--darkfield"], capsys)
    assert code == 0, err
    flat = tifffile.imread(folder / "scope.tif")
    dark = tifffile.imread(folder / "scope.dark.tif")
    assert flat.dtype == np.float32 and flat.shape == (TILE, TILE)
    assert abs(float(flat.mean()) - 1) < 1e-5
    truth = shaded[2] / shaded[2].mean()
    assert np.sqrt(np.mean((flat / truth - 1) ** 2)) < 0.02
    assert abs(float(dark.mean()) - DARK) < 0.25 * DARK
    import imageio.v3 as iio

    png = iio.imread(folder / "scope.png")
    assert png.dtype == np.uint8 and png.shape == (TILE, TILE)
    assert png[TILE // 2, TILE // 2] > png[0, 0]  # the centre is the bright part
    assert "scope.tif" in out and "scope.png" in out
    code, _, err = run_cli(["fuse", shaded_files, "-o", folder / "reuse.ome.zarr", "-q",
                            "--flatfield", folder / "scope.tif", "--darkfield",
                            folder / "scope.dark.tif"], capsys)
    assert code == 0, err
    assert relative_rms(read_fused(folder / "reuse.ome.zarr"), shaded[3]) < 0.015
    code, _, err = run_cli(["flatfield", shaded_files, "-o", folder / "scope.tif"], capsys)
    assert code == 2 and "exists" in err  # no --overwrite


@pytest.mark.parametrize("case", ["shape", "zeros", "negative", "nan", "dark-bright",
                                  "dark-range", "not-tiff", "dark-auto-alone", "stack"])
def test_bad_profiles_exit_2_one_line(shaded, shaded_files: Path, capsys, case: str) -> None:
    folder = shaded_files.parent
    bad = folder / "bad.tif"
    good = np.ones((TILE, TILE), np.float32)
    option = ["--flatfield", bad]
    if case == "shape":
        tifffile.imwrite(bad, np.ones((TILE, TILE + 2), np.float32))
        must = [f"profile shape ({TILE}, {TILE + 2})", f"({TILE}, {TILE})", "bad.tif"]
    elif case == "stack":
        tifffile.imwrite(bad, np.ones((2, TILE, TILE), np.float32))  # 2 channels, 1 given
        must = [f"profile shape (2, {TILE}, {TILE})", "bad.tif"]
    elif case in ("zeros", "negative", "nan"):
        good[5, 5] = {"zeros": 0.0, "negative": -1.0, "nan": np.nan}[case]
        tifffile.imwrite(bad, good)
        must = ["bad.tif", "NaN" if case == "nan" else "<= 0"]
    elif case == "dark-bright":
        tifffile.imwrite(bad, np.full((TILE, TILE), 30000, np.float32))
        option = ["--darkfield", bad]
        must = ["bad.tif", "brighter than the data"]
    elif case == "dark-range":
        tifffile.imwrite(bad, np.full((TILE, TILE), 70000, np.float32))
        option = ["--darkfield", bad]
        must = ["bad.tif", "uint16 range"]
    elif case == "not-tiff":
        bad = folder / "flat.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        option = ["--flatfield", bad]
        must = ["flat.png", "not a TIFF"]
    else:
        option = ["--darkfield", "auto"]
        must = ["--darkfield auto", "--flatfield auto"]
    out = folder / "never.ome.zarr"
    # the default backend (auto): a bad profile is refused before the backend is chosen,
    # so no "no usable GPU" notice comes before the error
    code, _, err = run_cli(["fuse", shaded_files, "-o", out, *option], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpufusion: error:"), err
    for text in must:
        assert text in lines[0], (text, lines[0])
    assert not out.exists()


# -- real data --------------------------------------------------------------------------


def overlap_steps(mosaic, pos: np.ndarray) -> float:
    """Mean over neighbouring tile pairs of |mean(A) - mean(B)| over their shared region,
    relative to its level: the intensity step across each overlap border."""
    tiles = [np.asarray(t.source.read(tuple(slice(0, n) for n in t.shape)), np.float64)
             for t in mosaic.tiles]
    ip = np.round(pos).astype(int)
    steps = []
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            d = ip[j] - ip[i]
            h, w = tiles[i].shape
            y0, y1, x0, x1 = max(0, d[0]), min(h, d[0] + h), max(0, d[1]), min(w, d[1] + w)
            if y1 - y0 < 16 or x1 - x0 < 16 or (abs(d[0]) > h // 2 and abs(d[1]) > w // 2):
                continue
            a = tiles[i][y0:y1, x0:x1]
            b = tiles[j][y0 - d[0]:y1 - d[0], x0 - d[1]:x1 - d[1]]
            steps.append(abs(a.mean() - b.mean()) / (0.5 * (a.mean() + b.mean())))
    return float(np.mean(steps))


def test_tma_overlap_steps_drop_with_auto_flatfield(data_dir: Path) -> None:
    """tma_4x3 at ASHLAR's positions: the brightness step between neighbouring tiles in their
    overlaps drops by more than 3x with the estimated flat-field, also on tiles the
    estimate did not see (fit on the top two rows, measured on the bottom two)."""
    from gpufusion.readers import open_tile

    folder = data_dir / "tma_4x3"
    rows = np.loadtxt(folder / "DERIVED_ashlar1.20_positions.csv", delimiter=",")
    tiles = [open_tile(folder / f"r{int(t) // 3}-c{int(t) % 3}.png") for t in rows[:, 0]]
    pos = rows[:, 3:5]
    m = mosaic_from_positions(tiles, pos)
    before = overlap_steps(m, pos)
    est = estimate_profiles(m)
    after = overlap_steps(correct_mosaic(m, flatfield=est.flatfield), pos)
    assert before / after > 3, (before, after)  # 5.0 % -> 0.66 % when measured
    top, bottom = mosaic_from_positions(tiles[:6], pos[:6]), mosaic_from_positions(tiles[6:],
                                                                                    pos[6:])
    held_out = estimate_profiles(top).flatfield
    b, a = overlap_steps(bottom, pos[6:]), overlap_steps(correct_mosaic(
        bottom, flatfield=held_out), pos[6:])
    assert b / a > 3, (b, a)


def test_profile_file_shapes_per_channel_and_plane() -> None:
    from gpufusion.flatfield import split_profiles

    yx = np.arange(12.0).reshape(3, 4) + 1
    per_channel = np.stack([yx, 2 * yx])
    assert [p.tolist() for p in split_profiles(yx, (3, 4), 2, "f")] == [yx.tolist()] * 2
    got = split_profiles(per_channel, (3, 4), 2, "f")
    assert [p.tolist() for p in got] == [yx.tolist(), (2 * yx).tolist()]
    zstack = np.stack([yx, yx + 1, yx + 2, yx + 3, yx + 4])  # 5 planes, 2 channels
    assert all(p.shape == (5, 3, 4) for p in split_profiles(zstack, (5, 3, 4), 2, "f"))
    got = split_profiles(per_channel, (5, 3, 4), 2, "f")  # 3D tiles, 2D profile per channel
    assert [p.shape for p in got] == [(3, 4), (3, 4)]
    full = np.stack([zstack, zstack])
    assert [p.shape for p in split_profiles(full, (5, 3, 4), 2, "f")] == [(5, 3, 4)] * 2
    with pytest.raises(InputError, match=r"f: profile shape \(3, 3, 4\) does not match"):
        split_profiles(np.stack([yx] * 3), (3, 4), 2, "f")


def test_provenance_and_resume_fingerprint_name_the_profiles() -> None:
    from gpufusion.pipeline import _provenance, _resume_fingerprint

    m = mosaic_from_positions([np.ones((8, 8), np.uint16)] * 2, [(0, 0), (0, 6)])
    a = correct_mosaic(m, flatfield=Profile(np.ones((8, 8)), "--flatfield a.tif"))
    b = correct_mosaic(m, flatfield=Profile(np.full((8, 8), 2.0), "--flatfield a.tif"))
    records = [_provenance([[x]], (), None, {"blend_width": None}) for x in (a, b, m)]
    assert records[0]["correction"]["flatfield"][0]["source"] == "--flatfield a.tif"
    assert "correction" not in records[2]
    prints = [_resume_fingerprint([[x]], r) for x, r in zip((a, b, m), records, strict=True)]
    assert prints[0]["options"]["correction"] != prints[1]["options"]["correction"]
    assert "correction" not in prints[2]["options"]


def test_profiles_pickle_as_their_recipe(shaded, tmp_path: Path) -> None:
    """A task sent to a dask worker carries a profile's file name or fit, not its pixels;
    the worker remakes it once, equal to the original."""
    import gpufusion.correction as corr
    from gpufusion.flatfield import load_profiles

    tiles, pos, flat, _ = shaded
    m = mosaic_from_positions(tiles, pos)
    tifffile.imwrite(tmp_path / "flat.tif", flat.astype(np.float32))
    from_file = load_profiles(tmp_path / "flat.tif", (TILE, TILE), 1, kind="flat")[0]
    fitted, _ = estimate_profiles(m).profiles()
    for prof in (from_file, fitted):
        src = correct_mosaic(m, flatfield=prof).tiles[3].source
        blob = pickle.dumps(src)
        assert len(blob) - len(pickle.dumps(src.base)) < 4096 < prof.array.nbytes
        corr._REMADE.clear()
        again = pickle.loads(blob)
        np.testing.assert_array_equal(again.steps[0].flat.array, prof.array)
        assert pickle.loads(blob).steps[0].flat is again.steps[0].flat  # remade once
    tifffile.imwrite(tmp_path / "flat.tif", 2 * flat.astype(np.float32) + 1)
    corr._REMADE.clear()
    with pytest.raises(InputError, match="flat.tif: the file changed"):
        pickle.loads(pickle.dumps(from_file))


@pytest.mark.slow
def test_fuse_on_a_dask_cluster_equals_local(shaded_files: Path, capsys) -> None:
    """--scheduler with worker processes: the profiles travel as recipes (file name, fit)
    and the workers' result is the local one, pixel for pixel."""
    distributed = pytest.importorskip("distributed")
    folder = shaded_files.parent
    common = ["fuse", shaded_files, "--chunk", "256", "--backend", "numpy", "--flatfield",
              "auto", "--darkfield", folder / "dark.tif"]
    code, _, err = run_cli([*common, "-o", folder / "local.ome.zarr", "-q"], capsys)
    assert code == 0, err
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        code, _, err = run_cli([*common, "-o", folder / "remote.ome.zarr", "-q",
                                "--scheduler", cluster.scheduler_address], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(read_fused(folder / "remote.ome.zarr"),
                                  read_fused(folder / "local.ome.zarr"))


@pytest.mark.parametrize("name", ["t0.tif", "t1.tif", "pos.tif"])
def test_flatfield_command_never_writes_over_an_input(shaded_files: Path, capsys,
                                                      name: str) -> None:
    """``gpufusion flatfield CSV -o t0.tif --overwrite`` beside tile t0.tif (or naming the
    CSV's own folder's files) is refused before any work: one line, exit 2, every input
    byte-identical, nothing written."""
    folder = shaded_files.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (folder / "pos.tif").write_bytes(b"")  # pos.csv is an input: pos.tif is fine, see below
    before["pos.tif"] = b""
    code, _, err = run_cli(["flatfield", shaded_files, "-o", folder / name, "--overwrite"],
                           capsys)
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    if name == "pos.tif":  # not an input: replaced, with its preview
        assert code == 0, err
        assert tifffile.imread(folder / "pos.tif").dtype == np.float32
        assert set(after) == set(before) | {"pos.png"}
        assert all(after[k] == v for k, v in before.items() if k != "pos.tif")
        return
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "input" in lines[0], err
    assert after == before


def test_a_profile_declaring_a_huge_image_is_refused_before_reading(shaded_files: Path,
                                                                    capsys,
                                                                    monkeypatch) -> None:
    """A 1.6 GB float32 profile (20000 x 20000, stored as 400 zlib tiles of zeros: 1.7 MB)
    is refused from its header, before its pixels are decoded or allocated."""
    folder = shaded_files.parent
    for cls in (tifffile.TiffFile, tifffile.TiffPageSeries, tifffile.TiffPage):
        def no_huge_decode(obj, *args, _decode=cls.asarray, **kwargs):
            owner = obj if isinstance(obj, tifffile.TiffFile) else obj.parent
            assert owner.filename != "huge.tif", "decoded the huge profile"
            return _decode(obj, *args, **kwargs)

        monkeypatch.setattr(cls, "asarray", no_huge_decode)
    zeros = np.zeros((1024, 1024), np.float32)
    tifffile.imwrite(folder / "huge.tif", (zeros for _ in range(20 * 20)),
                     shape=(20000, 20000), dtype="float32", tile=(1024, 1024),
                     compression="zlib")
    code, _, err = run_cli(["fuse", shaded_files, "-o", folder / "o.ome.zarr", "--flatfield",
                            folder / "huge.tif"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "huge.tif" in lines[0], err
    assert "profile shape (20000, 20000) does not match the tiles: expected" in lines[0]


def test_auto_refuses_too_few_tiles_and_a_negative_dark_level(tmp_path: Path, capsys) -> None:
    """One tile and no overlaps cannot separate shading from specimen (the old code
    returned the tile's own smoothed content as a flat-field); a negative --darkfield
    VALUE is a typo, not a camera offset. Both: exit 2, one line, nothing written."""
    rng = np.random.default_rng(0)
    tile = (rng.random((64, 64)) * 1000 + 500).astype(np.uint16)
    one = write_tile_csv(tmp_path, [tile], [(0, 0)], name="one.csv")
    two = write_tile_csv(tmp_path, [tile, tile], [(0, 0), (0, 48)], name="two.csv")
    for argv, must in [
            (["fuse", one, "-o", tmp_path / "a.ome.zarr", "--flatfield", "auto"],
             "too few to tell the shading from the specimen"),
            (["flatfield", one, "-o", tmp_path / "p.tif"], "too few"),
            (["fuse", two, "-o", tmp_path / "b.ome.zarr", "--darkfield", "-5"],
             "--darkfield -5: must be a finite number >= 0")]:
        code, _, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and must in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "t0.tif", "t1.tif",
                                                          "two.csv"]
