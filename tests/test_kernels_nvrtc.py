"""Every ``kernels/*.cu`` compiles with NVRTC for sm_80 and sm_90, without a warning.

NVRTC (the ``nvidia-cuda-nvrtc`` wheel, driven through ctypes) needs no GPU. Every template
instantiation the backend can ask for is forced with a name expression, with the options
CuPy will use (ours, plus the ``-ftz=true`` CuPy appends), so a kernel that only breaks for
one dtype, ndim or mode is caught on CPU-only CI.
"""

from __future__ import annotations

import importlib
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor

import pytest

from gpufusion.backends import cuda_kernels as ck

from .kernel_checks import skip_module_unless

# skipped without the wheel; an error instead under GPUFUSION_REQUIRE_KERNEL_CHECKS=1 (CI)
skip_module_unless(ck.nvrtc_library_paths() is not None,
                   "the nvidia-cuda-nvrtc wheel is not installed")

ARCHS = ("sm_80", "sm_90")
#: CuPy appends -ftz=true to the caller's options; compile what will actually run.
CUPY_OPTIONS = (*ck.COMPILE_OPTIONS, "-ftz=true")


def name_expressions(kernel: str) -> list[str]:
    if kernel == "fuse":
        return ([ck.fuse_name_expression(*key) for key in ck.fuse_instantiations()]
                + [ck.separable_name_expression(*key) for key in ck.fuse_instantiations()]
                + [ck.blocks_name_expression(*key) for key in ck.fuse_instantiations()])
    if kernel == "downsample":
        return [ck.downsample_name_expression(*key) for key in ck.downsample_instantiations()]
    raise AssertionError(f"kernels/{kernel}.cu has no name expressions in this test")


def compile_job(job: tuple[str, str]) -> ck.NvrtcResult | str:
    """Compile one (kernel, arch); a failure comes back as its message."""
    kernel, arch = job
    try:
        return ck.nvrtc_compile(ck.kernel_source(kernel), name=f"{kernel}.cu", arch=arch,
                                name_expressions=name_expressions(kernel),
                                options=CUPY_OPTIONS)
    except Exception as exc:  # reported by the test of that job
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], ck.NvrtcResult | str]:
    """Compile each (kernel, arch) once, in two processes (NVRTC serialises threads)."""
    jobs = [(k, a) for k in ck.kernel_names() for a in ARCHS]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        return dict(zip(jobs, pool.map(compile_job, jobs), strict=True))


def test_every_kernel_file_is_covered() -> None:
    assert ck.kernel_names() == ["downsample", "fuse"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["fuse", "downsample"])
def test_kernel_compiles_cleanly(compiled, kernel: str, arch: str) -> None:
    result = compiled[(kernel, arch)]
    if isinstance(result, str):
        pytest.fail(f"kernels/{kernel}.cu for {arch}: {result}")
    assert result.log == "", f"kernels/{kernel}.cu for {arch} has diagnostics:\n{result.log}"
    exprs = name_expressions(kernel)
    assert set(result.lowered_names) == set(exprs)
    assert len(set(result.lowered_names.values())) == len(exprs)
    assert result.binary[:4] == b"\x7fELF"  # a CUBIN for this architecture


def test_nvrtc_reports_errors_and_warnings() -> None:
    """The log check above is meaningful: NVRTC does report both."""
    with pytest.raises(ck.NvrtcError, match="error"):
        ck.nvrtc_compile("__global__ void broken( {", arch="sm_90")
    result = ck.nvrtc_compile('extern "C" __global__ void k(float* a) { int unused = 1; }',
                              arch="sm_90")
    assert "warning" in result.log


def test_ptx_target() -> None:
    expr = ck.fuse_name_expression("uint16", "uint16", 2, "linear", "linear")
    result = ck.nvrtc_compile(ck.kernel_source("fuse"), name_expressions=[expr],
                              arch="compute_90")
    assert b".entry " + result.lowered_names[expr].encode() in result.binary


@pytest.mark.parametrize("kernel", ["fuse", "downsample"])
def test_header_names_globals_and_their_numpy_twin(kernel: str) -> None:
    """Each file's header names its __global__ functions and the NumPy function mirrored."""
    source = ck.kernel_source(kernel)
    header = source.split("\n\n", 1)[0]
    for name in re.findall(r"__global__ void (\w+)", source):
        assert re.search(rf"//\s+{name}<", header), name
    twins = re.findall(r"mirrors (gpufusion(?:\.\w+)+)", header)
    assert twins
    for twin in twins:
        module, func = twin.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), func)), twin
