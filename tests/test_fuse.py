"""Fusion against independent references: ground truth, scipy.ndimage, hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from gpufusion import fuse, mosaic_from_affines, mosaic_from_positions
from gpufusion.backends.numpy_ref import cast_output
from gpufusion.blend import BLEND_MODES
from gpufusion.errors import InputError
from gpufusion.synthetic import make_mosaic

from .conftest import psnr


def random_affine(rng: np.random.Generator, ndim: int, shift: float = 5.0) -> np.ndarray:
    """A well-conditioned random affine: rotation(s), anisotropic scale, shear, translation."""
    a = np.eye(ndim + 1)
    lin = np.eye(ndim)
    for i in range(ndim):
        for j in range(i + 1, ndim):
            t = rng.uniform(-0.5, 0.5)
            r = np.eye(ndim)
            r[[i, i, j, j], [i, j, i, j]] = [np.cos(t), -np.sin(t), np.sin(t), np.cos(t)]
            lin = r @ lin
    shear = np.eye(ndim) + np.triu(rng.uniform(-0.15, 0.15, (ndim, ndim)), 1)
    lin = lin @ np.diag(rng.uniform(0.8, 1.25, ndim)) @ shear
    a[:ndim, :ndim] = lin
    a[:ndim, ndim] = rng.uniform(-shift, shift, ndim)
    return a


# --- ground truth --------------------------------------------------------------------------


def test_integer_positions_reproduce_ground_truth_exactly() -> None:
    syn = make_mosaic((3, 3), (96, 96), overlap=0.15, integer_positions=True, seed=3)
    m = syn.mosaic()
    fused = fuse(m, chunks=(50, 37)).compute()
    truth = syn.ground_truth(m.origin, m.shape)
    covered = syn.coverage(m.origin, m.shape)
    assert np.abs(fused.astype(np.int64) - truth)[covered].max() <= 1
    # outside overlaps the fused pixels are the tile pixels themselves: exact copies
    count = np.zeros(m.shape, dtype=int)
    for p in syn.positions.astype(int):
        count[p[0]:p[0] + 96, p[1]:p[1] + 96] += 1
    for tile, p in zip(syn.tiles, syn.positions.astype(int), strict=True):
        region = (slice(p[0], p[0] + 96), slice(p[1], p[1] + 96))
        alone = count[region] == 1
        assert alone.any()
        np.testing.assert_array_equal(fused[region][alone], tile[alone])
    assert (fused[~covered] == 0).all()


def test_subpixel_positions_error_is_interpolation_only() -> None:
    syn = make_mosaic((3, 3), (256, 256), subpixel=2.0, seed=5)
    m = syn.mosaic()
    fused = fuse(m, chunks=128).compute()
    truth = syn.ground_truth(m.origin, m.shape)
    covered = syn.coverage(m.origin, m.shape)
    assert psnr(fused[covered], truth[covered]) >= 40.0
    # the error of linear interpolation alone on one tile, measured with scipy, bounds ours
    tile, pos = syn.tiles[4], syn.positions[4]
    frac = pos - np.floor(pos)
    shifted = ndi.shift(tile.astype(np.float64), frac, order=1, mode="nearest")
    lo = np.floor(pos).astype(int) + 2
    ref = syn.ground_truth(lo, (200, 200)).astype(np.float64)
    interp_err = np.abs(shifted[2:202, 2:202] - ref).max()
    ours = np.abs(fused[lo[0]:lo[0] + 200, lo[1]:lo[1] + 200].astype(np.float64) - ref).max()
    assert ours <= interp_err + 1.0


def test_3d_subpixel_mosaic_matches_ground_truth() -> None:
    syn = make_mosaic((2, 2, 2), (24, 40, 40), overlap=0.2, subpixel=1.5, seed=7)
    m = syn.mosaic()
    fused = fuse(m, chunks=(16, 20, 23)).compute()
    truth = syn.ground_truth(m.origin, m.shape)
    covered = syn.coverage(m.origin, m.shape)
    assert fused.shape == m.shape and fused.ndim == 3
    assert psnr(fused[covered], truth[covered]) >= 40.0


# --- scipy.ndimage.affine_transform ------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_affine_matches_scipy(ndim: int, dtype: str) -> None:
    rng = np.random.default_rng(11 + ndim)
    shape = (40, 50) if ndim == 2 else (14, 18, 22)
    src = rng.uniform(0, 5000, shape).astype(dtype)
    for _ in range(3):
        aff = random_affine(rng, ndim)
        m = mosaic_from_affines([src], [aff])
        ours = fuse(m, chunks=(16, 7) if ndim == 2 else (5, 7, 9)).compute()
        inv = np.linalg.inv(m.affines[0])
        ref = ndi.affine_transform(src.astype(np.float64), inv, output_shape=m.shape, order=1,
                                   mode="constant", cval=0.0)
        # compare where the sample point is clearly inside (or clearly outside) the tile
        grid = np.indices(m.shape).reshape(ndim, -1).astype(np.float64)
        q = inv[:ndim, :ndim] @ grid + inv[:ndim, ndim:]
        s = np.array(shape)[:, None]
        inside = np.all((q > 1e-3) & (q < s - 1 - 1e-3), axis=0).reshape(m.shape)
        outside = np.any((q < -1e-3) | (q > s - 1 + 1e-3), axis=0).reshape(m.shape)
        assert inside.mean() > 0.15
        if dtype == "uint16":
            ref = np.rint(ref)
            np.testing.assert_allclose(ours[inside], ref[inside], atol=1.0)
        else:
            np.testing.assert_allclose(ours[inside], ref[inside], rtol=1e-5, atol=1e-2)
        assert (ours[outside] == 0).all()


def test_subpixel_translation_matches_scipy_shift() -> None:
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    m = mosaic_from_positions([src], [(3.25, 7.6)], origin=(0, 0), output_shape=(80, 80))
    ours = fuse(m, chunks=33).compute()
    ref = ndi.shift(np.pad(src.astype(np.float64), ((0, 16), (0, 16))), (3.25, 7.6), order=1,
                    mode="constant")
    np.testing.assert_allclose(ours[4:66, 8:70], ref[4:66, 8:70], rtol=1e-5, atol=1e-6)
    assert (ours[:3] == 0).all() and (ours[:, :7] == 0).all()


# --- chunk invariance and algorithm agreement ----------------------------------------------


def _mixed_mosaic(rng: np.random.Generator, ndim: int, dtype: str = "uint16"):
    """2x2 tiles in the last two axes; odd tiles carry random affines, even ones sub-pixel
    translations."""
    shape = np.array((30, 36) if ndim == 2 else (10, 16, 18))
    tiles, affs = [], []
    for k in range(4):
        tiles.append(rng.integers(0, 60000, tuple(shape)).astype(dtype))
        a = random_affine(rng, ndim, shift=3.0) if k % 2 else np.eye(ndim + 1)
        step = np.zeros(ndim)
        step[-2:] = (k // 2, k % 2)
        a[:ndim, ndim] += 0.7 * shape * step + (rng.uniform(0, 1, ndim) if k % 2 == 0 else 0)
        affs.append(a)
    return mosaic_from_affines(tiles, affs)


@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_chunk_invariance(mode: str, ndim: int) -> None:
    m = _mixed_mosaic(np.random.default_rng(ndim), ndim)
    chunkings = [(16, 7), 13, 64, 1000] if ndim == 2 else [(5, 7, 6), 8, 100]
    results = [fuse(m, chunks=c, blend=mode).compute() for c in chunkings]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("mode", BLEND_MODES)
@pytest.mark.parametrize("interp", ["linear", "nearest"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_separable_and_general_algorithms_agree(mode: str, interp: str, ndim: int) -> None:
    syn = make_mosaic((2,) * ndim, (20, 26) if ndim == 2 else (8, 12, 14), overlap=0.3,
                      subpixel=1.0, seed=ndim)
    m = syn.mosaic()
    a = fuse(m, chunks=9, blend=mode, interpolation=interp, algorithm="general").compute()
    b = fuse(m, chunks=9, blend=mode, interpolation=interp, algorithm="separable").compute()
    np.testing.assert_array_equal(a, b)


# --- blending -----------------------------------------------------------------------------


def _gain_mosaic():
    rng = np.random.default_rng(4)
    gains = rng.uniform(0.8, 1.2, 9)
    tiles = [np.full((100, 100), 1000.0 * g, dtype=np.float32) for g in gains]
    pos = [(r * 85 + rng.uniform(0, 1), c * 85 + rng.uniform(0, 1))
           for r in range(3) for c in range(3)]
    return mosaic_from_positions(tiles, pos), gains


def _max_step(img: np.ndarray) -> float:
    return float(max(np.abs(np.diff(img, axis=0)).max(), np.abs(np.diff(img, axis=1)).max()))


@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_feathering_has_no_seams(mode: str) -> None:
    m, gains = _gain_mosaic()
    jump = 1000.0 * (gains.max() - gains.min())
    width = 6.0
    fused = fuse(m, chunks=64, blend=mode, blend_width=width).compute()
    inner = fused[2:-2, 2:-2]  # drop the ragged outer border of the sub-pixel layout
    # the gain difference is spread over the ramp: no step anywhere near a full seam
    bound = (2.0 if mode == "linear" else np.pi) * jump / width
    assert _max_step(inner) <= bound
    overlay = fuse(m, chunks=64, blend="overlay").compute()[2:-2, 2:-2]
    assert _max_step(overlay) > 0.5 * jump > _max_step(inner)


def test_blend_modes_on_two_constant_tiles() -> None:
    a = np.full((10, 10), 100, np.uint16)
    b = np.full((10, 10), 201, np.uint16)
    m = mosaic_from_positions([a, b], [(0, 0), (0, 6)])
    row = {mode: fuse(m, chunks=7, blend=mode).compute()[5] for mode in BLEND_MODES}
    assert row["average"][7] == 150  # 150.5 rounds half to even
    assert row["max"][7] == 201 and row["max"][2] == 100
    assert row["overlay"][7] == 201  # the tile listed last wins
    lin = row["linear"].astype(int)
    assert lin[0] == 100 and lin[-1] == 201 and (np.diff(lin) >= 0).all()
    assert np.all(row["cosine"][6:10] > 100) and np.all(row["cosine"][6:10] < 201)
    empty = mosaic_from_positions([a, b], [(0, 0), (0, 20)])
    assert (fuse(empty, chunks=8).compute()[:, 10:20] == 0).all()


def test_default_blend_width_is_half_the_overlap() -> None:
    from gpufusion.fuse import fusion_params

    m = mosaic_from_positions([np.zeros((100, 100), np.uint8)] * 2, [(0, 0), (0, 80)])
    assert fusion_params(m).blend_width == (10.0, 10.0)


# --- dtype policy and validation --------------------------------------------------------------


def test_output_dtype_policy() -> None:
    vals = np.array([-3.2, 0.5, 1.5, 2.5, 254.6, 300.7], dtype=np.float32)
    assert cast_output(vals, np.uint8).tolist() == [0, 0, 2, 2, 255, 255]
    assert cast_output(vals, np.float32).dtype == np.float32
    a = np.full((8, 8), 10, np.uint8)
    b = np.full((8, 8), 11, np.uint8)
    m = mosaic_from_positions([a, b], [(0, 0), (0, 4)])
    f32 = fuse(m, chunks=8, blend="average", dtype="float32").compute()
    assert f32.dtype == np.float32 and f32[0, 5] == pytest.approx(10.5)
    assert fuse(m, chunks=8, blend="average").compute()[0, 5] == 10  # 10.5 -> 10 (half-even)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blend": "feather"}, "blend: unknown mode"),
        ({"blend_width": -1.0}, "blend width"),
        ({"chunks": 0}, "chunk size must be >= 1"),
        ({"interpolation": "cubic"}, "interpolation: unknown"),
        ({"dtype": "bool"}, "dtype"),
    ],
)
def test_bad_options_raise_input_error(kwargs: dict, message: str) -> None:
    m = mosaic_from_positions([np.zeros((8, 8), np.uint8)], [(0, 0)])
    with pytest.raises(InputError, match=message):
        fuse(m, **kwargs)


def test_mixed_tiles_are_rejected() -> None:
    with pytest.raises(InputError, match="dtype"):
        mosaic_from_positions([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint16)],
                              [(0, 0), (0, 2)])
    with pytest.raises(InputError, match="dimensions"):
        mosaic_from_affines([np.zeros((4, 4)), np.zeros((4, 4, 4))],
                            [np.eye(3), np.eye(4)])
    with pytest.raises(InputError, match="empty"):
        mosaic_from_positions([], np.zeros((0, 2)))
    with pytest.raises(InputError, match="singular"):
        mosaic_from_affines([np.zeros((4, 4))], [np.diag([1.0, 0.0, 1.0])])


def test_dask_tiles_are_accepted() -> None:
    import dask.array as da

    syn = make_mosaic((2, 2), (40, 40), seed=9)
    lazy = [da.from_array(t, chunks=16) for t in syn.tiles]
    a = fuse(syn.mosaic(), chunks=25).compute()
    b = fuse(mosaic_from_positions(lazy, syn.positions), chunks=25).compute()
    np.testing.assert_array_equal(a, b)


def test_per_axis_blend_width_with_defaults() -> None:
    from gpufusion.fuse import fusion_params

    syn = make_mosaic((2, 2, 2), (12, 40, 40), overlap=0.25, seed=2)
    m = syn.mosaic()
    default = fusion_params(m).blend_width
    assert fusion_params(m, blend_width=(1.5, None, None)).blend_width == (1.5, *default[1:])
    # the z width is used (results differ) and both fusions stay faithful to the specimen
    a = fuse(m, chunks=20, blend_width=(1.0, None, None)).compute()
    b = fuse(m, chunks=20, blend_width=(4.0, None, None)).compute()
    assert (a != b).any()
    truth = syn.ground_truth(m.origin, m.shape)
    covered = syn.coverage(m.origin, m.shape)
    assert min(psnr(a[covered], truth[covered]), psnr(b[covered], truth[covered])) >= 40
