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

Streams are modelled as far as their rules go, not their timing: every device array is
tagged with the stream current when its memory was allocated (as CuPy's pool ties a block
to that stream's free list); a kernel launch, a device function or a copy that touches an
array allocated on another stream than the one it runs on is a *stream crossing*, and a
device-to-host copy into memory that is not pinned (:func:`empty_pinned`) or not on an
explicit stream is a *pageable download*. Both are appended to ``STREAMS.violations``;
with ``STREAMS.strict`` set they raise :class:`StreamViolation` at once. Work runs at
once on the host, so this sees the pattern that races on a GPU, not the race itself.
"""

from __future__ import annotations

import operator
import threading
import types
import weakref
from collections import Counter
from typing import Any

import numpy as np

STATS: Counter[str] = Counter()


class StreamViolation(AssertionError):
    """Device memory used across streams in a way that races on a GPU."""


class FakeStream:
    """A CUDA stream as far as its ordering rules go: which one is current (per thread, as
    CuPy's ``with stream``), how much work was enqueued on it, how often it was waited for."""

    def __init__(self, non_blocking: bool = False, name: str = "") -> None:
        self.non_blocking = non_blocking
        self.name = name or f"stream-{id(self):x}"
        self.enqueued = 0  # operations enqueued
        self.synchronized = 0  # waits that found every enqueued operation done
        STREAMS.all.add(self)

    def __enter__(self) -> FakeStream:
        _stack().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack().pop()

    def synchronize(self) -> None:
        self.synchronized += 1

    def use(self) -> FakeStream:
        stack = _stack()
        if stack:
            stack[-1] = self
        else:
            stack.append(self)
        return self

    def __repr__(self) -> str:
        return f"<FakeStream {self.name}>"


class FakeEvent:
    """``cupy.cuda.Event``: waiting for it counts as synchronising its stream only if
    nothing was enqueued there after it was recorded."""

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self.recorded: tuple[FakeStream, int] | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = current_stream() if stream is None else stream
        self.recorded = (stream, stream.enqueued)

    def synchronize(self) -> None:
        if self.recorded is not None and self.recorded[0].enqueued == self.recorded[1]:
            self.recorded[0].synchronize()


class _Memory:
    """What the stream rules know of one allocation: its stream (CuPy's pool gives the
    block back to that stream's free list) and the other streams that used it."""

    __slots__ = ("ref", "home", "home_mark", "foreign", "shape")

    def __init__(self, ref: weakref.ref, home: FakeStream, shape: tuple) -> None:
        self.ref, self.home, self.shape = ref, home, shape
        self.home_mark = home.synchronized  # `home.synchronized` at its last use there
        # stream -> (its `synchronized` at the last use there, what that use was)
        self.foreign: dict[FakeStream, tuple[int, str]] = {}


class _StreamRules:
    """Ledger of the stream rules (see the module docstring); ``reset()`` between tests."""

    def __init__(self) -> None:
        self.strict = False
        self.violations: list[str] = []
        self.lock = threading.Lock()
        self.local = threading.local()
        self.memory: dict[int, _Memory] = {}  # id(root array) -> its record
        self.pinned: dict[int, weakref.ref] = {}  # id(root) of pinned host buffers
        self.all: weakref.WeakSet[FakeStream] = weakref.WeakSet()

    def report(self, message: str, raise_now: bool = True) -> None:
        with self.lock:
            if len(self.violations) < 1000:
                self.violations.append(message)
        if self.strict and raise_now:
            raise StreamViolation(message)

    def reset(self) -> None:
        with self.lock:
            self.violations.clear()

    def synchronize_all(self) -> None:
        for stream in list(self.all):
            stream.synchronize()


STREAMS = _StreamRules()

#: The legacy default stream (current when no ``with stream`` is open).
NULL_STREAM = FakeStream(name="legacy-null")


def _stack() -> list[FakeStream]:
    return STREAMS.local.__dict__.setdefault("stack", [])


def current_stream() -> FakeStream:
    """The stream work is enqueued on now (``cupy.cuda.get_current_stream``)."""
    stack = _stack()
    return stack[-1] if stack else NULL_STREAM


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _freed(key: int) -> None:
    """The memory of an allocation went back to its stream's free list."""
    mem = STREAMS.memory.pop(key, None)
    if mem is None:
        return
    for stream, (mark, what) in mem.foreign.items():
        if stream.synchronized == mark:
            STREAMS.report(f"freed while in use: an array {mem.shape} allocated on "
                           f"{mem.home.name} was freed (its block free for the next allocation "
                           f"on {mem.home.name}) while {what} on {stream.name} that uses it "
                           "was not waited for", raise_now=False)


def _tag(a: np.ndarray) -> None:
    """Record the allocation of ``a``'s memory on the current stream (unless known)."""
    root = _root(a)
    key = id(root)
    mem = STREAMS.memory.get(key)
    if mem is None or mem.ref() is not root:
        ref = weakref.ref(root, lambda _r, key=key: _freed(key))
        STREAMS.memory[key] = _Memory(ref, current_stream(), root.shape)


def _memory(d: DeviceArray) -> _Memory | None:
    root = _root(d._a)
    mem = STREAMS.memory.get(id(root))
    return mem if mem is not None and mem.ref() is root else None


def allocation_stream(d: DeviceArray) -> FakeStream | None:
    """The stream the memory of ``d`` was allocated on."""
    mem = _memory(d)
    return None if mem is None else mem.home


def check_streams(what: str, values: Any, stream: FakeStream | None = None) -> None:
    """Record that ``what`` is enqueued on ``stream`` (default the current one) and uses the
    device arrays among ``values``; report a use that races on a GPU:

    * on another stream than the array's, while work on its own stream was not waited for
      (it may not be written yet);
    * on its own stream, while work on another stream that used it was not waited for.

    Freeing an array while another stream's use of it was not waited for is reported when
    it is freed (its block could be handed to the next allocation on its stream).
    """
    stream = current_stream() if stream is None else stream
    for v in _device_arrays(values):
        mem = _memory(v)
        if mem is None:
            continue
        if mem.home is stream:
            for other, (mark, _) in mem.foreign.items():
                if other.synchronized == mark:
                    STREAMS.report(f"{what}: an array {v.shape} used on {stream.name} while "
                                   f"work on {other.name} that uses it was not waited for")
            mem.home_mark = stream.synchronized
        else:
            if mem.home.synchronized == mem.home_mark:
                STREAMS.report(f"{what}: an array {v.shape} allocated on {mem.home.name} used "
                               f"on {stream.name} before {mem.home.name} was waited for")
            mem.foreign[stream] = (stream.synchronized, what)
    stream.enqueued += 1


def _device_arrays(values: Any) -> list:
    if isinstance(values, DeviceArray):
        return [values]
    if isinstance(values, (list, tuple)):
        return [d for v in values for d in _device_arrays(v)]
    if isinstance(values, dict):
        return _device_arrays(list(values.values()))
    return []


def empty_pinned(shape: Any, dtype: Any = np.float64) -> np.ndarray:
    """``cupyx.empty_pinned``: a host array whose memory counts as pinned."""
    a = np.empty(shape, dtype)
    key = id(a)
    STREAMS.pinned[key] = weakref.ref(a, lambda _r, key=key: STREAMS.pinned.pop(key, None))
    return a


def is_pinned(a: np.ndarray) -> bool:
    root = _root(a)
    ref = STREAMS.pinned.get(id(root))
    return ref is not None and ref() is root


class DeviceArray:
    """A NumPy array posing as device memory, with CuPy's conversion rules."""

    __slots__ = ("_a",)
    __array_priority__ = 1000

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        _tag(a)

    # -- what CuPy refuses -----------------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        # as CuPy: NumPy ufuncs run on the device (``np.float32(2) * d`` is a device array),
        # and a host array among the operands is refused
        check_streams(f"numpy.{ufunc.__name__}", (inputs, kwargs))
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))

    #: False: NumPy functions on device arrays are refused (registration tests). True: they
    #: run "on the device" as CuPy's ``__array_function__`` does (dask calls
    #: ``np.concatenate`` and friends on blocks), host arrays among the arguments refused.
    dispatch_numpy = False

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if not DeviceArray.dispatch_numpy:
            raise TypeError(f"numpy.{func.__name__} called on a device array")
        check_streams(f"numpy.{func.__name__}", (args, kwargs))
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
    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        """Device to host (``cupy.ndarray.get``): a new array, or into ``out`` (same shape
        and dtype, C-contiguous, as CuPy requires); checked against the stream rules."""
        STATS["to_host"] += 1
        on = current_stream() if stream is None else stream
        check_streams("get", self, on)
        if stream is None:  # a synchronous copy: complete (with all before it) on return
            on.synchronize()
        # with a stream, the copy may still run on return (CuPy before 13 ignores
        # `blocking`): the caller waits for the stream
        if out is None:
            STATS["pageable_to_host"] += 1
            return self._a.copy()
        if not isinstance(out, np.ndarray) or out.shape != self.shape \
                or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError("get: `out` must be a C-contiguous host array of the same shape "
                             "and dtype")
        STATS["pinned_to_host" if is_pinned(out) else "pageable_to_host"] += 1
        np.copyto(out, self._a)
        return out

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        """Host to device into this array (``cupy.ndarray.set``): same shape and dtype."""
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise TypeError("set: a host array of the same shape and dtype is required")
        STATS["to_device"] += 1
        check_streams("set", self, current_stream() if stream is None else stream)
        np.copyto(self._a, arr)

    @property
    def flags(self) -> Any:
        return self._a.flags

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

            def call(*args: Any, **kwargs: Any) -> Any:
                check_streams(f"ndarray.{name}", (self, args, kwargs))
                return _wrap(method(*_unwrap(args), **_unwrap(kwargs)))

            return call
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
        check_streams(f"cupy.{fn.__name__}", (args, kwargs))
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
            STREAMS.synchronize_all()

    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=runtime, Device=Device, Stream=FakeStream, Event=FakeEvent,
        get_current_stream=current_stream)
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

        def launch(grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0,
                   stream: Any = None) -> None:
            check_streams(expr, args, stream)
            src, out, *dims = args
            shape4, factors4 = [int(v) for v in dims[:4]], [int(v) for v in dims[4:]]
            result = downsample_mean2(src._a.reshape(shape4), factors4, algorithm=algorithm)
            out._a[...] = result.reshape(out.shape)

        return launch
