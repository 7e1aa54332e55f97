"""Per-tile intensity correction applied as tiles are read: flat-field, dark-field, gains.

Every tile's pixels are corrected before they are resampled and blended::

    corrected = ((raw - dark) / flat) * gain + offset

``flat`` and ``dark`` are *profiles* shared by the tiles of one channel (2D arrays of the
tile's ``(y, x)`` shape, applied to every z plane of 3D tiles, or ``(z, y, x)`` stacks of
the tile's shape), ``gain`` and ``offset`` are one number per tile (intensity matching). The
arithmetic is in the accumulator dtype of the raw tiles
(:func:`gpufusion.backends.numpy_ref.accumulator_dtype`: float32 for 8- and 16-bit integers,
float16 and float32, float64 for wider types), in the order written above; the output then
follows the usual dtype policy (rounded half-to-even and clipped to the output dtype, which
stays the raw tiles' dtype by default).

:func:`correct_mosaic` returns a new :class:`~gpufusion.layout.Mosaic` whose tile sources are
:class:`CorrectedSource` wrappers. A wrapper's ``read`` returns corrected NumPy pixels (the
NumPy backend and registration use it); the CuPy backend instead reads the *raw* window
(:meth:`CorrectedSource.read_raw`), uploads it and corrects it on the device, in the task's
stream, with each profile uploaded once per worker thread and kept there
(:func:`device_corrected_windows`). Correcting twice composes: gains and offsets on top of a
correction are folded into it (``g = g1 * g2``, ``o = o1 * g2 + o2``), anything else is
applied as a second step after the first, so the result is always the two corrections one
after the other.

Profiles are :class:`Profile` objects (a read-only float array and a content digest) that a
mosaic's tiles share. A profile made from a file, a fit or a constant pickles as that recipe,
so a task sent to a dask worker stays small, and each worker process remakes the profile
once; one given as a bare array pickles its pixels (once per task).

Examples
--------
>>> import numpy as np
>>> from gpufusion import mosaic_from_positions
>>> tile = np.full((4, 6), 110, np.uint16)
>>> m = mosaic_from_positions([tile, tile], [(0, 0), (0, 5)])
>>> flat = np.full((4, 6), 0.5)
>>> c = correct_mosaic(m, flatfield=flat, darkfield=np.full((4, 6), 10.0))
>>> c.dtype, c.tiles[0].source.read((slice(0, 1), slice(0, 2))).tolist()
(dtype('uint16'), [[200.0, 200.0]])
>>> g = correct_mosaic(c, gains=[1.0, 0.5])  # folded into the same wrapper
>>> len(g.tiles[1].source.steps), float(g.tiles[1].source.read((slice(0, 1), slice(0, 1)))[0, 0])
(1, 100.0)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.numpy_ref import accumulator_dtype
from .errors import InputError
from .layout import Mosaic, Tile
from .sources import TileSource, Window

#: Profiles kept on the device per worker thread (CuPy backend); older ones are dropped.
DEVICE_PROFILE_CACHE = 8


class Profile:
    """A flat-field or dark-field profile: a read-only float array plus a content digest.

    Parameters
    ----------
    array : array-like
        2D ``(y, x)`` or 3D ``(z, y, x)``, finite values.
    label : str
        Where it came from (a file name, ``"auto"``), for messages and provenance.
    """

    def __init__(self, array: Any, label: str = "array", recipe: tuple | None = None) -> None:
        given = np.asarray(array)
        if given.dtype.kind not in "uif" or given.ndim not in (2, 3):
            raise InputError(f"{label}: a profile must be a 2D or 3D array of numbers, got "
                             f"{given.ndim}D {given.dtype}")
        # float32 unless the values need float64 (as the accumulator of wide tiles)
        wide = given.dtype.itemsize > 4 or (given.dtype.kind in "iu" and given.dtype.itemsize > 2)
        values = np.array(given, dtype=np.float64 if wide else np.float32)
        values.setflags(write=False)
        self.array = values
        self.label = str(label)
        self.key = hashlib.blake2b(values.tobytes() + str(values.shape).encode(),
                                   digest_size=12).hexdigest()
        self.recipe = recipe

    def __reduce__(self) -> tuple:
        """With a ``recipe`` (how to remake the array: a file, a fit, a constant), a pickled
        profile is that recipe, not the pixels: a task sent to a dask worker stays small,
        and each worker process remakes a profile once (:func:`_remake_profile`)."""
        if self.recipe is None:
            return (_profile_from_array, (self.array, self.label))
        return (_remake_profile, (self.key, self.label, self.recipe))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def window(self, window: Window) -> tuple[slice, ...]:
        """The slices of this profile under a tile ``window`` (its trailing axes)."""
        return tuple(window[len(window) - self.array.ndim:])

    def __repr__(self) -> str:
        return f"Profile({self.label!r}, shape={self.shape}, key={self.key})"


@dataclass(frozen=True)
class Correction:
    """One correction step: ``((v - dark) / flat) * gain + offset`` (``None``: skipped)."""

    flat: Profile | None = None
    dark: Profile | None = None
    gain: float = 1.0
    offset: float = 0.0

    @property
    def has_profiles(self) -> bool:
        return self.flat is not None or self.dark is not None

    def apply(self, values: Any, window: Window,
              fetch: Callable[[Profile], Any] = lambda p: p.array) -> Any:
        """Correct ``values`` (NumPy or CuPy, in the work dtype) under tile ``window``.

        ``fetch`` gives a profile's array in the values' array module (the device copy for
        CuPy). Only operators are used, so NumPy and CuPy compute the same thing.
        """
        dtype = values.dtype.type
        if self.dark is not None:
            values = values - fetch(self.dark)[self.dark.window(window)].astype(dtype, copy=False)
        if self.flat is not None:
            values = values / fetch(self.flat)[self.flat.window(window)].astype(dtype, copy=False)
        if self.gain != 1.0:
            values = values * dtype(self.gain)
        if self.offset != 0.0:
            values = values + dtype(self.offset)
        return values


class CorrectedSource:
    """A tile source whose pixels are corrected as they are read (see the module docstring).

    Parameters
    ----------
    source : TileSource
        The raw tile (or another ``CorrectedSource``: the corrections compose).
    flat, dark : Profile or array-like, optional
        Profiles of the tile's shape (or its ``(y, x)`` shape for 3D tiles).
    gain, offset : float
        This tile's gain and offset.

    ``shape``, ``dtype`` (the raw dtype: the output keeps it by default), ``name``,
    ``path`` and ``planes`` (the files it reads) are the raw source's; :meth:`read` returns
    the corrected pixels in :attr:`work_dtype`.
    """

    def __init__(self, source: TileSource, flat: Profile | Any = None, dark: Profile | Any = None,
                 gain: float = 1.0, offset: float = 0.0) -> None:
        step = Correction(_as_profile(flat, "flatfield"), _as_profile(dark, "darkfield"),
                          _finite(gain, "gain", source), _finite(offset, "offset", source))
        if isinstance(source, CorrectedSource):
            base, steps = source.base, source.steps
            if not step.has_profiles and steps:  # fold: ((v*g1 + o1) * g2 + o2)
                last = steps[-1]
                folded = Correction(last.flat, last.dark, last.gain * step.gain,
                                    last.offset * step.gain + step.offset)
                steps = (*steps[:-1], folded)
            else:
                steps = (*steps, step)
        else:
            base, steps = source, (step,)
        for s in steps:
            for prof in (s.flat, s.dark):
                if prof is not None:
                    check_profile_shape(prof, tuple(base.shape), base.name)
        self.base = base
        self.steps: tuple[Correction, ...] = steps
        self.shape = tuple(int(n) for n in base.shape)
        self.dtype = np.dtype(base.dtype)
        self.name = base.name
        self.work_dtype = accumulator_dtype(self.dtype)

    @property
    def path(self) -> Any:
        return getattr(self.base, "path", None)

    @property
    def planes(self) -> Any:
        return getattr(self.base, "planes", ())

    def read_raw(self, window: Window) -> np.ndarray:
        """The raw pixels of ``window`` (what the device path uploads)."""
        return self.base.read(window)

    def read(self, window: Window) -> np.ndarray:
        """The corrected pixels of ``window``, as NumPy in :attr:`work_dtype`."""
        return self.correct(np.asarray(self.base.read(window)), window)

    def correct(self, raw: Any, window: Window,
                fetch: Callable[[Profile], Any] = lambda p: p.array) -> Any:
        """Apply every step to the raw pixels ``raw`` of ``window`` (NumPy or CuPy)."""
        values = raw.astype(self.work_dtype)
        for step in self.steps:
            values = step.apply(values, window, fetch)
        return values

    def __repr__(self) -> str:
        return f"CorrectedSource({self.base!r}, steps={len(self.steps)})"


def _profile_from_array(array: np.ndarray, label: str) -> Profile:
    return Profile(array, label)


#: Profiles remade in this process from their recipes, by content key (see
#: :meth:`Profile.__reduce__`); a handful per run, kept for the process's life.
_REMADE: dict[str, Profile] = {}


def _remake_profile(key: str, label: str, recipe: tuple) -> Profile:
    """A pickled :class:`Profile` with a recipe: ``("constant", value, shape)``,
    ``("file", path, tile_shape, n_channels, channel, kind)`` (read again, refused if its
    content changed) or ``("fit", coef, shape, factor, blocks)`` (a fitted flat-field)."""
    found = _REMADE.get(key)
    if found is not None:
        return found
    kind = recipe[0]
    if kind == "constant":
        prof = Profile(np.full(tuple(recipe[2]), recipe[1], np.float32), label, recipe)
    elif kind == "file":
        from .flatfield import load_profiles

        _, path, tile_shape, n_channels, channel, what = recipe
        prof = load_profiles(path, tuple(tile_shape), n_channels, kind=what,
                             what=label.split(" ", 1)[0])[channel]
        if prof.key != key:
            raise InputError(f"{label}: the file changed while the fusion ran")
    elif kind == "fit":
        from .flatfield import flat_from_fit

        prof = Profile(flat_from_fit(*recipe[1:]), label, recipe)
    else:
        raise ValueError(f"unknown profile recipe {kind!r}")
    _REMADE[key] = prof
    return prof


def _as_profile(value: Any, what: str) -> Profile | None:
    if value is None or isinstance(value, Profile):
        return value
    return Profile(value, what)


def _finite(value: Any, what: str, source: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{getattr(source, 'name', 'tile')}: {what} {value!r} is not a "
                         "number") from None
    if not math.isfinite(v) or (what == "gain" and v <= 0):
        need = "a finite number > 0" if what == "gain" else "a finite number"
        raise InputError(f"{getattr(source, 'name', 'tile')}: {what} {value!r} must be {need}")
    return v


def check_profile_shape(profile: Profile, tile_shape: tuple[int, ...], tile: str) -> None:
    """Refuse a profile that is neither the tile's shape nor, for 3D tiles, its ``(y, x)``."""
    ok = profile.shape == tile_shape or (len(tile_shape) == 3 and profile.shape
                                         == tile_shape[1:])
    if not ok:
        want = f"{tile_shape}" + (f" or {tile_shape[1:]}" if len(tile_shape) == 3 else "")
        raise InputError(f"{profile.label}: profile shape {profile.shape} does not match the "
                         f"tile shape {want} of {tile}")


