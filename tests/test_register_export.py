"""Back to Fiji and BigStitcher: ``register -o X.registered.txt`` and ``--write-xml``.

Fiji: the TileConfiguration is checked with a re-implementation of the rules of Fiji's own
reader (``Stitching_Grid.getLayoutFromFile`` of the Stitching plugin: trimmed lines, ``#``
and short lines skipped, a ``dim`` header, three ``;`` fields, ``(x, y[, z])`` split at
``,`` and read as 32-bit floats, images at ``new File(folder, name)``), which also reads the
real ``TileConfiguration.registered.txt`` Fiji wrote for ``leica_2tiles``.

BigStitcher: the written dataset.xml is read back with gpufusion's own reader (the tiles'
affines are the registered ones within 1e-6 px) and compared with the input byte for byte
outside the inserted Stitching Transforms (and as element trees).
"""

from __future__ import annotations

import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpufusion import mosaic_from_file
from gpufusion.cli import main
from gpufusion.errors import InputError
from gpufusion.readers.bigstitcher import read_bigstitcher, read_spimdata, xyz_to_index
from gpufusion.readers.detect import read_tileset
from gpufusion.registration import register_mosaic
from gpufusion.synthetic import make_mosaic
from gpufusion.writers.bigstitcher_xml import (
    STITCHING_TRANSFORM,
    stitching_translations,
    tile_views,
    write_stitched_xml,
)
from gpufusion.writers.tileconfig import write_tile_configuration

from .conftest import DATA, missing_real_data
from .tile_files import write_tile_csv

LEICA = DATA / "leica_2tiles" / "experiment--test" / "slide--S00" / "chamber--U00--V00"
BIGSTITCHER = DATA / "bigstitcher_xml"


# ------------------------------------------------------------------------------------------
# Fiji


def fiji_layout(path: Path) -> list[tuple[Path, tuple[float, ...]]]:
    """What Fiji's Grid/Collection stitching reads from a TileConfiguration: (image file,
    offset) per tile, following ``Stitching_Grid.getLayoutFromFile`` rule by rule; raises
    ValueError where Fiji logs an error and gives up."""
    dim, tiles = -1, []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or len(line) <= 3:
            continue
        if line.startswith("dim"):
            entries = line.split("=")
            if len(entries) != 2:
                raise ValueError(f"does not look like [ dim = n ]: {line}")
            dim = int(entries[1].strip())
            continue
        if line.startswith("multiseries"):
            continue
        if dim not in (2, 3):
            raise ValueError(f"header missing or bad dim before {line}")
        entries = [e for e in line.split(";")]
        while entries and entries[-1] == "":  # Java's split drops trailing empty strings
            entries.pop()
        if len(entries) != 3:
            raise ValueError(f"does not have 3 entries: {line}")
        name, point = entries[0].strip(), entries[2].strip()
        if not name or not (point.startswith("(") and point.endswith(")")):
            raise ValueError(f"wrong format: {line}")
        numbers = point[1:-1].split(",")
        if len(numbers) != dim:
            raise ValueError(f"wrong number of coordinates, dim = {dim}: {line}")
        offset = tuple(float(np.float32(n.strip())) for n in numbers)  # Float.parseFloat
        tiles.append((path.parent / name, offset))  # new File(directory, imageName)
    return tiles


def test_fiji_rules_read_fijis_own_registered_file() -> None:
    """The reference parser against the real file Fiji wrote (and our reader agrees)."""
    real = LEICA / "TileConfiguration.registered.txt"
    if not real.is_file():
        missing_real_data(real)
    tiles = fiji_layout(real)
    assert [t[0].name for t in tiles] == [
        "image--L00--S00--U00--V00--J20--E00--O00--X00--Y00--T00--Z00--C01.ome.tif",
        "image--L00--S00--U00--V00--J20--E00--O00--X00--Y01--T00--Z00--C01.ome.tif"]
    np.testing.assert_allclose([t[1] for t in tiles], [(0.0, 0.0), (3.2326183, 936.7469)],
                               rtol=1e-7)
    from gpufusion.readers.positions import read_tile_configuration

    ours = read_tile_configuration(real)
    np.testing.assert_allclose(ours.positions[:, ::-1], [t[1] for t in tiles], rtol=1e-7)


