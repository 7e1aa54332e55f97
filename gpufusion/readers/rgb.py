"""RGB and RGBA tile files, read as three channels (R, G, B) fused with the same transforms.

Brightfield scanners (H&E, IHC) write colour tiles: 8- or 16-bit RGB or RGBA TIFFs (samples
interleaved or in planes, stripped or tiled, JPEG-compressed scanner tiles included), PNGs
and JPEGs. :func:`open_tile_channels` opens such a file as three lazy, picklable
:class:`SampleSource` objects, one per colour channel; a grayscale file stays one source
(:func:`~gpufusion.readers.images.open_tile`). The first read of any of the three decodes
the file once into the process-wide tile cache (as three planes), so the channels share it.

Alpha
    The alpha sample of an RGBA file is **ignored**: the colour samples are fused as they
    are stored (not premultiplied), and a tile covers its whole rectangle. Scanner tiles
    carry an opaque alpha, if any.

Registration
    An RGB tile set registers on its luminance by default, ``Y = 0.2126 R + 0.7152 G +
    0.0722 B`` (ITU-R BT.709 weights, as for sRGB; :class:`LuminanceSource`), or on one
    channel chosen with ``--reg-channel R|G|B`` (or 0, 1, 2).

A tile set is all RGB or all grayscale: :func:`open_tiles` refuses a mix, naming a file of
each kind. A :class:`~gpufusion.readers.tileset.TileSet` read from RGB tiles has
``rgb=True``; :func:`gpufusion.pipeline.fuse_to_file` then writes OME-Zarr channels R, G, B
coloured red, green and blue, and OME-TIFF as interleaved RGB (Photometric RGB,
``SamplesPerPixel=3``) at every pyramid level.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from ..layout import Mosaic, mosaic_from_affines
from ..sources import TileSource, Window
from .images import (
    _OME_INDEX_MESSAGE,
    _PNG_MAGIC,
    _TIFF_MAGIC,
    _TILE_CACHE,
    CachedTileSource,
    _check_dtype,
    _check_size,
    _fail,
    _one_line,
    _quiet_tifffile,
    _squeeze_tiff_axes,
    decode_image,
    file_stamp,
    open_tile,
)
from .library_logs import TIFFFILE_LOG
from .tiff_bounds import check_contiguous, check_segments
from .tileset import TileSet, channel_index, tileset_from_positions

__all__ = ["LUMA_WEIGHTS", "RGB_CHANNELS", "RGB_COLORS", "LuminanceSource", "SampleSource",
           "TileFiles", "luminance_mosaic", "open_tile_channels", "open_tiles",
           "registration_mosaic"]

#: Channel names of an RGB tile set, in sample order.
RGB_CHANNELS = ("R", "G", "B")

#: Display colours (``RRGGBB``) of the R, G and B channels.
RGB_COLORS = ("FF0000", "00FF00", "0000FF")

#: Luminance weights of R, G, B: ITU-R BT.709 (the sRGB primaries), as
#: ``skimage.color.rgb2gray`` uses.
LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)

#: Name ``--reg-channel`` takes for the luminance of an RGB tile set (its default there).
LUMINANCE = "luminance"

_PILLOW_RGB_MODES = ("RGB", "RGBA", "P", "PA", "RGBX", "RGBa")


class SampleSource(CachedTileSource):
    """One colour sample (R, G or B) of an RGB or RGBA image file.

    ``shape`` is the spatial shape (``(y, x)`` or ``(z, y, x)``). The first read of any
    sample of a file decodes the file whole into the tile cache as ``(3, *shape)`` planes
    (alpha dropped); ``read(window)`` returns a read-only view of this sample's plane.
    Pickles as the path plus header facts. Created by :func:`open_tile_channels`.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> path = Path(tempfile.mkdtemp()) / "rgb.tif"
    >>> rgb = np.zeros((2, 3, 3), np.uint8)
    >>> rgb[..., 1] = 7
    >>> tifffile.imwrite(path, rgb)
    >>> r, g, b = open_tile_channels(path)
    >>> g.shape, g.read((slice(0, 1), slice(None))).tolist(), int(r.read((slice(0, 1),)).max())
    ((2, 3), [[7, 7, 7]], 0)
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        dtype: np.dtype,
        name: str,
        stamp: tuple[int, int],
        decoder: Literal["tiff", "pillow"],
        sample: int,
        sample_axis: int,
    ) -> None:
        super().__init__(path, shape, dtype, name, stamp)
        self.decoder = decoder
        self.sample = sample
        self.sample_axis = sample_axis  # where the decoder puts the samples

    @property
    def _key(self) -> tuple[Any, ...]:  # one per sample (dask tokens, messages)
        return (*super()._key, "sample", self.sample)

    @property
    def _file_key(self) -> tuple[Any, ...]:  # the decoded file, shared by its samples
        return (str(self.path), *self._stamp, "samples")

    def _decode(self) -> np.ndarray:
        """The file's R, G, B samples as a ``(3, *shape)`` array."""
        self._check_unchanged()
        array = decode_image(self.path, "tiff-local" if self.decoder == "tiff" else "pillow")
        if array.ndim <= self.sample_axis or array.shape[self.sample_axis] < 3:
            raise _fail(self.path, f"decoded shape {array.shape} has no RGB samples")
        planes = np.moveaxis(array, self.sample_axis, 0)[:3]
        if planes[0].size != int(np.prod(self.shape)):
            raise _fail(self.path, f"decoded shape {array.shape} does not match {self.shape}")
        return np.ascontiguousarray(planes.reshape(3, *self.shape), dtype=self.dtype)

    def read(self, window: Window) -> np.ndarray:
        """Return this sample's pixels in ``window`` as a read-only view of the cached file."""
        return _TILE_CACHE.get(self._file_key, self._decode)[self.sample][tuple(window)]