def check_flatfield(profile: Profile) -> None:
    """Refuse a flat-field with zeros, negative, NaN or infinite values (one line)."""
    a = profile.array
    bad = ~np.isfinite(a)
    if bad.any():
        raise InputError(f"{profile.label}: flat-field has {int(bad.sum())} NaN or infinite "
                         "values; it must be finite and > 0 everywhere")
    if (a <= 0).any():
        raise InputError(f"{profile.label}: flat-field has {int((a <= 0).sum())} values <= 0 "
                         f"(minimum {float(a.min()):.4g}); it must be > 0 everywhere (a flat "
                         "field divides the tiles)")


def check_darkfield(profile: Profile) -> None:
    """Refuse a dark-field with NaN or infinite values."""
    bad = ~np.isfinite(profile.array)
    if bad.any():
        raise InputError(f"{profile.label}: dark-field has {int(bad.sum())} NaN or infinite "
                         "values")


def correct_mosaic(mosaic: Mosaic, *, flatfield: Any = None, darkfield: Any = None,
                   gains: Sequence[float] | np.ndarray | None = None,
                   offsets: Sequence[float] | np.ndarray | None = None) -> Mosaic:
    """A new mosaic whose tiles are corrected as they are read.

    ``corrected = ((raw - darkfield) / flatfield) * gains[i] + offsets[i]`` for tile ``i``.

    Parameters
    ----------
    mosaic : Mosaic
        One channel's tiles (their sources may already be corrected: the corrections
        compose, see the module docstring).
    flatfield, darkfield : array-like or Profile, optional
        The channel's profiles: the tiles' shape, or their ``(y, x)`` shape for 3D tiles
        (then the same for every plane). The flat-field is used as given (not normalised
        here; :func:`gpufusion.flatfield.load_profiles` normalises a file's to mean 1) and
        must be finite and > 0; the dark-field finite.
    gains, offsets : 1-D array-like, optional
        One per tile (gains finite and > 0).

    Returns
    -------
    Mosaic
        Same tiles, transforms and grid; sources wrapped in :class:`CorrectedSource`.

    Raises
    ------
    InputError
        A profile of the wrong shape, with non-finite values or (flat-field) values <= 0;
        gains or offsets of the wrong length or not finite.
    """
    if not isinstance(mosaic, Mosaic):
        raise InputError(f"mosaic: expected a gpufusion Mosaic, got {type(mosaic).__name__}")
    flat = _as_profile(flatfield, "flatfield")
    dark = _as_profile(darkfield, "darkfield")
    if flat is not None:
        check_flatfield(flat)
    if dark is not None:
        check_darkfield(dark)
    n = len(mosaic.tiles)
    g = _per_tile(gains, n, "gains", 1.0)
    o = _per_tile(offsets, n, "offsets", 0.0)
    if flat is None and dark is None and gains is None and offsets is None:
        return mosaic
    tiles = tuple(Tile(CorrectedSource(t.source, flat, dark, g[i], o[i]), t.affine, t.name)
                  for i, t in enumerate(mosaic.tiles))
    return Mosaic(tiles, mosaic.origin, mosaic.shape, mosaic.pixel_size, mosaic.unit)


