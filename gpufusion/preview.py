"""A quick look at a fused image: a contrast-stretched 8-bit RGB PNG thumbnail.

``gpufusion info IMAGE --preview out.png`` and ``gpufusion demo`` write one, so a user can
look at a result before opening a viewer. :func:`render_preview` builds it from one pyramid
level of an OME-Zarr image (NGFF 0.4 or 0.5) or of an OME-TIFF image
(:mod:`gpufusion.readers.image_info`):

* the level read is the smallest one whose long side (``y`` or ``x``) is still at least
  half of ``max_size`` (512 px for the default 1024), or level 0 when the image is smaller;
  when that level is larger than ``max_size`` it is reduced by block means to fit;
* 3D images are shown as their maximum projection along ``z``; of several time points the
  first is shown;
* each channel is stretched linearly from its 0.5th to its 99.5th percentile (gamma 1) to
  0..1;
* one channel is shown in grey; several are added in colours: the OME-Zarr ``omero``
  channel colours or the OME-TIFF ``Channel Color`` where the file gives them, else green,
  magenta, cyan, yellow, red, blue, orange and white in turn; the samples of an RGB(A) TIFF
  as red, green and blue (alpha left out).

:func:`write_preview` writes the PNG under a temporary name beside it and renames it into
place only when complete: a failed run leaves no PNG, and an existing file is kept unless
``overwrite`` is set.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["DEFAULT_COLORS", "Preview", "check_preview_target", "render_preview",
           "write_preview"]

#: Channel colours (r, g, b) used in turn when the image names none.
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 0),
    (255, 0, 0), (0, 0, 255), (255, 128, 0), (255, 255, 255),
)

#: Percentiles each channel is stretched between.
PERCENTILES = (0.5, 99.5)

#: Bytes of one slab of planes read at once for the ``z`` projection.
_SLAB_BYTES = 1 << 27


@dataclass(frozen=True)
class Preview:
    """A rendered preview: ``rgb`` (uint8, height x width x 3), the pyramid ``level`` it was
    made from, the number of ``levels`` and the per-channel ``colors`` used."""

    rgb: np.ndarray
    level: int
    levels: int
    colors: tuple[tuple[int, int, int], ...]


# --------------------------------------------------------------------------- level access


@dataclass(frozen=True)
class _Image:
    """What the renderer needs to know of an image, whatever its format."""

    path: Path
    axes: list[str]
    shapes: list[tuple[int, ...]]
    colors: list[tuple[int, int, int] | None]
    read: Any  # (level, index tuple of leading axes or slices) -> ndarray


def _is_tiff(path: Path) -> bool:
    from .readers.image_info import TIFF_SUFFIXES

    return path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES)


def _hex_color(value: Any) -> tuple[int, int, int] | None:
    """An omero colour ``"RRGGBB"`` as (r, g, b); None when it is not one."""
    if not isinstance(value, str) or len(value) != 6:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return (number >> 16) & 255, (number >> 8) & 255, number & 255


def _zarr_image(path: Path) -> _Image:
    import zarr

    from .writers.ome_zarr import read_ome_zarr_info

    info = read_ome_zarr_info(path)
    fmt = info["zarr_format"]
    arrays = [zarr.open_array(store=str(path / level["path"]), mode="r", zarr_format=fmt)
              for level in info["levels"]]
    attrs = zarr.open_group(store=str(path), mode="r", zarr_format=fmt).attrs.asdict()
    omero = (attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs).get("omero")
    channels = omero.get("channels") if isinstance(omero, dict) else None
    colors = ([_hex_color(c.get("color")) if isinstance(c, dict) else None for c in channels]
              if isinstance(channels, list) else [])
    ndim = len(info["levels"][0]["shape"])
    names = [a["name"] for a in info["axes"]] or ["t", "c", "z", "y", "x"][-ndim:]

    def read(level: int, index: tuple[Any, ...]) -> np.ndarray:
        try:
            return np.asarray(arrays[level][index])
        except Exception as exc:  # a damaged or missing chunk: zarr raises several types
            where = path / info["levels"][level]["path"]
            raise InputError(" ".join(f"{where}: cannot read pixels ({type(exc).__name__}: "
                                      f"{exc})".split())) from None

    return _Image(path, names, [tuple(a.shape) for a in arrays], colors, read)


def _tiff_image(path: Path) -> _Image:
    from .readers.image_info import is_image_tiff, open_tiff, read_ome_tiff_info

    if not is_image_tiff(path):
        raise InputError(f"{path}: a TIFF tile (one level, not written by gpufusion), not an "
                         "image; a preview needs an OME-Zarr image or an OME-TIFF gpufusion "
                         "wrote")
    info = read_ome_tiff_info(path)
    names = [a["name"] for a in info["axes"]]
    stored = [level["shape"] for level in info["levels"]]
    samples = names[-1] == "s"  # RGB(A) pixels: samples last in each page, shown as channels
    shapes = [(shape[-1], *shape[:-1]) for shape in stored] if samples else stored

    def read(level: int, index: tuple[Any, ...]) -> np.ndarray:
        sample = index[0] if samples else None
        index = index[1:] if samples else index
        lead = stored[level][:-3 if samples else -2]
        keys = [int(np.ravel_multi_index(i, lead)) if lead else 0 for i in _indices(index, lead)]
        with open_tiff(path, f"damaged pixel data in level {level}") as tif:
            series = tif.series[0].levels[level]
            planes = [series.asarray(key=k) for k in keys]
        if samples:
            planes = [plane[..., sample] for plane in planes]
        out_shape = [len(range(*s.indices(n))) for s, n in zip(index, lead, strict=True)
                     if isinstance(s, slice)]
        return np.stack(planes).reshape(*out_shape, *planes[0].shape[-2:])

    colors = list(info["colors"])
    if samples and stored[0][-1] in (3, 4) and not any(colors):
        colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]  # RGB as RGB, no alpha
    axes = ["s", *names[:-1]] if samples else names
    return _Image(path, axes, shapes, colors, read)


def _indices(index: tuple[Any, ...], lead: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Every plane index a tuple of ints and slices over the leading axes selects."""
    ranges = [range(*i.indices(n)) if isinstance(i, slice) else [int(i)]
              for i, n in zip(index, lead, strict=True)]
    for chosen in np.ndindex(*(len(r) for r in ranges)):
        yield tuple(r[k] for r, k in zip(ranges, chosen, strict=True))


