"""Registration (issue 4): pairwise offsets, global solve, outputs, CLI, real data."""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpufusion import mosaic_from_affines, mosaic_from_positions
from gpufusion.backends import gpu_status
from gpufusion.errors import InputError
from gpufusion.registration import (
    RegistrationWarning,
    candidate_pairs,
    mean_overlap_ncc,
    measure_pairs,
    overlap_ncc,
    overlapping_tile_pairs,
    register_mosaic,
    solve_positions,
)
from gpufusion.synthetic import make_mosaic

from .conftest import missing_real_data
from .tile_files import write_tile_csv

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LEICA = DATA / "leica_2tiles/experiment--test/slide--S00/chamber--U00--V00"
TMA = DATA / "tma_4x3"


def rms_after_offset(found: np.ndarray, truth: np.ndarray) -> float:
    """RMS position error (Euclidean, px) after removing the mean (global) offset."""
    err = found - truth
    err = err - err.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(err**2, axis=1))))


def needs(path: Path) -> Path:
    if not path.exists():
        missing_real_data(path)
    return path


# ------------------------------------------------------------------------------------------
# candidate pairs


def test_candidate_pairs_grid_keeps_side_neighbours_only() -> None:
    syn = make_mosaic((3, 4), (100, 100), overlap=0.1, subpixel=0, seed=0)
    pairs = candidate_pairs(syn.mosaic())
    grid = np.array(list(np.ndindex(3, 4)))
    steps = np.abs(grid[pairs[:, 1]] - grid[pairs[:, 0]]).sum(axis=1)
    assert len(pairs) == 3 * 3 + 2 * 4 and np.all(steps == 1)


def test_candidate_pairs_snake_and_irregular_layouts() -> None:
    tile = np.zeros((100, 100), np.uint8)
    # a snake: row 0 left to right, row 1 right to left (file order differs from layout)
    snake = [(0, 0), (0, 88), (0, 176), (88, 176), (88, 88), (88, 0)]
    pairs = candidate_pairs(mosaic_from_positions([tile] * 6, snake))
    assert {tuple(p) for p in pairs.tolist()} == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5),
                                                  (0, 5), (1, 4)}
    # irregular: one far away, one barely touching (4 px), one overlapping two others
    irregular = [(0, 0), (0, 96), (60, 50), (500, 500)]
    pairs = candidate_pairs(mosaic_from_positions([tile] * 4, irregular))
    assert pairs.tolist() == [[0, 2], [1, 2]]


# ------------------------------------------------------------------------------------------
# pairwise


def test_pair_offset_matches_scikit_image_on_texture() -> None:
    skreg = pytest.importorskip("skimage.registration")
    from scipy import ndimage as ndi

    rng = np.random.default_rng(4)
    image = ndi.gaussian_filter(rng.normal(size=(300, 300)), 1.5)
    true = np.array([3.4, -5.7])  # tile 1 sits at (0, 60) + true
    shifted = np.fft.ifft2(ndi.fourier_shift(np.fft.fft2(image), -true)).real
    a, b = image[20:220, 20:220], shifted[20:220, 80:280]
    mosaic = mosaic_from_positions([a.astype(np.float32), b.astype(np.float32)],
                                   [(0, 0), (0, 60)])
    m = measure_pairs(mosaic, max_shift=10)
    ours = m.offset[0] - (0, 60)
    # scikit-image's upsampled phase correlation of the nominal overlaps: the shift that
    # registers b onto a, i.e. b's offset from its nominal place
    theirs = skreg.phase_cross_correlation(a[:, 60:], b[:, :140], upsample_factor=100)[0]
    np.testing.assert_allclose(ours, true, atol=0.05)
    np.testing.assert_allclose(ours, theirs, atol=0.1)
    assert m.ncc[0] > 0.95


@pytest.mark.parametrize("seed", [0, 3])
def test_slices_and_batched_algorithms_agree(seed: int) -> None:
    syn = make_mosaic((3, 3), (96, 96), overlap=0.2, stage_error=6, seed=seed)
    mosaic = syn.mosaic(syn.stage_positions)
    a = measure_pairs(mosaic, max_shift=12, algorithm="slices")
    b = measure_pairs(mosaic, max_shift=12, algorithm="batched")
    np.testing.assert_allclose(a.shift, b.shift, atol=1e-5)
    np.testing.assert_allclose(a.ncc, b.ncc, atol=1e-6)


def test_pairwise_resolves_large_shifts_beyond_the_peak_wrap() -> None:
    # errors close to the overlap width: the correct alias must be picked
    syn = make_mosaic((1, 4), (128, 128), overlap=0.25, stage_error=12, seed=7)
    mosaic = syn.mosaic(syn.stage_positions)
    m = measure_pairs(mosaic, max_shift=24)
    true = syn.positions[m.pairs[:, 1]] - syn.positions[m.pairs[:, 0]]
    assert np.nanmax(np.abs(m.offset - true)) < 0.1


# ------------------------------------------------------------------------------------------
# whole registration, synthetic truth