def test_our_file_has_the_syntax_of_fijis(tmp_path: Path) -> None:
    """Line by line the same structure as the real Fiji file: header lines, then
    ``name; ; (x, y)`` with a decimal point."""
    if not LEICA.is_dir():
        missing_real_data(LEICA)
    ours = write_tile_configuration(tmp_path / "TileConfiguration.registered.txt",
                                    [(0.0, 0.0), (936.7469, 3.2326183)],
                                    [tmp_path / "a.tif", tmp_path / "b.tif"])
    tile_line = re.compile(r"^[^;#]+; ; \((-?\d+\.\d+), (-?\d+\.\d+)\)$")
    real_lines = (LEICA / "TileConfiguration.registered.txt").read_text().splitlines()
    our_lines = ours.read_text().splitlines()
    assert our_lines[:4] == real_lines[:4] == [
        "# Define the number of dimensions we are working on", "dim = 2", "",
        "# Define the image coordinates"]
    assert all(tile_line.match(line) for line in real_lines[4:])
    assert all(tile_line.match(line) for line in our_lines[4:])
    assert our_lines[5] == "b.tif; ; (3.2326, 936.7469)"  # x first


def write_positions(folder: Path, tiles: list[np.ndarray], positions: np.ndarray) -> Path:
    """``t{k}.tif`` per tile and ``pos.csv`` listing them (``file,x,y[,z]``)."""
    axes = "xyz"[: tiles[0].ndim]
    lines = ["file," + ",".join(axes)]
    for k, (tile, pos) in enumerate(zip(tiles, positions, strict=True)):
        tifffile.imwrite(folder / f"t{k}.tif", tile, photometric="minisblack")
        lines.append(f"t{k}.tif," + ",".join(repr(float(v)) for v in pos[::-1]))
    (folder / "pos.csv").write_text("\n".join(lines) + "\n")
    return folder / "pos.csv"


@pytest.mark.parametrize("shape, grid", [((64, 64), (2, 3)), ((12, 48, 48), (1, 2, 2))])
def test_registered_configuration_round_trips_for_fiji_and_us(tmp_path: Path, shape,
                                                              grid) -> None:
    """``register -o TileConfiguration.registered.txt``: Fiji's rules find every tile file
    at its registered position (x first, float32), and our reader gives the registered
    positions back (4 decimals); tiles in a sub-folder and beside the output's folder."""
    syn = make_mosaic(grid, shape, overlap=0.25, stage_error=3, seed=3)
    (tmp_path / "tiles").mkdir()
    csv = write_positions(tmp_path / "tiles", syn.tiles, syn.stage_positions)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "TileConfiguration.registered.txt"
    assert main(["register", str(csv), "-o", str(out), "--max-shift", "6", "--backend",
                 "numpy", "-q"]) == 0
    result = register_mosaic(mosaic_from_file(csv), max_shift=6, backend="numpy")
    tiles = fiji_layout(out)
    assert [os.path.normpath(p) for p, _ in tiles] == [
        str(tmp_path / "tiles" / f"t{k}.tif") for k in range(len(syn.tiles))]
    assert all(p.is_file() for p, _ in tiles)
    fiji_xyz = np.array([t[1] for t in tiles])
    np.testing.assert_allclose(fiji_xyz, result.positions[:, ::-1], atol=5e-5)
    np.testing.assert_allclose(mosaic_from_file(out).positions(), result.positions, atol=5e-5)
    assert "(" in out.read_text() and ".." in out.read_text()  # ../tiles/t0.tif


@pytest.mark.parametrize("name", ["dimension1.tif", "multiseries_a.tif", "dim.tif"])
def test_names_fiji_would_read_as_a_header_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="header"):
        write_tile_configuration(tmp_path / "t.txt", [(0.0, 0.0)], [tmp_path / name])
    # "Dim" is not a header to Fiji (Java's startsWith is case-sensitive)
    write_tile_configuration(tmp_path / "t.txt", [(0.0, 0.0)], [tmp_path / "Dimension.tif"])
    assert fiji_layout(tmp_path / "t.txt")[0][0].name == "Dimension.tif"


