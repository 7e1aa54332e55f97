"""TileSet: what every input reader returns.

A :class:`TileSet` holds the tiles of one acquisition, already opened as lazy sources, one
list per channel, and one affine per tile mapping the tile's pixel index coordinates to
*world pixel* coordinates (index order ``(y, x)`` or ``(z, y, x)``, see
:mod:`gpufusion.layout`). All channels of a tile share its affine. :meth:`TileSet.mosaics`
turns it into one :class:`~gpufusion.layout.Mosaic` per channel, ready for
:func:`gpufusion.fuse`.

``pixel_size`` is the physical size of one *world* pixel (the output grid), per axis in
index order, in ``unit`` (an NGFF unit name such as ``"micrometer"``); ``None`` when the
input does not say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..layout import Mosaic, mosaic_from_affines, translation_affine
from ..sources import TileSource
from .positions import CHANNEL_POSITION_TOLERANCE

__all__ = ["LENGTH_UNITS", "MetadataWarning", "TileSet", "length_to_um", "ngff_length_unit",
           "tileset_from_positions"]


class MetadataWarning(UserWarning):
    """A reader left out physical metadata the input was not clear about (the command line
    shows it as a notice)."""

#: Length units accepted in OME-XML (and BigStitcher XML), in micrometres.
LENGTH_UNITS: dict[str, float] = {
    "km": 1e9, "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "pm": 1e-6, "Å": 1e-4,
    "angstrom": 1e-4, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
    "in": 25400.0, "inch": 25400.0, "ft": 304800.0, "mi": 1.609344e9,
    "reference frame": 1.0,
}

#: NGFF (UDUNITS-2) names of the length units gpufusion writes, by size in micrometres.
_NGFF_BY_FACTOR = {1e6: "meter", 1e4: "centimeter", 1e3: "millimeter", 1.0: "micrometer",
                   1e-3: "nanometer", 1e-4: "angstrom", 1e-6: "picometer", 25400.0: "inch"}


@dataclass(frozen=True)
class TileSet:
    """Tiles (per channel), their world affines and physical metadata.

    Attributes
    ----------
    sources : list of list of TileSource
        ``sources[c][t]`` is channel ``c`` of tile ``t``; every channel has the same tile
        count and, per tile, the same shape.
    affines : ndarray, shape (n_tiles, ndim + 1, ndim + 1)
        Tile pixel -> world pixel, index order; float64, read-only.
    names : list of str
        One name per tile (used in messages).
    channel_names : list of str
        One name per channel.
    pixel_size : tuple of float or None
        Physical size of one world pixel per axis (index order), if known.
    unit : str or None
        NGFF unit of ``pixel_size`` (e.g. ``"micrometer"``).
    source : Path
        The file or folder the tiles were read from.
    rgb : bool
        The channels are the R, G, B samples of colour tile files
        (:mod:`gpufusion.readers.rgb`): written as colour (OME-TIFF interleaved RGB) and
        registered on their luminance by default. False for everything else, three
        fluorescence channels included.

    Examples
    --------
    >>> import numpy as np
    >>> from gpufusion.layout import translation_affine
    >>> tiles = [np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8)]
    >>> ts = TileSet([tiles], np.stack([translation_affine((0, 0)), translation_affine((0, 6))]),
    ...              ["a", "b"], ["gray"], (0.5, 0.5), "micrometer", Path("."))
    >>> ts.ndim, ts.n_channels, ts.n_tiles, ts.mosaics()[0].shape
    (2, 1, 2, (8, 14))
    """

    sources: list[list[TileSource]]
    affines: np.ndarray
    names: list[str]
    channel_names: list[str]
    pixel_size: tuple[float, ...] | None
    unit: str | None
    source: Path
    rgb: bool = False

    def __post_init__(self) -> None:
        if not self.sources or not self.sources[0]:
            raise InputError(f"{self.source}: no tiles found")
        if self.rgb and len(self.sources) != 3:
            raise InputError(f"{self.source}: an RGB tile set has 3 channels, not "
                             f"{len(self.sources)}")
        n = len(self.sources[0])
        for c, channel in enumerate(self.sources):
            if len(channel) != n:
                raise InputError(
                    f"{self.source}: channel {c} has {len(channel)} tiles but channel 0 has {n}; "
                    "every tile needs every channel"
                )
        affines = np.array(self.affines, dtype=np.float64)
        if affines.ndim != 3 or affines.shape[0] != n or affines.shape[1] != affines.shape[2]:
            raise InputError(
                f"{self.source}: expected {n} square affines, got an array of shape "
                f"{affines.shape}"
            )
        affines.setflags(write=False)
        object.__setattr__(self, "affines", affines)
        if len(self.names) != n:
            raise InputError(f"{self.source}: {len(self.names)} tile names for {n} tiles")
        finite = np.isfinite(affines).all(axis=(1, 2))
        if not finite.all():
            t = int(np.argmin(finite))
            raise InputError(
                f"{self.source}: tile {self.names[t]!r} has a non-finite position or transform "
                f"(translation {affines[t, :-1, -1].tolist()}); positions must be finite numbers"
            )
        if len(self.channel_names) != len(self.sources):
            raise InputError(
                f"{self.source}: {len(self.channel_names)} channel names for "
                f"{len(self.sources)} channels"
            )
        if self.pixel_size is not None:
            size = tuple(float(p) for p in self.pixel_size)
            if len(size) != affines.shape[1] - 1 or not all(
                math.isfinite(p) and p > 0 for p in size
            ):
                raise InputError(
                    f"{self.source}: pixel size must be {affines.shape[1] - 1} positive "
                    f"numbers, got {size}"
                )
            object.__setattr__(self, "pixel_size", size)
        if self.unit is not None:
            from ..units import ngff_unit

            object.__setattr__(self, "unit", ngff_unit(self.unit, f"{self.source}: unit"))
        for t in range(n):
            shapes = {tuple(ch[t].shape) for ch in self.sources}
            if len(shapes) > 1:
                raise InputError(
                    f"{self.names[t]}: channels differ in shape {sorted(shapes)}; all channels "
                    "of a tile must have the same shape"
                )

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return int(self.affines.shape[1] - 1)

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return len(self.sources)

    @property
    def n_tiles(self) -> int:
        """Number of tiles (per channel)."""
        return len(self.sources[0])

    def positions(self) -> np.ndarray:
        """``(n_tiles, ndim)`` world position of each tile's pixel 0 (the translations)."""
        return self.affines[:, : self.ndim, self.ndim].copy()

    def mosaics(self) -> list[Mosaic]:
        """One :class:`~gpufusion.layout.Mosaic` per channel, all with the same affines.

        Returns
        -------
        list of Mosaic
            ``mosaics()[c]`` fuses channel ``c``; the output grids are identical.
        """
        return [
            mosaic_from_affines(
                channel,
                self.affines,
                names=[f"{name} [{cname}]" if self.n_channels > 1 else name
                       for name in self.names],
                pixel_size=self.pixel_size,
                unit=self.unit,
            )
            for channel, cname in zip(self.sources, self.channel_names, strict=True)
        ]

    def in_unit(self, unit: str, what: str = "unit") -> TileSet:
        """The same TileSet with its pixel size converted to ``unit`` (an NGFF unit name or
        abbreviation).

        Raises
        ------
        InputError
            Naming ``what`` (e.g. ``--unit``), for an unknown unit or a TileSet without a
            pixel size (nothing to convert).

        Examples
        --------
        >>> ts = tileset_from_positions([np.zeros((4, 4))], np.zeros((1, 2)), ["a"], Path("."),
        ...                             pixel_size=0.2405)
        >>> ts.in_unit("nm").pixel_size, ts.in_unit("nm").unit
        ((240.5, 240.5), 'nanometer')
        """
        from ..units import convert_length, ngff_unit

        target = ngff_unit(unit, what)
        if self.pixel_size is None:
            raise InputError(f"{what} {unit}: {self.source} gives no pixel size to convert; "
                             "give the pixel size with --pixel-size (in this unit)")
        size = tuple(convert_length(p, self.unit or "micrometer", target)
                     for p in self.pixel_size)
        return TileSet(self.sources, self.affines, self.names, self.channel_names, size, target,
                       self.source, self.rgb)

    def select_channel(self, channel: int | str) -> TileSet:
        """Return a TileSet holding only ``channel`` (an index or a channel name).

        Raises
        ------
        InputError
            If there is no such channel.
        """
        index = channel_index(self.channel_names, channel, self.source)
        return TileSet([self.sources[index]], self.affines, self.names,
                       [self.channel_names[index]], self.pixel_size, self.unit, self.source)