def _per_tile(values: Any, n: int, what: str, default: float) -> np.ndarray:
    if values is None:
        return np.full(n, default)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what}: expected {n} numbers, one per tile") from None
    if arr.shape != (n,):
        raise InputError(f"{what}: expected {n} numbers (one per tile), got shape {arr.shape}")
    if not np.isfinite(arr).all() or (what == "gains" and (arr <= 0).any()):
        raise InputError(f"{what}: every value must be finite" +
                         (" and > 0" if what == "gains" else ""))
    return arr


def is_corrected(sources: Sequence[Any]) -> bool:
    """Whether any of ``sources`` is a :class:`CorrectedSource`."""
    return any(isinstance(s, CorrectedSource) for s in sources)


def mosaic_corrections(mosaic: Mosaic) -> dict[str, Any] | None:
    """A JSON summary of the correction of a mosaic's tiles (provenance), or None."""
    sources = [t.source for t in mosaic.tiles if isinstance(t.source, CorrectedSource)]
    if not sources:
        return None
    record: dict[str, Any] = {}
    for key, attr in (("flatfield", "flat"), ("darkfield", "dark")):
        profs = [getattr(step, attr) for step in sources[0].steps]
        found = [{"source": p.label, "digest": p.key, "shape": list(p.shape)}
                 for p in profs if p is not None]
        if found:
            record[key] = found
    gains = [math.prod(s.gain for s in src.steps) for src in sources]
    if any(g != 1.0 for g in gains):
        record["gains"] = [min(gains), max(gains)]
    return record


