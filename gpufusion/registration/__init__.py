"""Registration: correct stage-position errors before fusion (translations, 2D and 3D).

The flow, one module per step::

    pairwise.candidate_pairs   tiles whose nominal footprints overlap (spatial.overlapping_pairs)
    pairwise.measure_pairs     per pair: phase correlation on the widened overlap, the peak's
                               wrap-around aliases scored by NCC, NCC hill climbing,
                               sub-pixel refinement (refine.py); batched, NumPy or CuPy
    solve.solve_positions      weighted least squares over all positions (scipy.sparse),
                               residual-based outlier rejection, unregistered tiles placed
                               from their neighbours
    quality.overlap_ncc        reference-free score of positions: sub-pixel overlap NCC of
                               every overlapping pair
    report                     positions CSV (fuse input), edge table CSV, HTML/SVG/PNG picture

:func:`register_mosaic` runs them all and returns a :class:`RegistrationResult` whose
``mosaic`` carries the corrected translations.

Examples
--------
>>> import numpy as np
>>> from gpufusion.synthetic import make_mosaic
>>> from gpufusion.registration import register_mosaic
>>> syn = make_mosaic((2, 3), (128, 128), overlap=0.2, stage_error=4, seed=2)
>>> result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=10,
...                          backend="numpy")
>>> err = result.positions - syn.positions
>>> bool(np.abs(err - err.mean(axis=0)).max() < 0.05)
True
"""

from __future__ import annotations

from .pairwise import (
    PairMeasurements,
    candidate_pairs,
    default_max_shift,
    measure_pairs,
    translation_positions,
)
from .quality import mean_overlap_ncc, overlap_ncc, overlapping_tile_pairs
from .register import EdgeTable, RegistrationResult, RegistrationWarning, register_mosaic
from .report import edges_path_for, write_edges_csv, write_positions_csv, write_report
from .solve import SolveResult, solve_positions

__all__ = [
    "EdgeTable",
    "PairMeasurements",
    "RegistrationResult",
    "RegistrationWarning",
    "SolveResult",
    "candidate_pairs",
    "default_max_shift",
    "edges_path_for",
    "mean_overlap_ncc",
    "measure_pairs",
    "overlap_ncc",
    "overlapping_tile_pairs",
    "register_mosaic",
    "solve_positions",
    "translation_positions",
    "write_edges_csv",
    "write_positions_csv",
    "write_report",
]
