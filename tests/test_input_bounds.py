"""No silent wrong output (issue #10): coordinate bounds, the sparse-output guard, exact
copies for every tile dtype, and InputError (never a raw ValueError or TypeError) from the
Python API for bad chunks, tiles and positions."""

from __future__ import annotations

import types
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

import gpufusion
from gpufusion import InputError, fuse, fuse_to_file, mosaic_from_affines, mosaic_from_positions
from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends.numpy_ref import accumulator_dtype, cast_output
from gpufusion.cli import main
from gpufusion.layout import MAX_COORD, Mosaic
from gpufusion.plan import MAX_SPARSITY, estimate_output
from gpufusion.synthetic import make_mosaic

from .kernel_checks import kernel_checks_required
from .tile_files import write_tile_csv

# ---------------------------------------------------------------------------- helpers


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (the inputs must come out unchanged)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def refused(argv: list, folder: Path, out: Path, capsys, *parts: str) -> str:
    """Run ``gpufusion fuse`` and check a clean refusal: exit 2, one stderr line naming
    ``parts``, nothing at ``out`` (no hidden temporary either), inputs byte-identical."""
    before = files(folder)
    code = main([str(a) for a in ["fuse", *argv, "-o", out, "--backend", "numpy"]])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("gpufusion: error: "), err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert files(folder) == before
    return err


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def tiles_2x2(size: int = 16, dtype: str = "uint16") -> tuple[list[np.ndarray], list]:
    """Four tiles on a 2x2 grid overlapping by 2 px: a compact layout."""
    rng = np.random.default_rng(4)
    tiles = [rng.integers(1, 1000, (size, size)).astype(dtype) for _ in range(4)]
    step = size - 2
    return tiles, [(0, 0), (0, step), (step, 0), (step, step)]


# ---------------------------------------------------------------- 1. coordinate bounds


def test_csv_position_1e308_is_refused_naming_the_tile(tmp_path: Path, capsys) -> None:
    tiles, pos = tiles_2x2(8)
    pos[3] = (0.0, 1e308)
    csv = write_tile_csv(tmp_path, tiles, pos)
    refused([csv], tmp_path, tmp_path / "out.ome.zarr", capsys, "t3.tif", "position x",
            "1e+308", "2**40")


def test_dataset_xml_translation_1e300_is_refused(tmp_path: Path, capsys) -> None:
    from .test_formats_bigstitcher import write_dataset, write_filemap2

    tiles = [np.full((5, 8, 8), k, np.uint16) for k in range(4)]
    positions = np.array([[0, 0, 0], [0, 0, 6], [0, 6, 0], [0, 6, 1e300]], dtype=float)
    scene = (types.SimpleNamespace(positions=positions), tiles)
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, tiles), scene)
    refused([xml], tmp_path, tmp_path / "out.ome.zarr", capsys, "position x", "2**40")