# ------------------------------------------------------------------------------------------
# BigStitcher: the writer on the real files (metadata only)

_INSERTED = re.compile(r'<ViewTransform type="affine">\s*<Name>Stitching Transform</Name>\s*'
                       r"<affine>[^<]*</affine>\s*</ViewTransform>\s*")


def real_xml(tmp_path: Path, k: int) -> Path:
    src = BIGSTITCHER / f"bigstitcher_{k}.xml"
    if not src.is_file():
        missing_real_data(src)
    return Path(shutil.copy(src, tmp_path / "dataset.xml"))


def strip_stitching(elem: ET.Element) -> ET.Element:
    """A copy of ``elem`` without the ViewTransforms named Stitching Transform."""
    out = ET.Element(elem.tag, elem.attrib)
    out.text = (elem.text or "").strip()
    for child in elem:
        if child.tag == "ViewTransform" and child.findtext("Name") == STITCHING_TRANSFORM:
            continue
        out.append(strip_stitching(child))
    return out


def same_tree(a: ET.Element, b: ET.Element) -> bool:
    return ET.tostring(strip_stitching(a)) == ET.tostring(strip_stitching(b))


@pytest.mark.parametrize("k", [1, 2, 4, 5, 6])
def test_stitching_transform_on_real_files_gives_the_registered_affines(tmp_path: Path,
                                                                        k: int) -> None:
    """For every tile of a real dataset (affine, translation and calibration transforms,
    resampled by an output pixel size ``S``), the tile moved by ``d`` output pixels: the
    written file composes, as gpufusion's reader composes it, to ``T_out(d) @ A`` for every
    view of the tile (within 1e-6 px), and differs from the input only by the inserted
    elements (byte for byte, and as element trees)."""
    xml = real_xml(tmp_path, k)
    spim = read_spimdata(xml)
    groups = tile_views(spim)
    rng = np.random.default_rng(k)
    scale = np.diag([*rng.uniform(0.3, 3.0, 3), 1.0])  # the reader's resampling
    before = np.stack([scale @ xyz_to_index(spim.model(views[0])) for views in groups])
    moves = rng.normal(0.0, 40.0, (len(groups), 3))
    after = before.copy()
    after[:, :3, 3] += moves
    translations = stitching_translations(spim, before, after)
    assert set(translations) == {v for views in groups for v in views}
    out = write_stitched_xml(xml, tmp_path / "registered.xml", translations)
    new = read_spimdata(out)
    for views, old, want in zip(groups, before, after, strict=True):
        for view in views:  # the first is the tile's; the others move alike
            got = scale @ xyz_to_index(new.model(view))
            moved = want @ np.linalg.inv(old) @ scale @ xyz_to_index(spim.model(view))
            assert np.abs(got - moved).max() < 1e-6, view
            if view == views[0]:
                assert np.abs(got - want).max() < 1e-6, view
            names = [name for name, _ in new.registrations[view]]
            assert names[0] == STITCHING_TRANSFORM
            assert names[1:] == [name for name, _ in spim.registrations[view]]
    text, original = out.read_text(encoding="utf-8"), xml.read_text(encoding="utf-8")
    assert len(_INSERTED.findall(text)) == len(translations)
    assert _INSERTED.sub("", text) == original  # each inserted element and the line it adds
    assert same_tree(ET.parse(out).getroot(), ET.parse(xml).getroot())
    assert xml.read_text(encoding="utf-8") == (BIGSTITCHER / f"bigstitcher_{k}.xml").read_text(
        encoding="utf-8")  # the input as it was


def test_views_of_a_tile_all_move_channels_and_illuminations(tmp_path: Path) -> None:
    """mesoSPIM file 6 (2x2 tiles x 2 channels x 2 illuminations): illumination 0 is read,
    and all 4 views of each tile get its translation; per illumination with "all"."""
    xml = real_xml(tmp_path, 6)
    spim = read_spimdata(xml)
    groups = tile_views(spim)
    assert len(groups) == 4 and all(len(v) == 4 for v in groups)
    per_illumination = tile_views(spim, illumination="all")
    assert len(per_illumination) == 8 and all(len(v) == 2 for v in per_illumination)
    assert {v for g in groups for v in g} == {v for g in per_illumination for v in g}