@pytest.mark.parametrize("seed", [0, 1])
def test_register_synthetic_grid_accuracy(seed: int) -> None:
    syn = make_mosaic((6, 6), (256, 256), overlap=0.1, stage_error=15, seed=seed)
    result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=30, backend="numpy")
    assert rms_after_offset(result.positions, syn.positions) <= 0.1
    assert rms_after_offset(syn.stage_positions, syn.positions) > 5  # there was work to do
    assert result.mean_ncc_after > result.mean_ncc_before
    assert result.edges.kept.sum() >= 40
    # the corrected Mosaic carries the positions
    np.testing.assert_allclose(result.mosaic.positions(), result.positions)


@pytest.mark.parametrize(("sd", "limit"), [(500, 0.35), (1000, 0.7)])
def test_register_noisy_synthetic_grid(sd: float, limit: float) -> None:
    """White noise on smooth content (signal std ~7800): the NCC surface turns jagged and
    the gradients noisy; the noise-adaptive smoothing keeps the error near the Cramer-Rao
    bound (~0.12 / 0.25 px here; before it: 1.3 / 13.7 px)."""
    syn = make_mosaic((6, 6), (256, 256), overlap=0.1, stage_error=15, seed=0)
    rng = np.random.default_rng(1000)
    syn.tiles = [t.astype(np.float32) + rng.normal(0, sd, t.shape).astype(np.float32)
                 for t in syn.tiles]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=30,
                                 backend="numpy", quality=False)
    assert rms_after_offset(result.positions, syn.positions) <= limit


def test_noise_share_and_edge_exact_smoothing() -> None:
    from scipy import ndimage as ndi

    from gpufusion.registration.pairwise import _noise_share, _smooth

    rng = np.random.default_rng(0)
    assert _noise_share(rng.normal(size=(128, 128))) > 0.95
    smooth = ndi.gaussian_filter(rng.normal(size=(128, 128)), 6)
    assert _noise_share(smooth) < 0.1
    assert _noise_share(np.zeros((64, 64))) == 0.0
    # point reflection continues a ramp exactly: smoothing leaves it as it is, edges included
    ramp = np.add.outer(0.5 * np.arange(40.0), -0.25 * np.arange(30.0))
    np.testing.assert_allclose(_smooth(ramp, 2.0), ramp, atol=1e-9)


def test_register_synthetic_with_blank_tiles() -> None:
    blank = [3, 14, 22, 33]  # ~10 % of 36
    syn = make_mosaic((6, 6), (256, 256), overlap=0.1, stage_error=15, seed=2, blank=blank)
    with pytest.warns(RegistrationWarning, match="4 of 36 tiles have no reliable overlap"):
        result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=30,
                                 backend="numpy")
    assert result.unregistered.tolist() == blank
    others = np.setdiff1d(np.arange(36), blank)
    assert rms_after_offset(result.positions[others], syn.positions[others]) <= 0.2
    assert set(result.edges.status[np.any(np.isin(result.edges.pairs, blank), axis=1)]) == {
        "no_match"}


def test_register_3d() -> None:
    syn = make_mosaic((2, 2, 2), (24, 48, 48), overlap=0.25, stage_error=3, seed=1)
    result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=6, backend="numpy")
    assert result.positions.shape == (8, 3)
    assert rms_after_offset(result.positions, syn.positions) <= 0.1


def test_unregistered_tile_moves_with_its_neighbours() -> None:
    # a stage that drifts: every tile is 6 px further right than nominal per column
    syn = make_mosaic((3, 3), (96, 96), overlap=0.2, subpixel=0, seed=5, blank=[4])
    nominal = syn.positions.copy()
    nominal[:, 1] -= 6 * (np.arange(9) % 3)
    with pytest.warns(RegistrationWarning, match="tile_1_1"):
        result = register_mosaic(syn.mosaic(nominal), max_shift=10, backend="numpy")
    corr = result.corrections - result.corrections[result.anchor]
    pairs = result.edges.pairs
    neighbours = np.concatenate([pairs[pairs[:, 0] == 4, 1], pairs[pairs[:, 1] == 4, 0]])
    assert len(neighbours) >= 4
    np.testing.assert_allclose(corr[4], corr[neighbours].mean(axis=0), atol=1e-9)
    assert abs(corr[4, 1] - 6) < 0.5  # the middle column moved by ~6 px


# ------------------------------------------------------------------------------------------
# global solve


def test_solve_rejects_outlier_edge() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([(r * 90.0, c * 90.0) for r in range(5) for c in range(5)])
    truth += rng.uniform(-3, 3, truth.shape)
    pairs = np.array([(k, k + 1) for k in range(25) if k % 5 < 4]
                     + [(k, k + 5) for k in range(20)])
    offsets = truth[pairs[:, 1]] - truth[pairs[:, 0]] + rng.normal(0, 0.05, (len(pairs), 2))
    offsets[7] += (12.0, -9.0)  # one wrong measurement
    nominal = np.array([(r * 90.0, c * 90.0) for r in range(5) for c in range(5)])
    res = solve_positions(nominal, pairs, offsets, max_residual=1.0)
    assert not res.kept[7] and res.rejected[7] and res.kept.sum() == len(pairs) - 1
    assert rms_after_offset(res.positions, truth) < 0.1
    np.testing.assert_allclose(res.positions[res.anchor], nominal[res.anchor])


