"""A strict NumPy-backed stand-in for the array-module part of CuPy.

The registration code is written once against an array module ``xp`` (NumPy or CuPy). On a
machine without a GPU its CuPy path can still be run with this module in place of
``cupy``: device arrays are :class:`DeviceArray` objects wrapping NumPy arrays, and they
keep CuPy's rules on the host/device boundary, which is where such code breaks:

* no implicit conversion to NumPy (``np.asarray(d)``, ``np.stack([d])``, ``float(d)`` of a
  non-scalar, ``d.tolist()`` are errors), only ``cupy.asnumpy`` / ``d.get()``;
* device functions and operators refuse NumPy arrays (other than 0-d) as operands, the way
  CuPy raises ``TypeError: Unsupported type <class 'numpy.ndarray'>``; NumPy and Python
  scalars are fine;
* NumPy ufuncs on device arrays run "on the device" and return device arrays, as in CuPy;
  other NumPy functions (``np.stack``, ``np.where``, ...) are refused: CuPy would dispatch
  them to the device and hand back a device array where the code expects a host one.

Only the functions the registration code uses exist (an ``AttributeError`` names any
other), ``cupy.fft`` maps to ``numpy.fft`` (results cast to complex64/float32 as CuPy's
single-precision FFTs return) and ``cuda.runtime.getDeviceCount`` reports one device.
``RawModule`` knows only ``downsample_mean2`` (run by its NumPy reference): enough for the
trial kernel of :func:`gpufusion.backends.gpu_status`, so the stand-in counts as a usable
GPU. The counters in ``STATS`` let a test check the device path was actually taken.
"""

from __future__ import annotations

import operator
import types
from collections import Counter
from typing import Any

import numpy as np

STATS: Counter[str] = Counter()