def test_writer_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    xml = real_xml(tmp_path, 6)
    spim = read_spimdata(xml)
    n = len(tile_views(spim))
    before = np.stack([xyz_to_index(spim.model(v[0])) for v in tile_views(spim)])
    with pytest.raises(InputError, match="registered tiles for the dataset's 4 tiles"):
        stitching_translations(spim, before[:3], before[:3])
    rotated = before.copy()
    rotated[0, :3, :3] = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]]) @ rotated[0, :3, :3]
    with pytest.raises(InputError, match="not moved by a translation"):
        stitching_translations(spim, before, rotated)
    with pytest.raises(InputError, match="does not come from view"):
        stitching_translations(spim, before[::-1].copy(), before[::-1].copy())
    with pytest.raises(InputError, match="has no <ViewRegistration>"):
        write_stitched_xml(xml, tmp_path / "o.xml", {(5, 0): (1.0, 2.0, 3.0)})
    with pytest.raises(InputError, match="finite translation"):
        write_stitched_xml(xml, tmp_path / "o.xml", {(0, 0): (1.0, np.nan, 3.0)})
    assert not (tmp_path / "o.xml").exists() and n == 4


def test_windows_line_ends_are_kept(tmp_path: Path) -> None:
    xml = real_xml(tmp_path, 6)
    crlf = tmp_path / "crlf.xml"
    crlf.write_bytes(xml.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    out = write_stitched_xml(crlf, tmp_path / "out.xml", {(0, 0): (1.0, 2.0, 3.0)})
    data = out.read_bytes()
    assert data.count(b"\n") == data.count(b"\r\n") == crlf.read_bytes().count(b"\n") + 4
    assert read_spimdata(out).registrations[(0, 0)][0][0] == STITCHING_TRANSFORM


def test_tags_inside_comments_are_left_alone(tmp_path: Path) -> None:
    """A ViewRegistration inside a comment is not one; a self-closing one is opened."""
    xml = tmp_path / "dataset.xml"
    xml.write_text("<?xml version='1.0' encoding='UTF-8'?>\n<SpimData><!-- <ViewRegistration "
                   "timepoint='0' setup='0'> -->\n<ViewRegistrations>\n  <ViewRegistration "
                   "setup='0' timepoint='0'/>\n</ViewRegistrations></SpimData>\n",
                   encoding="utf-8")
    write_stitched_xml(xml, xml, {(0, 0): (1.5, 0.0, -2.0)})
    spim = read_spimdata(xml)
    np.testing.assert_array_equal(spim.model((0, 0))[:3, 3], [1.5, 0.0, -2.0])
    assert "<!-- <ViewRegistration timepoint='0' setup='0'> -->" in xml.read_text()


# ------------------------------------------------------------------------------------------
# BigStitcher: datasets with pixels (TIFF files, filemap2 loader)


def write_dataset(folder: Path, tiles: list[np.ndarray], stage_zyx: np.ndarray, *,
                  voxel=(0.5, 0.5, 0.5), calibration=(1.0, 1.0, 1.0)) -> Path:
    """A BigStitcher dataset.xml over one TIFF per tile: a Translation (the stage, in world
    units), then the calibration (listed last, applied first), as BigStitcher writes them."""
    setups, regs, maps = [], [], []
    for k, (tile, pos) in enumerate(zip(tiles, stage_zyx, strict=True)):
        tifffile.imwrite(folder / f"tile{k}.tif", tile, photometric="minisblack")
        x, y, z = (float(v) for v in pos[::-1])
        cx, cy, cz = calibration
        setups.append(
            f"<ViewSetup><id>{k}</id><name>tile{k}</name><size>{tile.shape[2]} {tile.shape[1]} "
            f"{tile.shape[0]}</size><voxelSize><unit>µm</unit><size>{voxel[0]} {voxel[1]} "
            f"{voxel[2]}</size></voxelSize><attributes><illumination>0</illumination>"
            f"<channel>0</channel><tile>{k}</tile><angle>0</angle></attributes></ViewSetup>")
        regs.append(
            f'    <ViewRegistration timepoint="0" setup="{k}">\n'
            f'      <ViewTransform type="affine">\n        <Name>Translation</Name>\n'
            f"        <affine>1.0 0.0 0.0 {x!r} 0.0 1.0 0.0 {y!r} 0.0 0.0 1.0 {z!r}</affine>\n"
            f'      </ViewTransform>\n      <ViewTransform type="affine">\n'
            f"        <Name>calibration</Name>\n        <affine>{cx} 0.0 0.0 0.0 0.0 {cy} 0.0 0.0 "
            f"0.0 0.0 {cz} 0.0</affine>\n      </ViewTransform>\n    </ViewRegistration>")
        maps.append(f"<FileMapping view_setup='{k}' timepoint='0' series='0' channel='0'>"
                    f"<file type='relative'>tile{k}.tif</file></FileMapping>")
    xml = ("<?xml version='1.0' encoding='UTF-8'?>\n<SpimData version='0.2'>\n"
           "  <BasePath type='relative'>.</BasePath>\n  <SequenceDescription>"
           "<ImageLoader format='spimreconstruction.filemap2'><files>" + "".join(maps)
           + "</files></ImageLoader><ViewSetups>" + "".join(setups) + "</ViewSetups>"
           "<Timepoints type='pattern'><integerpattern>0</integerpattern></Timepoints>"
           "</SequenceDescription>\n  <ViewRegistrations>\n" + "\n".join(regs)
           + "\n  </ViewRegistrations>\n</SpimData>\n")
    path = folder / "dataset.xml"
    path.write_text(xml, encoding="utf-8")
    return path


@pytest.fixture
def volume(tmp_path: Path):
    """2x2 tiles of 8x48x48 voxels (isotropic) with stage errors up to 3 px, as a dataset."""
    syn = make_mosaic((1, 2, 2), (8, 48, 48), overlap=0.3, stage_error=2.5, seed=11,
                      dtype="uint16")
    (tmp_path / "data").mkdir()
    xml = write_dataset(tmp_path / "data", syn.tiles, syn.stage_positions)
    return xml, syn


def test_anisotropic_calibration_and_resampling_round_trip(tmp_path: Path) -> None:
    """Voxels 0.4 x 0.4 x 1.2 um with BigStitcher's calibration (z x 3), read resampled to
    0.8 um pixels: tiles moved by d output pixels read back exactly so from the XML."""
    syn = make_mosaic((1, 1, 2), (4, 24, 24), overlap=0.3, dtype="uint16", seed=1)
    xml = write_dataset(tmp_path, syn.tiles, np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 17.0]]),
                        voxel=(0.4, 0.4, 1.2), calibration=(1.0, 1.0, 3.0))
    ts = read_bigstitcher(xml, pixel_size=0.8)
    assert not np.allclose(ts.affines[0][:3, :3], np.eye(3))  # z and the resampling
    after = np.asarray(ts.affines, dtype=np.float64).copy()
    after[:, :3, 3] += [[0.25, -1.5, 2.0], [-0.75, 3.125, -1.0]]  # (z, y, x) output px
    out = write_stitched_xml(xml, tmp_path / "out.xml", stitching_translations(
        read_spimdata(xml), ts.affines, after))
    again = read_bigstitcher(out, pixel_size=0.8)
    assert np.abs(np.asarray(again.affines) - after).max() < 1e-9
    # the world translation of tile 0: x = -1 px * 0.8 um / 0.4 um per world unit = -2
    written = read_spimdata(out).registrations[(0, 0)][0][1]
    np.testing.assert_allclose(written[:3, 3], [2.0 * 2, -1.5 * 2, 0.25 * 2])