def test_solve_large_grid_is_exact_without_noise() -> None:
    n = 60
    grid = np.array([(r, c) for r in range(n) for c in range(n)], dtype=np.float64)
    truth = grid * 900 + np.random.default_rng(1).uniform(-10, 10, grid.shape)
    idx = np.arange(n * n).reshape(n, n)
    pairs = np.concatenate([np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
                            np.stack([idx[:-1].ravel(), idx[1:].ravel()], 1)])
    offsets = truth[pairs[:, 1]] - truth[pairs[:, 0]]
    res = solve_positions(grid * 900, pairs, offsets)
    assert rms_after_offset(res.positions, truth) < 1e-6
    assert not res.rejected.any() and res.kept.all()


def test_solve_places_disconnected_groups_by_neighbours() -> None:
    nominal = np.array([[0.0, 0], [0, 90], [0, 180], [0, 270]])
    pairs = np.array([[0, 1], [1, 2], [2, 3]])
    offsets = np.array([[1.0, 92], [np.nan, np.nan], [0, 91]])  # the middle edge failed
    res = solve_positions(nominal, pairs, offsets)
    assert res.unplaced.tolist() == [2, 3]
    corr = res.positions - nominal
    # group {2, 3}: its mean correction equals that of its placed neighbour (tile 1)
    np.testing.assert_allclose(corr[[2, 3]].mean(axis=0), corr[1])
    np.testing.assert_allclose(res.positions[3] - res.positions[2], [0, 91])


# ------------------------------------------------------------------------------------------
# bad and degenerate input


def test_single_tile_is_returned_unchanged() -> None:
    mosaic = mosaic_from_positions([np.ones((32, 32))], [(3.5, 4.0)])
    result = register_mosaic(mosaic, backend="numpy")
    np.testing.assert_array_equal(result.positions, [[3.5, 4.0]])
    assert len(result.edges) == 0 and len(result.unregistered) == 0


def test_tiles_that_do_not_overlap_keep_their_positions() -> None:
    rng = np.random.default_rng(0)
    mosaic = mosaic_from_positions([rng.random((32, 32)), rng.random((32, 32))],
                                   [(0, 0), (0, 40)])
    with pytest.warns(RegistrationWarning, match="no two tiles overlap"):
        result = register_mosaic(mosaic, backend="numpy")
    np.testing.assert_array_equal(result.positions, [[0, 0], [0, 40]])


def test_uniform_tiles_are_flagged_not_crashed() -> None:
    mosaic = mosaic_from_positions([np.full((64, 64), 7, np.uint16)] * 3,
                                   [(0, 0), (0, 50), (0, 100)])
    with pytest.warns(RegistrationWarning, match="3 of 3 tiles"):
        result = register_mosaic(mosaic, backend="numpy")
    np.testing.assert_array_equal(result.positions, mosaic.positions())
    assert set(result.edges.status) == {"no_match"}
    assert np.isnan(result.mean_ncc_before)


def test_max_shift_zero_keeps_nominal_positions() -> None:
    syn = make_mosaic((2, 2), (64, 64), overlap=0.25, stage_error=3, seed=0)
    mosaic = syn.mosaic(syn.stage_positions)
    result = register_mosaic(mosaic, max_shift=0, backend="numpy")
    np.testing.assert_allclose(result.positions, syn.stage_positions, atol=1e-9)
    assert np.all(result.edges.shift == 0) and np.all(np.isfinite(result.edges.ncc))


def _texture_pair(true_dx: float, overlap: int = 24, size: int = 96, smooth: float = 2):
    """Two tiles cut from one texture, side by side along x: nominal overlap ``overlap``
    px, the second tile really ``true_dx`` px further right than its stage says."""
    from scipy import ndimage as ndi

    img = ndi.gaussian_filter(np.random.default_rng(3).normal(size=(size, 3 * size)), smooth)
    step = size - overlap
    a = img[:, :size]
    b = img[:, step + int(true_dx): step + int(true_dx) + size]
    return mosaic_from_positions([a, b], [(0, 0), (0, step)])


def test_shift_within_max_shift_is_kept() -> None:
    m = measure_pairs(_texture_pair(5), max_shift=5)
    assert not m.at_limit[0]
    np.testing.assert_allclose(m.shift[0], [0, 5], atol=0.05)
    result = register_mosaic(_texture_pair(5), max_shift=5, backend="numpy")
    assert result.edges.counts() == {"kept": 1}


