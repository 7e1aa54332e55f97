"""Resolution pyramids by 2x mean downsampling.

A pyramid is a list of levels; level ``k + 1`` is level ``k`` reduced by a factor of 1 or
2 on each axis. Only spatial axes (``z``, ``y``, ``x``) are ever reduced; channel (``c``)
and time (``t``) axes keep their size.

Downsampling rule
-----------------
Each output sample is the mean of the (up to ``2**d``) input samples it covers. An axis of
odd length ``n`` gives ``ceil(n / 2)`` samples and the last one is the mean of the samples
that exist (no zero padding, no edge replication), so an image of constant value stays
constant at every level.

Dtype policy
------------
Means are accumulated in float32 (float64 for float64 input, and for integer inputs of 32
or 64 bits, whose values float32 cannot hold exactly). Integer outputs are rounded half to
even and clipped to the dtype range; the output dtype is the input dtype.

The block function :func:`downsample_mean2` uses only slicing, ``astype``, arithmetic,
``round`` and ``clip``, so it runs unchanged on CuPy arrays. It has a fast algorithm
(``"corners"``, the default) and the simple one it is tested against (``"pairwise"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np

#: Axis names that are downsampled; all others ('c', 't') never are.
SPATIAL_AXES = ("z", "y", "x")

#: Signature of the per-level factor rule: (current shape, axis names) -> factors.
LevelFactorRule = Callable[[tuple[int, ...], Sequence[str]], tuple[int, ...]]

_MAX_LEVELS = 64

#: ``z`` is halved while its pixel size is at most this times the in-plane size (see
#: :func:`pyramid_factors`): halving then brings ``p_z / p_xy`` nearer to 1 than keeping.
_Z_TOLERANCE = 2**0.5


def _accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """Float dtype that holds every value of ``dtype`` closely enough to average it."""
    if dtype == np.float64:
        return np.dtype(np.float64)
    if np.issubdtype(dtype, np.integer) and dtype.itemsize >= 4:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _clip_bounds(dtype: np.dtype, acc: np.dtype) -> tuple[Any, Any]:
    """Range of ``dtype`` as ``acc`` values that convert back without overflow."""
    info = np.iinfo(dtype)
    lo, hi = acc.type(info.min), acc.type(info.max)
    # int64/uint64 maxima round *up* in float64; step back to the largest float below.
    if int(hi) > info.max:
        hi = np.nextafter(hi, acc.type(0))
    return lo, hi


def _axis_slice(ndim: int, axis: int, sl: slice) -> tuple[slice, ...]:
    return (slice(None),) * axis + (sl,) + (slice(None),) * (ndim - axis - 1)


def _halve_axis(acc: Any, axis: int) -> Any:
    """Mean of neighbouring pairs along ``axis``; an odd last sample is kept as is."""
    n, pairs = acc.shape[axis], acc.shape[axis] // 2
    # Samples 0, 2, 4, ... : ceil(n/2) of them, the last one alone when n is odd.
    out = acc[_axis_slice(acc.ndim, axis, slice(0, n, 2))].astype(acc.dtype, copy=True)
    head = _axis_slice(acc.ndim, axis, slice(0, pairs))
    out[head] = (out[head] + acc[_axis_slice(acc.ndim, axis, slice(1, 2 * pairs, 2))]) * 0.5
    return out


def _mean_pairwise(block: Any, factors: tuple[int, ...], acc_dtype: np.dtype) -> Any:
    """Reference algorithm: halve one axis at a time (one temporary array per axis)."""
    acc = block.astype(acc_dtype, copy=False)
    for axis, factor in enumerate(factors):
        if factor == 2:
            acc = _halve_axis(acc, axis)
    return acc


def _mean_corners(block: Any, factors: tuple[int, ...], acc_dtype: np.dtype) -> Any:
    """Fast algorithm: add the ``2**d`` strided corner views into one accumulator.

    The sum starts from the even samples (``ceil(n/2)`` per axis); a view starting at odd
    samples has ``floor(n/2)`` of them and is added to the leading part. Then the leading
    ``floor(n/2)`` entries of each halved axis are scaled by 1/2, so an odd trailing slab
    is divided only by the number of samples it received. For integers up to 16 bits the
    float32 sums are exact, so the result equals the pairwise algorithm bit for bit.
    """
    reduced = [axis for axis, factor in enumerate(factors) if factor == 2]
    evens = [slice(0, None, f) for f in factors]
    out = block[tuple(evens)].astype(acc_dtype, copy=True)
    for corner in range(1, 2 ** len(reduced)):
        src, dst = list(evens), [slice(None)] * block.ndim
        for bit, axis in enumerate(reduced):
            if corner >> bit & 1:
                src[axis] = slice(1, None, 2)
                dst[axis] = slice(0, block.shape[axis] // 2)
        out[tuple(dst)] += block[tuple(src)]
    for axis in reduced:
        out[_axis_slice(block.ndim, axis, slice(0, block.shape[axis] // 2))] *= 0.5
    return out


_ALGORITHMS = {"corners": _mean_corners, "pairwise": _mean_pairwise}


def downsample_mean2(block: Any, factors: Sequence[int], algorithm: str = "corners") -> Any:
    """Reduce each axis of ``block`` by its factor (1 or 2) by taking means.

    Parameters
    ----------
    block : numpy.ndarray or cupy.ndarray
        Integer or floating-point array.
    factors : sequence of int
        One factor per axis, each 1 (axis kept) or 2 (axis halved).
    algorithm : {"corners", "pairwise"}
        ``"corners"`` (default) sums the ``2**d`` strided views into one accumulator, 2-3x
        faster; ``"pairwise"`` halves one axis at a time, the simple reference. They agree
        exactly for integers up to 16 bits and to float rounding otherwise.

    Returns
    -------
    array of the same kind and dtype as ``block``
        Shape ``ceil(n / f)`` per axis. A trailing odd sample is the mean of the samples
        available. Integer results are rounded half to even and clipped to the dtype.

    Raises
    ------
    ValueError
        If ``factors`` has the wrong length or a value other than 1 or 2, or
        ``algorithm`` is unknown.
    TypeError
        If ``block`` is not of an integer or floating-point dtype.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0, 2, 4], [2, 4, 7]], dtype=np.uint8)
    >>> downsample_mean2(a, (2, 2))
    array([[2, 6]], dtype=uint8)
    >>> downsample_mean2(a, (1, 2), algorithm="pairwise")
    array([[1, 4],
           [3, 7]], dtype=uint8)
    """
    factors = tuple(int(f) for f in factors)
    if len(factors) != block.ndim:
        raise ValueError(f"factors {factors} must have one entry per axis ({block.ndim})")
    if any(f not in (1, 2) for f in factors):
        raise ValueError(f"factors {factors} may only contain 1 or 2")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {sorted(_ALGORITHMS)}")
    dtype = np.dtype(block.dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.number) or dtype.kind == "c":
        raise TypeError(f"downsample_mean2 needs an integer or float array, got {dtype}")

    acc_dtype = _accumulator_dtype(dtype)
    acc = _ALGORITHMS[algorithm](block, factors, acc_dtype)
    if np.issubdtype(dtype, np.integer):
        lo, hi = _clip_bounds(dtype, acc_dtype)
        acc = acc.round().clip(lo, hi)  # ndarray.round rounds half to even, like rint
    return acc.astype(dtype, copy=False)


def downsampled_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """Shape after :func:`downsample_mean2` with ``factors``.

    Examples
    --------
    >>> downsampled_shape((1000, 731), (2, 2))
    (500, 366)
    """
    return tuple(-(-int(n) // int(f)) for n, f in zip(shape, factors, strict=True))


def default_level_factors(shape: Sequence[int], axes: Sequence[str]) -> tuple[int, ...]:
    """Factors for the next level: 2 on every spatial axis longer than 1, else 1.

    Custom rules can replace it (``level_factors`` in :func:`pyramid_factors`); the
    anisotropy rule for ``z`` (``pixel_size`` there) is applied on top of any rule.

    Examples
    --------
    >>> default_level_factors((2, 5, 100, 100), ("c", "z", "y", "x"))
    (1, 2, 2, 2)
    >>> default_level_factors((1, 100, 100), ("z", "y", "x"))
    (1, 2, 2)
    """
    return tuple(
        2 if name in SPATIAL_AXES and n > 1 else 1 for n, name in zip(shape, axes, strict=True)
    )


def fits_in_one_chunk(shape: Sequence[int], chunks: Sequence[int], axes: Sequence[str]) -> bool:
    """Whether every spatial axis of ``shape`` is at most its chunk size.

    Examples
    --------
    >>> fits_in_one_chunk((3, 100, 128), (1, 128, 128), ("c", "y", "x"))
    True
    """
    return all(
        n <= c for n, c, name in zip(shape, chunks, axes, strict=True) if name in SPATIAL_AXES
    )


def pyramid_factors(
    shape: Sequence[int],
    chunks: Sequence[int],
    axes: Sequence[str],
    *,
    level_factors: LevelFactorRule = default_level_factors,
    pixel_size: Sequence[float] | None = None,
) -> list[tuple[int, ...]]:
    """Plan the levels below level 0.

    Levels are added until the smallest one fits in a single chunk (every spatial axis no
    longer than its chunk size), or until ``level_factors`` reduces nothing.

    Parameters
    ----------
    shape : sequence of int
        Level-0 shape.
    chunks : sequence of int
        Chunk shape (the same for every level).
    axes : sequence of str
        Axis names, e.g. ``("z", "y", "x")``; only ``z``, ``y``, ``x`` are reduced.
    level_factors : callable, optional
        ``(shape, axes) -> factors`` for the next level; default
        :func:`default_level_factors`.
    pixel_size : sequence of float, optional
        Level-0 physical pixel size of each spatial axis (``z``, ``y``, ``x`` present in
        ``axes``, in that order), any one unit. None (default): every spatial axis is
        treated alike, whatever the voxel shape.

    Returns
    -------
    list of tuple of int
        For levels 1, 2, ..., the factors relative to the level above. Empty when level 0
        already fits in one chunk.

    Raises
    ------
    ValueError
        If the lengths of ``shape``, ``chunks`` and ``axes`` differ, or ``pixel_size``
        does not hold one positive number per spatial axis.

    Notes
    -----
    With ``pixel_size`` given, ``z`` is halved at a level only when that leaves the voxel
    closer to cubic: when its current size ``p_z`` is at most ``sqrt(2)`` times the current
    in-plane size ``min(p_y, p_x)`` (the ratio ``p_z / p_xy`` is then nearer 1 after halving
    ``z`` together with ``y`` and ``x`` than after halving only ``y`` and ``x``). So a stack
    of 2 um planes with 0.5 um pixels keeps every plane until ``y``/``x`` have reached 2 um
    (level 2) and is reduced on all three axes from then on; isotropic voxels and ``z``
    finer than ``y``/``x`` are halved at every level, as without ``pixel_size``. When
    ``y`` and ``x`` can no longer be reduced, ``z`` is, so the plan still ends in one chunk.

    Examples
    --------
    >>> pyramid_factors((1000, 731), (128, 128), ("y", "x"))
    [(2, 2), (2, 2), (2, 2)]
    >>> pyramid_factors((3, 300, 200), (1, 128, 128), ("c", "y", "x"))
    [(1, 2, 2), (1, 2, 2)]

    2 um planes, 0.5 um pixels: ``z`` waits until ``y``/``x`` have reached 2 um.

    >>> pyramid_factors((64, 4096, 4096), (16, 256, 256), "zyx", pixel_size=(2, 0.5, 0.5))
    [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    """
    if not len(shape) == len(chunks) == len(axes):
        raise ValueError(
            f"shape {tuple(shape)}, chunks {tuple(chunks)} and axes {tuple(axes)}"
            " must have the same length"
        )
    sizes = _spatial_sizes(axes, pixel_size)
    current = tuple(int(n) for n in shape)
    plan: list[tuple[int, ...]] = []
    while not fits_in_one_chunk(current, chunks, axes) and len(plan) < _MAX_LEVELS:
        factors = tuple(int(f) for f in level_factors(current, axes))
        if sizes is not None:
            factors = _keep_z_sensible(factors, current, axes, sizes)
            steps = zip(sizes.items(), _spatial(factors, axes), strict=True)
            sizes = {name: size * f for (name, size), f in steps}
        if all(f == 1 for f in factors):
            break
        plan.append(factors)
        current = downsampled_shape(current, factors)
    return plan


def _spatial(values: Sequence[int], axes: Sequence[str]) -> list[int]:
    """The entries of ``values`` that belong to spatial axes, in order."""
    return [v for v, name in zip(values, axes, strict=True) if name in SPATIAL_AXES]


def _spatial_sizes(
    axes: Sequence[str], pixel_size: Sequence[float] | None
) -> dict[str, float] | None:
    """``{axis name: pixel size}`` for the spatial axes, or None without ``pixel_size``."""
    if pixel_size is None:
        return None
    names = [name for name in axes if name in SPATIAL_AXES]
    values = [float(p) for p in pixel_size]
    if len(values) != len(names) or not all(p > 0 and np.isfinite(p) for p in values):
        raise ValueError(
            f"pixel_size {tuple(pixel_size)} must be one positive number per spatial axis"
            f" {tuple(names)}"
        )
    return dict(zip(names, values, strict=True))


def _keep_z_sensible(
    factors: tuple[int, ...], shape: tuple[int, ...], axes: Sequence[str], sizes: dict[str, float]
) -> tuple[int, ...]:
    """Turn a 2 on ``z`` into 1 while ``z`` is coarser than ``sqrt(2)`` x the in-plane size."""
    index = {name: i for i, name in enumerate(axes)}
    in_plane = [name for name in ("y", "x") if name in sizes]
    if "z" not in sizes or factors[index["z"]] == 1 or not in_plane:
        return factors
    plane_shrinks = any(factors[index[n]] == 2 and shape[index[n]] > 1 for n in in_plane)
    if plane_shrinks and sizes["z"] > _Z_TOLERANCE * min(sizes[n] for n in in_plane):
        z = index["z"]
        return factors[:z] + (1,) + factors[z + 1 :]
    return factors


def _regular_chunks(size: int, chunk: int) -> tuple[int, ...]:
    """Chunks of ``chunk`` covering ``size``, the last one ragged."""
    if size == 0:
        return (0,)
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def blockwise_level_chunks(
    chunks: Sequence[Sequence[int]], factors: Sequence[int], min_chunk: int = 1
) -> tuple[tuple[int, ...], ...] | None:
    """Block sizes of the next level when every block is downsampled on its own, or None.

    Downsampling block by block equals downsampling the whole array exactly when, on every
    halved axis, every block but the last has an even size: each pair of samples then lies
    in one block, and only the array's own odd trailing sample can end up alone. None when
    that fails, or when on an axis of several blocks the halved blocks would be shorter
    than ``min_chunk``.

    Parameters
    ----------
    chunks : sequence of sequence of int
        Block sizes per axis (dask's ``Array.chunks``).
    factors : sequence of int
        One factor (1 or 2) per axis.
    min_chunk : int
        Smallest halved block size accepted on an axis with several blocks.

    Returns
    -------
    tuple of tuple of int or None
        ``ceil(size / factor)`` for every block, or None.

    Examples
    --------
    >>> blockwise_level_chunks(((128, 128, 104), (128, 128, 75)), (2, 2))
    ((64, 64, 52), (64, 64, 38))
    >>> blockwise_level_chunks(((5, 5), (8,)), (2, 2)) is None
    True
    """
    out = []
    for sizes, factor in zip(chunks, factors, strict=True):
        sizes = tuple(int(s) for s in sizes)
        head = sizes[:-1]
        if factor == 2 and head and (any(s % 2 for s in head) or min(head) // 2 < min_chunk):
            return None
        out.append(tuple(-(-s // int(factor)) for s in sizes))
    return tuple(out)


def blockwise_level(
    arr: da.Array,
    factors: Sequence[int],
    downsample: Callable[..., Any] = downsample_mean2,
    min_chunk: int = 1,
) -> da.Array | None:
    """Downsample every block of ``arr`` on its own: one task per block, no regrouping.

    The result equals :func:`pyramid_level` exactly; None when it would not (see
    :func:`blockwise_level_chunks`). Blocks stay where they are (on the GPU for CuPy
    blocks with ``downsample=downsample_mean2_gpu``).

    Parameters
    ----------
    arr : dask.array.Array
        Integer or floating-point array (NumPy or CuPy blocks).
    factors : sequence of int
        One factor (1 or 2) per axis.
    downsample : callable
        ``downsample(block, factors)``, :func:`downsample_mean2` or a twin of it.
    min_chunk : int
        See :func:`blockwise_level_chunks`.

    Returns
    -------
    dask.array.Array or None
        Same dtype and meta as ``arr``; block ``i`` is ``downsample(arr.blocks[i])``.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> a = da.from_array(np.arange(35, dtype=np.float32).reshape(5, 7), chunks=(4, 4))
    >>> low = blockwise_level(a, (2, 2))
    >>> low.chunks, bool((low.compute() == pyramid_level(a, (2, 2)).compute()).all())
    (((2, 1), (2, 2)), True)
    """
    factors = tuple(int(f) for f in factors)
    chunks = blockwise_level_chunks(arr.chunks, factors, min_chunk)
    if chunks is None:
        return None
    return arr.map_blocks(downsample, factors=factors, chunks=chunks, dtype=arr.dtype,
                          meta=arr._meta)


def blockwise_levels(
    arr: da.Array,
    plan: Sequence[Sequence[int]],
    downsample: Callable[..., Any] = downsample_mean2,
    min_chunk: int = 1,
) -> list[da.Array]:
    """Levels 1, 2, ... of ``plan`` by :func:`blockwise_level`, as long as that is exact.

    Returns
    -------
    list of dask.array.Array
        The leading levels of ``plan`` (possibly none); each block of level ``k + 1`` is
        computed from the matching block of level ``k``, so every block of ``arr`` feeds
        all of them while it is in memory.

    Examples
    --------
    >>> import dask.array as da
    >>> img = da.zeros((1000, 731), dtype="uint16", chunks=128)
    >>> [lvl.chunksize for lvl in blockwise_levels(img, [(2, 2)] * 3, min_chunk=32)]
    [(64, 64), (32, 32)]
    """
    levels: list[da.Array] = []
    for factors in plan:
        lower = blockwise_level(levels[-1] if levels else arr, factors, downsample, min_chunk)
        if lower is None:
            break
        levels.append(lower)
    return levels


def pyramid_level(
    arr: da.Array, factors: Sequence[int], chunks: Sequence[int] | None = None
) -> da.Array:
    """Lazily downsample a dask array by ``factors`` (see :func:`downsample_mean2`).

    For an output chunk size ``C`` on an axis, the input is regrouped into blocks of
    ``f * C`` samples (a no-op when it is already chunked so, e.g. read from Zarr with
    those chunks), so every output block is exactly one block of ``C`` (the last one
    ragged) and the odd edge only ever occurs in the last block. Every task reads one
    input block; the whole image is never held in memory.

    Parameters
    ----------
    arr : dask.array.Array
        Integer or floating-point array (NumPy or CuPy blocks).
    factors : sequence of int
        One factor (1 or 2) per axis.
    chunks : sequence of int, optional
        Output chunk size ``C`` per axis; default ``arr.chunksize``.

    Returns
    -------
    dask.array.Array
        Same dtype as ``arr``, chunks of ``C``; shape ``ceil(n / f)`` per axis.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> a = da.from_array(np.arange(35, dtype=np.float32).reshape(5, 7), chunks=2)
    >>> low = pyramid_level(a, (2, 2))
    >>> low.shape, low.chunksize
    ((3, 4), (2, 2))
    >>> low.compute()[2]
    array([28.5, 30.5, 32.5, 34. ], dtype=float32)
    """
    factors = tuple(int(f) for f in factors)
    if len(factors) != arr.ndim or any(f not in (1, 2) for f in factors):
        raise ValueError(f"factors {factors} must be 1 or 2 for each of the {arr.ndim} axes")
    chunk = tuple(int(c) for c in (arr.chunksize if chunks is None else chunks))
    if len(chunk) != arr.ndim or min(chunk, default=1) < 1:
        raise ValueError(f"chunks {chunk} must be one positive size per axis ({arr.ndim})")
    grouped = arr.rechunk(tuple(c * f for c, f in zip(chunk, factors, strict=True)))
    out_shape = downsampled_shape(arr.shape, factors)
    out_chunks = tuple(_regular_chunks(n, c) for n, c in zip(out_shape, chunk, strict=True))
    return grouped.map_blocks(
        downsample_mean2,
        factors=factors,
        chunks=out_chunks,
        dtype=arr.dtype,
        meta=arr._meta,
    )
