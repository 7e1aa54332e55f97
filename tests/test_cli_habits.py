"""A CLI that fits a person's habits (issue #11, section 3).

Top-level ``-q``/``--debug`` reach every command; only OME-Zarr and OME-TIFF output names;
``register -o *.txt`` writes a Fiji TileConfiguration; every command has a description and
examples that parse; ``--compression`` applies to the output kind (and says how to get
imagecodecs); ``import gpufusion`` and ``gpufusion --version`` load no heavy module;
``register`` gives the same no-GPU notice as ``fuse``.
"""

from __future__ import annotations

import csv
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import gpufusion
import gpufusion.backends
from gpufusion.cli import COMMANDS, build_parser, main
from gpufusion.errors import InputError
from gpufusion.readers.positions import read_tile_configuration
from gpufusion.synthetic import make_mosaic
from gpufusion.writers.tileconfig import write_tile_configuration

from .tile_files import write_tile_csv

FAST = ["--chunk", "32", "--backend", "numpy"]
HEAVY = ("dask.array", "scipy.sparse", "zarr", "tifffile")
ROOT = Path(__file__).resolve().parents[1]

#: The smallest argument list each command parses (nothing is run with these).
MINIMAL = {
    "demo": [],
    "fuse": ["pos.csv", "-o", "out.ome.zarr"],
    "register": ["pos.csv", "-o", "reg.csv"],
    "info": ["slide.ome.zarr"],
    "bench": [],
    "flatfield": ["pos.csv", "-o", "profiles.tif"],
}


def run_cli(argv: list[object], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one has every module imported already)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


