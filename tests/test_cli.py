"""The command line: the happy path, and every bad input with exit code 2 and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from gpufusion.cli import main
from gpufusion.synthetic import make_mosaic

from .conftest import psnr
from .tile_files import write_tile_csv


@pytest.fixture
def tile_dir(tmp_path: Path) -> Path:
    """2x2 synthetic uint16 tiles as TIFF files with a positions CSV and a TileConfiguration."""
    syn = make_mosaic((2, 2), (64, 64), overlap=0.2, subpixel=1.0, seed=2)
    lines = ["file,x,y"]
    fiji = ["# Define the number of dimensions we are working on", "dim = 2", ""]
    for k, (tile, (y, x)) in enumerate(zip(syn.tiles, syn.positions, strict=True)):
        tifffile.imwrite(tmp_path / f"t{k}.tif", tile)
        lines.append(f"t{k}.tif,{float(x)!r},{float(y)!r}")
        fiji.append(f"t{k}.tif; ; ({float(x)!r}, {float(y)!r})")
    (tmp_path / "pos.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "TileConfiguration.txt").write_text("\n".join(fiji) + "\n")
    np.save(tmp_path / "truth.npy", syn.ground_truth((0, 0), (116, 116)))
    return tmp_path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
@pytest.mark.parametrize("config", ["pos.csv", "TileConfiguration.txt"])
def test_fuse_from_positions_file(tile_dir: Path, capsys, ngff: str, config: str) -> None:
    out = tile_dir / "out.ome.zarr"
    code, stdout, err = run_cli(["fuse", tile_dir / config, "-o", out, "--chunk", "40",
                                 "--ngff", ngff, "--backend", "numpy"], capsys)
    assert code == 0, err
    assert "fused 4 tiles" in stdout
    level0 = zarr.open_group(str(out), mode="r")["0"][...]
    truth = np.load(tile_dir / "truth.npy")
    assert level0.shape[0] >= 116 and level0.dtype == np.uint16
    assert psnr(level0[2:114, 2:114], truth[2:114, 2:114]) >= 40
    code, stdout, _ = run_cli(["info", out], capsys)
    assert code == 0 and f"NGFF {ngff}" in stdout


def test_overwrite_replaces_only_when_asked(tile_dir: Path, capsys) -> None:
    out = tile_dir / "out.ome.zarr"
    assert run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "-q"], capsys)[0] == 0
    before = sorted(p.name for p in out.rglob("*"))
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out], capsys)
    assert code == 2 and "already exists" in err and str(out) in err
    assert sorted(p.name for p in out.rglob("*")) == before
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--overwrite",
                            "--blend", "max", "-q"], capsys)
    assert code == 0, err
    # a failing run with --overwrite leaves the previous result intact
    (tile_dir / "t3.tif").write_bytes(b"II*\x00garbage")
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--overwrite"], capsys)
    assert code == 2 and "t3.tif" in err
    assert zarr.open_group(str(out), mode="r")["0"].shape[0] >= 116


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_POSITIONS = {
    "malformed line": ("file,x,y\nt0.tif,0,0\nt1.tif;12\n", "pos.csv:3"),
    "missing column": ("file,x\nt0.tif,0\n", "pos.csv"),
    "nan position": ("file,x,y\nt0.tif,0,0\nt1.tif,nan,0\n", "pos.csv:3"),
    "inf position": ("file,x,y\nt0.tif,0,0\nt1.tif,0,inf\n", "pos.csv:3"),
    "non-numeric": ("file,x,y\nt0.tif,abc,0\n", "pos.csv:2"),
    "duplicate": ("file,x,y\nt0.tif,0,0\nt0.tif,5,0\n", "pos.csv"),
    "empty list": ("file,x,y\n", "pos.csv"),
    "missing tile": ("file,x,y\nt0.tif,0,0\nnope.tif,5,0\n", "nope.tif"),
}


@pytest.mark.parametrize("case", sorted(BAD_POSITIONS))
def test_bad_positions_files(tile_dir: Path, capsys, case: str) -> None:
    text, must_name = BAD_POSITIONS[case]
    pos = _write(tile_dir / "pos.csv", text)
    out = tile_dir / "out.ome.zarr"
    code, _, err = run_cli(["fuse", pos, "-o", out], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("gpufusion: error:")
    assert must_name in err
    assert not out.exists()
    assert not [p for p in tile_dir.iterdir() if p.name.startswith(".out")]


def test_bad_tiles(tile_dir: Path, capsys) -> None:
    out = tile_dir / "out.ome.zarr"
    data = (tile_dir / "t1.tif").read_bytes()
    (tile_dir / "t1.tif").write_bytes(data[: len(data) // 2])  # truncated
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out], capsys)
    assert code == 2 and "t1.tif" in err and err.count("\n") == 1
    tifffile.imwrite(tile_dir / "t1.tif", np.zeros((64, 64), np.uint8))  # other dtype
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out], capsys)
    assert code == 2 and "t1.tif" in err and "dtype" in err
    tifffile.imwrite(tile_dir / "t1.tif", np.zeros((5, 64, 64), np.uint16),
                    photometric="minisblack", metadata={"axes": "ZYX"})
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out], capsys)
    assert code == 2 and "t1.tif" in err and "3D" in err
    (tile_dir / "t1.tif").write_text("not an image at all")
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out], capsys)
    assert code == 2 and "t1.tif" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "must_say"),
    [
        (["--chunk", "0"], "--chunk"),
        (["--blend-width", "-3"], "--blend-width"),
        (["--blend", "feather"], "--blend"),
        (["--interp", "cubic"], "--interp"),
        (["--backend", "opencl"], "--backend"),
    ],
)
def test_bad_options_exit_2(tile_dir: Path, option: list[str], must_say: str) -> None:
    out = tile_dir / "out.ome.zarr"
    proc = subprocess.run(
        [sys.executable, "-m", "gpufusion", "fuse", str(tile_dir / "pos.csv"), "-o", str(out),
         *option], capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert must_say in proc.stderr
    assert not out.exists()


def test_cupy_backend_without_gpu_is_a_clear_error(tile_dir: Path, capsys) -> None:
    from gpufusion.backends import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is usable here")
    out = tile_dir / "out.ome.zarr"
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--backend", "cupy"],
                           capsys)
    assert code == 2 and "backend cupy" in err and err.count("\n") == 1
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--backend", "auto"],
                           capsys)
    assert code == 0 and "NumPy" in err


def test_internal_errors_exit_1_with_traceback_under_debug(tile_dir: Path, capsys,
                                                           monkeypatch) -> None:
    import gpufusion.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpufusion.pipeline, "fuse_to_file", boom)
    args = ["fuse", tile_dir / "pos.csv", "-o", tile_dir / "o.ome.zarr"]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "internal error" in err and "Traceback" not in err
    code, _, err = run_cli([*args, "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "simulated failure" in err


def test_demo_reports_error_against_ground_truth(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["demo", "--out", tmp_path, "--tiles", "2x3", "--tile", "128",
                              "--chunk", "64"], capsys)
    assert code == 0, err
    assert (tmp_path / "demo.ome.zarr" / "0").is_dir()
    line = [ln for ln in out.splitlines() if "PSNR" in ln][0]
    assert float(line.split("PSNR")[1].split("dB")[0]) >= 40
    assert "6 tiles" in out and "Mpx/s" in out
    # the demo replaces its own previous output
    assert run_cli(["demo", "--out", tmp_path, "--tiles", "1x2", "--tile", "64", "-q"],
                   capsys)[0] == 0


def test_fuse_on_a_running_dask_cluster(tile_dir: Path, capsys) -> None:
    """--scheduler: tasks run in worker processes and read their own tile windows."""
    distributed = pytest.importorskip("distributed")
    out = tile_dir / "out.ome.zarr"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--chunk", "40",
                                "--backend", "numpy", "--scheduler", cluster.scheduler_address],
                               capsys)
    assert code == 0, err
    level0 = zarr.open_group(str(out), mode="r")["0"][...]
    truth = np.load(tile_dir / "truth.npy")
    assert psnr(level0[2:114, 2:114], truth[2:114, 2:114]) >= 40


def test_fuse_with_gpus_option_equals_local_threads(tile_dir: Path, capsys,
                                                    monkeypatch) -> None:
    """``--gpus 0,1`` through the command line: one (stand-in) dask-cuda worker per GPU,
    the same pixels as the local threaded run, every level."""
    from .cluster_helpers import install_fake_dask_cuda

    starts = install_fake_dask_cuda(monkeypatch)
    local, on_gpus = tile_dir / "local.ome.zarr", tile_dir / "gpus.ome.zarr"
    common = ["fuse", tile_dir / "pos.csv", "--chunk", "40", "--backend", "numpy"]
    code, _, err = run_cli([*common, "-o", local], capsys)
    assert code == 0, err
    code, _, err = run_cli([*common, "-o", on_gpus, "--gpus", "0,1", "--threads-per-gpu", "2"],
                           capsys)
    assert code == 0, err
    assert "running on" in err
    assert starts == [{"CUDA_VISIBLE_DEVICES": "0,1", "n_workers": 2, "threads_per_worker": 2}]
    a, b = zarr.open_group(str(local), mode="r"), zarr.open_group(str(on_gpus), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys()) and len(list(a.array_keys())) >= 2
    for level in a.array_keys():
        np.testing.assert_array_equal(b[level][...], a[level][...])


def test_unreachable_scheduler_is_a_clear_error(tile_dir: Path, capsys, monkeypatch) -> None:
    import gpufusion.cluster

    monkeypatch.setattr(gpufusion.cluster, "CONNECT_TIMEOUT", 1.0)
    out = tile_dir / "out.ome.zarr"
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--backend", "numpy",
                            "--scheduler", "tcp://127.0.0.1:9"], capsys)
    assert code == 2 and "--scheduler" in err.splitlines()[-1]
    assert not out.exists()


def test_threads_per_gpu_without_gpus_is_a_clear_error(tile_dir: Path, capsys) -> None:
    out = tile_dir / "out.ome.zarr"
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--backend", "numpy",
                            "--threads-per-gpu", "4"], capsys)
    assert code == 2 and "--threads-per-gpu" in err.splitlines()[-1]
    assert not out.exists()


def test_fuse_to_pyramidal_ome_tiff(tile_dir: Path, capsys) -> None:
    out = tile_dir / "out.ome.tif"
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", out, "--chunk", "32",
                            "--backend", "numpy", "--pixel-size", "0.5"], capsys)
    assert code == 0, err
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        level0 = series.asarray()
        assert tif.is_ome and len(series.levels) >= 1
    ref = tile_dir / "ref.ome.zarr"
    assert run_cli(["fuse", tile_dir / "pos.csv", "-o", ref, "-q", "--backend", "numpy"],
                   capsys)[0] == 0
    np.testing.assert_array_equal(level0, zarr.open_group(str(ref), mode="r")["0"][...])


def test_fuse_with_registration_recovers_stage_errors(tmp_path: Path, capsys) -> None:
    syn = make_mosaic((3, 3), (128, 128), overlap=0.15, stage_error=6.0, seed=8)
    write_tile_csv(tmp_path, syn.tiles, syn.stage_positions, "stage.csv")
    code, _, err = run_cli(["fuse", tmp_path / "stage.csv", "-o", tmp_path / "r.ome.zarr",
                            "--register", "--max-shift", "20", "--backend", "numpy"], capsys)
    assert code == 0, err
    assert "mean overlap NCC" in err
    fused = zarr.open_group(str(tmp_path / "r.ome.zarr"), mode="r")["0"][...]
    # registration fixes relative positions; find the global offset from the first tile
    code, _, err = run_cli(["register", tmp_path / "stage.csv", "-o", tmp_path / "reg.csv",
                            "--max-shift", "20", "-q"], capsys)
    assert code == 0, err
    reg = np.loadtxt(tmp_path / "reg.csv", delimiter=",", skiprows=1, usecols=(1, 2))[:, ::-1]
    err_px = (reg - reg[0]) - (syn.positions - syn.positions[0])
    assert np.sqrt(np.mean(err_px**2)) <= 0.2
    origin = syn.positions[0] - reg[0] + np.floor(reg.min(axis=0))
    truth = syn.ground_truth(origin, fused.shape)
    inner = (slice(10, fused.shape[0] - 10), slice(10, fused.shape[1] - 10))
    assert psnr(fused[inner], truth[inner]) >= 35


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys, tmp_path: Path) -> None:
    import argparse

    from gpufusion.cli import show_progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(argparse.Namespace(quiet=False))
    assert not show_progress(argparse.Namespace(quiet=True))
    # on a terminal the fuse shows its labelled progress lines on stderr
    code, _, err = run_cli(["demo", "--out", tmp_path, "--tiles", "1x2", "--tile", "64",
                            "--backend", "numpy"], capsys)
    assert code == 0 and "\rfusing, writing level" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_progress(argparse.Namespace(quiet=False))
    code, _, err = run_cli(["demo", "--out", tmp_path, "--tiles", "1x2", "--tile", "64",
                            "--backend", "numpy"], capsys)
    assert code == 0 and "\r" not in err and "fusing, writing level" not in err


def test_blend_width_z_needs_3d_tiles(tile_dir: Path, capsys) -> None:
    code, _, err = run_cli(["fuse", tile_dir / "pos.csv", "-o", tile_dir / "o.ome.zarr",
                            "--blend-width-z", "4"], capsys)
    assert code == 2 and "--blend-width-z" in err and err.count("\n") == 1
