"""Compile ``kernels/*.cu`` as C++ with g++ and run them on the CPU through ctypes.

Each kernel file becomes one shared library: ``cuda_shim.h``, then the ``.cu`` file itself
(unchanged), then one ``extern "C"`` launch wrapper per template instantiation, generated
here from the same name expressions NVRTC compiles. A wrapper runs the kernel body for every
(block, thread) of a 1-D grid (see ``cuda_shim.h``). The Python side packs chunks with the
backend's own :func:`~gpufusion.backends.cuda_kernels.pack_fusion_chunk` and
:func:`~gpufusion.backends.cuda_kernels.fusion_kernel_args`, so the argument layout is
exercised exactly as on the GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpufusion.backends import cuda_kernels as ck
from gpufusion.backends.numpy_ref import FusionParams, cast_output
from gpufusion.plan import ChunkTable

HERE = Path(__file__).resolve().parent
SHIM = HERE / "cuda_shim.h"
#: g++ flags: no contraction of a*b+c (as --fmad=false on the GPU), C++17 like NVRTC.
CXXFLAGS = ("-O2", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror")

FuseKey = tuple[str, str, int, str, str]

_FUSE_ARGS = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
              ctypes.c_longlong, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
              ctypes.c_longlong, ctypes.c_double, ctypes.c_double, ctypes.c_double,
              ctypes.c_double, ctypes.c_longlong]
_DS_ARGS = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p] + \
    [ctypes.c_longlong] * 8


def gxx_available() -> bool:
    return shutil.which("g++") is not None


def _fuse_symbol(key: FuseKey) -> str:
    kin, kout, ndim, mode, interp = key
    return f"gf_host_fuse_{kin}_{kout}_{ndim}d_{mode}_{interp}"


def _fuse_wrappers(keys: Sequence[FuseKey]) -> str:
    out = []
    for key in keys:
        expr = ck.fuse_name_expression(*key)
        tin, tout = ck.CTYPES[key[0]], ck.CTYPES[key[1]]
        out.append(f"""
extern "C" void {_fuse_symbol(key)}(unsigned int grid, unsigned int block, const void* windows,
        const long long* idesc, const double* fdesc, long long n_entries, void* out,
        long long s0, long long s1, long long s2, double bw0, double bw1, double bw2,
        double eps, long long keep_single) {{
    gf_host_launch(grid, block, [&]() {{
        {expr}((const {tin}*)windows, idesc, fdesc, n_entries, ({tout}*)out, s0, s1, s2,
               bw0, bw1, bw2, eps, keep_single);
    }});
}}""")
    return "\n".join(out)


_SEPARABLE_ARGS = [ctypes.c_uint, ctypes.c_uint] + [ctypes.c_void_p] * 5 + \
    [ctypes.c_longlong, ctypes.c_void_p] + [ctypes.c_longlong] * 4


def _separable_symbol(key: FuseKey) -> str:
    return _fuse_symbol(key).replace("gf_host_fuse_", "gf_host_fuse_separable_")


def _separable_wrappers(keys: Sequence[FuseKey]) -> str:
    out = []
    for key in keys:
        expr = ck.separable_name_expression(*key)
        tin, tout = ck.CTYPES[key[0]], ck.CTYPES[key[1]]
        acc = ck.CTYPES[ck.FUSE_ACCUMULATOR[key[0]]]
        out.append(f"""
extern "C" void {_separable_symbol(key)}(unsigned int grid, unsigned int block,
        const void* windows, const long long* woff, const int* cover, const void* atab,
        const int* itab, long long n_entries, void* out, long long s0, long long s1,
        long long s2, long long keep_single) {{
    gf_host_launch(grid, block, [&]() {{
        {expr}((const {tin}*)windows, woff, cover, (const {acc}*)atab, itab, n_entries,
               ({tout}*)out, s0, s1, s2, keep_single);
    }});
}}""")
    return "\n".join(out)


_BLOCKS_ARGS = [ctypes.c_uint, ctypes.c_uint] + [ctypes.c_void_p] * 6 + \
    [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_longlong]


def _blocks_symbol(key: FuseKey) -> str:
    return _fuse_symbol(key).replace("gf_host_fuse_", "gf_host_fuse_blocks_")


def _blocks_wrappers(keys: Sequence[FuseKey]) -> str:
    out = []
    for key in keys:
        expr = ck.blocks_name_expression(*key)
        tin, tout = ck.CTYPES[key[0]], ck.CTYPES[key[1]]
        acc = ck.CTYPES[ck.FUSE_ACCUMULATOR[key[0]]]
        out.append(f"""
