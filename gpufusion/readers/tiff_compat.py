"""The one place where gpufusion bridges tifffile API changes.

tifffile 2026.5.2 (Python 3.12+ only) removed ``TiffPageSeries.get_shape`` and
``get_axes``; from then on a series' full (unsqueezed) dimensions come from
``TiffFile.series(squeeze=False)``, which older releases (a plain list there) lack.
"""

from __future__ import annotations

from typing import Any


def series_dims(tif: Any, index: int) -> tuple[tuple[int, ...], str]:
    """Return the unsqueezed shape and axes of series ``index`` of an open TIFF.

    Unsqueezed means every axis the file declares is kept, singletons included
    (e.g. ``TCZYXS`` for an OME-TIFF), unlike the default ``series[index].shape``.

    Parameters
    ----------
    tif : tifffile.TiffFile
        The open file.
    index : int
        Series index; must exist.

    Returns
    -------
    shape : tuple of int
        Size of each axis.
    axes : str
        One tifffile axis code per dimension, in the order of ``shape``.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "cyx.ome.tif"
    >>> tifffile.imwrite(path, np.zeros((2, 8, 8), np.uint8), metadata={"axes": "CYX"})
    >>> with tifffile.TiffFile(path) as tif:
    ...     tif.series[0].shape, series_dims(tif, 0)
    ((2, 8, 8), ((1, 1, 2, 8, 8, 1), 'TZCYXS'))
    """
    if callable(tif.series):  # tifffile >= 2026.5.2: TiffFile.series(squeeze=...)
        full = tif.series(squeeze=False)[index]
        return tuple(full.shape), full.axes
    series = tif.series[index]  # tifffile < 2026.5.2: a list; get_shape/get_axes(False)
    return tuple(series.get_shape(False)), series.get_axes(False)