def length_to_um(value: float, unit: str | None, where: str) -> float:
    """Convert a length to micrometres; ``unit=None`` means micrometres.

    Raises
    ------
    InputError
        For an unknown unit, naming ``where`` (file and attribute).

    Examples
    --------
    >>> length_to_um(0.5, "mm", "x"), length_to_um(2.0, None, "x")
    (500.0, 2.0)
    """
    if unit is None:
        return float(value)
    factor = LENGTH_UNITS.get(unit.strip())
    if factor is None:
        raise InputError(
            f"{where}: unknown unit {unit!r}; expected one of "
            f"{', '.join(sorted(k for k in LENGTH_UNITS if len(k) <= 3))}"
        )
    return float(value) * factor


def ngff_length_unit(unit: str | None, where: str) -> str | None:
    """NGFF name of a length unit (``"µm"`` -> ``"micrometer"``); pixels give ``None``.

    Raises
    ------
    InputError
        For an unknown unit, naming ``where``.

    Examples
    --------
    >>> ngff_length_unit("µm", "x"), ngff_length_unit("nm", "x"), ngff_length_unit("pixel", "x")
    ('micrometer', 'nanometer', None)
    """
    if unit is None or unit.strip().lower() in ("pixel", "pixels", "px", ""):
        return None
    factor = length_to_um(1.0, unit, where)
    for size, name in _NGFF_BY_FACTOR.items():
        if abs(factor / size - 1) < 1e-9:
            return name
    raise InputError(f"{where}: unit {unit!r} has no NGFF name")