def _open_image(path: Path) -> _Image:
    from .readers.image_info import is_ome_zarr

    if is_ome_zarr(path):
        return _zarr_image(path)
    if _is_tiff(path):
        return _tiff_image(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    raise InputError(f"{path}: not an image; a preview needs an OME-Zarr image (*.ome.zarr) "
                     "or an OME-TIFF gpufusion wrote (*.ome.tif)")


# ------------------------------------------------------------------------------ rendering


def _choose_level(shapes: Sequence[tuple[int, ...]], max_size: int) -> int:
    """The smallest level whose long side is at least ``max_size / 2`` (else level 0).

    Examples
    --------
    >>> _choose_level([(3000, 2000), (1500, 1000), (750, 500), (375, 250)], 1024)
    2
    >>> _choose_level([(300, 200), (150, 100)], 1024)
    0
    """
    long_sides = [max(shape[-2:]) for shape in shapes]
    fitting = [k for k, side in enumerate(long_sides) if side >= max_size / 2]
    return max(fitting) if fitting else 0


def _projection(image: _Image, level: int, channel: int | None) -> np.ndarray:
    """One channel of a level as a float64 plane: first time point, maximum over ``z``."""
    shape = image.shapes[level]
    lead: list[Any] = []
    z_axis = None
    channel_axis = _channel_axis(image.axes)
    for name in image.axes[:-2]:
        if name == channel_axis and channel is not None:
            lead.append(channel)
        elif name == "z":
            z_axis = len(lead)
            lead.append(slice(None))
        else:
            lead.append(0)  # first time point (or of any other axis)
    if z_axis is None:
        return np.asarray(image.read(level, tuple(lead)), dtype=np.float64)
    plane_bytes = 8 * shape[-2] * shape[-1]
    depth = shape[image.axes.index("z")]
    step = max(1, min(depth, _SLAB_BYTES // max(plane_bytes, 1)))
    result = None
    for z0 in range(0, depth, step):
        lead[z_axis] = slice(z0, min(depth, z0 + step))
        slab = np.asarray(image.read(level, tuple(lead)))
        top = slab.max(axis=0).astype(np.float64)
        result = top if result is None else np.fmax(result, top)
    assert result is not None
    return result


def _reduce(plane: np.ndarray, max_size: int) -> np.ndarray:
    """Block-mean ``plane`` by the smallest integer factor that makes it fit ``max_size``.

    Examples
    --------
    >>> _reduce(np.ones((2100, 900)), 1024).shape
    (700, 300)
    """
    factor = -(-max(plane.shape) // max_size)
    if factor <= 1:
        return plane
    h, w = (-(-n // factor) for n in plane.shape)
    padded = np.pad(plane, ((0, h * factor - plane.shape[0]), (0, w * factor - plane.shape[1])),
                    mode="edge")
    return padded.reshape(h, factor, w, factor).mean(axis=(1, 3))


def _stretch(plane: np.ndarray) -> np.ndarray:
    """Map the 0.5th..99.5th percentile of ``plane`` linearly to 0..1 (NaN to 0).

    Examples
    --------
    >>> _stretch(np.array([[0.0, 50.0], [100.0, np.nan]])).round(2).tolist()
    [[0.0, 0.5], [1.0, 0.0]]
    """
    finite = plane[np.isfinite(plane)]
    if not finite.size:
        return np.zeros(plane.shape)
    low, high = np.percentile(finite, PERCENTILES)
    # a flat channel: what is above its level shows, the rest stays dark
    out = (plane > low).astype(np.float64) if high <= low else (plane - low) / (high - low)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def _channel_axis(axes: Sequence[str]) -> str | None:
    """The axis shown as colours: ``c``, else TIFF samples ``s`` (RGB), else none."""
    return next((a for a in ("c", "s") if a in axes[:-2]), None)


def render_preview(image_path: str | os.PathLike[str], max_size: int = 1024) -> Preview:
    """Render a contrast-stretched RGB thumbnail of an OME-Zarr or OME-TIFF image.

    Parameters
    ----------
    image_path : str or path-like
        An OME-Zarr image folder (NGFF 0.4 or 0.5) or an OME-TIFF gpufusion wrote (or any
        pyramidal TIFF).
    max_size : int
        Longest side of the thumbnail in pixels (at least 16).

    Returns
    -------
    Preview
        The uint8 ``(height, width, 3)`` picture and where it came from (module docstring:
        the level chosen, z projection, contrast and colours).

    Raises
    ------
    InputError
        One line naming the file: not an image, unreadable metadata or pixels.

    Examples
    --------
    >>> import tempfile
    >>> from gpufusion.writers.ome_zarr import write_ome_zarr
    >>> img = np.zeros((2, 64, 96), "uint16"); img[0, :32] = 1000; img[1, :, :48] = 500
    >>> out = write_ome_zarr(img, tempfile.mkdtemp() + "/a.zarr", axes=["c", "y", "x"])
    >>> p = render_preview(out)
    >>> p.rgb.shape, p.rgb.dtype, p.rgb[0, 0].tolist(), p.rgb[-1, -1].tolist()
    ((64, 96, 3), dtype('uint8'), [255, 255, 255], [0, 0, 0])
    """
    if int(max_size) < 16:
        raise InputError(f"preview size {max_size}: must be at least 16 px")
    image = _open_image(Path(image_path))
    level = _choose_level(image.shapes, int(max_size))
    shape = image.shapes[level]
    channel_axis = _channel_axis(image.axes)
    n_channels = shape[image.axes.index(channel_axis)] if channel_axis else 1
    if n_channels == 1:
        colors: list[tuple[int, int, int]] = [(255, 255, 255)]
    else:
        colors = [image.colors[k] if k < len(image.colors) and image.colors[k] is not None
                  else DEFAULT_COLORS[k % len(DEFAULT_COLORS)] for k in range(n_channels)]
    rgb = None
    for k, color in enumerate(colors):
        plane = _stretch(_reduce(_projection(image, level, k if channel_axis else None),
                                 int(max_size)))
        part = plane[..., None] * (np.asarray(color, np.float64) / 255.0)
        rgb = part if rgb is None else rgb + part
    assert rgb is not None
    pixels = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Preview(pixels, level, len(image.shapes), tuple(tuple(c) for c in colors))


def check_preview_target(image: Path, png: Path, overwrite: bool) -> None:
    """Refuse a preview path that is not ``*.png``, is or lies inside the image, is a
    folder, or exists (without ``overwrite``), with an InputError naming ``--preview``."""
    if not png.name.lower().endswith(".png"):
        raise InputError(f"--preview {png}: the preview is a PNG; name it *.png")
    target, source = png.resolve(), image.resolve()
    if target == source or target.is_relative_to(source):
        raise InputError(f"--preview {png}: is or lies inside the image {image}; write the "
                         "preview elsewhere")
    if png.is_dir():
        raise InputError(f"--preview {png}: a folder is there; name a PNG file")
    if (png.exists() or png.is_symlink()) and not overwrite:
        raise InputError(f"--preview {png}: already exists; use --overwrite to replace it")


def write_preview(image_path: str | os.PathLike[str], png_path: str | os.PathLike[str],
                  max_size: int = 1024, *, overwrite: bool = False) -> Path:
    """Write :func:`render_preview` of ``image_path`` as an 8-bit RGB PNG, atomically.

    Parameters
    ----------
    image_path : str or path-like
        An OME-Zarr image or an OME-TIFF gpufusion wrote.
    png_path : str or path-like
        The PNG to write (``*.png``); its folder is created if needed. It is written under
        a hidden temporary name beside it and renamed into place when complete.
    max_size : int
        Longest side of the thumbnail in pixels (default 1024).
    overwrite : bool
        Replace an existing ``png_path`` (default: refuse it).

    Returns
    -------
    pathlib.Path
        ``png_path``.

    Raises
    ------
    InputError
        One line: the image cannot be read, ``png_path`` is not a ``*.png``, lies inside
        the image, is a folder, or exists and ``overwrite`` is False. Nothing is written.

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> from gpufusion.writers.ome_zarr import write_ome_zarr
    >>> d = Path(tempfile.mkdtemp())
    >>> out = write_ome_zarr(np.arange(4096, dtype="uint16").reshape(64, 64), d / "a.zarr",
    ...                      axes=["y", "x"])
    >>> png = write_preview(out, d / "a.png")
    >>> with Image.open(png) as picture:
    ...     picture.mode, picture.size
    ('RGB', (64, 64))
    """
    from PIL import Image

    image, png = Path(image_path), Path(png_path)
    check_preview_target(image, png, overwrite)
    pixels = render_preview(image, max_size).rgb
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.parent / f".{png.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as f:  # the umask's permissions, as any other output
            Image.fromarray(pixels).save(f, format="PNG")
        if (png.exists() or png.is_symlink()) and not overwrite:  # appeared meanwhile
            raise InputError(f"--preview {png}: already exists; use --overwrite to replace it")
        os.replace(tmp, png)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return png
