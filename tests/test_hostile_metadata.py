"""Hostile metadata: OME-XML, BigStitcher dataset.xml, N5 and OME-Zarr JSON, ``info``.

Each bad file ends ``fuse``/``info`` with exit code 2 and one stderr line naming the file
and the field at fault, in bounded time and memory, nothing written at OUT and the inputs
unchanged; ``info`` describes an input tile set and where its pixels are read from.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpufusion.cli import main
from gpufusion.writers.ome_zarr import write_ome_zarr

from .test_formats_bigstitcher import write_n5_dataset
from .test_formats_ome_tiff import plane_meta, write_tile
from .tile_files import write_tile_csv
from .writer_helpers import refused


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fuse_refused(capsys, tmp_path: Path, source: Path, *parts: str, absent: str = "") -> str:
    """``fuse source``: refused as :func:`refused` says, every input file unchanged."""
    folder = source if source.is_dir() else source.parent
    before = snapshot(folder)
    out = tmp_path / "out.ome.zarr"
    line = refused(capsys, ["fuse", source, "-o", out, "-q", "--backend", "numpy"], out,
                   *parts, absent=absent)
    assert snapshot(folder) == before
    return line


def cli_in_subprocess(argv: list, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI in a child process, so a metadata-driven hang fails the test, not the run."""
    return subprocess.run([sys.executable, "-m", "gpufusion", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout)


# --- BigStitcher dataset.xml -----------------------------------------------------------------

TIFF_LOADER = ("<ImageLoader format='spimreconstruction.filemap2'><files><FileMapping "
               "view_setup='0' timepoint='0' series='0' channel='0'><file type='relative'>"
               "v0.tif</file></FileMapping></files></ImageLoader>")
N5_LOADER = "<ImageLoader format='bdv.n5'><n5 type='relative'>{}</n5></ImageLoader>"
REGISTRATION = ("<ViewRegistration timepoint='0' setup='0'><ViewTransform type='affine'>"
                "<affine>1 0 0 0 0 1 0 0 0 0 1 0</affine></ViewTransform></ViewRegistration>")


def dataset_xml(folder: Path, *, loader: str = TIFF_LOADER,
                timepoints: str = "<integerpattern>0</integerpattern>",
                setup: str = "<size>8 8 2</size>", registrations: str = REGISTRATION,
                extra: str = "") -> Path:
    """A one-view dataset.xml (8 x 8 x 2 uint16, ``v0.tif`` for the TIFF loader)."""
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "v0.tif", np.arange(128, dtype=np.uint16).reshape(2, 8, 8))
    kind = "range" if "<first>" in timepoints else "pattern"
    (folder / "dataset.xml").write_text(
        f"<SpimData version='0.2'><BasePath type='relative'>.</BasePath><SequenceDescription>"
        f"{loader}<ViewSetups><ViewSetup><id>0</id>{setup}</ViewSetup></ViewSetups>"
        f"<Timepoints type='{kind}'>{timepoints}</Timepoints>{extra}</SequenceDescription>"
        f"<ViewRegistrations>{registrations}</ViewRegistrations></SpimData>")
    return folder / "dataset.xml"


def test_the_synthetic_dataset_fuses(tmp_path, capsys):
    xml = dataset_xml(tmp_path / "in")
    assert main(["fuse", str(xml), "-o", str(tmp_path / "o.ome.zarr"), "-q"]) == 0


@pytest.mark.parametrize(("timepoints", "says"), [
    ("<integerpattern>0-300000000</integerpattern>",
     ["integerpattern '0-300000000' lists 300000001 timepoints", "more than the 1 view(s)"]),
    ("<integerpattern>0,5-9,0-999999999999:2</integerpattern>", ["lists 500000000006"]),
    ("<first>0</first><last>1000000000000</last>", ["range 0-1000000000000 lists"]),
])
def test_timepoint_expansion_is_bounded_by_the_views_the_file_describes(
        tmp_path, capsys, timepoints, says):
    xml = dataset_xml(tmp_path / "in", timepoints=timepoints)
    assert xml.stat().st_size < 700
    fuse_refused(capsys, tmp_path, xml, "dataset.xml", "<Timepoints>", *says)