def test_cli_write_xml_reads_back_the_registered_positions(volume, tmp_path: Path,
                                                           capsys) -> None:
    """``register dataset.xml --write-xml`` (another folder: BasePath rewritten) and ``-o``:
    gpufusion reads the XML back at the positions of the CSV, the registered ones, and the
    input XML is untouched."""
    xml, syn = volume
    original = xml.read_bytes()
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "elsewhere" / "registered.xml"
    assert main(["register", str(xml), "--write-xml", str(out), "-o",
                 str(tmp_path / "reg.csv"), "--max-shift", "6", "--backend", "numpy",
                 "-q"]) == 0
    assert xml.read_bytes() == original
    registered = read_tileset(out).positions()
    csv_positions = mosaic_from_file(tmp_path / "reg.csv").positions()
    np.testing.assert_allclose(registered, csv_positions, atol=1e-4)  # the CSV's digits
    direct = register_mosaic(read_tileset(xml).mosaics()[0], max_shift=6, backend="numpy")
    assert np.abs(registered - direct.positions).max() < 1e-6
    err = registered - syn.positions
    assert np.abs(err - err.mean(axis=0)).max() < 0.1
    assert "../data" in out.read_text()  # the BasePath, relative to the new folder
    # without -o: the XML and its edge table only
    out2 = tmp_path / "only.xml"
    assert main(["register", str(xml), "--write-xml", str(out2), "--max-shift", "6",
                 "--backend", "numpy", "-q"]) == 0
    assert (tmp_path / "only.edges.csv").is_file()
    assert np.abs(read_tileset(out2).positions() - direct.positions).max() < 1e-6