def channel_index(names: Sequence[str], channel: int | str, source: Path) -> int:
    """Resolve a channel given as an index or a name (an all-digit string is an index)."""
    if isinstance(channel, str) and not channel.strip().lstrip("-").isdigit():
        if channel in names:
            return list(names).index(channel)
        raise InputError(
            f"{source}: no channel named {channel!r}; channels are {list(names)}"
        )
    index = int(channel)
    if not 0 <= index < len(names):
        raise InputError(
            f"{source}: channel {index} does not exist; there are {len(names)} "
            f"channel(s): {list(names)}"
        )
    return index


def normalise_pixel_size(
    pixel_size: float | Sequence[float] | None, ndim: int, source: Path
) -> tuple[float, ...] | None:
    """One number for all axes, or one per axis (index order) -> a tuple of ``ndim``."""
    if pixel_size is None:
        return None
    if isinstance(pixel_size, int | float | np.floating | np.integer):
        values = (float(pixel_size),) * ndim
    else:
        values = tuple(float(p) for p in pixel_size)
        if len(values) == 1:
            values = values * ndim
    if len(values) != ndim or not all(math.isfinite(p) and p > 0 for p in values):
        raise InputError(
            f"{source}: pixel size must be one positive number or {ndim} (index order), "
            f"got {pixel_size!r}"
        )
    return values