def test_timepoints_within_the_views_described_are_read(tmp_path, capsys):
    regs = REGISTRATION + REGISTRATION.replace("timepoint='0'", "timepoint='2'")
    missing = "<MissingViews><MissingView timepoint='1' setup='0'/></MissingViews>"
    xml = dataset_xml(tmp_path / "in", timepoints="<first>0</first><last>2</last>",
                      registrations=regs, extra=missing)
    from gpufusion.readers.bigstitcher import read_spimdata, spimdata_timepoints

    assert spimdata_timepoints(read_spimdata(xml)) == [0, 2]


@pytest.mark.parametrize(("change", "says"), [
    ({"registrations": REGISTRATION.replace("timepoint='0'", "timepoint='x'")},
     ["ViewRegistration timepoint is not a number: 'x'"]),
    ({"registrations": REGISTRATION.replace("setup='0'", "setup='0.5'")},
     ["ViewRegistration setup is not a whole number: '0.5'"]),
    ({"registrations": REGISTRATION.replace("1 0 0 0 0 1", "inf 0 0 0 0 1")},
     ["affine of view (0, 0) has a number that is not finite"]),
    ({"extra": "<MissingViews><MissingView timepoint='nan' setup='0'/></MissingViews>"},
     ["MissingView timepoint has a number that is not finite: 'nan'"]),
    ({"setup": "<size>8 8 2</size><voxelSize><unit>um</unit><size>nan 1 1</size></voxelSize>"},
     ["ViewSetup 0 voxelSize has a number that is not finite: 'nan 1 1'"]),
    ({"setup": "<size>-8 8 2.5</size>"}, ["ViewSetup 0 size must be 3 whole numbers >= 1"]),
    ({"setup": "<size>8 8 2</size><attributes><channel>red</channel></attributes>"},
     ["ViewSetup 0 attribute <channel> is not a number: 'red'"]),
    ({"timepoints": "<integerpattern>0-4:0</integerpattern>"}, ["step 0 must be >= 1"]),
    ({"timepoints": "<first>0</first><last>1e400</last>"}, ["<last> has a number that is not"]),
    ({"loader": TIFF_LOADER.replace("series='0'", "series='[0]'")},
     ["FileMapping series is not a number: '[0]'"]),
])
def test_wrong_metadata_types_in_dataset_xml(tmp_path, capsys, change, says):
    xml = dataset_xml(tmp_path / "in", **change)
    fuse_refused(capsys, tmp_path, xml, "dataset.xml", *says)


LAUGHS = ("<?xml version='1.0'?><!DOCTYPE SpimData [<!ENTITY a 'aaaaaaaaaa'>"
          + "".join(f"<!ENTITY {n} '{('&' + p + ';') * 10}'>"
                    for p, n in zip("abcdefgh", "bcdefghi", strict=True))
          + "]><SpimData><BasePath>&i;</BasePath></SpimData>")


@pytest.mark.parametrize(("text", "says"), [
    (LAUGHS, "XML entity declarations are not allowed (<!ENTITY a> at line 1)"),
    ("<?xml version='1.0'?><!DOCTYPE SpimData [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>"
     "<SpimData><BasePath>&e;</BasePath></SpimData>",
     "XML external entities are refused (<!ENTITY e SYSTEM 'file:///etc/passwd'>"),
    ("<SpimData>\n  <BasePath>.</Base>\n</SpimData>", "malformed XML at line 2, column"),
    ("<SpimData><SequenceDescription><ViewSetups>", "truncated XML: the text ends (at line 1"),
    ("", "empty XML"),
])
def test_each_xml_rejection_says_what_it_is(tmp_path, capsys, text, says):
    xml = dataset_xml(tmp_path / "in")
    xml.write_text(text)
    line = fuse_refused(capsys, tmp_path, xml, "dataset.xml", says, absent="corrupt or truncated")
    assert "passwd" not in line.split("(")[0]  # the entity was named, never resolved


# --- N5 --------------------------------------------------------------------------------------


def n5_dataset(folder: Path, compression: str = "gzip") -> tuple[Path, Path]:
    """A dataset.xml reading one 8 x 8 x 2 uint16 N5 dataset; returns (xml, dataset)."""
    data = np.arange(128, dtype=np.uint16).reshape(2, 8, 8)
    dataset = folder / "c.n5" / "setup0" / "timepoint0" / "s0"
    write_n5_dataset(dataset, data, (8, 8, 2), compression)
    return dataset_xml(folder, loader=N5_LOADER.format("c.n5")), dataset