class LuminanceSource:
    """The luminance of three colour sources, ``sum(w_c * channel_c)`` in float32.

    ``weights`` default to :data:`LUMA_WEIGHTS` (ITU-R BT.709). Picklable when its sources
    are. Used to register RGB tiles (:func:`registration_mosaic`).

    Examples
    --------
    >>> from gpufusion.sources import ArraySource
    >>> chans = [ArraySource(np.full((2, 2), v, np.uint8)) for v in (100, 200, 50)]
    >>> lum = LuminanceSource(chans, "tile")
    >>> lum.dtype, round(float(lum.read((slice(None), slice(None)))[0, 0]), 3)
    (dtype('float32'), 167.91)
    """

    def __init__(self, channels: Sequence[TileSource], name: str,
                 weights: Sequence[float] = LUMA_WEIGHTS) -> None:
        if len(channels) != 3 or len(weights) != 3:
            raise InputError(f"{name}: luminance needs 3 colour channels and 3 weights")
        self.channels = list(channels)
        self.weights = tuple(float(w) for w in weights)
        self.shape = tuple(channels[0].shape)
        self.dtype = np.dtype(np.float32)
        self.name = name
        self.path = getattr(channels[0], "path", None)

    def read(self, window: Window) -> np.ndarray:
        out = np.zeros(np.empty(self.shape, bool)[tuple(window)].shape, np.float32)
        for weight, channel in zip(self.weights, self.channels, strict=True):
            out += np.float32(weight) * np.asarray(channel.read(window), dtype=np.float32)
        return out

    def __repr__(self) -> str:
        return f"LuminanceSource({self.name!r}, shape={self.shape}, weights={self.weights})"


# --- opening ------------------------------------------------------------------------------