def test_cli_xml_output_safety(volume, tmp_path: Path, capsys) -> None:
    xml, _ = volume
    original = xml.read_bytes()
    common = ["--max-shift", "6", "--backend", "numpy", "-q"]
    out = tmp_path / "out.xml"
    out.write_text("precious")
    assert main(["register", str(xml), "--write-xml", str(out), *common]) == 2
    assert "already exists (use --overwrite" in capsys.readouterr().err
    assert out.read_text() == "precious"
    assert main(["register", str(xml), "--write-xml", str(out), "--overwrite", *common]) == 0
    assert read_spimdata(out).registrations[(0, 0)][0][0] == STITCHING_TRANSFORM
    assert main(["register", str(xml), "--write-xml", str(xml), "--overwrite", *common]) == 2
    assert "use --in-place" in capsys.readouterr().err
    assert main(["register", str(xml), "--write-xml", str(tmp_path / "o.txt"), *common]) == 2
    assert main(["register", str(xml), "--write-xml", str(out), "--in-place", *common]) == 2
    assert "exclusive" in capsys.readouterr().err
    assert main(["register", str(xml), *common]) == 2
    assert "-o: give the positions file" in capsys.readouterr().err
    csv = write_tile_csv(tmp_path, [np.zeros((32, 32), np.uint8)] * 2, [(0, 0), (0, 24)])
    assert main(["register", str(csv), "--write-xml", str(tmp_path / "x.xml"), *common]) == 2
    assert "applies to a BigStitcher dataset.xml" in capsys.readouterr().err
    assert xml.read_bytes() == original
    assert sorted(p.name for p in xml.parent.iterdir() if "~" in p.name) == []


def test_cli_in_place_keeps_a_backup(volume) -> None:
    xml, _ = volume
    original = xml.read_bytes()
    common = ["--max-shift", "6", "--backend", "numpy", "-q"]
    assert main(["register", str(xml), "--in-place", *common]) == 0
    backups = [p for p in xml.parent.iterdir() if p.name.startswith("dataset.xml~")]
    assert len(backups) == 1 and backups[0].read_bytes() == original
    assert re.fullmatch(r"dataset\.xml~\d{8}-\d{6}", backups[0].name)
    assert read_spimdata(xml).registrations[(0, 1)][0][0] == STITCHING_TRANSFORM
    assert main(["register", str(xml), "--in-place", *common]) == 2  # its edge table
    assert main(["register", str(xml), "--in-place", "--overwrite", *common]) == 0
    assert len([p for p in xml.parent.iterdir() if p.name.startswith("dataset.xml~")]) == 2
    names = [n for n, _ in read_spimdata(xml).registrations[(0, 1)]]
    assert names == [STITCHING_TRANSFORM, STITCHING_TRANSFORM, "Translation", "calibration"]