def test_n5_gzip_bomb_is_refused_before_it_inflates(tmp_path, capsys):
    xml, dataset = n5_dataset(tmp_path / "in")
    block = dataset / "0" / "0" / "0"
    header = block.read_bytes()[:16]
    block.write_bytes(header + gzip.compress(bytes(64 * 2**20)))  # 64 MiB for 256 bytes
    assert block.stat().st_size < 100_000
    fuse_refused(capsys, tmp_path, xml, "0/0/0", "N5 gzip block inflates beyond the 256 bytes")


@pytest.mark.parametrize("compression", ["bzip2", "xz", "blosc", "zstd"])
def test_n5_bombs_of_every_codec_are_refused(tmp_path, compression):
    import bz2
    import lzma

    import numcodecs

    from gpufusion.errors import InputError
    from gpufusion.readers.n5 import N5DatasetSource

    xml, dataset = n5_dataset(tmp_path / "in", "raw")
    attrs = json.loads((dataset / "attributes.json").read_text())
    attrs["compression"] = {"type": compression}
    (dataset / "attributes.json").write_text(json.dumps(attrs))
    encode = {"bzip2": bz2.compress, "xz": lzma.compress, "blosc": numcodecs.Blosc().encode,
              "zstd": numcodecs.Zstd().encode}[compression]
    block = dataset / "0" / "0" / "0"
    header = block.read_bytes()[:16]
    good = np.arange(128, dtype=">u2").tobytes()
    block.write_bytes(header + encode(good))
    source = N5DatasetSource(dataset, "v")
    np.testing.assert_array_equal(source.read((slice(None),) * 3).ravel(), np.arange(128))
    block.write_bytes(header + encode(bytes(4 * 2**20)))
    with pytest.raises(InputError, match="inflates") as excinfo:
        source.read((slice(None),) * 3)
    assert "0/0/0" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_n5_block_header_larger_than_the_block_size_is_refused(tmp_path, capsys):
    xml, dataset = n5_dataset(tmp_path / "in")
    block = dataset / "0" / "0" / "0"
    block.write_bytes(struct.pack(">HH3I", 0, 3, 100000, 100000, 1000) + block.read_bytes()[16:])
    fuse_refused(capsys, tmp_path, xml, "0/0/0", "header size [100000, 100000, 1000] does "
                 "not fit the blockSize [8, 8, 2]")


@pytest.mark.parametrize(("change", "says"), [
    ({"blockSize": [0, 8, 2]}, "N5 blockSize must be a list of 3 whole numbers >= 1"),
    ({"blockSize": [8, 8]}, "N5 blockSize must be a list of 3"),
    ({"dimensions": {"x": 8}}, "N5 dimensions must be a list of 3"),
    ({"dimensions": [8, "8", 2]}, "N5 dimensions must be"),
    ({"dimensions": [8, True, 2]}, "N5 dimensions must be"),
    ({"dataType": "complex64"}, "N5 dataType 'complex64' is not pixels"),
    ({"dataType": ["uint16"]}, "N5 dataType ['uint16'] is not pixels"),
    ({"compression": "gzip"}, "N5 compression must be an object with a 'type'"),
    ({"compression": {"type": ["gzip"]}}, "N5 compression ['gzip'] is not supported"),
])
def test_wrong_n5_attribute_types(tmp_path, capsys, change, says):
    xml, dataset = n5_dataset(tmp_path / "in")
    attrs = json.loads((dataset / "attributes.json").read_text())
    (dataset / "attributes.json").write_text(json.dumps({**attrs, **change}))
    fuse_refused(capsys, tmp_path, xml, "attributes.json", says)


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "not an N5 dataset's attributes (invalid JSON"),
    ("[8, 8, 2]", "N5 attributes must be a JSON object"),
])
def test_corrupt_n5_attributes(tmp_path, capsys, text, says):
    xml, dataset = n5_dataset(tmp_path / "in")
    (dataset / "attributes.json").write_text(text)
    fuse_refused(capsys, tmp_path, xml, "attributes.json", says)


# --- OME-TIFF --------------------------------------------------------------------------------


def ome_pair(folder: Path, attribute: str, value: str) -> Path:
    """``a.ome.tif`` and ``b.ome.tif`` side by side; ``attribute`` of b's OME-XML set to
    ``value`` (its first occurrence)."""
    folder.mkdir()
    write_tile(folder / "a.ome.tif")
    write_tile(folder / "b.ome.tif", Plane=plane_meta((0, 12), 1))
    with tifffile.TiffFile(folder / "b.ome.tif") as tif:
        xml = tif.ome_metadata
    xml, n = re.subn(rf'\b{attribute}="[^"]*"', f'{attribute}="{value}"', xml, count=1)
    assert n == 1, (attribute, xml)
    tifffile.imwrite(folder / "b.ome.tif", np.zeros((16, 16), np.uint8),
                     description=xml.encode(), metadata=None)
    return folder