def _tiff_rgb(path: Path, name: str, stamp: tuple[int, int]) -> list[SampleSource] | None:
    """Three sample sources for an RGB(A) TIFF, or None when the TIFF is not RGB (then
    :func:`~gpufusion.readers.images.open_tile` checks and explains it).

    An RGB TIFF gets the checks ``open_tile`` makes: sample count, pixel type, codec, and
    that its strips or tiles can hold what the header claims (no allocation a damaged or
    hostile header asks for); what tifffile logs about it is an error naming it.
    """
    import tifffile

    with _quiet_tifffile(), TIFFFILE_LOG.capture() as captured:
        try:
            tif = tifffile.TiffFile(path, is_ome=False)
        except Exception:  # not a readable TIFF: open_tile explains
            return None
        with tif:
            try:
                series = tif.series[0] if tif.series else None
                keyframe = None if series is None else series.keyframe
            except Exception:  # corrupt IFDs: open_tile explains
                return None
            colour = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            if series is None or keyframe.photometric not in colour or "S" not in series.axes:
                return None
            try:
                spatial, samples, dtype = _check_rgb_series(path, series, stamp[0])
            except InputError:
                raise
            except Exception as exc:  # corrupt IFDs surface while walking the series
                raise _fail(path, f"corrupt or truncated TIFF ({type(exc).__name__}: "
                            f"{_one_line(exc)})") from None
    messages = [m for m in captured if _OME_INDEX_MESSAGE not in m]
    if messages:
        more = f" (and {len(messages) - 1} more warnings)" if len(messages) > 1 else ""
        raise _fail(path, f"damaged TIFF: {messages[0]}{more}")
    s = series.axes.index("S")
    return [SampleSource(path, spatial, dtype, name, stamp, "tiff", k, s) for k in range(3)]


def _check_rgb_series(path: Path, series: Any, file_size: int
                      ) -> tuple[tuple[int, ...], int, np.dtype]:
    """``(spatial shape, samples, dtype)`` of an RGB(A) TIFF series, checked."""
    from tifffile import TIFF

    axes, shape = series.axes, tuple(int(n) for n in series.shape)
    s = axes.index("S")
    samples = shape[s]
    if samples not in (3, 4):
        raise _fail(path, f"RGB TIFF with {samples} samples per pixel (series axes {axes!r} "
                    f"shape {shape}): only RGB (3) or RGBA (4) is read")
    dtype = _check_dtype(path, series.dtype)
    spatial = _squeeze_tiff_axes(path, shape[:s] + shape[s + 1:], axes[:s] + axes[s + 1:])
    _check_size(path, spatial)
    keyframe = series.keyframe
    if keyframe.compression != 1 and keyframe.compression not in TIFF.DECOMPRESSORS:
        raise _fail(path, f"TIFF compression {keyframe.compression!r} cannot be decoded here "
                    "(it needs the 'imagecodecs' package)")
    if keyframe.predictor != 1 and keyframe.predictor not in TIFF.UNPREDICTORS:
        raise _fail(path, f"TIFF predictor {keyframe.predictor!r} not supported")
    if series.dataoffset is not None:
        check_contiguous(path, series, dtype, (samples, *spatial), file_size)
    else:
        check_segments(path, series, dtype)
    return spatial, samples, dtype


