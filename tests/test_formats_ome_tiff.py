"""OME-TIFF with stage positions: the real Leica export and synthetic files fused end to end."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gpufusion
from gpufusion.errors import InputError
from gpufusion.readers.detect import detect_format, read_tileset
from gpufusion.readers.images import clear_tile_cache, set_tile_cache_bytes, tile_cache_info
from gpufusion.readers.ome_tiff import read_ome_tiff
from gpufusion.synthetic import make_mosaic

from .conftest import missing_real_data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LEICA = DATA / "leica_2tiles"
CHAMBER = LEICA / "experiment--test" / "slide--S00" / "chamber--U00--V00"
PIXEL_UM = 0.5


def needs(folder: Path) -> Path:
    if not folder.is_dir():
        missing_real_data(folder)
    return folder


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- real data: Leica Matrix Screener export ---------------------------------------------------


def test_leica_stage_positions_as_the_metadata_says():
    ts = read_tileset(needs(LEICA))
    assert detect_format(LEICA) == "ome-tiff"
    assert (ts.ndim, ts.n_tiles, ts.n_channels) == (2, 2, 2)
    assert ts.channel_names == ["C00", "C01"]  # from the file names: the XML has none
    assert ts.pixel_size == pytest.approx((0.24050019550342, 0.24050019550342))
    assert ts.unit == "micrometer"
    # StagePosition Y (metres): 0.03191692701790 -> 0.03214992494548, i.e. 232.998 um
    # = 968.81 px. This is what the metadata says and it is WRONG: the nominal Fiji offset
    # is 921 px, the registered one 936.75 px (README); registration corrects it later.
    expected_dy = (0.03214992494548 - 0.03191692701790) * 1e6 / 0.24050019550342
    np.testing.assert_allclose(ts.positions(), [[0, 0], [expected_dy, 0]], atol=1e-9)
    assert ts.positions()[1, 0] == pytest.approx(968.806, abs=1e-3)
    assert [n.split("/")[-2] for n in ts.names] == ["field--X00--Y00", "field--X00--Y01"]


def test_leica_channels_come_from_the_c00_and_c01_files():
    ts = read_tileset(needs(CHAMBER))
    for c in range(2):
        for t, field in enumerate(("Y00", "Y01")):
            src = ts.sources[c][t]
            file = next(CHAMBER.glob(f"field--X00--{field}/*--C0{c}.ome.tif"))
            assert Path(src.path) == file
            with tifffile.TiffFile(file, is_ome=False) as tif:
                expected = tif.pages[0].asarray()
            np.testing.assert_array_equal(src.read((slice(None), slice(None))), expected)
    mosaic = ts.mosaics()[1]
    assert mosaic.shape == (int(968.806 + 1023) + 1, 1024)


# --- synthetic OME-TIFFs ---------------------------------------------------------------------


def make_scene(ndim: int = 2, seed: int = 3):
    if ndim == 2:
        s = make_mosaic((2, 2), (48, 64), overlap=0.2, integer_positions=True, seed=seed)
    else:
        s = make_mosaic((1, 2, 2), (5, 32, 40), overlap=0.25, integer_positions=True, seed=seed)
    return s


def plane_meta(pos_zyx, n_planes: int, unit: str = "µm", scale: float = 1.0) -> dict:
    """Plane positions in ``unit`` for a tile at pixel position ``pos_zyx`` (+ a stage offset)."""
    y_um, x_um = pos_zyx[-2] * PIXEL_UM + 1500.0, pos_zyx[-1] * PIXEL_UM - 300.0
    return {"PositionX": [x_um * scale] * n_planes, "PositionY": [y_um * scale] * n_planes,
            "PositionXUnit": [unit] * n_planes, "PositionYUnit": [unit] * n_planes}


def inverted(tile: np.ndarray) -> np.ndarray:
    return (np.iinfo(tile.dtype).max - tile).astype(tile.dtype)


def test_folder_of_multichannel_files_fuses_to_ground_truth(tmp_path):
    s = make_scene()
    for k, (tile, pos) in enumerate(zip(s.tiles, s.positions, strict=True)):
        data = np.stack([tile, inverted(tile)])
        tifffile.imwrite(tmp_path / f"tile_{k}.ome.tif", data, photometric="minisblack",
                         metadata={"axes": "CYX", "PhysicalSizeX": PIXEL_UM,
                                   "PhysicalSizeY": PIXEL_UM, "Channel": {"Name": ["GFP", "inv"]},
                                   "Plane": plane_meta(pos, 2)})
    ts = read_tileset(tmp_path)
    assert ts.channel_names == ["GFP", "inv"] and ts.pixel_size == (PIXEL_UM, PIXEL_UM)
    np.testing.assert_allclose(ts.positions(), s.positions - s.positions.min(axis=0), atol=1e-9)
    src = pickle.loads(pickle.dumps(ts.sources[1][2]))
    np.testing.assert_array_equal(src.read((slice(3, 9), slice(0, 5))),
                                  inverted(s.tiles[2])[3:9, :5])
    m0, m1 = ts.mosaics()
    origin = m0.origin + s.positions.min(axis=0)
    truth, covered = s.ground_truth(origin, m0.shape), s.coverage(origin, m0.shape)
    assert covered.mean() > 0.9
    fused0 = gpufusion.fuse(m0, chunks=40).compute()
    fused1 = gpufusion.fuse(m1, chunks=40).compute()
    np.testing.assert_allclose(fused0[covered], truth[covered], atol=1)
    np.testing.assert_allclose(fused1[covered], inverted(truth)[covered], atol=1)


def test_one_multi_series_file_3d_with_units(tmp_path):
    s = make_scene(ndim=3)
    path = tmp_path / "stack.ome.tiff"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for tile, pos in zip(s.tiles, s.positions, strict=True):
            planes = plane_meta(pos, tile.shape[0], unit="mm", scale=1e-3)
            planes.update(PositionZ=[2.0 * pos[0]] * tile.shape[0],
                          PositionZUnit=["µm"] * tile.shape[0])
            tw.write(tile, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
                               "PhysicalSizeZ": 2.0, "PhysicalSizeXUnit": "µm", "Plane": planes})
    assert detect_format(path) == "ome-tiff"
    ts = read_ome_tiff(path)
    assert (ts.ndim, ts.n_tiles, ts.n_channels) == (3, 4, 1)
    assert ts.pixel_size == (2.0, PIXEL_UM, PIXEL_UM)
    assert ts.names == ["stack.ome.tiff Image0", "stack.ome.tiff Image1", "stack.ome.tiff Image2",
                        "stack.ome.tiff Image3"]
    np.testing.assert_allclose(ts.positions(), s.positions - s.positions.min(axis=0), atol=1e-6)
    m = ts.mosaics()[0]
    origin = m.origin + s.positions.min(axis=0)
    fused = gpufusion.fuse(m, chunks=(5, 32, 32)).compute()
    covered = s.coverage(origin, m.shape)
    np.testing.assert_allclose(fused[covered], s.ground_truth(origin, m.shape)[covered], atol=1)


@pytest.mark.parametrize("axes", ["ZCYX", "CZYX", "TZCYX"])
def test_planes_follow_the_dimension_order(tmp_path, axes):
    codes = {"Z": 3, "C": 2, "T": 2 if "T" in axes else 1}
    shape = [codes[a] for a in axes[:-2]]
    data = np.zeros((*shape, 4, 5), np.uint8)
    for index in np.ndindex(*shape):
        pos = dict(zip(axes, index, strict=False))
        data[index] = 100 * pos.get("T", 0) + 10 * pos["C"] + pos["Z"]
    n = int(np.prod(shape))
    tifffile.imwrite(tmp_path / "a.ome.tif", data, photometric="minisblack",
                     metadata={"axes": axes, "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0,
                               "Plane": {"PositionX": [0.0] * n, "PositionY": [0.0] * n}})
    for time in range(codes["T"]):
        ts = read_tileset(tmp_path, timepoint=time)
        assert ts.ndim == 3 and ts.n_channels == 2 and ts.sources[0][0].shape == (3, 4, 5)
        for ch in range(2):
            values = ts.sources[ch][0].read((slice(None), slice(0, 1), slice(0, 1))).ravel()
            assert values.tolist() == [100 * time + 10 * ch + k for k in range(3)]


def test_3d_tiles_decode_only_the_planes_a_window_needs(tmp_path):
    data = np.arange(6 * 8 * 9, dtype=np.uint16).reshape(6, 8, 9)
    tifffile.imwrite(tmp_path / "z.ome.tif", data, compression="zlib",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0,
                               "Plane": {"PositionX": [0.0] * 6, "PositionY": [0.0] * 6}})
    src = read_tileset(tmp_path).sources[0][0]
    clear_tile_cache()
    try:
        window = (slice(2, 4), slice(1, 3), slice(None))
        np.testing.assert_array_equal(src.read(window), data[window])
        assert tile_cache_info().misses == 2  # planes 2 and 3 only
        np.testing.assert_array_equal(src.read((slice(3, 5), slice(None), slice(4, 5))),
                                      data[3:5, :, 4:5])
        assert tile_cache_info().misses == 3
        set_tile_cache_bytes(2 * data[0].nbytes)  # room for two planes of six
        np.testing.assert_array_equal(src.read((slice(None),) * 3), data)
        assert src.read((slice(4, 4), slice(None), slice(None))).shape == (0, 8, 9)
    finally:
        set_tile_cache_bytes(1 << 30)
        clear_tile_cache()


def test_multi_file_dataset_with_the_full_xml_in_every_file(tmp_path):
    """Bio-Formats style: every file lists every Image; each Image is read once."""
    image = ('<Image ID="Image:{k}" Name="pos{k}"><Pixels ID="Pixels:{k}" '
             'DimensionOrder="XYZCT" Type="uint8" SizeX="16" SizeY="12" SizeZ="1" SizeC="1" '
             'SizeT="1" PhysicalSizeX="2" PhysicalSizeY="2"><Channel ID="Channel:{k}:0"/>'
             '<TiffData IFD="0" PlaneCount="1"><UUID FileName="f{k}.ome.tif">urn:uuid:{k}'
             '</UUID></TiffData><Plane TheZ="0" TheC="0" TheT="0" PositionX="{x}" '
             'PositionY="0"/></Pixels></Image>')
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns='
           '"http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           + "".join(image.format(k=k, x=20.0 * k) for k in range(2)) + "</OME>")
    for k in range(2):
        tifffile.imwrite(tmp_path / f"f{k}.ome.tif", np.full((12, 16), k + 1, np.uint8),
                         description=xml.encode(), metadata=None)
    ts = read_tileset(tmp_path)
    assert ts.n_tiles == 2 and ts.names == ["f0.ome.tif", "f1.ome.tif"]
    np.testing.assert_allclose(ts.positions(), [[0, 0], [0, 10]])
    assert [int(src.read((slice(0, 1), slice(0, 1)))[0, 0]) for src in ts.sources[0]] == [1, 2]


def test_one_file_per_channel_grouped_by_name(tmp_path):
    s = make_scene()
    for k, (tile, pos) in enumerate(zip(s.tiles, s.positions, strict=True)):
        for c, data in enumerate((tile, inverted(tile))):
            tifffile.imwrite(tmp_path / f"field{k}--C0{c}.ome.tif", data,
                             metadata={"axes": "YX", "PhysicalSizeX": PIXEL_UM,
                                       "PhysicalSizeY": PIXEL_UM, "Plane": plane_meta(pos, 1)})
    ts = read_tileset(tmp_path, channel="C01")
    assert ts.n_tiles == 4 and ts.channel_names == ["C01"]
    assert [Path(src.path).name for src in ts.sources[0]] == [f"field{k}--C01.ome.tif"
                                                              for k in range(4)]
    np.testing.assert_array_equal(ts.sources[0][1].read((slice(None), slice(None))),
                                  inverted(s.tiles[1]))


def test_timepoint_selects_planes_and_positions(tmp_path):
    s = make_scene()
    for k, (tile, pos) in enumerate(zip(s.tiles, s.positions, strict=True)):
        planes = plane_meta(pos, 2)
        planes["PositionX"][1] += 10 * PIXEL_UM * k  # the stage drifted at t=1
        tifffile.imwrite(tmp_path / f"t{k}.ome.tif", np.stack([tile, inverted(tile)]),
                         photometric="minisblack",
                         metadata={"axes": "TYX", "PhysicalSizeX": PIXEL_UM,
                                   "PhysicalSizeY": PIXEL_UM, "Plane": planes})
    t0, t1 = read_tileset(tmp_path), read_tileset(tmp_path, timepoint=1)
    np.testing.assert_allclose(t1.positions()[:, 1] - t0.positions()[:, 1], [0, 10, 20, 30])
    np.testing.assert_array_equal(t1.sources[0][0].read((slice(None), slice(None))),
                                  inverted(s.tiles[0]))
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path, timepoint=2)
    one_line(excinfo, "timepoint 2 does not exist", "SizeT=2")


# --- bad input -------------------------------------------------------------------------------


def write_tile(path: Path, **meta) -> None:
    metadata = {"axes": "YX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
                "Plane": plane_meta((0, 0), 1)}
    metadata.update(meta)
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), metadata=metadata)


def test_corrupt_ome_xml(tmp_path):
    write_tile(tmp_path / "a.ome.tif")
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        xml = tif.ome_metadata
    tifffile.imwrite(tmp_path / "b.ome.tif", np.zeros((16, 16), np.uint8),
                     description=xml[: len(xml) // 2].encode(), metadata=None)
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "b.ome.tif", "truncated OME-XML")


def test_unknown_unit(tmp_path):
    write_tile(tmp_path / "a.ome.tif", PhysicalSizeXUnit="furlong")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "a.ome.tif", "unknown unit 'furlong'", "PhysicalSizeXUnit")


def test_missing_positions_and_pixel_size(tmp_path):
    tifffile.imwrite(tmp_path / "a.ome.tif", np.zeros((16, 16), np.uint8),
                     metadata={"axes": "YX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0})
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "a.ome.tif", "no stage position", "--grid")
    (tmp_path / "a.ome.tif").unlink()
    write_tile(tmp_path / "b.ome.tif", PhysicalSizeX=None, PhysicalSizeY=None)
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "b.ome.tif", "no PhysicalSizeX", "--pixel-size")
    assert read_tileset(tmp_path, pixel_size=0.25).pixel_size == (0.25, 0.25)


def test_inconsistent_channel_counts(tmp_path):
    write_tile(tmp_path / "a.ome.tif")
    tifffile.imwrite(tmp_path / "b.ome.tif", np.zeros((2, 16, 16), np.uint8),
                     photometric="minisblack",
                     metadata={"axes": "CYX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0,
                               "Plane": plane_meta((0, 10), 2)})
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "inconsistent channel counts per tile", "[1, 2]")


def test_plane_file_named_in_tiffdata_is_missing(tmp_path):
    write_tile(tmp_path / "a.ome.tif")
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        xml = tif.ome_metadata
    xml = xml.replace('<TiffData IFD="0" PlaneCount="1"/>',
                      '<TiffData FirstC="0"><UUID FileName="gone.ome.tif">urn:uuid:0</UUID>'
                      '</TiffData>')
    assert "gone.ome.tif" in xml
    tifffile.imwrite(tmp_path / "a.ome.tif", np.zeros((16, 16), np.uint8),
                     description=xml.encode(), metadata=None)
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "a.ome.tif", "gone.ome.tif", "not found")


def test_folder_without_ome_tiffs(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path)
    one_line(excinfo, "folder without OME-TIFF files", "--grid")
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "plain.tif")
    one_line(excinfo, "plain.tif", "without OME-XML")