def test_shift_beyond_max_shift_is_dropped_and_warned() -> None:
    # 12 px off, 5 allowed: on smooth content the NCC keeps rising up to the wall of the
    # search range (on fine texture it stays below min_ncc there: dropped as low_ncc)
    m = measure_pairs(_texture_pair(12, smooth=8), max_shift=5)
    assert m.at_limit[0] and m.ncc[0] > 0.1
    with pytest.warns(RegistrationWarning, match="max_shift limit"):
        result = register_mosaic(_texture_pair(12, smooth=8), max_shift=5, backend="numpy")
    assert result.edges.counts() == {"max_shift": 1}
    np.testing.assert_array_equal(result.positions, result.nominal)


def test_grid_with_stage_error_beyond_max_shift_is_flagged() -> None:
    syn = make_mosaic((3, 3), (200, 200), overlap=0.15, stage_error=15, seed=1)
    with pytest.warns(RegistrationWarning, match="max_shift limit"):
        result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=3,
                                 backend="numpy")
    e = result.edges
    true = syn.positions[e.pairs[:, 1]] - syn.positions[e.pairs[:, 0]] - e.nominal
    far = np.abs(true).max(axis=1) > 3 + 2
    assert far.sum() >= 10
    assert np.mean(e.status[far] == "max_shift") >= 0.9


def test_abutting_tiles_are_paired_within_max_shift() -> None:
    # the stage says the tiles only touch; really they overlap by 20 px
    mosaic = _texture_pair(-20, overlap=0)
    assert candidate_pairs(mosaic).tolist() == []
    assert candidate_pairs(mosaic, max_shift=30).tolist() == [[0, 1]]
    result = register_mosaic(mosaic, max_shift=30, backend="numpy")
    assert result.edges.counts() == {"kept": 1}
    np.testing.assert_allclose(result.positions[1] - result.positions[0], [0, 76], atol=0.05)
    # a 2x2 grid that touches: side neighbours qualify, diagonal ones still do not
    grid = mosaic_from_positions([np.zeros((100, 100))] * 4,
                                 [(0, 0), (0, 100), (100, 0), (100, 100)])
    assert candidate_pairs(grid, max_shift=20).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]


def test_touching_grid_with_large_max_shift_keeps_diagonals_out() -> None:
    for size, step, ms in ((128, 128, 50), (64, 58, 30)):  # touching; 10 % overlap
        grid = mosaic_from_positions([np.zeros((size, size))] * 4,
                                     [(0, 0), (0, step), (step, 0), (step, step)])
        assert candidate_pairs(grid, max_shift=ms).tolist() == [[0, 1], [0, 2], [1, 3],
                                                                [2, 3]]


def test_max_shift_as_large_as_a_tile_is_input_error() -> None:
    with pytest.raises(InputError, match="not below the tile size"):
        register_mosaic(_texture_pair(0), max_shift=1e9, backend="numpy")
    with pytest.raises(InputError, match="along x"):
        register_mosaic(_texture_pair(0), max_shift=[5, 200], backend="numpy")


@pytest.mark.parametrize("kwargs", [{"max_shift": -1}, {"max_shift": [1, 2, 3]},
                                    {"max_shift": float("nan")}, {"min_ncc": 2},
                                    {"max_residual": 0}, {"anchor": 9},
                                    {"backend": "opencl"}])
def test_bad_options_raise_input_error(kwargs: dict) -> None:
    syn = make_mosaic((1, 2), (32, 32), overlap=0.3, seed=0)
    with pytest.raises(InputError):
        register_mosaic(syn.mosaic(), **kwargs)


def test_rotated_tiles_are_rejected() -> None:
    rot = np.array([[0.0, -1, 9], [1, 0, 0], [0, 0, 1]])
    mosaic = mosaic_from_affines([np.zeros((8, 8))] * 2, [np.eye(3), rot])
    with pytest.raises(InputError, match="translations only"):
        register_mosaic(mosaic, backend="numpy")


def test_cupy_backend_without_gpu_is_input_error() -> None:
    if gpu_status()[0]:
        pytest.skip("a GPU is usable here")
    syn = make_mosaic((1, 2), (32, 32), overlap=0.3, seed=0)
    with pytest.raises(InputError, match="backend cupy"):
        register_mosaic(syn.mosaic(), backend="cupy")


# ------------------------------------------------------------------------------------------
# quality measure and outputs


def test_overlap_ncc_is_one_at_truth_and_lower_off_it() -> None:
    syn = make_mosaic((2, 2), (64, 64), overlap=0.25, integer_positions=True, seed=3)
    pairs = overlapping_tile_pairs(syn.mosaic())
    assert len(pairs) == 6  # 4 side and 2 diagonal neighbours
    np.testing.assert_allclose(overlap_ncc(syn.mosaic(), pairs), 1.0, atol=1e-6)
    assert mean_overlap_ncc(syn.mosaic(), pairs, syn.positions + [[0, 0], [0, 3], [2, 0],
                                                                  [0, 0]]) < 0.999


