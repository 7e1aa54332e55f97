"""Time points: list_timepoints per format, --timepoint all and tilesets_from_args."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpufusion.cli.inputs import (
    add_input_options,
    tileset_from_args,
    tilesets_from_args,
    timepoints_from_args,
)
from gpufusion.errors import InputError
from gpufusion.readers.detect import list_timepoints, read_tileset

from . import test_formats_bigstitcher
from .conftest import missing_real_data
from .test_formats_bigstitcher import view_pixels, write_dataset, write_n5, write_n5_dataset
from .test_formats_ome_tiff import PIXEL_UM, inverted, make_scene, plane_meta

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CZI = DATA / "czi_2tiles" / "mosaic_test.czi"
WHOLE = (slice(None),) * 3

#: The 4-tile, 2-channel 3D scene of the BigStitcher tests (a module-scoped fixture).
scene = test_formats_bigstitcher.scene


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def args_for(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpufusion fuse")
    p.add_argument("input")
    p.add_argument("--pixel-size", type=float, default=None)
    add_input_options(p)
    return p.parse_args(list(argv))


# --- BigStitcher: two timepoints with pixels, a third whose views are all missing ---------


def later_pixels(tiles, sid: int) -> np.ndarray:
    """Pixels of view ``sid`` at timepoint 1 (told apart from timepoint 0)."""
    return (view_pixels(tiles, sid) // 2).astype(np.uint16)


def two_timepoint_dataset(folder: Path, scene, *, missing_t1: tuple[int, ...] = ()) -> Path:
    """N5 dataset, Timepoints 0-2: timepoint 1 has its own pixels, timepoint 2 is missing."""
    _, tiles = scene
    loader = write_n5(folder, tiles, "raw")
    for sid in range(8):
        if sid not in missing_t1:
            write_n5_dataset(folder / "dataset.n5" / f"setup{sid}" / "timepoint1" / "s0",
                             later_pixels(tiles, sid), (20, 12, 2), "raw")
    xml = write_dataset(folder, loader, scene)
    text = xml.read_text()
    regs = text[text.index("<ViewRegistrations>") + 19 : text.index("</ViewRegistrations>")]
    missing = "".join(f"<MissingView timepoint='2' setup='{sid}'/>" for sid in range(8))
    missing += "".join(f"<MissingView timepoint='1' setup='{sid}'/>" for sid in missing_t1)
    text = (text.replace("</ViewRegistrations>",
                         regs.replace("timepoint='0'", "timepoint='1'") + "</ViewRegistrations>")
            .replace("<integerpattern>0</integerpattern>", "<integerpattern>0-2</integerpattern>")
            .replace("</SequenceDescription>",
                     f"<MissingViews>{missing}</MissingViews></SequenceDescription>"))
    xml.write_text(text)
    return xml


def test_bigstitcher_lists_present_timepoints_and_reads_each(tmp_path, scene):
    _, tiles = scene
    xml = two_timepoint_dataset(tmp_path, scene)
    assert list_timepoints(xml) == [0, 1]
    assert list_timepoints(xml, format="bigstitcher", illumination=0) == [0, 1]
    t1 = read_tileset(xml, timepoint=1)
    np.testing.assert_array_equal(t1.sources[1][2].read(WHOLE), later_pixels(tiles, 6))
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml, timepoint=2)
    one_line(excinfo, "dataset.xml", "timepoint 2 does not exist", "[0, 1]")
    with pytest.raises(InputError) as excinfo:
        list_timepoints(xml, illumination=5)
    one_line(excinfo, "dataset.xml", "no view of illumination 5")


def test_tilesets_from_args_all_bigstitcher(tmp_path, scene):
    _, tiles = scene
    xml = two_timepoint_dataset(tmp_path, scene)
    every = tilesets_from_args(args_for(str(xml), "--timepoint", "all"))
    assert timepoints_from_args(args_for(str(xml), "--timepoint", "all")) == [0, 1]
    assert [ts.n_tiles for ts in every] == [4, 4]
    for ts, pixels in zip(every, (view_pixels, later_pixels), strict=True):
        np.testing.assert_array_equal(ts.sources[0][3].read(WHOLE), pixels(tiles, 3))
    default = tilesets_from_args(args_for(str(xml)))
    assert len(default) == 1 and timepoints_from_args(args_for(str(xml))) == [0]
    np.testing.assert_array_equal(default[0].sources[0][0].read(WHOLE), view_pixels(tiles, 0))
    one = tilesets_from_args(args_for(str(xml), "--timepoint", "1"))
    assert len(one) == 1 and timepoints_from_args(args_for(str(xml), "--timepoint", "1")) == [1]
    np.testing.assert_array_equal(one[0].sources[0][0].read(WHOLE), later_pixels(tiles, 0))


def test_all_timepoints_need_the_same_tiles(tmp_path, scene):
    xml = two_timepoint_dataset(tmp_path, scene, missing_t1=(3, 7))  # tile 3 absent at t=1
    assert list_timepoints(xml) == [0, 1]
    with pytest.raises(InputError) as excinfo:
        tilesets_from_args(args_for(str(xml), "--timepoint", "all"))
    one_line(excinfo, "dataset.xml", "timepoint 1 differs from timepoint 0", "tiles 3", "vs 4")


# --- OME-TIFF: T planes in each file -----------------------------------------------------------


def write_ome_timelapse(folder: Path, n_t=(2, 2, 2, 3)) -> list[np.ndarray]:
    """One TYX OME-TIFF per tile; plane t is the tile, inverted at odd t; stage drifts."""
    s = make_scene()
    for k, (tile, pos, n) in enumerate(zip(s.tiles, s.positions, n_t, strict=True)):
        planes = plane_meta(pos, n)
        for t in range(n):
            planes["PositionX"][t] += 10 * PIXEL_UM * k * t
        stack = np.stack([inverted(tile) if t % 2 else tile for t in range(n)])
        tifffile.imwrite(folder / f"t{k}.ome.tif", stack, photometric="minisblack",
                         metadata={"axes": "TYX", "PhysicalSizeX": PIXEL_UM,
                                   "PhysicalSizeY": PIXEL_UM, "Plane": planes})
    return s.tiles


def test_ome_tiff_timepoints_are_the_smallest_size_t(tmp_path):
    tiles = write_ome_timelapse(tmp_path)
    assert list_timepoints(tmp_path) == [0, 1]  # one tile has a third plane: not every tile
    every = tilesets_from_args(args_for(str(tmp_path), "--timepoint", "all"))
    assert len(every) == 2
    # positions may differ between time points (drift); tiles and shapes may not
    np.testing.assert_allclose(every[1].positions()[:, 1] - every[0].positions()[:, 1],
                               [0, 10, 20, 30])
    np.testing.assert_array_equal(every[1].sources[0][2].read(WHOLE[:2]), inverted(tiles[2]))
    np.testing.assert_array_equal(every[0].sources[0][2].read(WHOLE[:2]), tiles[2])


def test_ome_tiff_single_file_without_time_axis(tmp_path):
    write_ome_timelapse(tmp_path, n_t=(1, 1, 1, 1))
    assert list_timepoints(tmp_path / "t0.ome.tif") == [0]
    assert list_timepoints(tmp_path, format="ome-tiff") == [0]


# --- CZI, positions files, grids ----------------------------------------------------------------


def test_czi_real_file_has_one_timepoint():
    pytest.importorskip("czifile")
    if not CZI.is_file():
        missing_real_data(CZI)
    assert list_timepoints(CZI) == [0]
    every = tilesets_from_args(args_for(str(CZI), "--timepoint", "all"))
    assert len(every) == 1 and every[0].n_tiles == 2
    with pytest.raises(InputError) as excinfo:
        timepoints_from_args(args_for(str(CZI), "--timepoint", "4"))
    one_line(excinfo, "mosaic_test.czi", "timepoint 4 does not exist", "[0]")


def test_positions_files_and_grids_have_timepoint_0_only(tmp_path):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"r{i}.tif", np.full((8, 8), i, np.uint8))
    (tmp_path / "pos.csv").write_text("file,x,y\nr0.tif,0,0\nr1.tif,6,0\n")
    csv = tmp_path / "pos.csv"
    assert list_timepoints(csv) == [0] == list_timepoints(tmp_path, grid="1x2")
    assert read_tileset(csv, timepoint=0).n_tiles == 2
    assert read_tileset(tmp_path, grid="1x2", timepoint=0).n_tiles == 2
    with pytest.raises(InputError) as excinfo:
        read_tileset(csv, timepoint=1)
    one_line(excinfo, "pos.csv", "--timepoint must be 0")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path, grid="1x2", timepoint=2)
    one_line(excinfo, "grid", "--timepoint must be 0")
    every = tilesets_from_args(args_for(str(csv), "--timepoint", "all"))
    assert len(every) == 1 and every[0].n_tiles == 2
    with pytest.raises(InputError) as excinfo:
        tilesets_from_args(args_for(str(csv), "--timepoint", "1"))
    one_line(excinfo, "pos.csv", "--timepoint must be 0")


# --- the option itself ---------------------------------------------------------------------------


def test_timepoint_option_values(tmp_path, capsys):
    assert args_for("in", "--timepoint", "all").timepoint == "all"
    assert args_for("in", "--timepoint", "ALL").timepoint == "all"
    assert args_for("in", "--timepoint", "3").timepoint == 3
    assert args_for("in").timepoint is None
    with pytest.raises(SystemExit):
        args_for("in", "--timepoint", "some")
    assert "expected an integer" in capsys.readouterr().err
    (tmp_path / "pos.csv").write_text("file,x,y\n")
    with pytest.raises(InputError) as excinfo:  # one-timepoint commands (register)
        tileset_from_args(args_for(str(tmp_path / "pos.csv"), "--timepoint", "all"))
    one_line(excinfo, "--timepoint all", "one time point")
    with pytest.raises(InputError) as excinfo:
        list_timepoints(tmp_path / "absent.xml")
    one_line(excinfo, "absent.xml", "no such file")


def test_fuse_all_timepoints_writes_a_t_axis(tmp_path, scene, capsys):
    """End to end: ``fuse dataset.xml --timepoint all`` gives t, c, z, y, x."""
    import zarr

    from gpufusion.cli import main

    xml = two_timepoint_dataset(tmp_path, scene)
    out = tmp_path / "tc.ome.zarr"
    code = main(["fuse", str(xml), "-o", str(out), "--timepoint", "all", "--chunk", "32",
                 "-q", "--backend", "numpy"])
    assert code == 0, capsys.readouterr().err
    img = zarr.open_group(str(out), mode="r")["0"]
    assert img.ndim == 5 and img.shape[:2] == (2, 2)
    level0 = img[...]
    # timepoint 1 holds the timepoint-0 pixels halved (integer division): so does the fusion
    t0, t1 = level0[0].astype(np.int64), level0[1].astype(np.int64)
    assert np.abs(t1 - t0 // 2).max() <= 1
    assert t0.max() > 100


def test_fuse_all_timepoints_register_writes_one_report_each(tmp_path, capsys):
    """``--register`` registers every time point on its own; each gets its own report."""
    from gpufusion.cli import main

    (tmp_path / "in").mkdir()  # outputs may not go inside the input folder
    write_ome_timelapse(tmp_path / "in")  # the stage drifts between the two time points
    code = main(["fuse", str(tmp_path / "in"), "-o", str(tmp_path / "tc.ome.zarr"), "--timepoint",
                 "all", "-q", "--backend", "numpy", "--register", "--max-shift", "40",
                 "--report", str(tmp_path / "r.html")])
    assert code == 0, capsys.readouterr().err
    for k in (0, 1):
        assert "<svg" in (tmp_path / f"r.t{k}.html").read_text()
        assert (tmp_path / f"r.t{k}.edges.csv").is_file()
    assert not (tmp_path / "r.html").exists()


def test_fuse_register_reports_are_checked_first_and_written_last(tmp_path, capsys,
                                                                  monkeypatch):
    import gpufusion.pipeline
    from gpufusion.cli import main

    (tmp_path / "in").mkdir()  # outputs may not go inside the input folder
    write_ome_timelapse(tmp_path / "in")
    argv = ["fuse", str(tmp_path / "in"), "--timepoint", "all", "-q", "--backend", "numpy",
            "--register", "--max-shift", "40", "--report", str(tmp_path / "r.html")]
    (tmp_path / "r.t1.html").write_text("an earlier report")
    code = main([*argv, "-o", str(tmp_path / "a.ome.zarr")])
    assert code == 2 and "r.t1.html: already exists" in capsys.readouterr().err
    assert not (tmp_path / "r.t0.html").exists() and not (tmp_path / "a.ome.zarr").exists()
    (tmp_path / "r.t1.html").unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpufusion.pipeline, "fuse_to_file", interrupted)
    assert main([*argv, "-o", str(tmp_path / "a.ome.zarr")]) == 130
    assert not list(tmp_path.glob("r.*"))  # no report of a fusion that did not finish
    # --report without --register is refused
    assert main(["fuse", str(tmp_path / "in"), "-o", str(tmp_path / "b.ome.zarr"),
                 "--report", str(tmp_path / "r.html")]) == 2
    assert "add --register" in capsys.readouterr().err
