"""The GPU session's pieces that run without a GPU: the whole-slide pyramid check, the
scheduling-overhead benchmark's stub run, the session script's arguments and summaries.

The pyramid check (benchmarks/bench_wsi.py) compares every level of a written OME-Zarr
image with the NumPy pyramid of the NumPy fusion; here a level corrupted after the run
(as a device race would leave it) must be caught, which the old check (level 0's first
chunk only) could not.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import zarr

from .test_bench_wsi import ROOT, load_benchmark


@pytest.fixture(scope="module")
def wsi() -> ModuleType:
    return load_benchmark("bench_wsi")


@pytest.fixture(scope="module")
def mosaic():
    from gpufusion.synthetic import make_mosaic

    return make_mosaic((2, 2), (150, 150), dtype="uint16", seed=5).mosaic()


def written(tmp_path: Path, mosaic, **options) -> Path:
    from gpufusion import fuse_to_file

    out = tmp_path / "m.ome.zarr"
    fuse_to_file(mosaic, out, chunks=64, **options)
    return out


@pytest.mark.parametrize("ngff_version", ["0.4", "0.5"])
def test_pyramid_check_passes_every_level_of_a_true_pyramid(wsi: ModuleType, mosaic,
                                                            tmp_path: Path,
                                                            ngff_version: str) -> None:
    out = written(tmp_path, mosaic, ngff_version=ngff_version)
    levels = sorted(zarr.open_group(str(out), mode="r").array_keys(), key=int)
    assert len(levels) >= 3
    assert wsi.level_factors(out) == [(2, 2)] * (len(levels) - 1)
    check = wsi.pyramid_check(out, mosaic, chunk=64)
    assert [c["level"] for c in check] == list(range(len(levels)))
    assert all(c["max_diff"] == 0 and c["differing"] == 0 and c["self_consistent"]
               for c in check), check
    shapes = [list(zarr.open_array(str(out / k), mode="r").shape) for k in levels]
    assert [c["shape"] for c in check] == shapes


def test_pyramid_check_finds_a_corrupted_coarse_level(wsi: ModuleType, mosaic,
                                                      tmp_path: Path) -> None:
    """One block of level 1 overwritten after the run (as a block downsampled from memory
    that a later allocation overwrote would be): level 1 differs from the reference and
    level 2 is no longer its 2x mean; level 0, which the old check looked at, is intact."""
    out = written(tmp_path, mosaic)
    level1 = zarr.open_array(str(out / "1"), mode="r+")
    level1[:8, :8] = np.asarray(level1[:8, :8]) + 50
    check = wsi.pyramid_check(out, mosaic, chunk=64)
    assert check[0]["max_diff"] == 0 and check[0]["self_consistent"]
    assert check[1]["max_diff"] == 50 and check[1]["differing"] == 64
    assert not check[2]["self_consistent"]
    line = wsi.format_check("numpy", check)
    assert "1: max 50 (64 px)" in line and "NOT the 2x mean" in line


def test_halve_matches_the_whole_array_reference_with_odd_blocks(wsi: ModuleType) -> None:
    import dask.array as da

    from gpufusion.pyramid import downsample_mean2

    image = np.random.default_rng(1).integers(0, 60000, (37, 29)).astype(np.uint16)
    blocks = da.from_array(image, chunks=(7, 5))  # odd block boundaries: rechunked
    np.testing.assert_array_equal(wsi.halve(blocks, (2, 2)).compute(),
                                  downsample_mean2(image, (2, 2)))


# ---------------------------------------------------------------------- scheduling stub


def test_scheduling_stub_counts_the_tasks_it_runs(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The stub run fuses nothing (a stub tile is never read), writes the image's shape,
    and counts at least one task per block, whatever the writer's graph."""
    from gpufusion.backends import NumpyBackend

    bench = load_benchmark("bench_schedule")
    monkeypatch.setattr(NumpyBackend, "fuse_task", bench.zeros_fuse_task)
    case = bench.Case("tiny", 2, 3, 1024)
    figures = bench.run_stubbed(case, tmp_path / "tiny.ome.zarr")
    assert figures["tiles"] == 6 and figures["computes"] >= 1
    assert figures["blocks"] == 4 * 6  # 3891 x 5734 px in blocks of 1024
    assert figures["tasks"] >= figures["blocks"]
    assert 0 <= figures["first_task_s"] <= figures["wall_s"]
    group = zarr.open_group(str(tmp_path / "tiny.ome.zarr"), mode="r")
    assert list(group["0"].shape) == figures["shape"] == [3891, 5734]
    assert not np.any(group["0"][:1024, :1024])
    with pytest.raises(AssertionError, match="a stub tile was read"):
        bench.StubSource((8, 8), "uint16", "t").read((slice(0, 1), slice(0, 1)))


# ---------------------------------------------------------------------- the session script


@pytest.mark.parametrize("args", [[], ["--frobnicate", "x"], ["a", "b"]])
def test_session_script_refuses_bad_arguments(args: list[str], tmp_path: Path) -> None:
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), *args],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 2 and "usage: bash benchmarks/gpu_session.sh" in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing staged, nothing written


def test_summaries_of_benchmark_json(tmp_path: Path, capsys) -> None:
    probe = load_benchmark("gpu_probe")
    data = {"benchmarks": [{"name": "test_whole_slide_fuse[cupy]", "stats": {"median": 12.5},
                            "extra_info": {"seconds": 12.5, "device": "NVIDIA H200",
                                           "pyramid_check": [
                                               {"level": 0, "max_diff": 1,
                                                "self_consistent": True},
                                               {"level": 1, "max_diff": 3,
                                                "self_consistent": False}]}}]}
    path = tmp_path / "wsi.json"
    path.write_text(json.dumps(data))
    assert probe.summarize([str(path), str(tmp_path / "absent.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test_whole_slide_fuse[cupy]: median 12.5 s; ")
    assert json.loads(out[0].split("; ", 1)[1]) == {
        "device": "NVIDIA H200", "seconds": 12.5, "pyramid_check": ["0:1", "1:3!"]}
    assert out[1] == "absent.json: not readable (FileNotFoundError)"