def _png_bit_depth(path: Path) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` from a PNG's IHDR chunk."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if not head.startswith(_PNG_MAGIC) or len(head) < 26 or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _pillow_rgb(path: Path, name: str, stamp: tuple[int, int]) -> list[SampleSource] | None:
    """Three sample sources for an RGB(A) PNG, JPEG or other Pillow image, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, size, frames = im.mode, im.size, getattr(im, "n_frames", 1)
    except Exception:  # not readable here: open_tile explains
        return None
    if mode not in _PILLOW_RGB_MODES or frames != 1:
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            raise _fail(path, f"{mode} colour image: only RGB or RGBA colour tiles are read "
                        "(convert it to RGB)")
        return None
    depth = _png_bit_depth(path)
    if depth is not None and depth[0] == 16 and depth[1] in (2, 6):
        raise _fail(path, "16-bit RGB PNG: Pillow reads it as 8 bits per sample, which would "
                    "lose data; save 16-bit colour tiles as TIFF")
    shape = (int(size[1]), int(size[0]))
    _check_size(path, shape)
    return [SampleSource(path, shape, np.dtype(np.uint8), name, stamp, "pillow", k, 2)
            for k in range(3)]


def open_tile_channels(path: str | os.PathLike[str], *, name: str | None = None
                       ) -> list[TileSource]:
    """Open an image file as its channels: three for RGB or RGBA, one for grayscale.

    RGB(A) TIFFs (photometric RGB or YCbCr, 3 or 4 samples, interleaved or planar, any
    compression tifffile decodes), PNGs and JPEGs become three :class:`SampleSource`
    (R, G, B; alpha ignored). Anything else is :func:`~gpufusion.readers.images.open_tile`.

    Raises
    ------
    InputError
        Naming the file: as :func:`~gpufusion.readers.images.open_tile`, and for colour
        TIFFs with a sample count other than 3 or 4, CMYK or other colour models, and
        16-bit RGB PNGs (Pillow would reduce them to 8 bits).

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "rgb.tif", np.zeros((3, 8, 6), np.uint16), photometric="rgb",
    ...                  planarconfig="separate")
    >>> tifffile.imwrite(d / "gray.tif", np.zeros((8, 6), np.uint16))
    >>> [(s.shape, s.dtype.name) for s in open_tile_channels(d / "rgb.tif")]
    [((8, 6), 'uint16'), ((8, 6), 'uint16'), ((8, 6), 'uint16')]
    >>> len(open_tile_channels(d / "gray.tif"))
    1
    """
    file_path = Path(path)
    tile_name = file_path.name if name is None else name
    stamp = file_stamp(file_path)
    try:
        with open(file_path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        head = b""  # open_tile explains
    found = None
    if head[:4] in _TIFF_MAGIC:
        found = _tiff_rgb(file_path, tile_name, stamp)
    elif head:
        found = _pillow_rgb(file_path, tile_name, stamp)
    return list(found) if found is not None else [open_tile(file_path, name=name)]


@dataclass(frozen=True)
class TileFiles:
    """Tile files opened as channels (:func:`open_tiles`).

    Attributes
    ----------
    channels : list of list of TileSource
        ``channels[i]`` are file ``i``'s channels: one source for grayscale, three (R, G,
        B) for RGB.
    rgb : bool
        Whether the files are RGB (then every one is).
    """

    channels: list[list[TileSource]]
    rgb: bool

    @property
    def first(self) -> list[TileSource]:
        """The first channel of every file (all of a grayscale set)."""
        return [c[0] for c in self.channels]

    def tileset(self, positions: np.ndarray, names: Sequence[str], source: Path, *,
                pixel_size: float | Sequence[float] | None = None, unit: str | None = None,
                channels: Sequence[str] | None = None) -> TileSet:
        """The :class:`~gpufusion.readers.tileset.TileSet` of these files at ``positions``.

        Grayscale files are as :func:`~gpufusion.readers.tileset.tileset_from_positions`
        makes them (``channels``: a CSV channel column); RGB files give the channels R, G,
        B and ``rgb=True`` (a channel column is refused: an RGB file holds all three).
        """
        if not self.rgb:
            return tileset_from_positions(self.first, positions, names, source,
                                          pixel_size=pixel_size, unit=unit, channels=channels)
        if channels is not None and len(set(channels)) > 1:
            raise InputError(f"{source}: lists RGB tile files in {len(set(channels))} "
                             "channels (a channel column); an RGB file holds its three colour "
                             "channels, so list each tile once, without a channel column")
        n = len(self.channels)
        tiles = tileset_from_positions(
            [c[k] for k in range(3) for c in self.channels], np.tile(positions, (3, 1)),
            list(names) * 3, source, pixel_size=pixel_size, unit=unit,
            channels=[name for name in RGB_CHANNELS for _ in range(n)])
        return TileSet(tiles.sources, tiles.affines, tiles.names, tiles.channel_names,
                       tiles.pixel_size, tiles.unit, tiles.source, rgb=True)


def open_tiles(files: Sequence[str | os.PathLike[str]], source: str | os.PathLike[str]
               ) -> TileFiles:
    """Open tile files as channels (:func:`open_tile_channels`), all RGB or all grayscale.

    Raises
    ------
    InputError
        For any unreadable file, and when RGB and grayscale files are mixed: the message
        names one file of each kind.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "a.tif", np.zeros((8, 6, 3), np.uint8))
    >>> tifffile.imwrite(d / "b.tif", np.zeros((8, 6), np.uint8))
    >>> open_tiles([d / "a.tif"], d).rgb
    True
    >>> try:
    ...     open_tiles([d / "a.tif", d / "b.tif"], d)
    ... except InputError as exc:
    ...     print(str(exc).split(": ", 1)[1].replace(str(d), "D")[:60])
    mixes RGB and grayscale tiles: D/a.tif is RGB, D/b.tif is gr
    """
    opened = [open_tile_channels(f) for f in files]
    colour = [len(c) == 3 for c in opened]
    if any(colour) and not all(colour):
        rgb_file, gray_file = files[colour.index(True)], files[colour.index(False)]
        raise InputError(f"{source}: mixes RGB and grayscale tiles: {rgb_file} is RGB, "
                         f"{gray_file} is grayscale; every tile of a set must be one or the "
                         "other")
    return TileFiles(opened, bool(opened) and all(colour))


# --- registration -------------------------------------------------------------------------


def luminance_mosaic(channels: Sequence[Mosaic], names: Sequence[str] | None = None
                     ) -> Mosaic:
    """The luminance (:data:`LUMA_WEIGHTS`) of an R, G, B mosaic triple, same affines;
    tiles named ``names`` (default: the R channel's tile names).

    Examples
    --------
    >>> from gpufusion.layout import mosaic_from_positions
    >>> chans = [mosaic_from_positions([np.full((4, 4), v, np.uint8)], [[0, 0]])
    ...          for v in (10, 20, 30)]
    >>> lum = luminance_mosaic(chans)
    >>> lum.dtype, round(float(lum.tiles[0].source.read((slice(0, 1), slice(0, 1)))[0, 0]), 3)
    (dtype('float32'), 18.596)
    """
    if len(channels) != 3:
        raise InputError(f"luminance: needs the R, G, B channels, got {len(channels)}")
    first = channels[0]
    names = [t.name for t in first.tiles] if names is None else [str(n) for n in names]
    sources = [LuminanceSource([m.tiles[t].source for m in channels], names[t])
               for t in range(len(first))]
    return mosaic_from_affines(sources, [t.affine for t in first.tiles], names=names,
                               pixel_size=first.pixel_size, unit=first.unit)


def registration_mosaic(channels: Sequence[Mosaic], channel_names: Sequence[str], rgb: bool,
                        channel: int | str | None, source: Path,
                        names: Sequence[str] | None = None) -> Mosaic:
    """The mosaic to register on: ``channel`` (index or name), or for ``None`` channel 0,
    or the luminance of an RGB set (``None`` or ``"luminance"``; tiles named ``names``).

    Raises
    ------
    InputError
        For a channel that does not exist (``"luminance"`` without RGB tiles included).
    """
    if rgb and (channel is None or str(channel).lower() == LUMINANCE):
        return luminance_mosaic(channels, names)
    if channel is not None and str(channel).lower() == LUMINANCE:
        raise InputError(f"--reg-channel {channel}: luminance applies to RGB tiles; {source} "
                         f"has channels {list(channel_names)}")
    return channels[channel_index(channel_names, 0 if channel is None else channel, source)]