@pytest.mark.parametrize(("attribute", "value", "says"), [
    ("SizeZ", "inf", "Image Image:0: SizeZ='inf' is not a finite number"),
    ("SizeZ", "-3", "SizeZ='-3' is out of range (expected 1 to 2147483647)"),
    ("SizeZ", "1.5", "SizeZ='1.5' is not a whole number"),
    ("SizeT", "1000000000000", "SizeT='1000000000000' is out of range"),
    ("SizeC", "two", "SizeC='two' is not a number"),
    ("TheZ", "nan", "Image Image:0 Plane 0: TheZ='nan' is not a finite number"),
    ("TheC", "-1", "Plane 0: TheC='-1' is out of range"),
    ("IFD", "0.5", "IFD='0.5' is not a whole number"),
    ("PositionX", "nan", "Image Image:0 Plane 0: PositionX='nan' is not a finite number"),
    ("PhysicalSizeX", "nan", "PhysicalSizeX='nan' is not a finite number"),
    ("PhysicalSizeX", "-0.5", "PhysicalSizeX='-0.5' is negative"),
    ("DimensionOrder", "XYCZ", "Image Image:0: DimensionOrder 'XYCZ' is not a permutation"),
])
def test_bad_ome_xml_values_name_the_file_image_and_plane(tmp_path, capsys, attribute, value,
                                                           says):
    folder = ome_pair(tmp_path / "in", attribute, value)
    line = fuse_refused(capsys, tmp_path, folder, "b.ome.tif", says)
    assert "a.ome.tif" not in line


def test_huge_position_unit_is_named_not_blamed_on_another_tile(tmp_path, capsys):
    folder = ome_pair(tmp_path / "in", "PositionXUnit", "km")
    with tifffile.TiffFile(folder / "b.ome.tif") as tif:
        xml = re.sub(r'PositionX="[^"]*"', 'PositionX="1e305"', tif.ome_metadata, count=1)
    tifffile.imwrite(folder / "b.ome.tif", np.zeros((16, 16), np.uint8),
                     description=xml.encode(), metadata=None)
    line = fuse_refused(capsys, tmp_path, folder, "b.ome.tif", "Plane 0: PositionX=",
                        "out of range in micrometres")
    assert "a.ome.tif" not in line


def test_plane_count_beyond_the_file_is_refused_not_looped(tmp_path):
    folder = ome_pair(tmp_path / "in", "PlaneCount", "10000000000")
    out = tmp_path / "out.ome.zarr"
    done = cli_in_subprocess(["fuse", folder, "-o", out, "-q", "--backend", "numpy"])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert "b.ome.tif: Image Image:0: TiffData PlaneCount=10000000000 but b.ome.tif has " \
           "only 1 IFD(s) from IFD 0 on" in done.stderr
    assert not out.exists()