class DeviceArray:
    """A NumPy array posing as device memory, with CuPy's conversion rules."""

    __slots__ = ("_a",)
    __array_priority__ = 1000

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    # -- what CuPy refuses -----------------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        # as CuPy: NumPy ufuncs run on the device (``np.float32(2) * d`` is a device array),
        # and a host array among the operands is refused
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))

    #: False: NumPy functions on device arrays are refused (registration tests). True: they
    #: run "on the device" as CuPy's ``__array_function__`` does (dask calls
    #: ``np.concatenate`` and friends on blocks), host arrays among the arguments refused.
    dispatch_numpy = False

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if not DeviceArray.dispatch_numpy:
            raise TypeError(f"numpy.{func.__name__} called on a device array")
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __iter__(self) -> Any:
        raise TypeError("iterating over a device array (use cupy.asnumpy first)")

    def tolist(self) -> Any:
        raise TypeError("tolist of a device array (use cupy.asnumpy first)")

    def __float__(self) -> float:
        return float(self._scalar())

    def __int__(self) -> int:
        return int(self._scalar())

    def __bool__(self) -> bool:
        return bool(self._scalar())

    def _scalar(self) -> Any:
        if self._a.size != 1:
            raise TypeError("only size-1 device arrays convert to Python scalars")
        STATS["to_host"] += 1
        return self._a.reshape(-1)[0]

    # -- explicit transfers ----------------------------------------------------------------
    def get(self) -> np.ndarray:
        STATS["to_host"] += 1
        return self._a.copy()

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Host to device into this array (``cupy.ndarray.set``): same shape and dtype."""
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise TypeError("set: a host array of the same shape and dtype is required")
        STATS["to_device"] += 1
        np.copyto(self._a, arr)

    @property
    def data(self) -> Any:
        """``.data.ptr``: the address kernels receive (host memory standing in)."""
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    # -- array attributes and methods ------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: _wrap(self._a.T))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"DeviceArray({self._a!r})"

    def __getattr__(self, name: str) -> Any:
        if name in _METHODS:
            method = getattr(self._a, name)
            return lambda *args, **kwargs: _wrap(method(*_unwrap(args), **_unwrap(kwargs)))
        raise AttributeError(f"DeviceArray has no attribute {name!r} here")

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_unwrap_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if _host_operand(value):  # CuPy copies a host value in
            STATS["to_device"] += 1
        else:
            value = _unwrap(value)
        self._a[_unwrap_index(key)] = value


_METHODS = {"astype", "reshape", "sum", "max", "min", "mean", "copy", "ravel", "transpose",
            "conj", "argmax", "argmin", "any", "all", "squeeze", "swapaxes", "prod", "cumsum",
            "view", "fill", "round", "clip", "flatten", "nonzero", "std", "var", "dot"}


def _binary(op: Any, reflected: bool = False) -> Any:
    def method(self: DeviceArray, other: Any) -> Any:
        other = _unwrap(other)
        return _wrap(op(other, self._a) if reflected else op(self._a, other))
    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv),
                   ("mod", operator.mod), ("pow", operator.pow), ("and", operator.and_),
                   ("or", operator.or_), ("xor", operator.xor), ("matmul", operator.matmul)]:
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
    setattr(DeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt),
                   ("ge", operator.ge), ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
DeviceArray.__neg__ = lambda self: _wrap(-self._a)  # type: ignore[attr-defined]
DeviceArray.__abs__ = lambda self: _wrap(abs(self._a))  # type: ignore[attr-defined]
DeviceArray.__invert__ = lambda self: _wrap(~self._a)  # type: ignore[attr-defined]
DeviceArray.__hash__ = None  # type: ignore[assignment]


def _host_operand(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.ndim > 0


def _unwrap(x: Any) -> Any:
    """Device arrays to their NumPy arrays; NumPy arrays (ndim > 0) are refused."""
    if isinstance(x, DeviceArray):
        return x._a
    if _host_operand(x):
        raise TypeError(f"Unsupported type {type(x)} (a host array given to a device "
                        f"function; shape {x.shape})")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _unwrap_index(key: Any) -> Any:
    # CuPy accepts host integer arrays as indices (it copies them); keep that
    if isinstance(key, tuple):
        return tuple(k._a if isinstance(k, DeviceArray) else k for k in key)
    return key._a if isinstance(key, DeviceArray) else key


def _wrap(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return DeviceArray(x)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _device_function(fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        STATS["calls"] += 1
        return _wrap(fn(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = fn.__name__
    return call


def asarray(a: Any, dtype: Any = None) -> DeviceArray:
    """Host to device (explicit, as ``cupy.asarray``)."""
    if isinstance(a, DeviceArray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else DeviceArray(
            a._a.astype(dtype))
    STATS["to_device"] += 1
    return DeviceArray(np.array(a, dtype=dtype))


def asnumpy(a: Any) -> np.ndarray:
    if isinstance(a, DeviceArray):
        return a.get()
    return np.asarray(a)


_FUNCTIONS = ("abs", "arange", "argmax", "clip", "conj", "maximum", "minimum", "ones", "zeros",
              "empty", "pad", "sqrt", "stack", "take", "unravel_index", "where", "isfinite",
              "full", "exp", "floor", "round", "rint", "concatenate", "sum", "cumsum",
              "ascontiguousarray", "empty_like", "zeros_like", "ones_like", "copyto")


def _fft(fn: Any, out_dtype: Any) -> Any:
    def call(x: Any, *args: Any, **kwargs: Any) -> DeviceArray:
        if not isinstance(x, DeviceArray):
            raise TypeError(f"cupy.fft: expected a device array, got {type(x)}")
        STATS["fft"] += 1
        return DeviceArray(fn(x._a, *_unwrap(args), **_unwrap(kwargs)).astype(
            out_dtype(x._a.dtype)))
    return call


def _complex_for(dt: np.dtype) -> type:
    return np.complex64 if dt in (np.float32, np.complex64) else np.complex128


def _real_for(dt: np.dtype) -> type:
    return np.float32 if dt in (np.float32, np.complex64) else np.float64


def build_strict_cupy() -> types.ModuleType:
    """A ``cupy`` module: device arrays with CuPy's rules, kernels-free, one fake device."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = DeviceArray  # type: ignore[attr-defined]
    cupy.asarray = asarray  # type: ignore[attr-defined]
    cupy.asnumpy = asnumpy  # type: ignore[attr-defined]
    for name in _FUNCTIONS:
        setattr(cupy, name, _device_function(getattr(np, name)))
    for name in ("float32", "float64", "complex64", "complex128", "int64", "int32", "uint8",
                 "uint16", "bool_", "nan", "inf", "pi", "newaxis"):
        setattr(cupy, name, getattr(np, name))
    cupy.fft = types.SimpleNamespace(  # type: ignore[attr-defined]
        rfftn=_fft(np.fft.rfftn, _complex_for), irfftn=_fft(np.fft.irfftn, _real_for),
        fftn=_fft(np.fft.fftn, _complex_for), ifftn=_fft(np.fft.ifftn, _complex_for))
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0,
                                    getDeviceProperties=lambda dev: {"name": b"strict stand-in"})

    class Device:
        def synchronize(self) -> None:
            return None

    cupy.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)  # type: ignore[attr-defined]
    cupy.RawModule = ReferenceRawModule  # type: ignore[attr-defined]
    return cupy


class ReferenceRawModule:
    """``cupy.RawModule`` for ``kernels/downsample.cu`` only, its kernel run by the NumPy
    reference on the device arrays' data (the launch arguments as the backend passes them)."""

    def __init__(self, *, code: str, options: tuple, name_expressions: tuple) -> None:
        self.exprs = name_expressions

    def get_function(self, expr: str) -> Any:
        from gpufusion.backends import cuda_kernels as ck
        from gpufusion.pyramid import downsample_mean2

        if expr not in self.exprs or not expr.startswith("downsample_mean2<"):
            raise NotImplementedError(f"strict stand-in: no kernel {expr!r}")
        algorithm = ck.DOWNSAMPLE_ALGORITHMS[int(expr.rstrip(">").rsplit(",", 1)[1])]

        def launch(grid: tuple, block: tuple, args: tuple) -> None:
            src, out, *dims = args
            shape4, factors4 = [int(v) for v in dims[:4]], [int(v) for v in dims[4:]]
            result = downsample_mean2(src._a.reshape(shape4), factors4, algorithm=algorithm)
            out._a[...] = result.reshape(out.shape)

        return launch
