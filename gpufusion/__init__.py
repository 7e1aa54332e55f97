"""gpufusion: GPU-accelerated mosaic image fusion.

The flow, one module per stage::

    readers (positions files, tile images)  -> layout.Mosaic (tiles + affines + output grid)
    -> plan.plan_fusion (per output chunk: tiles, windows, inverse affines)
    -> fuse.fuse (dask map_blocks, one task per chunk; backends: numpy reference, cupy kernels)
    -> pyramid + writers.ome_zarr / writers.ome_tiff (multiscale OME-Zarr or pyramidal
       OME-TIFF, written atomically)

``pipeline.fuse_to_file`` runs the whole job; ``gpufusion.cli`` is the command line.

``import gpufusion`` is light: the public names below (and the submodules) are imported on
first use (PEP 562), so ``gpufusion --version`` or a script that needs only
:class:`InputError` does not load dask, zarr, scipy or tifffile.

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

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import InputError

__version__ = "0.1.0"

#: Public name -> the submodule defining it, imported on first access.
_LAZY = {
    "FuseResult": "pipeline",
    "FusionPlan": "plan",
    "Mosaic": "layout",
    "RegistrationResult": "registration",
    "Tile": "layout",
    "correct_mosaic": "correction",
    "fuse": "fuse",
    "fuse_to_file": "pipeline",
    "fuse_to_ome_zarr": "pipeline",
    "make_mosaic": "synthetic",
    "match_intensities": "intensity",
    "mosaic_from_affines": "layout",
    "mosaic_from_file": "readers",
    "mosaic_from_positions": "layout",
    "plan_fusion": "plan",
    "register_mosaic": "registration",
    "write_ome_tiff": "writers.ome_tiff",
    "write_ome_zarr": "writers.ome_zarr",
}

#: Submodules, reachable as attributes after a plain ``import gpufusion`` (imported on first
#: access, as they were when this module imported them all).
_SUBMODULES = frozenset({
    "backends", "bench", "blend", "cli", "cluster", "errors", "intensity", "layout",
    "pipeline", "plan",
    "pyramid", "readers", "registration", "sources", "spatial", "synthetic", "writers",
})

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .correction import correct_mosaic
    from .fuse import fuse
    from .intensity import match_intensities
    from .layout import Mosaic, Tile, mosaic_from_affines, mosaic_from_positions
    from .pipeline import FuseResult, fuse_to_file, fuse_to_ome_zarr
    from .plan import FusionPlan, plan_fusion
    from .readers import mosaic_from_file
    from .registration import RegistrationResult, register_mosaic
    from .synthetic import make_mosaic
    from .writers.ome_tiff import write_ome_tiff
    from .writers.ome_zarr import write_ome_zarr


def __getattr__(name: str) -> Any:
    """Import a public name's module, or a submodule, on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


class _Package(types.ModuleType):
    """This package's module type: ``gpufusion.fuse`` stays the function.

    Importing the submodule ``gpufusion.fuse`` (which every fusion does) makes the import
    system set the package attribute ``fuse`` to that module; the public name is the
    function :func:`gpufusion.fuse.fuse`, as it was when this module imported it eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "FuseResult",
    "FusionPlan",
    "InputError",
    "Mosaic",
    "RegistrationResult",
    "Tile",
    "__version__",
    "correct_mosaic",
    "fuse",
    "fuse_to_file",
    "fuse_to_ome_zarr",
    "make_mosaic",
    "match_intensities",
    "mosaic_from_affines",
    "mosaic_from_file",
    "mosaic_from_positions",
    "plan_fusion",
    "register_mosaic",
    "write_ome_tiff",
    "write_ome_zarr",
]