def test_sizes_beyond_the_stored_planes_cost_no_loop(tmp_path):
    """SizeT and SizeC in the billions over one stored plane: listing time points and
    reading stay bounded by the planes stored (HEAD looped over SizeT, allocated SizeC)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, x in (("a", 0), ("b", 12)):
        write_tile(folder / f"{name}.ome.tif", Plane=plane_meta((0, x), 1))
        with tifffile.TiffFile(folder / f"{name}.ome.tif") as tif:
            xml = tif.ome_metadata.replace('SizeT="1"', 'SizeT="2000000000"')
        tifffile.imwrite(folder / f"{name}.ome.tif", np.full((16, 16), 7, np.uint8),
                         description=xml.encode(), metadata=None)
    out = tmp_path / "all.ome.zarr"
    done = cli_in_subprocess(["fuse", folder, "-o", out, "-q", "--timepoint", "all",
                              "--backend", "numpy"])
    assert done.returncode == 0, done.stderr
    import zarr

    assert zarr.open_group(str(out), mode="r")["0"].shape == (16, 28)  # T=0 alone: no t axis
    for name in ("a", "b"):
        with tifffile.TiffFile(folder / f"{name}.ome.tif") as tif:
            xml = tif.ome_metadata.replace('SizeC="1"', 'SizeC="2000000000"')
        tifffile.imwrite(folder / f"{name}.ome.tif", np.zeros((16, 16), np.uint8),
                         description=xml.encode(), metadata=None)
    done = cli_in_subprocess(["fuse", folder, "-o", tmp_path / "c.ome.zarr", "-q"])
    assert done.returncode == 2, done.stderr
    assert "a.ome.tif (Image0): no TIFF page for C=1 Z=0 T=0 (SizeC=2000000000" in done.stderr


@pytest.mark.parametrize(("doctype", "says"), [
    ("<!DOCTYPE OME [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]>",
     "OME-XML entity declarations are not allowed"),
    ("<!DOCTYPE OME [<!ENTITY e SYSTEM 'http://example.invalid/x'>]>",
     "OME-XML external entities are refused"),
])
def test_entities_in_ome_xml_are_refused_by_name(tmp_path, capsys, doctype, says):
    folder = tmp_path / "in"
    folder.mkdir()
    write_tile(folder / "a.ome.tif")
    write_tile(folder / "b.ome.tif", Plane=plane_meta((0, 12), 1))
    with tifffile.TiffFile(folder / "b.ome.tif") as tif:
        xml = re.sub(r"^<\?xml[^>]*>", lambda m: m.group(0) + doctype, tif.ome_metadata)
    tifffile.imwrite(folder / "b.ome.tif", np.zeros((16, 16), np.uint8),
                     description=xml.encode(), metadata=None)
    fuse_refused(capsys, tmp_path, folder, "b.ome.tif", says, absent="corrupt")


# --- info: OME-Zarr metadata -----------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    image = np.zeros((4, 6), np.uint8)
    return {2: write_ome_zarr(image, root / "v2.zarr", axes=["y", "x"], ngff_version="0.4"),
            3: write_ome_zarr(image, root / "v3.zarr", axes=["y", "x"], ngff_version="0.5")}


def _set(doc: dict, path: str, value) -> dict:
    *keys, last = path.split(".")
    node = doc
    for key in keys:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(("fmt", "file", "edit", "says"), [
    (2, ".zattrs", "{not json", ".zattrs: invalid JSON at line 1, column 2"),
    (2, ".zattrs", [1, 2], ".zattrs: the document must be a JSON object, got [1, 2]"),
    (2, ".zattrs", ("multiscales", {"a": 1}), "multiscales must be a non-empty list"),
    (2, ".zattrs", ("multiscales.0", "x"), "multiscales[0] must be an object, got 'x'"),
    (2, ".zattrs", ("multiscales.0.datasets", {"path": "0"}),
     "multiscales[0].datasets must be a list"),
    (2, ".zattrs", ("multiscales.0.datasets.0.path", 0),
     "multiscales[0].datasets[0].path must be a path inside the group, got 0"),
    (2, ".zattrs", ("multiscales.0.datasets.0.path", "../../elsewhere"),
     "datasets[0].path must be a path inside the group"),
    (2, ".zattrs", ("multiscales.0.axes", 5), "multiscales[0].axes must be a list, got 5"),
    (2, ".zattrs", ("multiscales.0.axes.1", {"type": "space"}),
     "multiscales[0].axes[1] must be an object with a string 'name'"),
    (2, ".zattrs", ("multiscales.0.axes.1.unit", 3), "multiscales[0].axes[1].unit must be a"),
    (2, ".zattrs", ("multiscales.0.datasets.0.coordinateTransformations.0.scale", "ab"),
     "coordinateTransformations[0].scale must be a list of 2 finite numbers"),
    (2, ".zattrs", ("multiscales.0.datasets.0.coordinateTransformations.0.scale", [1, 2, 3]),
     "must be a list of 2 finite numbers (the arrays are 2D), got [1, 2, 3]"),
    (2, ".zattrs", ("multiscales.0.datasets.0.coordinateTransformations", {"type": "scale"}),
     "datasets[0].coordinateTransformations must be a list"),
    (2, ".zattrs", ("multiscales.0.name", ["x"]), "multiscales[0].name must be a string"),
    (2, "0/.zarray", "{oops", "0/.zarray: invalid JSON at line 1, column 2"),
    (2, "0/.zarray", ("shape", "abc"), "0/.zarray: unreadable Zarr array metadata"),
    (2, ".zgroup", "{", ".zgroup: invalid JSON"),
    (3, "zarr.json", "{", "zarr.json: invalid JSON at line 1, column 2"),
    (3, "zarr.json", ("attributes", []), "zarr.json: attributes must be a JSON object"),
    (3, "zarr.json", ("attributes.ome", "0.5"), "zarr.json: attributes.ome must be a JSON"),
    (3, "zarr.json", ("attributes.ome.multiscales", 7),
     "zarr.json: attributes.ome.multiscales must be a non-empty list, got 7"),
    (3, "0/zarr.json", "{", "0/zarr.json: invalid JSON"),
])
def test_info_names_the_metadata_file_and_field(tmp_path, capsys, zarr_images, fmt, file,
                                                 edit, says):
    image = tmp_path / "img.zarr"
    shutil.copytree(zarr_images[fmt], image)
    target = image / file
    if isinstance(edit, tuple):
        edit = _set(json.loads(target.read_text()), *edit)
    target.write_text(edit if isinstance(edit, str) else json.dumps(edit))
    refused(capsys, ["info", image], None, str(image), says)


def test_info_still_describes_intact_images(capsys, zarr_images):
    for fmt, image in zarr_images.items():
        assert main(["info", str(image)]) == 0
        out = capsys.readouterr().out
        assert f"(Zarr v{fmt})" in out and "4 x 6" in out


# --- info: input tile sets -------------------------------------------------------------------


REAL_LOCATIONS = {
    0: ("bdv.n5", "tiles: 15", "N5 container {folder}/dataset.n5 (15 views; inside"),
    1: ("bdv.multimg.zarr", "tiles: 15", "Zarr container /data/foo_dataset/SPIM.ome.zarr "
        "(15 views; outside the input's folder; not found)"),
    2: ("bdv.multimg.zarr", "tiles: 15", "S3 bucket s3://aind-open-data/exaSPIM_719654_"
        "2024-06-14_12-48-10/SPIM.ome.zarr (15 views; outside the input's folder; remote"),
    3: ("no ImageLoader", "tiles: 0", "data: no ViewSetups: nothing to read"),
    4: ("bdv.n5", "tiles: 49, channels: 3", "pixel size: 168 x 168 x 168 nanometer"),
    6: ("bdv.multimg.zarr", "channels: 2 (488 nm, 561 nm)", "Zarr container {folder}/Reuss-"
        "MousBrain2x2tiles-2ch.ome.zarr (16 views; inside the input's folder; not found)"),
}


@pytest.mark.parametrize("index", sorted(REAL_LOCATIONS))
def test_info_describes_real_dataset_xml_and_where_data_is_read(data_dir, capsys, index):
    xml = data_dir / "bigstitcher_xml" / f"bigstitcher_{index}.xml"
    assert main(["info", str(xml)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(xml.resolve())
    assert "BigStitcher dataset.xml (SpimData)" in out
    for part in REAL_LOCATIONS[index]:
        assert part.format(folder=xml.resolve().parent) in out, out


def test_info_marks_a_loader_path_leaving_the_dataset_folder(tmp_path, capsys):
    (tmp_path / "project").mkdir()
    n5_dataset(tmp_path / "data")
    xml = dataset_xml(tmp_path / "project", loader=N5_LOADER.format("../data/c.n5"))
    assert main(["info", str(xml)]) == 0
    out = capsys.readouterr().out
    assert f"data: N5 container {(tmp_path / 'data' / 'c.n5').resolve()} (1 views; outside " \
           "the input's folder)" in out
    assert "not found" not in out
    assert main(["fuse", str(xml), "-o", str(tmp_path / "o.ome.zarr"), "-q"]) == 0  # allowed
    capsys.readouterr()
    inside = dataset_xml(tmp_path / "data", loader=N5_LOADER.format("c.n5"))
    assert main(["info", str(inside)]) == 0
    assert "(1 views; inside the input's folder)" in capsys.readouterr().out


def test_info_describes_a_positions_file(tmp_path, capsys):
    tiles = [np.zeros((8, 8), np.uint16)] * 3
    csv = write_tile_csv(tmp_path, tiles, [(0, 0), (0, 6), (6, 0)])
    assert main(["info", str(csv)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        "  CSV positions file",
        "  tiles: 3, channels: 1 (channel 0), time points: 1 (0)",
        "  pixel size: not given (y, x)",
        f"  data: tile files {tmp_path.resolve()} (3 files; inside the input's folder)",
    ]


def test_info_refuses_a_bad_dataset_xml_in_one_line(tmp_path, capsys):
    xml = dataset_xml(tmp_path, timepoints="<integerpattern>0-300000000</integerpattern>")
    refused(capsys, ["info", xml], None, "dataset.xml", "lists 300000001 timepoints")