@pytest.mark.parametrize("offset", [(3.25, 41.6), (-2.5, 40.0), (0.0, 37.1), (5.0, 44.0)])
def test_overlap_ncc_matches_scipy_shift(offset: tuple[float, float]) -> None:
    """Sub-pixel NCC against an independent computation: tile 1 moved onto tile 0's pixel
    grid by scipy.ndimage.shift (order 1), samples outside tile 1 dropped."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    base = ndimage.gaussian_filter(rng.normal(size=(60, 100)), 2.0)
    a = base[:50, :60]
    b = base[3:55, 40:98] + 0.05 * rng.normal(size=(52, 58))  # truth near offset (3, 40)
    mosaic = mosaic_from_positions([a, b], [(0.0, 0.0), offset])
    whole = np.floor(offset).astype(int)
    padded = np.pad(b, 1, constant_values=np.nan)
    moved = ndimage.shift(padded, np.asarray(offset) - whole, order=1, mode="constant",
                          cval=np.nan)[1:-1, 1:-1]  # moved[k] = b(k - frac)
    canvas = np.full((50 + 2 * 52, 60 + 2 * 58), np.nan)
    canvas[52 + whole[0]:52 + whole[0] + 52, 58 + whole[1]:58 + whole[1] + 58] = moved
    shared = canvas[52:52 + 50, 58:58 + 60]
    ok = np.isfinite(shared)
    want = np.corrcoef(a[ok], shared[ok])[0, 1]
    assert overlap_ncc(mosaic, [[0, 1]])[0] == pytest.approx(want, abs=1e-12)


def test_outputs_positions_edges_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    from gpufusion.readers import read_positions

    syn = make_mosaic((2, 3), (96, 96), overlap=0.2, stage_error=4, seed=1)
    files = []
    for k, tile in enumerate(syn.tiles):
        tifffile.imwrite(tmp_path / f"t{k}.tif", tile)
        files.append(tmp_path / f"t{k}.tif")
    mosaic = mosaic_from_positions(syn.tiles, syn.stage_positions,
                                   names=[str(f) for f in files])
    result = register_mosaic(mosaic, max_shift=8, backend="numpy")
    out = result.write_positions_csv(tmp_path / "pos.csv", files)
    table = read_positions(out)
    np.testing.assert_allclose(table.positions, result.positions, atol=1e-4)
    with open(result.write_edges_csv(tmp_path / "pos.edges.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.edges) and rows[0]["file_i"] == "t0.tif"
    assert {"shift_x", "shift_y", "ncc", "residual", "status"} <= set(rows[0])
    html = result.write_report(tmp_path / "report.html").read_text()
    assert "<svg" in html and "mean overlap NCC" in html
    svg = result.write_report(tmp_path / "report.svg").read_text()
    assert svg.startswith("<svg") and "mean overlap NCC" in svg  # the quality, in the picture
    assert "sub-pixel offset" in html and "integer-rounded" not in html
    from PIL import Image

    with Image.open(result.write_report(tmp_path / "report.png")) as img:
        assert img.format == "PNG" and img.size[0] > 100
    with pytest.raises(InputError, match="report must end"):
        result.write_report(tmp_path / "report.pdf")


# ------------------------------------------------------------------------------------------
# command line


def cli_run(argv: list[str]) -> int:
    """Run ``gpufusion register`` through its parser; InputError propagates (``main`` would
    turn it into exit code 2, tested in test_cli)."""
    from gpufusion.cli import common_options
    from gpufusion.cli import register as reg_cli

    parser = argparse.ArgumentParser(parents=[common_options()])
    reg_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["register", *map(str, argv)])
    return args.run(args)


@pytest.fixture
def tile_csv(tmp_path: Path) -> tuple[Path, object]:
    syn = make_mosaic((2, 2), (96, 96), overlap=0.2, stage_error=5, seed=4)
    return write_tile_csv(tmp_path, syn.tiles, syn.stage_positions), syn


def test_cli_register_writes_usable_positions(tile_csv, tmp_path: Path, capsys) -> None:
    from gpufusion import mosaic_from_file

    src, syn = tile_csv
    out = tmp_path / "sub" / "registered.csv"
    out.parent.mkdir()
    code = cli_run([src, "-o", out, "--max-shift", "10", "--backend", "numpy",
                    "--report", tmp_path / "r.html"])
    assert code == 0
    assert "registered 4 tiles" in capsys.readouterr().out
    assert (tmp_path / "sub" / "registered.edges.csv").is_file()
    assert (tmp_path / "r.html").is_file()
    mosaic = mosaic_from_file(out)  # fuse input: paths relative to the CSV's folder
    assert rms_after_offset(mosaic.positions(), syn.positions) < 0.05


def test_cli_register_bad_input(tile_csv, tmp_path: Path) -> None:
    src, _ = tile_csv
    with pytest.raises(InputError, match="one of the input files"):
        cli_run([src, "-o", src, "--overwrite"])
    with pytest.raises(InputError, match="report"):
        cli_run([src, "-o", tmp_path / "o.csv", "--report", tmp_path / "r.pdf"])
    with pytest.raises(InputError, match="does not exist"):
        cli_run([src, "-o", tmp_path / "missing" / "o.csv"])
    with pytest.raises(InputError, match="max-shift"):
        cli_run([src, "-o", tmp_path / "o.csv", "--max-shift", "1,2,3"])
    with pytest.raises(InputError, match="must end in .csv or .txt"):
        cli_run([src, "-o", tmp_path / "o.png"])


def test_cli_register_never_replaces_inputs_or_existing_outputs(tile_csv, tmp_path: Path,
                                                                capsys) -> None:
    import imageio.v3 as iio

    from gpufusion.cli import main

    src, syn = tile_csv
    # the same tiles as PNG files, which a --report name could hit
    lines = src.read_text().replace(".tif", ".png")
    for k, t in enumerate(syn.tiles):
        iio.imwrite(tmp_path / f"t{k}.png", t)
    (tmp_path / "png.csv").write_text(lines)
    tile = tmp_path / "t1.png"
    before = tile.read_bytes()
    for argv in (["-o", tmp_path / "png.csv"], ["-o", tmp_path / "o.csv", "--report", tile]):
        # an input is never an output, even with --overwrite
        code = main(["register", str(tmp_path / "png.csv"), *map(str, argv), "--overwrite",
                     "-q"])
        assert code == 2
        assert "one of the input files" in capsys.readouterr().err
    assert tile.read_bytes() == before and not (tmp_path / "o.csv").exists()
    assert main(["register", str(src), "-o", str(tmp_path / "t0.tif"), "-q"]) == 2
    assert "must end in .csv or .txt" in capsys.readouterr().err
    out = tmp_path / "o.csv"
    out.write_text("keep me")
    code = main(["register", str(src), "-o", str(out), "--max-shift", "10", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists (use --overwrite" in err and err.count("\n") == 1
    assert out.read_text() == "keep me"
    assert main(["register", str(src), "-o", str(out), "--max-shift", "10", "-q",
                 "--overwrite"]) == 0
    assert out.read_text().startswith("file,x,y")


def test_cli_register_failed_write_leaves_no_outputs(tile_csv, tmp_path: Path, capsys,
                                                     monkeypatch) -> None:
    from gpufusion.cli import main
    from gpufusion.registration import report

    src, _ = tile_csv
    out = tmp_path / "o.csv"
    for named in (True, False):  # a real write() raises ENOSPC without a file name

        def full_disk(path, result, named=named):
            Path(path).write_bytes(b"half a picture")
            raise OSError(28, "No space left on device", *([str(path)] if named else []))

        monkeypatch.setattr(report, "write_report", full_disk)
        for debug in ([], ["--debug"]):
            code = main(["register", str(src), "-o", str(out), "--max-shift", "10", "-q",
                         "--report", str(tmp_path / "r.png"), *debug])
            err = capsys.readouterr().err
            assert code == 2 and "No space left on device" in err
            assert f"{tmp_path / 'r.png'}: cannot write" in err  # the output, not a temp
            assert err.count("\n") == 1 or debug
            assert sorted(p.name for p in tmp_path.iterdir()) == [
                "pos.csv", "t0.tif", "t1.tif", "t2.tif", "t3.tif"]


def test_cli_register_refuses_an_edges_path_that_is_a_folder(tile_csv, tmp_path) -> None:
    src, _ = tile_csv
    (tmp_path / "o.edges.csv").mkdir()
    with pytest.raises(InputError, match="o.edges.csv: is a folder"):
        cli_run([src, "-o", tmp_path / "o.csv"])
    assert not (tmp_path / "o.csv").exists()


def test_register_for_fuse_returns_corrected_mosaic(capsys) -> None:
    from gpufusion.cli import common_options
    from gpufusion.cli.register import add_registration_options, register_for_fuse

    parser = argparse.ArgumentParser(parents=[common_options()])
    add_registration_options(parser)
    args = parser.parse_args(["--max-shift", "10"])
    syn = make_mosaic((2, 2), (96, 96), overlap=0.2, stage_error=5, seed=4)
    mosaic = register_for_fuse(args, syn.mosaic(syn.stage_positions), "numpy")
    assert rms_after_offset(mosaic.positions(), syn.positions) < 0.05
    assert "registered 4 tiles" in capsys.readouterr().err


def test_cli_max_shift_parsing() -> None:
    from gpufusion.cli.register import max_shift_value

    assert max_shift_value("4") == (4.0,)
    assert max_shift_value("4,6") == (6.0, 4.0)  # x,y -> index order (y, x)
    for bad in ("-1", "x", "1,2,3,4", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            max_shift_value(bad)


# ------------------------------------------------------------------------------------------
# real data


def test_leica_second_tile_lands_on_the_fiji_registration() -> None:
    from gpufusion import mosaic_from_file

    mosaic = mosaic_from_file(needs(LEICA) / "TileConfiguration.txt")  # channel C01
    result = register_mosaic(mosaic, backend="numpy")
    offset = result.positions[1] - result.positions[0]
    assert np.all(np.abs(offset - (936.7469, 3.2326183)) <= 1.0), offset  # (y, x)
    assert result.edges.ncc[0] > 0.8 and result.mean_ncc_after > result.mean_ncc_before


@pytest.fixture(scope="module")
def tma() -> tuple[object, np.ndarray, object]:
    from gpufusion.readers import open_tile

    rows = np.loadtxt(needs(TMA) / "DERIVED_ashlar1.20_positions.csv", delimiter=",")
    tiles = [open_tile(TMA / f"r{int(t) // 3}-c{int(t) % 3}.png") for t in rows[:, 0]]
    nominal = np.array([(int(t) // 3 * 460.8, int(t) % 3 * 460.8) for t in rows[:, 0]])
    return mosaic_from_positions(tiles, nominal), rows[:, 3:5], rows


def test_tma_quality_reference_numbers(tma) -> None:
    """The issue's reference figures: mean overlap NCC 0.054 nominal, 0.253 ASHLAR."""
    mosaic, ashlar, rows = tma
    assert len(candidate_pairs(mosaic)) == 17  # registration: the side neighbours of 4 x 3
    assert len(overlapping_tile_pairs(mosaic)) == 29  # quality: 12 diagonal ones too
    np.testing.assert_allclose(rows[:, 1:3], mosaic.positions())
    assert mean_overlap_ncc(mosaic) == pytest.approx(0.054, abs=0.001)
    assert mean_overlap_ncc(mosaic, positions=ashlar) == pytest.approx(0.253, abs=0.001)


