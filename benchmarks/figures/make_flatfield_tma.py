"""Make ``flatfield_tma.png`` (README): ``tma_4x3`` fused without and with ``--flatfield auto``.

Run from the repository root, with ``../shared/data`` beside it::

    python benchmarks/figures/make_flatfield_tma.py

The 12 tiles are placed at ASHLAR's positions (``DERIVED_ashlar1.20_positions.csv``), fused
as acquired and with the flat-field estimated from the tiles themselves, and both halves of
the picture are contrast-stretched with the same percentiles (of the uncorrected image),
so the tile grid's bands show on the left and not on the right. Each half is the whole slide
at 4x downsampling (2x mean, twice), to keep the file small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1].parent / "shared" / "data" / "tma_4x3"


def main() -> int:
    import imageio.v3 as iio

    from gpufusion import correct_mosaic, fuse, mosaic_from_positions
    from gpufusion.flatfield import estimate_profiles
    from gpufusion.pyramid import downsample_mean2
    from gpufusion.readers import open_tile

    if not DATA.is_dir():
        print(f"{DATA}: not found (../shared/data/tma_4x3)", file=sys.stderr)
        return 2
    rows = np.loadtxt(DATA / "DERIVED_ashlar1.20_positions.csv", delimiter=",")
    tiles = [open_tile(DATA / f"r{int(t) // 3}-c{int(t) % 3}.png") for t in rows[:, 0]]
    mosaic = mosaic_from_positions(tiles, rows[:, 3:5])
    flat = estimate_profiles(mosaic).flatfield
    images = [fuse(m, dtype="float32").compute()
              for m in (mosaic, correct_mosaic(mosaic, flatfield=flat))]
    lo, hi = np.percentile(images[0], [1, 99.5])
    halves = []
    for image in images:
        small = downsample_mean2(downsample_mean2(image, (2, 2)), (2, 2))
        halves.append(np.clip((small - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8))
    gap = np.full((halves[0].shape[0], 12), 255, np.uint8)
    iio.imwrite(HERE / "flatfield_tma.png", np.hstack([halves[0], gap, halves[1]]))
    print(HERE / "flatfield_tma.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