@pytest.fixture
def tiles(tmp_path: Path) -> tuple[Path, object]:
    """``tiles/pos.csv`` listing a 2x2 mosaic of 96 px tiles with stage errors."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    syn = make_mosaic((2, 2), (96, 96), overlap=0.2, stage_error=5, seed=4)
    return write_tile_csv(folder, syn.tiles, syn.stage_positions), syn


def test_every_command_is_covered() -> None:
    assert sorted(MINIMAL) == sorted(COMMANDS)


# ------------------------------------------------------------- 1. -q / --debug anywhere


@pytest.mark.parametrize("command", COMMANDS)
def test_quiet_and_debug_before_or_after_the_command(command: str) -> None:
    parser = build_parser()
    rest = MINIMAL[command]
    for argv, quiet, debug in [
        ([command, *rest], False, False),
        (["-q", command, *rest], True, False),
        (["--quiet", "--debug", command, *rest], True, True),
        (["--debug", command, *rest], False, True),
        ([command, *rest, "-q"], True, False),
        ([command, *rest, "--debug"], False, True),
        (["-q", command, *rest, "--debug"], True, True),
    ]:
        args = parser.parse_args(argv)
        assert (args.quiet, args.debug) == (quiet, debug), argv


@pytest.mark.parametrize("command", COMMANDS)
def test_top_level_flags_reach_every_command_through_main(command: str, monkeypatch,
                                                          capsys) -> None:
    module = importlib.import_module(f"gpufusion.cli.{command}")

    def noisy(args) -> int:
        from gpufusion.cli import notice

        notice(args, "a notice")
        return 0

    def broken(args) -> int:
        raise RuntimeError("boom inside")

    monkeypatch.setattr(module, "run", noisy)  # build_parser reads it when it runs
    assert run_cli([command, *MINIMAL[command]], capsys)[2] == "gpufusion: a notice\n"
    assert run_cli(["-q", command, *MINIMAL[command]], capsys) == (0, "", "")
    monkeypatch.setattr(module, "run", broken)
    code, _, err = run_cli([command, *MINIMAL[command]], capsys)
    assert code == 1 and "Traceback" not in err and "run with --debug" in err
    code, _, err = run_cli(["--debug", command, *MINIMAL[command]], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err
    assert "RuntimeError: boom inside" in err


def test_quiet_before_fuse_silences_the_real_run(tiles, tmp_path: Path, monkeypatch,
                                                 capsys) -> None:
    csv_path, _ = tiles
    monkeypatch.setattr(gpufusion.backends, "resolve_backend",
                        lambda name: ("numpy", "no usable GPU: a test; using the NumPy backend"))
    code, stdout, err = run_cli(["-q", "fuse", csv_path, "-o", tmp_path / "a.ome.zarr",
                                 "--chunk", "32"], capsys)
    assert (code, stdout, err) == (0, "", "")
    code, stdout, err = run_cli(["fuse", csv_path, "-o", tmp_path / "b.ome.zarr",
                                 "--chunk", "32"], capsys)
    assert code == 0 and "no usable GPU: a test" in err and "fused 4 tiles" in stdout


# ------------------------------------------------------------ 2. output names


BAD_NAMES = ["slide.png", "x.h5", "x", "slide.ome", "notes.zarr.txt", "x.tif.gz"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_fuse_refuses_names_that_are_no_output_before_any_work(tmp_path: Path, capsys,
                                                               name: str) -> None:
    # the tiles do not exist: refusing the name first shows nothing was read
    (tmp_path / "pos.csv").write_text("file,x,y\nmissing.tif,0,0\n")
    out = tmp_path / name
    code, stdout, err = run_cli(["fuse", tmp_path / "pos.csv", "-o", out, *FAST], capsys)
    assert code == 2 and stdout == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpufusion: error: {out}: "), err
    for suffix in (".ome.zarr", ".zarr", ".ome.tif", ".ome.tiff", ".tif", ".tiff"):
        assert suffix in lines[0]
    assert "missing.tif" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pos.csv"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_fuse_to_file_refuses_names_that_are_no_output(tmp_path: Path, name: str) -> None:
    mosaic = make_mosaic((1, 2), (32, 32), overlap=0.25, seed=1).mosaic()
    with pytest.raises(InputError, match=r"\.ome\.zarr.*\.ome\.tif") as excinfo:
        gpufusion.fuse_to_file(mosaic, tmp_path / name, chunks=32)
    assert "\n" not in str(excinfo.value) and str(tmp_path / name) in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "kind"), [("m.zarr", "zarr"), ("M.OME.ZARR", "zarr"),
                                            ("m.tiff", "tiff"), ("M.OME.TIF", "tiff")])
def test_every_accepted_name_writes_its_kind(tmp_path: Path, name: str, kind: str) -> None:
    syn = make_mosaic((1, 2), (32, 32), overlap=0.25, integer_positions=True, seed=1)
    result = gpufusion.fuse_to_file(syn.mosaic(), tmp_path / name, chunks=32)
    if kind == "zarr":
        level0 = zarr.open_group(str(tmp_path / name), mode="r")["0"][...]
    else:
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_ome
            level0 = tif.series[0].asarray()
    assert level0.shape == result.shape


# ------------------------------------------------------------ 3. Fiji TileConfiguration

#: The documented grammar, independent of our reader: a 'dim = N' line, then
#: 'name; ; (x, y[, z])' lines; '#' lines and blank lines are comments.
_DIM = re.compile(r"^dim = ([23])$")
_NUMBER = r"-?\d+(?:\.\d+)?"
_TILE = re.compile(rf"^([^;#\s][^;]*?); ; \(({_NUMBER}(?:, {_NUMBER}){{1,2}})\)$")


def parse_fiji(path: Path) -> tuple[int, list[tuple[str, list[float]]]]:
    dim, rows = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if dim is None:
            match = _DIM.match(line)
            assert match, f"first content line must be 'dim = N': {line!r}"
            dim = int(match.group(1))
            continue
        match = _TILE.match(line)
        assert match, f"not 'name; ; (x, y[, z])': {line!r}"
        coords = [float(v) for v in match.group(2).split(", ")]
        assert len(coords) == dim
        rows.append((match.group(1), coords))
    assert dim is not None
    return dim, rows


def read_csv_xy(path: Path) -> dict[Path, list[float]]:
    with open(path, newline="") as fh:
        return {(path.parent / row["file"]).resolve(): [float(row["x"]), float(row["y"])]
                for row in csv.DictReader(fh)}


def test_register_writes_a_fiji_tile_configuration_for_txt(tiles, tmp_path: Path,
                                                           capsys) -> None:
    csv_path, _ = tiles
    (tmp_path / "out").mkdir()
    fiji = tmp_path / "out" / "TileConfiguration.registered.txt"
    reference = tmp_path / "out" / "registered.csv"
    for out in (reference, fiji):
        code, _, err = run_cli(["register", csv_path, "-o", out, "--max-shift", "12", *FAST[2:],
                                "-q"], capsys)
        assert code == 0, err
    assert (tmp_path / "out" / "TileConfiguration.registered.edges.csv").is_file()
    expected = read_csv_xy(reference)  # x, y of every tile, from the CSV
    # by the documented grammar: names relative to the file's folder (Fiji joins them to
    # it), x first
    dim, rows = parse_fiji(fiji)
    assert dim == 2 and len(rows) == 4
    for name, coords in rows:
        assert not Path(name).is_absolute() and name.startswith("../tiles/")
        tile = (fiji.parent / name).resolve()
        assert tile.is_file()
        np.testing.assert_allclose(coords, expected[tile], atol=1e-4)
    # and by our reader, which fuse uses
    table = read_tile_configuration(fiji)
    got = {f: p[::-1].tolist() for f, p in zip(table.files, table.positions, strict=True)}
    assert got.keys() == expected.keys()
    for f, xy in expected.items():
        np.testing.assert_allclose(got[f], xy, atol=1e-4)
    # the CSV stays a CSV
    assert reference.read_text().startswith("file,x,y\n")


@pytest.mark.parametrize("name", ["pos.json", "pos.tsv", "pos"])
def test_register_refuses_other_output_names(tiles, tmp_path: Path, capsys, name: str) -> None:
    csv_path, _ = tiles
    code, _, err = run_cli(["register", csv_path, "-o", tmp_path / name, "-q"], capsys)
    assert code == 2 and ".csv" in err and ".txt" in err and "TileConfiguration" in err
    assert not (tmp_path / name).exists()


def test_tile_configuration_writer_3d_and_unwritable_names(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "sub" / "a b.tif", tmp_path / "c.tif"]
    for f in files:
        tifffile.imwrite(f, np.zeros((2, 4, 4), np.uint8))
    positions = [(0.0, 0.0, 0.0), (1.5, -2.25, 30.0)]  # (z, y, x)
    out = write_tile_configuration(tmp_path / "TileConfiguration.txt", positions, files)
    dim, rows = parse_fiji(out)
    assert dim == 3
    assert rows == [("sub/a b.tif", [0.0, 0.0, 0.0]), ("c.tif", [30.0, -2.25, 1.5])]
    table = read_tile_configuration(out)
    assert table.ndim == 3 and table.files == [f.resolve() for f in files]
    np.testing.assert_array_equal(table.positions, positions)
    for bad in ("x;y.tif", "#a.tif"):
        with pytest.raises(InputError, match="TileConfiguration"):
            write_tile_configuration(tmp_path / "t.txt", [(0.0, 0.0)], [tmp_path / bad])
    with pytest.raises(InputError, match="finite"):
        write_tile_configuration(tmp_path / "t.txt", [(np.nan, 0.0)], files[:1])


# ------------------------------------------------------------ 4. help and compression


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_help_has_a_description_and_examples_that_parse(command: str | None,
                                                              capsys) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith("usage: gpufusion")
    assert len(description.split()) >= 8 and not description.lstrip().startswith(
        ("positional arguments", "options")), description
    assert "\nexamples:\n" in text
    examples = text.split("\nexamples:\n", 1)[1].strip().splitlines()
    assert 2 <= len(examples) <= 4, examples
    parser = build_parser()
    for line in examples:
        words = shlex.split(line, comments=True)
        assert words[0] == "gpufusion"
        if command is not None:
            assert words[1] == command
        args = parser.parse_args(words[1:])  # SystemExit (exit 2) if an example is wrong
        assert args.command in (command or COMMANDS)


def test_descriptions_name_both_output_formats(capsys) -> None:
    for argv in (["--help"], ["fuse", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
        assert "OME-Zarr" in description and "OME-TIFF" in description
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_text = text.split("--compression", 2)[2]
    assert "OME-Zarr takes blosc-zstd (default), blosc-lz4, zstd or none" in help_text
    assert "OME-TIFF takes zlib (default), lzw, zstd or none" in help_text
    assert "pip install 'gpufusion[tiff]'" in help_text


@pytest.mark.parametrize(("name", "codec", "kind"), [
    ("o.ome.zarr", "lzw", "OME-Zarr"), ("o.ome.zarr", "zlib", "OME-Zarr"),
    ("o.ome.tif", "blosc-zstd", "OME-TIFF"), ("o.tiff", "blosc-lz4", "OME-TIFF")])
def test_compression_that_does_not_apply_is_refused(tiles, tmp_path: Path, capsys, name: str,
                                                    codec: str, kind: str) -> None:
    csv_path, _ = tiles
    code, _, err = run_cli(["fuse", csv_path, "-o", tmp_path / name, "--compression", codec,
                            *FAST], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--compression {codec}: does not apply to {kind} output" in err
    assert not (tmp_path / name).exists()


def test_demo_refuses_a_tiff_codec(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["demo", "--out", tmp_path / "d", "--tiles", "1x2", "--tile", "64",
                            "--compression", "lzw", "-q"], capsys)
    assert code == 2 and "--compression lzw: does not apply to OME-Zarr" in err
    assert not (tmp_path / "d").exists()


def test_tiff_default_compression_is_zlib(tiles, tmp_path: Path, capsys) -> None:
    csv_path, _ = tiles
    out = tmp_path / "o.ome.tif"
    assert run_cli(["fuse", csv_path, "-o", out, *FAST, "-q"], capsys)[0] == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_fuse_to_file_compression_follows_the_output_kind(tmp_path: Path) -> None:
    mosaic = make_mosaic((1, 2), (32, 32), overlap=0.25, seed=1).mosaic()
    with pytest.raises(InputError, match="compressor blosc-zstd: does not apply to OME-TIFF"):
        gpufusion.fuse_to_file(mosaic, tmp_path / "a.ome.tif", compressor="blosc-zstd")
    assert list(tmp_path.iterdir()) == []  # refused before any work, not silently zlib
    gpufusion.fuse_to_file(mosaic, tmp_path / "b.ome.tif", chunks=32)  # the kind's default
    with tifffile.TiffFile(tmp_path / "b.ome.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    gpufusion.fuse_to_file(mosaic, tmp_path / "c.ome.zarr", chunks=32)
    codecs = zarr.open_group(str(tmp_path / "c.ome.zarr"), mode="r")["0"].compressors
    assert "zstd" in repr(codecs).lower()


def test_lzw_tiff_with_imagecodecs(tiles, tmp_path: Path, capsys) -> None:
    pytest.importorskip("imagecodecs")
    csv_path, _ = tiles
    out = tmp_path / "o.ome.tif"
    assert run_cli(["fuse", csv_path, "-o", out, "--compression", "lzw", *FAST, "-q"],
                   capsys)[0] == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW


def test_lzw_tiff_without_imagecodecs_names_the_extra(tiles, tmp_path: Path) -> None:
    csv_path, _ = tiles
    out = tmp_path / "o.ome.tif"
    done = python(
        "import sys; sys.modules['imagecodecs'] = None  # as if not installed\n"
        "from gpufusion.cli import main\n"
        f"sys.exit(main(['fuse', {str(csv_path)!r}, '-o', {str(out)!r}, '--compression', "
        "'lzw', '--backend', 'numpy']))")
    assert done.returncode == 2, done.stderr
    assert "--compression lzw" in done.stderr and "pip install 'gpufusion[tiff]'" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and not out.exists()


def test_pyproject_has_a_tiff_extra_with_imagecodecs() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(req.startswith("imagecodecs") for req in extras["tiff"])


# ------------------------------------------------------------ 5. a light import


def test_import_gpufusion_loads_no_heavy_module() -> None:
    done = python("import gpufusion, sys; "
                  f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_loads_no_heavy_module() -> None:
    done = python("import sys\nfrom gpufusion.cli import main\n"
                  "try:\n    main(['-q', '--version'])\nexcept SystemExit as exc:\n"
                  "    assert exc.code == 0\n"
                  f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"gpufusion {gpufusion.__version__}", "[]"]
    done = subprocess.run([sys.executable, "-m", "gpufusion", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, f"gpufusion {gpufusion.__version__}\n")


def test_every_public_name_still_resolves() -> None:
    done = python(
        "import gpufusion, inspect\n"
        "for name in gpufusion.__all__:\n"
        "    assert getattr(gpufusion, name) is not None, name\n"
        "    assert name in dir(gpufusion), name\n"
        "import gpufusion.fuse, gpufusion.pipeline  # the submodule fuse shares its name\n"
        "assert inspect.isfunction(gpufusion.fuse), gpufusion.fuse\n"
        "from gpufusion import *  # noqa\n"
        "assert inspect.isfunction(fuse) and fuse is gpufusion.fuse\n"
        "assert gpufusion.fuse_to_ome_zarr is gpufusion.pipeline.fuse_to_file\n"
        "assert gpufusion.readers.mosaic_from_file is gpufusion.mosaic_from_file\n"
        "print('ok')")
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = gpufusion.nonexistent


# ------------------------------------------------------------ 6. register's no-GPU notice


def test_register_gives_the_same_no_gpu_notice_as_fuse(tiles, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    csv_path, _ = tiles
    notice = "no usable GPU: CuPy is not installed (a test); using the NumPy backend"
    monkeypatch.setattr(gpufusion.backends, "resolve_backend", lambda name: ("numpy", notice))
    code, _, fuse_err = run_cli(["fuse", csv_path, "-o", tmp_path / "a.ome.zarr", "--chunk",
                                 "32"], capsys)
    assert code == 0
    code, _, reg_err = run_cli(["register", csv_path, "-o", tmp_path / "r.csv", "--max-shift",
                                "12"], capsys)
    assert code == 0
    line = f"gpufusion: {notice}"
    assert line in fuse_err.splitlines() and line in reg_err.splitlines()
    # quiet means quiet, before or after the command
    for argv in (["-q", "register"], ["register", "-q"]):
        code, _, err = run_cli([*argv, csv_path, "-o", tmp_path / "q.csv", "--overwrite",
                                "--max-shift", "12"], capsys)
        assert code == 0 and notice not in err