def device_corrected_windows(task: Any, cp: Any, cache: dict) -> list[Any]:
    """The corrected windows of a fusion task, computed on the device.

    Raw windows are read on the host and uploaded (``cupy.asarray`` on the current
    stream: the task's); each profile is uploaded once per thread and device and kept in
    ``cache`` (at most :data:`DEVICE_PROFILE_CACHE`); the correction runs as CuPy
    element-wise operations on the current stream. Uncorrected sources of the same task are
    uploaded and converted to the same work dtype.
    """
    sources = task.sources
    work = np.result_type(*[accumulator_dtype(s.dtype) for s in sources]) if sources \
        else np.dtype(np.float32)
    device = int(cp.cuda.runtime.getDevice())

    def fetch(profile: Profile) -> Any:
        key = (device, profile.key)
        found = cache.get(key)
        if found is None:
            found = cp.asarray(profile.array)
            while len(cache) >= DEVICE_PROFILE_CACHE:
                cache.pop(next(iter(cache)))
            cache[key] = found
        return found

    out = []
    for src, win in zip(sources, task.table.windows(), strict=True):
        if isinstance(src, CorrectedSource):
            raw = cp.asarray(np.ascontiguousarray(src.read_raw(win)))
            values = src.correct(raw, win, fetch)
        else:
            values = cp.asarray(np.ascontiguousarray(src.read(win)))
        out.append(values if values.dtype == work else values.astype(work))
    return out