def tileset_from_positions(
    sources: Sequence[TileSource],
    positions: np.ndarray,
    names: Sequence[str],
    source: Path,
    *,
    pixel_size: float | Sequence[float] | None = None,
    unit: str | None = None,
    channels: Sequence[str] | None = None,
) -> TileSet:
    """TileSet of tiles placed by translation (positions in world pixels).

    Without ``channels`` every source is a tile of one channel, ``"channel 0"``. With
    ``channels`` (one value per source, as :attr:`PositionTable.channels
    <gpufusion.readers.positions.PositionTable>` holds them), sources are grouped by
    channel value, channels in order of first appearance, and tile ``t`` of a channel is
    its ``t``-th source; tiles take the positions and names of the first channel's
    sources (as multi-channel OME-TIFF tiles are named after their first channel file).

    Parameters
    ----------
    sources : sequence of TileSource
    positions : ndarray, shape (n, ndim)
        Position of each source's pixel 0, index order.
    names : sequence of str
        One per source.
    source : Path
        The positions file or folder (for messages).
    pixel_size : float or sequence of float, optional
        Physical pixel size, one number or one per axis (index order).
    unit : str, optional
        Unit of ``pixel_size`` (default ``"micrometer"`` when a size is given).
    channels : sequence of str, optional
        The channel of every source.

    Raises
    ------
    InputError
        For a source whose dimensionality differs from the positions', channels with
        different tile counts, or a tile whose position differs between channels (by
        more than 1e-6 px).

    Examples
    --------
    >>> import numpy as np
    >>> ts = tileset_from_positions([np.zeros((4, 4))] * 2, np.array([[0, 0], [0, 3.5]]),
    ...                             ["a", "b"], Path("."), pixel_size=0.5)
    >>> ts.pixel_size, ts.unit, ts.positions().tolist()
    ((0.5, 0.5), 'micrometer', [[0.0, 0.0], [0.0, 3.5]])
    >>> ts = tileset_from_positions([np.zeros((4, 4))] * 4, np.array([[0, 0], [0, 3], [0, 0],
    ...                             [0, 3]]), ["a0", "b0", "a1", "b1"], Path("."),
    ...                             channels=["DAPI", "DAPI", "GFP", "GFP"])
    >>> ts.n_channels, ts.channel_names, ts.names, ts.positions().tolist()
    (2, ['DAPI', 'GFP'], ['a0', 'b0'], [[0.0, 0.0], [0.0, 3.0]])
    """
    pos = np.asarray(positions, dtype=np.float64)
    ndim = pos.shape[1]
    for src, name in zip(sources, names, strict=True):
        if len(src.shape) != ndim:
            raise InputError(
                f"{name}: image is {len(src.shape)}D but {source} gives {ndim}D positions"
            )
    size = normalise_pixel_size(pixel_size, ndim, source)
    if channels is None:
        rows = {"channel 0": list(range(len(sources)))}
    else:
        if len(channels) != len(sources):
            raise InputError(f"{source}: {len(channels)} channel values for "
                             f"{len(sources)} tile files")
        rows = {}
        for i, channel in enumerate(channels):
            rows.setdefault(str(channel), []).append(i)
    (first, ref), *others = rows.items() or {"channel 0": []}.items()
    for channel, members in others:
        if len(members) != len(ref):
            raise InputError(
                f"{source}: channel {channel!r} has {len(members)} tiles but channel "
                f"{first!r} has {len(ref)}; every channel needs the same number of tiles"
            )
        for t, (i, r) in enumerate(zip(members, ref, strict=True)):
            if np.abs(pos[i] - pos[r]).max() > CHANNEL_POSITION_TOLERANCE:
                raise InputError(
                    f"{source}: channel {channel!r} tile {t} ({names[i]}) is at "
                    f"{pos[i].tolist()} but channel {first!r} puts it at {pos[r].tolist()} "
                    "(index order); every channel of a tile needs the same position"
                )
    affines = (np.stack([translation_affine(pos[r]) for r in ref]) if ref
               else np.zeros((0, ndim + 1, ndim + 1)))
    return TileSet([[sources[i] for i in members] for members in rows.values()], affines,
                   [str(names[r]) for r in ref], list(rows),
                   size, (unit or "micrometer") if size is not None else None, Path(source))