extern "C" void {_blocks_symbol(key)}(unsigned int grid, unsigned int block,
        const void* tiles, const long long* btab, const long long* woff, const int* cover,
        const void* atab, const int* itab, long long n_blocks, long long per_block, void* out,
        long long keep_single) {{
    gf_host_launch(grid, block, [&]() {{
        {expr}((const {tin}*)tiles, btab, woff, cover, (const {acc}*)atab, itab, n_blocks,
               per_block, ({tout}*)out, keep_single);
    }});
}}""")
    return "\n".join(out)


def _downsample_symbol(dtype: str, algorithm: str) -> str:
    return f"gf_host_downsample_{dtype}_{algorithm}"


def _downsample_wrappers(keys: Sequence[tuple[str, str]]) -> str:
    out = []
    for name, algorithm in keys:
        expr = ck.downsample_name_expression(name, algorithm)
        t = ck.CTYPES[name]
        out.append(f"""
extern "C" void {_downsample_symbol(name, algorithm)}(unsigned int grid, unsigned int block,
        const void* in, void* out, long long n0, long long n1, long long n2, long long n3,
        long long f0, long long f1, long long f2, long long f3) {{
    gf_host_launch(grid, block, [&]() {{
        {expr}((const {t}*)in, ({t}*)out, n0, n1, n2, n3, f0, f1, f2, f3);
    }});
}}""")
    return "\n".join(out)


def _translation_unit(kernel: str, wrappers: str) -> str:
    return f'#include "{SHIM}"\n#include "{_kernel_path(kernel)}"\n{wrappers}\n'


def _kernel_path(kernel: str) -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("gpufusion.kernels").joinpath(f"{kernel}.cu")))


class HostKernels:
    """The kernels of ``kernels/*.cu`` compiled for the host, with NumPy-facing calls."""

    def __init__(self, libs: dict[str, ctypes.CDLL], fuse_keys: Sequence[FuseKey],
                 downsample_keys: Sequence[tuple[str, str]]) -> None:
        self.libs = libs
        self.fuse_keys = set(fuse_keys)
        self.downsample_keys = set(downsample_keys)
        for key in fuse_keys:
            fn = getattr(libs["fuse"], _fuse_symbol(key))
            fn.argtypes, fn.restype = _FUSE_ARGS, None
            fn = getattr(libs["fuse"], _separable_symbol(key))
            fn.argtypes, fn.restype = _SEPARABLE_ARGS, None
            fn = getattr(libs["fuse"], _blocks_symbol(key))
            fn.argtypes, fn.restype = _BLOCKS_ARGS, None
        for name, algorithm in downsample_keys:
            fn = getattr(libs["downsample"], _downsample_symbol(name, algorithm))
            fn.argtypes, fn.restype = _DS_ARGS, None

    @classmethod
    def build(cls, workdir: Path, fuse_keys: Sequence[FuseKey],
              downsample_keys: Sequence[tuple[str, str]]) -> HostKernels:
        """Compile both kernel files (in parallel) into ``workdir`` and load them; each
        fusion key builds the general kernel, its separable twin and the batched one."""
        units = {"fuse": _fuse_wrappers(fuse_keys) + _separable_wrappers(fuse_keys)
                 + _blocks_wrappers(fuse_keys),
                 "downsample": _downsample_wrappers(downsample_keys)}
        procs, paths = {}, {}
        for kernel, wrappers in units.items():
            text = _translation_unit(kernel, wrappers)
            digest = hashlib.sha256((text + _kernel_path(kernel).read_text()
                                     + SHIM.read_text() + " ".join(CXXFLAGS)).encode())
            cpp = workdir / f"{kernel}_host.cpp"
            so = workdir / f"lib{kernel}_host_{digest.hexdigest()[:16]}.so"
            paths[kernel] = so
            if so.exists():
                continue
            cpp.write_text(text)
            procs[kernel] = subprocess.Popen(["g++", *CXXFLAGS, str(cpp), "-o", str(so)],
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True)
        for kernel, proc in procs.items():
            log, _ = proc.communicate()
            if proc.returncode != 0 or log.strip():
                raise RuntimeError(f"g++ failed or warned on {kernel}.cu:\n{log}")
        libs = {k: ctypes.CDLL(str(p)) for k, p in paths.items()}
        return cls(libs, fuse_keys, downsample_keys)

    def fuse_chunk(self, windows: Sequence[np.ndarray], table: ChunkTable,
                   params: FusionParams, *, block: int = 64, max_blocks: int = 1 << 20
                   ) -> np.ndarray:
        """Fuse one chunk with the emulated kernel, as the CuPy backend does on the GPU."""
        out_dtype = np.dtype(params.out_dtype)
        kin, kout = ck.fusion_kernel_dtypes(windows[0].dtype if windows else out_dtype,
                                            out_dtype)
        out = np.zeros(table.shape, dtype=kout)
        if len(table) == 0:
            return cast_output(out.astype(np.float32), out_dtype)
        key = (kin, kout, len(table.shape), params.mode, params.interpolation)
        if key not in self.fuse_keys:
            raise KeyError(f"instantiation {key} was not built for the host")
        packing = ck.fusion_packing(table, kin)
        buffer = np.zeros(packing.nbytes + 64, dtype=np.uint8)
        base = -buffer.ctypes.data % 64  # 64-byte aligned like a device allocation
        buf = buffer[base:base + packing.nbytes]
        ck.pack_fusion_chunk(windows, table, packing, buf)
        args = ck.fusion_kernel_args(buf.ctypes.data, out.ctypes.data, packing, table.shape,
                                     params)
        grid, threads = ck.launch_config(math.prod(table.shape), block, max_blocks)
        fn = getattr(self.libs["fuse"], _fuse_symbol(key))
        fn(grid, threads, *(float(a) if isinstance(a, np.floating) else int(a) for a in args))
        return out if kout == out_dtype.name else cast_output(out, out_dtype)

    def fuse_chunk_separable(self, windows: Sequence[np.ndarray], table: ChunkTable,
                             params: FusionParams, *, block: int = 64,
                             max_blocks: int = 1 << 20) -> np.ndarray:
        """Fuse one chunk of translations with the emulated separable kernel."""
        out_dtype = np.dtype(params.out_dtype)
        kin, kout = ck.fusion_kernel_dtypes(windows[0].dtype, out_dtype)
        if not ck.separable_applies(table):
            raise ValueError("the separable kernel does not apply to this chunk")
        key = (kin, kout, len(table.shape), params.mode, params.interpolation)
        if key not in self.fuse_keys:
            raise KeyError(f"instantiation {key} was not built for the host")
        packing = ck.separable_packing(table, kin)
        buffer = np.zeros(packing.nbytes + 64, dtype=np.uint8)
        base = -buffer.ctypes.data % 64
        buf = buffer[base:base + packing.nbytes]
        ck.pack_separable_chunk(windows, table, packing, buf, params)
        out = np.zeros(table.shape, dtype=kout)
        args = ck.separable_kernel_args(buf.ctypes.data, out.ctypes.data, packing, table.shape,
                                        params)
        grid, threads = ck.launch_config(ck.separable_launch_total(table.shape), block,
                                         max_blocks)
        fn = getattr(self.libs["fuse"], _separable_symbol(key))
        fn(grid, threads, *(int(a) for a in args))
        return out if kout == out_dtype.name else cast_output(out, out_dtype)

    def downsample_mean2(self, arr: np.ndarray, factors: Sequence[int],
                         algorithm: str = "corners", *, block: int = 64,
                         max_blocks: int = 1 << 20) -> np.ndarray:
        """2x mean downsampling with the emulated kernel (shape handling as on the GPU)."""
        geometry = ck.downsample_geometry(arr.shape, factors)
        if geometry is None:
            raise ValueError(f"{arr.ndim}-D block with factors {tuple(factors)} needs the "
                             "generic fallback")
        shape4, factors4 = geometry
        name = np.dtype(arr.dtype).name
        src = np.ascontiguousarray(arr)
        out_shape = tuple(-(-n // f) for n, f in zip(arr.shape, factors, strict=True))
        out = np.empty(out_shape, dtype=arr.dtype)
        grid, threads = ck.launch_config(out.size, block, max_blocks)
        fn = getattr(self.libs["downsample"], _downsample_symbol(name, algorithm))
        fn(grid, threads, src.ctypes.data, out.ctypes.data, *shape4, *factors4)
        return out