def test_tma_registration_matches_ashlar(tma) -> None:
    mosaic, ashlar, _ = tma
    result = register_mosaic(mosaic, backend="numpy")
    err = result.positions - ashlar
    err -= err.mean(axis=0)
    assert np.linalg.norm(err, axis=1).max() <= 3.0  # Euclidean, every tile (0.74 px here)
    assert result.mean_ncc_before == pytest.approx(0.054, abs=0.001)
    assert result.mean_ncc_after >= mean_overlap_ncc(mosaic, positions=ashlar)


def test_czi_registration_matches_ashlar() -> None:
    """Tile 1 of the real CZI lands within 2 px of ASHLAR's offset from nominal."""
    pytest.importorskip("czifile")
    from gpufusion.readers.detect import read_tileset

    folder = needs(DATA / "czi_2tiles")
    tiles = read_tileset(folder / "mosaic_test.czi")
    mosaic = tiles.mosaics()[0]
    nominal = mosaic.positions()
    assert nominal[1].tolist() == [0.0, 832.0]
    result = register_mosaic(mosaic, backend="numpy", max_shift=30)
    moved = (result.positions[1] - result.positions[0]) - (nominal[1] - nominal[0])
    # ASHLAR: tile 0 at (1.6, 0.0), tile 1 at (0.0, 824.6) -> tile 1 moved (-1.6, -7.4)
    ashlar = np.array([0.0 - 1.6, 824.6 - 0.0]) - (nominal[1] - nominal[0])
    assert np.abs(moved - ashlar).max() <= 2.0, (moved, ashlar)


