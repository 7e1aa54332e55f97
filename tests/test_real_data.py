"""Fusion of the real tile sets in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from gpufusion import fuse, mosaic_from_file, mosaic_from_positions
from gpufusion.readers import open_tile


def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_tma_at_ashlar_positions_matches_reference_stitch(data_dir: Path) -> None:
    folder = data_dir / "tma_4x3"
    rows = np.loadtxt(folder / "DERIVED_ashlar1.20_positions.csv", delimiter=",")
    tiles, pos = [], []
    for tile, _ny, _nx, ay, ax in rows:
        r, c = divmod(int(tile), 3)
        tiles.append(open_tile(folder / f"r{r}-c{c}.png"))
        pos.append((ay, ax))
    mosaic = mosaic_from_positions(tiles, pos)
    fused = fuse(mosaic, chunks=512).compute()
    assert abs(fused.shape[0] - 1874) <= 2 and abs(fused.shape[1] - 1421) <= 2
    assert fused.dtype == np.uint8
    merged = iio.imread(folder / "merged.png")
    if merged.ndim == 3:
        merged = merged[..., :3].mean(axis=2)
    h, w = min(fused.shape[0], merged.shape[0]), min(fused.shape[1], merged.shape[1])
    score = ncc(block_mean(fused[:h, :w], 8), block_mean(merged[:h, :w], 8))
    assert score >= 0.95, score


def test_leica_registered_configuration(data_dir: Path) -> None:
    folder = data_dir / "leica_2tiles/experiment--test/slide--S00/chamber--U00--V00"
    mosaic = mosaic_from_file(folder / "TileConfiguration.registered.txt")
    assert len(mosaic) == 2
    fused = fuse(mosaic, chunks=512, blend="linear").compute()
    # (x, y) = (3.2326183, 936.7469): rows floor(936.7469 + 1023) + 1, columns floor(1026.23) + 1
    assert fused.shape == (1960, 1027)
    first = mosaic.tiles[0].source.read((slice(0, 1024), slice(0, 1024)))
    second = mosaic.tiles[1].source.read((slice(0, 1024), slice(0, 1024)))
    # above the overlap only the first tile contributes, at integer position: exact copy
    np.testing.assert_array_equal(fused[:930, :1024], first[:930])
    # inside the overlap the two registered tiles agree: the fused image matches both
    ov = fused[945:1015, 10:1000].astype(np.float64)
    assert ncc(ov, first[945:1015, 10:1000]) > 0.75
    assert ncc(ov, second[8:78, 7:997]) > 0.75
