"""gpufusion: GPU-accelerated mosaic image fusion.

The flow, one module per stage::

    readers (positions files, tile images)  -> layout.Mosaic (tiles + affines + output grid)
    -> plan.plan_fusion (per output chunk: tiles, windows, inverse affines)
    -> fuse.fuse (dask map_blocks, one task per chunk; backends: numpy reference, cupy kernels)
    -> pyramid + writers.ome_zarr (multiscale OME-Zarr, written atomically)

``pipeline.fuse_to_ome_zarr`` runs the whole job; ``gpufusion.cli`` is the command line.

Examples
--------
>>> import numpy as np, gpufusion
>>> tiles = [np.full((64, 64), v, np.uint16) for v in (100, 200)]
>>> mosaic = gpufusion.mosaic_from_positions(tiles, [(0, 0), (0, 48.5)])
>>> image = gpufusion.fuse(mosaic, chunks=32, blend="linear")   # lazy dask array
>>> image.shape, int(image[0, 0].compute()), int(image[0, -1].compute())
((64, 112), 100, 200)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import InputError
from .fuse import fuse
from .layout import Mosaic, Tile, mosaic_from_affines, mosaic_from_positions
from .pipeline import FuseResult, fuse_to_file, fuse_to_ome_zarr
from .plan import FusionPlan, plan_fusion
from .readers import mosaic_from_file
from .registration import RegistrationResult, register_mosaic
from .synthetic import make_mosaic
from .writers.ome_tiff import write_ome_tiff
from .writers.ome_zarr import write_ome_zarr

__all__ = [
    "FuseResult",
    "FusionPlan",
    "InputError",
    "Mosaic",
    "RegistrationResult",
    "Tile",
    "__version__",
    "fuse",
    "fuse_to_file",
    "fuse_to_ome_zarr",
    "make_mosaic",
    "mosaic_from_affines",
    "mosaic_from_file",
    "mosaic_from_positions",
    "plan_fusion",
    "register_mosaic",
    "write_ome_tiff",
    "write_ome_zarr",
]