# ------------------------------------------------------------------------------------------
# GPU


def check_cupy_matches_numpy() -> None:
    """The CuPy path against the NumPy reference: pairs, then a whole registration."""
    syn = make_mosaic((4, 4), (256, 256), overlap=0.1, stage_error=10, seed=3, blank=[5])
    mosaic = syn.mosaic(syn.stage_positions)
    ref = measure_pairs(mosaic, max_shift=20, backend="numpy")
    gpu = measure_pairs(mosaic, max_shift=20, backend="cupy")
    assert gpu.backend == "cupy"
    np.testing.assert_array_equal(np.isfinite(gpu.ncc), np.isfinite(ref.ncc))
    np.testing.assert_allclose(gpu.shift, ref.shift, atol=2e-3)
    np.testing.assert_allclose(gpu.ncc, ref.ncc, atol=1e-4)
    with pytest.warns(RegistrationWarning):
        result = register_mosaic(mosaic, max_shift=20, backend="cupy")
    assert result.backend == "cupy"
    others = np.setdiff1d(np.arange(16), [5])
    assert rms_after_offset(result.positions[others], syn.positions[others]) <= 0.1


@pytest.mark.gpu
def test_cupy_backend_matches_numpy() -> None:
    ok, why = gpu_status()
    if not ok:
        pytest.skip(why)
    check_cupy_matches_numpy()


def test_cupy_path_on_strict_stand_in(monkeypatch) -> None:
    """The CuPy code path, run without a GPU on a stand-in that keeps CuPy's rules on the
    host/device boundary (tests/host_emulation/strict_cupy.py): no implicit conversions,
    no host arrays mixed into device operations. Same checks as the GPU test."""
    import sys

    from .host_emulation.strict_cupy import STATS, build_strict_cupy

    monkeypatch.setitem(sys.modules, "cupy", build_strict_cupy())
    STATS.clear()
    check_cupy_matches_numpy()
    assert STATS["fft"] > 0 and STATS["to_device"] > 0 and STATS["to_host"] > 0
    # the stand-in does refuse what CuPy refuses
    from .host_emulation.strict_cupy import DeviceArray

    d = sys.modules["cupy"].asarray(np.ones(3))
    with pytest.raises(TypeError):
        np.asarray(d)
    with pytest.raises(TypeError):
        d + np.ones(3)
    assert isinstance(np.float32(2) * d, DeviceArray)


