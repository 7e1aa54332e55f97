"""Intensity matching between tiles (gpufusion.intensity, ``fuse --intensity-match``).

Every case is a synthetic mosaic cut from a known specimen with known per-tile gains (and
offsets): the truth the estimate is compared with is what undoes them, up to the global
scale the overlaps cannot see.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from gpufusion import InputError, fuse, mosaic_from_positions
from gpufusion.cli import main
from gpufusion.correction import correct_mosaic
from gpufusion.intensity import (
    IntensityWarning,
    estimate_intensity,
    match_channels,
    match_intensities,
    solve_intensity,
)
from gpufusion.synthetic import make_mosaic

from .tile_files import write_tile_csv


def undo(gains: np.ndarray) -> np.ndarray:
    """The correction that undoes per-tile ``gains``, normalised to mean 1."""
    g = 1.0 / np.asarray(gains, dtype=np.float64)
    return g / g.mean()


def scale_free_error(found: np.ndarray, truth: np.ndarray) -> float:
    """Largest relative error of ``found`` against ``truth`` after the best common scale."""
    ratio = np.asarray(found) / np.asarray(truth)
    return float(np.max(np.abs(ratio / np.exp(np.mean(np.log(ratio))) - 1.0)))


def textured_float_mosaic(grid=(3, 3), tile=96, gains=None, offsets=None, seed=5,
                          integer_positions=True):
    """float32 tiles ``(0.2 + 0.6 * specimen) * gain + offset`` (no clipping anywhere) and
    the truth ``0.2 + 0.6 * specimen``; returns (mosaic, truth on the output grid)."""
    syn = make_mosaic(grid, (tile, tile), overlap=0.25, dtype="float32", seed=seed,
                      integer_positions=integer_positions)
    n = len(syn.tiles)
    gains = np.ones(n) if gains is None else gains
    offsets = np.zeros(n) if offsets is None else offsets
    tiles = [((0.2 + 0.6 * t) * g + o).astype(np.float32)
             for t, g, o in zip(syn.tiles, gains, offsets, strict=True)]
    mosaic = mosaic_from_positions(tiles, syn.positions)
    truth = 0.2 + 0.6 * syn.ground_truth(mosaic.origin, mosaic.shape).astype(np.float64)
    return mosaic, truth


def max_step(img: np.ndarray) -> float:
    return float(max(np.abs(np.diff(img, axis=0)).max(), np.abs(np.diff(img, axis=1)).max()))


# --- the seam test and the error against the truth ------------------------------------------


def test_gain_steps_vanish_with_intensity_match() -> None:
    """The core suite's seam-gradient test (``test_fuse.test_feathering_has_no_seams``), on
    the ratio of the fused image to the truth (which removes the texture): with +-20 %
    gains a ramp of ``width`` px climbs the gain jump in steps of about jump / width; after
    matching no step is left."""
    gains = np.random.default_rng(4).uniform(0.8, 1.2, 9)
    mosaic, truth = textured_float_mosaic(gains=gains)
    jump = 1000.0 * (gains.max() - gains.min())
    width = 6.0

    def relative(m) -> np.ndarray:  # fused / truth, scaled as the core test's 1000 DN
        fused = fuse(m, chunks=64, blend="linear", blend_width=width).compute()
        return (1000.0 * fused / truth)[5:-5, 5:-5]  # inside the ragged outer border

    before = relative(mosaic)
    corrected, match = match_intensities(mosaic)
    after = relative(corrected)
    bound = 0.01 * jump / width  # 1 % of the step the ramp spreads the jump into
    assert max_step(before) > 0.25 * jump / width > bound  # fails without matching
    assert max_step(after) <= bound
    assert scale_free_error(match.gains, undo(gains)) <= 1e-3
    # relative RMS error against the truth (up to the global scale) drops accordingly
    fused_before = before / 1000.0
    fused_after = after / 1000.0
    rms_before = np.std(fused_before) / np.mean(fused_before)
    rms_after = np.std(fused_after) / np.mean(fused_after)
    assert rms_before > 0.05 and rms_after < 1e-3


@pytest.mark.parametrize("seed", [1, 7])
def test_recovers_known_gains_within_one_percent(seed: int) -> None:
    """uint16 tiles at sub-pixel positions, +-20 % gains."""
    syn = make_mosaic((4, 4), (96, 96), overlap=0.25, gain_spread=0.2, seed=seed)
    match = estimate_intensity(syn.mosaic())
    assert scale_free_error(match.gains, undo(syn.gains)) <= 0.01
    assert np.mean(match.gains) == pytest.approx(1.0)
    assert match.kept.sum() >= 24 and len(match.unmatched) == 0
    fixed = estimate_intensity(syn.mosaic(), reference=5)
    assert fixed.gains[5] == 1.0
    np.testing.assert_allclose(fixed.gains / fixed.gains.mean(), match.gains, rtol=1e-9)


def test_3d_tiles() -> None:
    syn = make_mosaic((1, 2, 2), (8, 48, 48), overlap=0.25, gain_spread=0.2, seed=2)
    match = estimate_intensity(syn.mosaic(), block=4)
    assert scale_free_error(match.gains, undo(syn.gains)) <= 0.01


def test_fused_error_drops_with_matching_on_uint16() -> None:
    syn = make_mosaic((3, 3), (96, 96), overlap=0.25, gain_spread=0.2,
                      integer_positions=True, seed=3)
    mosaic = syn.mosaic()
    truth = syn.ground_truth(mosaic.origin, mosaic.shape).astype(np.float64)
    ok = syn.coverage(mosaic.origin, mosaic.shape) & (truth < 0.75 * 65535)  # not clipped

    def rel_rms(m) -> float:
        fused = fuse(m, chunks=64).compute().astype(np.float64)[ok]
        scale = np.sum(fused * truth[ok]) / np.sum(truth[ok] ** 2)
        return float(np.sqrt(np.mean((fused - scale * truth[ok]) ** 2)) / np.mean(fused))

    corrected, _ = match_intensities(mosaic)
    before, after = rel_rms(mosaic), rel_rms(corrected)
    assert before > 0.05 and after < 0.005, (before, after)


# --- robustness ---------------------------------------------------------------------------


def test_blank_tile_is_left_alone_and_the_others_stay_right() -> None:
    """An empty field of view (a constant tile) says nothing about gains: its overlaps are
    dropped (no correlation), it keeps gain 1, a warning names it, the rest is right."""
    syn = make_mosaic((3, 3), (96, 96), overlap=0.25, gain_spread=0.2, blank=[4], seed=2)
    with pytest.warns(IntensityWarning, match="tile_1_1"):
        match = estimate_intensity(syn.mosaic())
    assert match.unmatched.tolist() == [4] and match.gains[4] == 1.0
    touching = (match.pairs == 4).any(axis=1)
    assert set(match.status[touching]) <= {"low_ncc", "few_samples"}
    others = np.arange(9) != 4
    assert scale_free_error(match.gains[others], undo(syn.gains)[others]) <= 0.01


def test_saturated_overlap_is_masked() -> None:
    """Tile 4 (the middle) saturated, as an overexposed camera clips: its brightest 40 %
    read as the dtype's maximum. Those pixels are masked out in every pair and the gains
    stay right; without the mask (and without residual rejection) they are not. A tile
    whose overlap is saturated whole has no usable samples there."""
    syn = make_mosaic((3, 3), (96, 96), overlap=0.25, gain_spread=0.2, seed=2)
    tile = syn.tiles[4]
    tile[tile > np.percentile(tile, 60)] = 65535
    match = estimate_intensity(syn.mosaic())
    assert scale_free_error(match.gains, undo(syn.gains)) <= 0.01
    unmasked = estimate_intensity(syn.mosaic(), saturation=np.inf, max_residual=10.0)
    assert scale_free_error(unmasked.gains, undo(syn.gains)) > 0.03
    syn.tiles[1][:, 60:] = 65535  # tile 1's whole overlap with tile 2
    match = estimate_intensity(syn.mosaic())
    pair = match.pairs.tolist().index([1, 2])
    assert match.status[pair] == "few_samples" and match.samples[pair] == 0
    assert scale_free_error(match.gains, undo(syn.gains)) <= 0.01


def test_inconsistent_pair_is_rejected_by_its_residual() -> None:
    """A bright artefact over the whole overlap of one pair (a lamp flash in one tile's
    strip) makes that pair disagree with the loops around it: dropped as ``residual``."""
    gains = np.random.default_rng(2).uniform(0.8, 1.2, 9)
    mosaic, _ = textured_float_mosaic(gains=gains)
    tiles = [np.array(t.source.read((slice(None),) * 2)) for t in mosaic.tiles]
    tiles[4][10:86, 70:] *= 1.5  # tile 4's overlap with tile 5 (to its right)
    bad = mosaic_from_positions(tiles, mosaic.positions())
    match = estimate_intensity(bad)
    dropped = match.pairs[match.status == "residual"].tolist()
    assert [4, 5] in dropped and len(dropped) <= 2  # and the diagonal (2, 4) it touches
    assert scale_free_error(match.gains, undo(gains)) <= 0.01
    plain = estimate_intensity(bad, max_residual=10.0)  # rejection off: tile 4 or 5 off
    assert scale_free_error(plain.gains, undo(gains)) > 0.02


def test_solve_from_samples_with_a_disconnected_group() -> None:
    """Two groups of tiles without a usable pair between them are normalised separately
    (each group's mean gain 1); a tile with no pair at all keeps 1 and is warned about."""
    rng = np.random.default_rng(0)
    scene = rng.uniform(100, 200, 40)
    truth = np.array([1.0, 1.25, 0.8, 1.1, 0.9])
    pairs = np.array([[0, 1], [2, 3]])
    samples = [(scene / truth[i], scene / truth[j]) for i, j in pairs]
    with pytest.warns(IntensityWarning, match="tile4"):
        m = solve_intensity(samples, pairs, 5)
    np.testing.assert_allclose(m.gains[:2], truth[:2] / truth[:2].mean(), rtol=1e-12)
    np.testing.assert_allclose(m.gains[2:4], truth[2:4] / truth[2:4].mean(), rtol=1e-12)
    assert m.gains[4] == 1.0 and m.unmatched.tolist() == [4]


# --- offsets ------------------------------------------------------------------------------


def test_gain_and_offset_mode_recovers_offsets() -> None:
    rng = np.random.default_rng(1)
    gains, offsets = rng.uniform(0.8, 1.2, 9), rng.uniform(-0.1, 0.1, 9)
    mosaic, _ = textured_float_mosaic(gains=gains, offsets=offsets, integer_positions=False)
    match = estimate_intensity(mosaic, mode="gain+offset")
    # corrected = raw * g + o with raw = x * G + O: g = s / G, o = -O s / G + c
    g_true = undo(gains)
    o_true = -offsets * g_true
    o_true -= o_true.mean()
    np.testing.assert_allclose(match.gains, g_true, rtol=0.01)
    np.testing.assert_allclose(match.offsets, o_true, atol=0.01 * 0.8)  # 1 % of the range
    assert np.mean(match.offsets) == pytest.approx(0.0, abs=1e-12)
    assert "offsets" in match.summary() and "offsets" in match.record()
    # a gain alone cannot absorb the offsets
    assert scale_free_error(estimate_intensity(mosaic).gains, g_true) > 0.05
    corrected = match.apply(mosaic)
    a = corrected.tiles[0].source.read((slice(72, 96), slice(0, 96)))
    b = corrected.tiles[3].source.read((slice(0, 24), slice(0, 96)))
    shift = mosaic.positions()[3] - mosaic.positions()[0]
    assert abs(shift[0] - 72) < 2.5  # the two windows show about the same place
    assert abs(float(np.mean(a) - np.mean(b))) < 0.01 * float(np.mean(a))


# --- with flat-field correction -----------------------------------------------------------


def test_gains_are_measured_on_flat_field_corrected_tiles() -> None:
    """Vignetting and per-tile gains together: the gains found on the flat-field corrected
    mosaic are the true ones, and applying them folds into the same correction."""
    syn = make_mosaic((3, 3), (96, 96), overlap=0.25, gain_spread=0.15, dtype="uint16",
                      integer_positions=True, seed=6)
    yy, xx = np.mgrid[:96, :96] / 95.0 - 0.5
    flat = (1.0 - 0.6 * (yy**2 + xx**2)).astype(np.float32)  # 30 % darker in the corners
    tiles = [np.rint(t * flat).astype(np.uint16) for t in syn.tiles]
    raw = mosaic_from_positions(tiles, syn.positions)
    flat_corrected = correct_mosaic(raw, flatfield=flat)
    corrected, match = match_intensities(flat_corrected)
    assert scale_free_error(match.gains, undo(syn.gains)) <= 0.01
    src = corrected.tiles[0].source
    assert len(src.steps) == 1 and src.steps[0].gain == pytest.approx(match.gains[0])


def test_saturation_is_tested_on_the_raw_pixels_of_flat_field_corrected_tiles() -> None:
    """A flat-field brighter than 1 at the right edge makes a saturated raw pixel (65535)
    read as about 50,000 once corrected: the mask looks at the raw pixels, so it still
    leaves it out; tested on the corrected values it would not."""
    syn = make_mosaic((2, 2), (96, 96), overlap=0.25, gain_spread=0.15, dtype="uint16",
                      integer_positions=True, seed=6)
    flat = np.broadcast_to(np.linspace(0.7, 1.3, 96, dtype=np.float32), (96, 96))
    tiles = [np.rint(np.minimum(t * flat, 65535)).astype(np.uint16) for t in syn.tiles]
    strip = tiles[0][:, 72:]
    strip[strip > np.percentile(strip, 50)] = 65535  # tile 0's overlap with tile 1
    raw = mosaic_from_positions(tiles, syn.positions)
    match = estimate_intensity(correct_mosaic(raw, flatfield=flat))
    assert scale_free_error(match.gains, undo(syn.gains)) <= 0.01
    values = [m.source.read((slice(None),) * 2) for m in correct_mosaic(raw, flatfield=flat).tiles]
    on_values = estimate_intensity(mosaic_from_positions(values, syn.positions),
                                   saturation=65535, max_residual=10.0)
    assert scale_free_error(on_values.gains, undo(syn.gains)) > 0.03


# --- bad input ----------------------------------------------------------------------------


def test_single_tile_and_no_overlap_are_input_errors() -> None:
    one = mosaic_from_positions([np.ones((16, 16), np.uint16)], [(0, 0)])
    with pytest.raises(InputError, match="only tile"):
        estimate_intensity(one)
    apart = mosaic_from_positions([np.ones((16, 16), np.uint16)] * 2, [(0, 0), (0, 40)])
    with pytest.raises(InputError, match="none of the 2 tiles overlap"):
        estimate_intensity(apart)
    with pytest.raises(InputError, match="unknown mode"):
        estimate_intensity(apart, mode="offset")
    with pytest.raises(InputError, match="reference tile 7"):
        estimate_intensity(apart, reference=7)
    with pytest.raises(InputError, match="pairs must join two different tiles"):
        estimate_intensity(apart, pairs=[[0, 2]])
    rotated = np.array([[0.0, -1, 30], [1, 0, 0], [0, 0, 1]])
    from gpufusion import mosaic_from_affines

    turned = mosaic_from_affines([np.ones((16, 16))] * 2, [np.eye(3), rotated])
    with pytest.raises(InputError, match="placed by translation"):
        estimate_intensity(turned)


def test_match_channels_turns_warnings_into_notices() -> None:
    syn = make_mosaic((2, 2), (96, 96), overlap=0.25, blank=[3], seed=2)
    said: list[str] = []
    mosaics, matches = match_channels([syn.mosaic(), syn.mosaic()], notify=said.append)
    assert len(mosaics) == len(matches) == 2
    assert len(said) == 2 and all("tile_1_1" in s and s.startswith("warning:") for s in said)


# --- command line -------------------------------------------------------------------------


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_fuse_with_intensity_match(tmp_path: Path, capsys) -> None:
    syn = make_mosaic((3, 3), (96, 96), overlap=0.25, gain_spread=0.2,
                      integer_positions=True, seed=3)
    csv = write_tile_csv(tmp_path, syn.tiles, syn.positions)
    out = tmp_path / "m.ome.zarr"
    code, stdout, err = run_cli(["fuse", csv, "-o", out, "--intensity-match",
                                 "--backend", "numpy", "--chunk", "64"], capsys)
    assert code == 0, err
    assert "intensity match (gain): gains" in stdout and "over 9 tiles" in stdout
    group = zarr.open_group(str(out), mode="r")
    fused = group["0"][...].astype(np.float64)
    record = group.attrs["gpufusion"]
    gains = np.array(record["intensity_match"]["gains"])
    assert scale_free_error(gains, undo(syn.gains)) <= 0.01
    truth = syn.ground_truth((0, 0), fused.shape).astype(np.float64)
    ok = syn.coverage((0, 0), fused.shape) & (truth < 0.75 * 65535)
    scale = np.sum(fused[ok] * truth[ok]) / np.sum(truth[ok] ** 2)
    assert np.sqrt(np.mean((fused[ok] - scale * truth[ok]) ** 2)) / np.mean(fused[ok]) < 0.005
    json.dumps(record)  # the record is plain JSON


def test_cli_offsets_and_registration(tmp_path: Path, capsys) -> None:
    syn = make_mosaic((2, 3), (96, 96), overlap=0.25, gain_spread=0.2, stage_error=4.0,
                      seed=8)
    csv = write_tile_csv(tmp_path, syn.tiles, syn.stage_positions)
    out = tmp_path / "r.ome.zarr"
    code, stdout, err = run_cli(["fuse", csv, "-o", out, "--register", "--max-shift", "12",
                                 "--intensity-offset", "--backend", "numpy",
                                 "--report", tmp_path / "reg.html"], capsys)
    assert code == 0, err
    assert "intensity match (gain+offset): gains" in stdout and "offsets" in stdout
    record = zarr.open_group(str(out), mode="r").attrs["gpufusion"]["intensity_match"]
    table = np.genfromtxt(tmp_path / "reg.gains.csv", delimiter=",", names=True, dtype=None,
                          encoding="utf-8")
    assert table.dtype.names == ("tile", "gain", "offset", "pairs_kept")
    np.testing.assert_allclose(table["gain"], record["gains"], atol=1e-6)
    np.testing.assert_allclose(table["offset"], record["offsets"], rtol=1e-5, atol=1e-3)
    assert (tmp_path / "reg.edges.csv").exists()
    # measured at the registered positions: at the stage positions (4 px off) the
    # offset mode's gains are 15-30 % off on this mosaic
    assert scale_free_error(np.array(record["gains"]), undo(syn.gains)) <= 0.01
    assert np.abs(record["offsets"]).max() < 0.01 * 65535  # the tiles have none


@pytest.mark.parametrize("positions", [[(0, 0)], [(0, 0), (0, 200)]],
                         ids=["single-tile", "no-overlap"])
def test_cli_nothing_to_match_exits_2(tmp_path: Path, capsys, positions) -> None:
    tiles = [np.full((32, 32), 100 + 10 * k, np.uint16) for k in range(len(positions))]
    csv = write_tile_csv(tmp_path, tiles, positions)
    code, stdout, err = run_cli(["fuse", csv, "-o", tmp_path / "x.ome.zarr",
                                 "--intensity-match", "--allow-sparse", "--backend", "numpy"],
                                capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpufusion: error: --intensity-match: ")
    assert "only tile" in lines[0] or "none of the 2 tiles overlap" in lines[0]
    assert not (tmp_path / "x.ome.zarr").exists()


def test_cli_matches_each_channel_on_its_own(tmp_path: Path, capsys) -> None:
    """Two channels of the same tiles with different gains (bleaching differs): one line
    and one record per channel, each with its own gains."""
    import tifffile

    syn = make_mosaic((2, 2), (96, 96), overlap=0.25, integer_positions=True, seed=4)
    rng = np.random.default_rng(9)
    per_channel = {"DAPI": rng.uniform(0.8, 1.2, 4), "GFP": rng.uniform(0.8, 1.2, 4)}
    lines = ["file,x,y,channel"]
    for name, gains in per_channel.items():
        for k, (tile, (y, x)) in enumerate(zip(syn.tiles, syn.positions, strict=True)):
            tifffile.imwrite(tmp_path / f"{name}{k}.tif",
                             np.rint(tile * gains[k] * 0.8).astype(np.uint16))
            lines.append(f"{name}{k}.tif,{float(x)!r},{float(y)!r},{name}")
    (tmp_path / "pos.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "c.ome.zarr"
    code, stdout, err = run_cli(["fuse", tmp_path / "pos.csv", "-o", out, "--intensity-match",
                                 "--backend", "numpy", "--register", "--report",
                                 tmp_path / "reg.svg"], capsys)
    assert code == 0, err
    assert "DAPI: intensity match (gain)" in stdout and "GFP: intensity match (gain)" in stdout
    records = zarr.open_group(str(out), mode="r").attrs["gpufusion"]["intensity_match"]
    assert len(records) == 2
    rows = (tmp_path / "reg.gains.csv").read_text().splitlines()
    assert rows[0] == "channel,tile,gain,offset,pairs_kept" and len(rows) == 1 + 2 * 4
    assert [r.split(",")[0] for r in rows[1:]] == ["DAPI"] * 4 + ["GFP"] * 4
    for record, gains in zip(records, per_channel.values(), strict=True):
        assert scale_free_error(np.array(record["gains"]), undo(gains)) <= 0.01


# --- real data ----------------------------------------------------------------------------


def side_overlap_steps(tiles: list[np.ndarray], pos: np.ndarray, gains: np.ndarray) -> list:
    """Per side-neighbour pair (overlap of more than 100 px along the shared edge), the
    relative difference of the two tiles' mean over their shared rectangle (positions
    rounded to pixels), after ``gains``."""
    steps = []
    shape = np.array(tiles[0].shape)
    for i in range(len(tiles)):
        for j in range(i + 1, len(tiles)):
            off = np.rint(pos[j] - pos[i]).astype(int)
            lo, hi = np.maximum(0, off), np.minimum(shape, off + shape)
            if np.any(hi - lo < 20) or np.all(hi - lo < 100):
                continue  # apart, or diagonal neighbours
            a = tiles[i][lo[0]:hi[0], lo[1]:hi[1]].astype(np.float64) * gains[i]
            b = tiles[j][lo[0] - off[0]:hi[0] - off[0],
                         lo[1] - off[1]:hi[1] - off[1]].astype(np.float64) * gains[j]
            steps.append(abs(a.mean() - b.mean()) / (0.5 * (a.mean() + b.mean())))
    return steps


def test_tma_overlap_steps_drop(data_dir: Path) -> None:
    """``tma_4x3`` at ASHLAR's positions: the brightness step across the side overlaps
    (measured here by plain slicing) drops from 5.5 % to about 1 % (median)."""
    import imageio.v3 as iio

    folder = data_dir / "tma_4x3"
    rows = np.loadtxt(folder / "DERIVED_ashlar1.20_positions.csv", delimiter=",")
    tiles, pos = [], []
    for tile, _ny, _nx, ay, ax in rows:
        r, c = divmod(int(tile), 3)
        tiles.append(iio.imread(folder / f"r{r}-c{c}.png"))
        pos.append((ay, ax))
    pos = np.array(pos)
    match = estimate_intensity(mosaic_from_positions(tiles, pos))
    before = side_overlap_steps(tiles, pos, np.ones(len(tiles)))
    after = side_overlap_steps(tiles, pos, match.gains)
    assert len(before) == 17
    assert np.median(before) > 0.04 and np.median(after) < np.median(before) / 3
