"""Listing a folder's files as tiles: what folder readers skip.

Readers that take every matching file of a folder as a tile (OME-TIFF folders, grids)
skip:

* hidden files and folders (names starting with ``.``), among them the temporary folders
  ``.NAME.tmp-XXXXXXXX`` in which gpufusion builds an output and ``.NAME.old-XXXXXXXX``
  holding one being replaced;
* TIFF files gpufusion wrote (:func:`is_gpufusion_output`): an output written beside the
  tiles is never read back as a tile by the next run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["is_gpufusion_output", "is_hidden", "visible_files"]

#: The TIFF ``Software`` tag gpufusion's OME-TIFF writer sets on the first page (the OME-XML
#: ``Creator`` is tifffile's, so it cannot tell).
GPUFUSION_SOFTWARE = "gpufusion"


def is_hidden(name: str) -> bool:
    """True for a hidden file or folder name (``.name``)."""
    return name.startswith(".")


def visible_files(folder: Path, recursive: bool = True) -> Iterator[Path]:
    """Files under ``folder`` that are not hidden, nor inside a hidden folder.

    Folders are visited in name order, files of a folder in name order.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for name in ("a.tif", ".b.tif", ".out.ome.tif.tmp-0123abcd/out.ome.tif", "s/c.tif"):
    ...     (d / name).parent.mkdir(parents=True, exist_ok=True)
    ...     _ = (d / name).write_bytes(b"")
    >>> [p.relative_to(d).as_posix() for p in visible_files(d)]
    ['a.tif', 's/c.tif']
    >>> [p.relative_to(d).as_posix() for p in visible_files(d, recursive=False)]
    ['a.tif']
    """
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if recursive and not is_hidden(d))
        for name in sorted(names):
            if not is_hidden(name):
                yield Path(root) / name


def is_gpufusion_output(path: Path) -> bool:
    """True for a TIFF whose first page says gpufusion wrote it (``Software`` tag).

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "tile.tif", np.zeros((4, 4), np.uint8))
    >>> tifffile.imwrite(d / "out.tif", np.zeros((4, 4), np.uint8), software="gpufusion")
    >>> is_gpufusion_output(d / "tile.tif"), is_gpufusion_output(d / "out.tif")
    (False, True)
    """
    if not path.name.lower().endswith((".tif", ".tiff")):
        return False
    import tifffile

    from .images import _quiet_tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path, is_ome=False) as tif:
            return bool(len(tif.pages)) and tif.pages[0].software == GPUFUSION_SOFTWARE
    except Exception:  # not a readable TIFF: the reader says so when it opens it as a tile
        return False