def test_leica_wrong_stage_metadata_is_recovered_by_registration() -> None:
    """The Leica OME-XML StagePosition puts field 2 at ~969 px (wrong); registration on the
    channel the Fiji file uses (C01) still finds the (x, y) = (3.23, 936.75) offset."""
    from gpufusion.readers.detect import read_tileset

    folder = needs(DATA / "leica_2tiles" / "experiment--test")
    tiles = read_tileset(folder)
    assert tiles.n_channels == 2 and tiles.n_tiles == 2
    stage = tiles.positions()
    assert abs((stage[1] - stage[0])[0] - 968.8) < 1.0  # what the metadata says
    c01 = tiles.select_channel(1).mosaics()[0]
    result = register_mosaic(c01, backend="numpy", max_shift=80)
    offset = result.positions[1] - result.positions[0]
    assert np.abs(offset - [936.75, 3.23]).max() <= 1.0, offset


def test_cli_register_refuses_channel_names_a_csv_cannot_tell_apart(tmp_path: Path,
                                                                     monkeypatch) -> None:
    import dataclasses

    from gpufusion.cli import inputs
    from gpufusion.readers import open_tile
    from gpufusion.readers.tileset import tileset_from_positions

    rng = np.random.default_rng(0)
    files = []
    for k in range(4):
        files.append(tmp_path / f"t{k}.tif")
        tifffile.imwrite(files[-1], rng.integers(0, 255, (32, 32), dtype=np.uint8))

    two = tileset_from_positions([open_tile(f) for f in files],
                                 np.array([[0, 0], [0, 28], [0, 0], [0, 28]], float),
                                 [str(f) for f in files], tmp_path,
                                 channels=["A", "A", "B", "B"])
    assert two.n_channels == 2
    for names in (["GFP", "GFP"], ["GFP", " "]):  # e.g. from a BigStitcher XML
        ts = dataclasses.replace(two, channel_names=names)
        monkeypatch.setattr(inputs, "tileset_from_args", lambda args, ts=ts: ts)
        with pytest.raises(InputError, match="not distinct and non-empty"):
            cli_run([tmp_path / "t0.tif", "-o", tmp_path / "o.csv"])
        assert not (tmp_path / "o.csv").exists()


def test_cli_register_multichannel_csv_fuses_every_channel(tmp_path: Path, capsys) -> None:
    """``register`` on a two-channel OME-TIFF folder writes every channel's files (a
    ``channel`` column); fusing that CSV gives both channels, as ``fuse --register`` does."""
    import zarr

    from gpufusion.cli import main
    from gpufusion.readers.detect import read_tileset

    folder = needs(DATA / "leica_2tiles" / "experiment--test")
    opts = ["--reg-channel", "1", "--max-shift", "80", "--backend", "numpy", "-q"]
    assert main(["register", str(folder), "-o", str(tmp_path / "p.csv"), *opts]) == 0
    tiles = read_tileset(tmp_path / "p.csv")
    assert tiles.channel_names == ["C00", "C01"] and tiles.n_tiles == 2
    offset = tiles.positions()[1] - tiles.positions()[0]
    assert np.abs(offset - [936.75, 3.23]).max() <= 1.0
    assert main(["fuse", str(tmp_path / "p.csv"), "-o", str(tmp_path / "a.ome.zarr"),
                 "--backend", "numpy", "-q"]) == 0
    assert main(["fuse", str(folder), "--register", "-o", str(tmp_path / "b.ome.zarr"),
                 *opts]) == 0
    a = zarr.open_group(str(tmp_path / "a.ome.zarr"), mode="r")["0"][:]
    b = zarr.open_group(str(tmp_path / "b.ome.zarr"), mode="r")["0"][:]
    assert a.shape == b.shape and a.shape[0] == 2
    assert np.abs(a.astype(np.int64) - b).max() <= 1  # CSV positions carry 4 decimals


def test_fuse_register_report_has_edges_sidecar_and_respects_overwrite(tile_csv,
                                                                       tmp_path: Path,
                                                                       capsys) -> None:
    from gpufusion.cli import main

    src, _ = tile_csv
    report = tmp_path / "r.png"
    argv = ["fuse", str(src), "--register", "--max-shift", "10", "--backend", "numpy", "-q",
            "--report", str(report)]
    assert main([*argv, "-o", str(tmp_path / "a.ome.zarr")]) == 0
    with open(tmp_path / "r.edges.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 4 and sum(r["status"] == "kept" for r in rows) >= 4
    assert report.read_bytes().startswith(b"\x89PNG")
    stamp = report.stat().st_mtime_ns
    code = main([*argv, "-o", str(tmp_path / "b.ome.zarr")])  # the report exists now
    assert code == 2 and "r.png: already exists" in capsys.readouterr().err
    assert report.stat().st_mtime_ns == stamp and not (tmp_path / "b.ome.zarr").exists()
    assert main([*argv, "-o", str(tmp_path / "b.ome.zarr"), "--overwrite"]) == 0