def test_ome_xml_physical_size_1e_300_is_refused(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "tiles"
    folder.mkdir()
    for k, x_um in enumerate([0.0, 10.0]):
        tifffile.imwrite(folder / f"t{k}.ome.tif", np.full((16, 16), k + 1, np.uint16),
                         metadata={"axes": "YX", "PhysicalSizeX": 1e-300,
                                   "PhysicalSizeY": 1e-300,
                                   "Plane": {"PositionX": [x_um], "PositionY": [0.0]}})
    # 10 um at 1e-300 um per pixel: a position of 1e301 px
    refused([folder], folder, tmp_path / "out.ome.zarr", capsys, "t1.ome.tif", "position x")
    (folder / "t1.ome.tif").unlink()  # one tile: no huge position, the pixel size itself
    refused([folder], folder, tmp_path / "out.ome.zarr", capsys, "pixel_size", "1e-300")


def test_huge_affines_are_refused_through_the_api() -> None:
    tile = np.zeros((4, 5), np.uint8)
    far = np.eye(3)
    far[1, 2] = 1e300
    with pytest.raises(InputError) as excinfo:
        mosaic_from_affines([tile, tile], [np.eye(3), far], names=["a", "b"])
    one_line(excinfo, "b:", "position x", "1e+300")
    scale = np.diag([1e300, 1.0, 1.0])  # finite, invertible, but reaching 3e300
    with pytest.raises(InputError) as excinfo:
        mosaic_from_affines([tile], [scale])
    one_line(excinfo, "tile0", "reaches y", "3e+300")
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions([np.zeros((2, 4, 4))], [(-2.0**41, 0, 0)])
    one_line(excinfo, "tile0", "position z")
    # up to 2**40 px is fine, and integer positions stay exact there
    m = mosaic_from_positions([tile, tile], [(0, MAX_COORD - 10), (0, MAX_COORD - 6)])
    assert m.origin.tolist() == [0, MAX_COORD - 10] and m.shape == (4, 9)


def test_grids_are_validated_however_the_mosaic_is_made() -> None:
    m = mosaic_from_positions([np.ones((4, 4), np.uint8)], [(0, 0)])
    assert m.with_grid((-2, 3), (8, 9)).shape == (8, 9)
    for origin, shape, field in [((0, 0), (-4, 4), "output_shape"),
                                 ((0, 0), (0, 4), "output_shape"),
                                 ((0, 0), (4.5, 4), "output_shape"),
                                 ((0, 0), (4,), "output_shape"),
                                 ((np.nan, 0), (4, 4), "origin"),
                                 ((0, "a"), (4, 4), "origin"),
                                 ((2**41, 0), (4, 4), "2**40"),
                                 ((0, 0), (2**40, 2**40), "2**60")]:
        with pytest.raises(InputError) as excinfo:
            m.with_grid(origin, shape)
        one_line(excinfo, field)
        with pytest.raises(InputError) as excinfo:
            Mosaic(m.tiles, origin, shape)  # built directly: the same checks
        one_line(excinfo, field)
    bad = gpufusion.Tile(m.tiles[0].source, np.full((3, 3), np.nan), "nan-tile")
    with pytest.raises(InputError) as excinfo:
        Mosaic((bad,), np.zeros(2, np.int64), (4, 4))
    one_line(excinfo, "nan-tile", "NaN")
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions([np.ones((4, 4))], [(0, 0)], output_shape=(-3, 4))
    one_line(excinfo, "output_shape")
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions([np.ones((4, 4))], [(0, 0)], pixel_size=(1e-300, 1.0))
    one_line(excinfo, "pixel_size")


# ------------------------------------------------------------- 2. sparse-output guard


def test_stray_tile_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    tiles, pos = tiles_2x2()
    tiles.append(tiles[0])
    pos.append((0, 3000))  # a mistyped x: the output is 30 x 3016, 95 % empty
    csv = write_tile_csv(tmp_path, tiles, pos)
    out = tmp_path / "out.ome.zarr"
    err = refused([csv, "--chunk", "64"], tmp_path, out, capsys, "30 x 3016", "48 chunks",
                  "farthest from the others: ", "--allow-sparse")
    named = err.split("farthest from the others: ")[1]
    assert named.startswith(f"{tmp_path / 't4.tif'} (") and "t0.tif" not in named
    assert main([str(a) for a in ["fuse", csv, "-o", out, "--chunk", "64", "--backend",
                                  "numpy", "--allow-sparse"]]) == 0
    fused = zarr.open_group(str(out), mode="r")["0"][...]
    assert fused.shape == (30, 3016)
    np.testing.assert_array_equal(fused[:16, 3000:], tiles[4])


def test_sparse_guard_in_the_python_api(tmp_path: Path) -> None:
    tiles, pos = tiles_2x2()
    m = mosaic_from_positions(tiles + [tiles[0]], pos + [(5000, 0)])
    with pytest.raises(InputError) as excinfo:
        fuse(m, chunks=256)
    one_line(excinfo, "5016 x 30", "20 chunks", "tile4 (", "allow_sparse=True")
    assert fuse(m, chunks=256, allow_sparse=True).shape == (5016, 30)
    out = tmp_path / "m.ome.zarr"
    with pytest.raises(InputError):
        fuse_to_file(m, out, chunks=256)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert fuse_to_file(m, out, chunks=256, allow_sparse=True).shape == (5016, 30)
    # a grid set wider than compact tiles (as time points share one) is named as such
    compact = mosaic_from_positions(tiles, pos).with_grid((0, 0), (30, 900))
    with pytest.raises(InputError) as excinfo:
        fuse(compact)
    one_line(excinfo, "wider than the tiles' bounding box (30 x 30 px)", "with_grid")


def test_footprint_is_the_transformed_volume() -> None:
    """3D tiles with a z scale of 20 (anisotropic voxels, as a dataset.xml calibration) fill
    their output: counted in pixels of the tile (512 each) they would look 95 % empty."""
    tiles = [np.ones((2, 16, 16), np.uint16)] * 4
    affines = []
    for y, x in [(0, 0), (0, 14), (14, 0), (14, 14)]:
        a = np.diag([20.0, 1.0, 1.0, 1.0])
        a[1:3, 3] = (y, x)
        affines.append(a)
    m = mosaic_from_affines(tiles, affines)
    est = estimate_output(m, 8)
    assert m.shape == (21, 30, 30) and est.footprint == pytest.approx(4 * 20 * 512)
    assert est.chunks == 3 * 4 * 4 and est.sparsity < 1
    fuse(m, chunks=8)  # not refused
    rotated = [np.array([[np.cos(t), -np.sin(t), 40], [np.sin(t), np.cos(t), 40], [0, 0, 1]])
               for t in np.linspace(0, np.pi / 2, 4)]
    r = mosaic_from_affines([np.ones((32, 32), np.uint8)] * 4, rotated)
    assert estimate_output(r, 64).footprint == pytest.approx(4 * 32 * 32)
    fuse(r, chunks=64)


@pytest.mark.parametrize("grid,tile", [((4, 4), (64, 64)), ((2, 2, 2), (8, 32, 32)),
                                       ((1, 5), (48, 48))])
def test_ordinary_layouts_are_far_from_the_limit(grid, tile) -> None:
    m = make_mosaic(grid, tile, overlap=0.1, subpixel=2.0, seed=1).mosaic()
    assert estimate_output(m, 32).sparsity < MAX_SPARSITY / 5


def test_chunk_count_of_a_huge_output_is_computed_not_listed() -> None:
    m = mosaic_from_positions([np.ones((4, 4), np.uint8)], [(0, 0)])
    est = estimate_output(m.with_grid((0, 0), (4, 10**10)), 1024)
    assert (est.pixels, est.chunks) == (4 * 10**10, 9765625)


# ------------------------------------------------------- 3. exact copies, every dtype

#: Every tile dtype the engine accepts, with values float32 cannot hold where the dtype has
#: any (2**24 + 1 = 16777217 becomes 16777216 in float32; 64-bit integers are exact up to
#: 2**53, float64's integer range).
EXACT_VALUES = {
    "uint8": [0, 1, 254, 255],
    "int8": [-128, -1, 0, 127],
    "uint16": [0, 1, 65534, 65535],
    "int16": [-32768, -1, 1, 32767],
    "uint32": [0, 2**24 + 1, 2**32 - 3, 2**32 - 1],
    "int32": [-(2**31), -(2**24 + 1), 2**24 + 1, 2**31 - 1],
    "uint64": [0, 2**24 + 1, 2**53 - 3, 2**53 - 1],
    "int64": [-(2**53 - 1), -(2**24 + 1), 2**24 + 1, 2**53 - 1],
    "float16": [-65504.0, 0.0009765625, 1.5, 65504.0],
    "float32": [-1e38, 1.0 + 2**-23, 16777216.0, 1e38, 1 / 3, -7.77],
    "float64": [-1e300, 1.0 + 2**-40, 2.0**53 - 1, 1e300],
}


def exact_case(dtype: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Two 10x20 tiles at integer positions overlapping by 8 columns, filled with the
    dtype's awkward values, and a mask of the pixels one tile covers alone."""
    rng = np.random.default_rng(len(dtype))
    values = np.array(EXACT_VALUES[dtype], dtype=dtype)
    tiles = [rng.choice(values, size=(10, 20)) for _ in range(2)]
    alone = np.ones((10, 32), bool)
    alone[:, 12:20] = False
    return tiles, alone


def check_exact_copies(fused: np.ndarray, tiles: list[np.ndarray], alone: np.ndarray) -> None:
    assert fused.dtype == tiles[0].dtype and fused.shape == alone.shape
    expected = np.zeros_like(fused)
    expected[:, :20] = tiles[0]
    expected[:, 12:] = tiles[1]
    np.testing.assert_array_equal(fused[alone], expected[alone])
    assert fused.tobytes() != np.zeros_like(fused).tobytes()


def test_every_accepted_dtype_is_listed() -> None:
    """EXACT_VALUES covers every dtype the layout accepts, and each has a kernel path whose
    accumulator is the reference's."""
    from gpufusion.layout import SUPPORTED_KINDS

    accepted = {t for t in np.sctypeDict.values() if isinstance(t, type)
                and np.dtype(t).kind in SUPPORTED_KINDS and np.dtype(t).itemsize <= 8}
    assert {np.dtype(t).name for t in accepted} == set(EXACT_VALUES)
    for name in EXACT_VALUES:
        kin, _ = ck.fusion_kernel_dtypes(name, name)
        assert ck.FUSE_ACCUMULATOR[kin] == accumulator_dtype(name).name
    assert accumulator_dtype("uint32") == np.float64 and accumulator_dtype("int16") == np.float32


@pytest.mark.parametrize("algorithm", ["general", "separable"])
@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
@pytest.mark.parametrize("dtype", sorted(EXACT_VALUES))
def test_integer_positions_are_exact_copies(dtype: str, interpolation: str,
                                            algorithm: str) -> None:
    """Pixels one tile covers alone are that tile's pixels, bit for bit, in every blend mode
    (ramps included: the mosaic's outer edge lies within the blend width, whose weights
    w make ``w * v / w`` differ from ``v`` unless they are short binary fractions, as the
    default 4 px gives)."""
    tiles, alone = exact_case(dtype)
    m = mosaic_from_positions(tiles, [(0, 0), (0, 12)])
    for blend in gpufusion.blend.BLEND_MODES:
        for width in (None, 3.3):
            image = fuse(m, chunks=(7, 9), blend=blend, blend_width=width,
                         interpolation=interpolation, algorithm=algorithm)
            check_exact_copies(image.compute(scheduler="synchronous"), tiles, alone)


def test_uint32_nearest_keeps_16777217_through_the_cli(tmp_path: Path, capsys) -> None:
    """The issue's case: 2**24 + 1 came out as 2**24 (float32 accumulation)."""
    tiles, alone = exact_case("uint32")
    tiles[0][0, 0] = 2**24 + 1
    csv = write_tile_csv(tmp_path, tiles, [(0, 0), (0, 12)])
    out = tmp_path / "out.ome.zarr"
    code = main([str(a) for a in ["fuse", csv, "-o", out, "--interp", "nearest",
                                  "--backend", "numpy", "--chunk", "8"]])
    assert code == 0, capsys.readouterr().err
    fused = zarr.open_group(str(out), mode="r")["0"][...]
    assert int(fused[0, 0]) == 2**24 + 1
    check_exact_copies(fused, tiles, alone)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory):
    """The fusion kernel compiled for the host (tests/host_emulation) for the instantiations
    these tests launch; skipped without g++ unless the kernel checks are required."""
    from .host_emulation.harness import HostKernels, gxx_available

    if not gxx_available():
        if kernel_checks_required():
            pytest.fail("g++ is not installed and the kernel checks are required")
        pytest.skip("g++ is not installed")
    keys = sorted({(*ck.fusion_kernel_dtypes(d, d), 2, mode, interp)
                   for d in EXACT_VALUES for mode in ("linear", "overlay")
                   for interp in ("nearest", "linear")})
    return HostKernels.build(tmp_path_factory.mktemp("host_fuse"), keys, [("uint8", "corners")])


@pytest.mark.parametrize("dtype", sorted(EXACT_VALUES))
def test_integer_positions_are_exact_copies_on_the_emulated_gpu(host, monkeypatch,
                                                                dtype: str) -> None:
    """The CuPy backend's whole path (dtype choice, packing, kernel, casts) on the
    host-emulated device: wide dtypes accumulate in double in the kernel too."""
    from .host_emulation.fake_cupy import emulated_gpu

    tiles, alone = exact_case(dtype)
    m = mosaic_from_positions(tiles, [(0, 0), (0, 12)])
    with emulated_gpu(host, monkeypatch) as cupy:
        for blend in ("linear", "overlay"):
            for interpolation in ("nearest", "linear"):
                kwargs = {"chunks": (7, 9), "blend": blend, "blend_width": 3.3,
                          "interpolation": interpolation}
                gpu = cupy.asnumpy(fuse(m, backend="cupy", **kwargs).compute(
                    scheduler="synchronous"))
                check_exact_copies(gpu, tiles, alone)
                ref = fuse(m, **kwargs)
                np.testing.assert_array_equal(gpu, ref.compute(scheduler="synchronous"))


def test_casts_to_64_bit_integers_clip_without_overflow() -> None:
    values = np.array([2.0**63, -(2.0**64), 2.0**64, 0.5, 2.5])
    assert cast_output(values, np.int64).tolist() == [2**63 - 1024, -(2**63), 2**63 - 1024,
                                                      0, 2]
    assert cast_output(values, np.uint64).tolist() == [2**63, 0, 2**64 - 2048, 0, 2]
    assert cast_output(np.array([3e9], np.float32), np.int32).tolist() == [2**31 - 128]


# ---------------------------------------------------------- 4. Python API validation


@pytest.mark.parametrize("chunks", [1.5, True, "abc", None, 0, -4, (8, 2.5), (8,),
                                    ((4, 4), (8, 4)), [[4, 4.0], [8, 8]]], ids=repr)
def test_bad_chunks_are_input_errors(tmp_path: Path, chunks) -> None:
    m = mosaic_from_positions([np.ones((8, 16), np.uint8)], [(0, 0)])
    with pytest.raises(InputError) as excinfo:
        fuse(m, chunks=chunks)
    one_line(excinfo, "chunk")
    with pytest.raises(InputError):
        fuse_to_file(m, tmp_path / "m.ome.zarr", chunks=chunks)
    assert list(tmp_path.iterdir()) == []


def test_good_chunk_forms_still_work() -> None:
    m = mosaic_from_positions([np.arange(128, dtype=np.uint8).reshape(8, 16)], [(0, 0)])
    for chunks in (5, np.int64(5), (3, 7), ((4, 4), (10, 6))):
        np.testing.assert_array_equal(fuse(m, chunks=chunks).compute(), m.tiles[0].source.array)


@pytest.mark.parametrize("tile", [np.ones((4, 4), bool), np.ones((4, 4), np.complex64),
                                  np.ones((4, 4), object), np.full((4, 4), "ab"),
                                  np.zeros((4, 4), "datetime64[s]")], ids=lambda t: t.dtype.name)
def test_unsupported_tile_dtypes_are_input_errors(tile: np.ndarray) -> None:
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions([tile], [(0, 0)])
    one_line(excinfo, "tile0", f"dtype {tile.dtype}", "not supported")
    with pytest.raises(InputError):
        mosaic_from_affines([tile], [np.eye(3)])


@pytest.mark.parametrize(("positions", "message"), [
    ([(0, 0), (0, 1, 2)], "positions"),
    ([0, 0], "positions"),
    ([(0, 0, 0), (0, 0, 5)], "tile0: position has 3 coordinates but the tile is 2D"),
    ([(0, 0)], "positions"),
    ([("a", "b"), (0, 0)], "positions"),
    (None, "positions"),
    ("0,0", "positions"),
])
def test_bad_positions_are_input_errors(positions, message: str) -> None:
    tiles = [np.ones((4, 4), np.uint8)] * 2
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions(tiles, positions)
    one_line(excinfo, message)


def test_bad_tiles_and_transforms_are_input_errors() -> None:
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions([[[1, 2], [3]]], [(0, 0)])  # ragged nested lists
    one_line(excinfo, "tile0")
    tile = np.ones((4, 4), np.uint8)
    for affines in (["abc"], [[[1, 0], [0, 1, 2]]], None):
        with pytest.raises(InputError):
            mosaic_from_affines([tile], affines)
    with pytest.raises(InputError) as excinfo:
        fuse(tile)
    one_line(excinfo, "mosaic")


def test_dask_tiles_with_unknown_chunks_are_input_errors() -> None:
    a = da.from_array(np.ones((8, 8), np.uint16), chunks=4)
    unknown = a[a[:, 0] > 0]
    assert np.isnan(unknown.shape[0])
    with pytest.raises(InputError) as excinfo:
        mosaic_from_positions([unknown], [(0, 0)], names=["lazy"])
    one_line(excinfo, "lazy", "unknown shape", "compute_chunk_sizes")
    known = unknown.compute_chunk_sizes()
    assert mosaic_from_positions([known], [(0, 0)]).shape == (8, 8)
