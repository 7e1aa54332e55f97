"""BigStitcher / BigDataViewer dataset.xml: metadata of real files, fusion from synthetic stores."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gpufusion
from gpufusion.errors import InputError
from gpufusion.readers.bigstitcher import (
    N5DatasetSource,
    compose,
    group_views,
    read_bigstitcher,
    read_spimdata,
    world_unit,
    xyz_to_index,
)
from gpufusion.readers.detect import detect_format, read_tileset
from gpufusion.synthetic import make_mosaic

from .conftest import missing_real_data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bigstitcher_xml"


def real(i: int) -> Path:
    path = DATA / f"bigstitcher_{i}.xml"
    if not path.is_file():
        missing_real_data(path)
    return path


def affine(*values: float) -> np.ndarray:
    a = np.eye(4)
    a[:3] = np.reshape(values, (3, 4))
    return a


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- real files: metadata only ---------------------------------------------------------------


@pytest.mark.parametrize(("index", "n_views", "loader"), [
    (0, 15, "bdv.n5"), (1, 15, "bdv.multimg.zarr"), (2, 15, "bdv.multimg.zarr"), (3, 15, None),
    (4, 147, "bdv.n5"), (5, 147, "bdv.n5"), (6, 16, "bdv.multimg.zarr"),
])
def test_real_files_parse_with_view_counts(index, n_views, loader):
    spim = read_spimdata(real(index))
    assert len(spim.views()) == n_views
    assert spim.loader_format == loader
    assert detect_format(real(index)) == "bigstitcher"


def test_composition_first_listed_applied_last_file1():
    spim = read_spimdata(real(1))
    # setup 0, literally from the file: [regularized affine, TranslationModel3D, nominal grid]
    a1 = affine(0.9990407284329631, 0.006294762826228883, -0.0018936408042257633,
                -35.4616465867072, -0.004211752487216202, 0.9997544969400599,
                -3.685859256398284E-4, 11.822642190798302, 0.0024962860876907864,
                0.0011824161816296971, 0.9999449502009171, 61.30110412015014)
    a2 = affine(1, 0, 0, 16.143134199814995, 0, 1, 0, 62.808413727239895, 0, 0, 1,
                57.03870763658597)
    a3 = affine(1, 0, 0, -7096.0, 0, 1, 0, -23408.0003, 0, 0, 1, -28672.0)
    names = [name for name, _ in spim.registrations[(0, 0)]]
    assert names[1:] == ["TranslationModel3D", "Translation to Nominal Grid"]
    model = spim.model((0, 0))
    np.testing.assert_allclose(model[:, :3], (a1 @ a2 @ a3)[:, :3], atol=1e-12)
    # pixel (0, 0, 0) lands where the nominal grid, then the two corrections, put it
    origin = a1 @ a2 @ np.array([-7096.0, -23408.0003, -28672.0, 1.0])
    np.testing.assert_allclose(model[:3, 3], origin[:3], rtol=1e-6)
    assert not np.allclose(model, a3 @ a2 @ a1, atol=1e-3)


def test_calibration_applied_first_and_index_order_file6():
    spim = read_spimdata(real(6))
    cal_z = 10.0 / 3.26
    model = spim.model((0, 0))
    expected = affine(1, 0, 0, -861.5031, 0, 1, 0, 23895.71, 0, 0, cal_z, 6145.0)
    np.testing.assert_allclose(model, expected, rtol=1e-9)
    # a voxel 100 planes deep: z = 6145 + 100 * 10 / 3.26 (translation NOT scaled)
    assert (model @ [0, 0, 100, 1])[2] == pytest.approx(6145.0 + 100 * cal_z)
    zyx = xyz_to_index(model)
    np.testing.assert_allclose(zyx, [[cal_z, 0, 0, 6145.0], [0, 1, 0, 23895.71],
                                     [0, 0, 1, -861.5031], [0, 0, 0, 1]], rtol=1e-9)


def test_composition_with_three_transforms_file5():
    spim = read_spimdata(real(5))
    transforms = spim.registrations[(0, 0)]
    assert [n for n, _ in transforms] == ["InterpolatedAffineModel3D", "affine", "calibration"]
    a, t, c = (m for _, m in transforms)
    np.testing.assert_allclose(np.diag(c)[:3], [1, 1, 400 / 168], rtol=1e-12)
    np.testing.assert_allclose(spim.model((0, 0)), a @ t @ c, rtol=1e-12)
    point = np.array([10, 20, 30, 1.0])
    np.testing.assert_allclose(compose([a, t, c]) @ point, a @ (t @ (c @ point)))


def test_mesospim_grouping_file6():
    spim = read_spimdata(real(6))
    tp, tiles, channels = group_views(spim)
    assert tp == 0 and channels == [0, 1] and len(tiles) == 4
    # illumination 0 (the default): setups of channel 0 are 0..3, of channel 1 are 4..7
    assert {key[0]: (per_c[0][1], per_c[1][1]) for key, per_c in tiles.items()} == {
        0: (0, 4), 1: (1, 5), 2: (2, 6), 3: (3, 7)}
    _, tiles1, _ = group_views(spim, illumination=1)
    assert sorted(per_c[0][1] for per_c in tiles1.values()) == [8, 9, 10, 11]
    _, every, _ = group_views(spim, illumination="all")
    assert len(every) == 8 and {key[2] for key in every} == {0, 1}
    assert world_unit(spim, [v for p in tiles.values() for v in p.values()]) == (
        pytest.approx((3.26, 3.26, 3.26)), "micrometer")
    with pytest.raises(InputError) as excinfo:
        group_views(spim, illumination=5)
    one_line(excinfo, "illumination 5 does not exist")


def test_world_unit_nanometres_file4_and_per_axis_without_calibration_file1():
    spim = read_spimdata(real(4))  # 168 x 168 x 400 nm, calibration z = 400 / 168
    assert world_unit(spim, spim.views()) == (pytest.approx((168.0,) * 3), "nanometer")
    spim1 = read_spimdata(real(1))  # no calibration entry: the world is in pixels
    assert world_unit(spim1, spim1.views()) == (
        pytest.approx((1.0, 0.7479999743009398, 0.7480000148631624)), "micrometer")


def test_missing_registration_and_empty_affine_raise_on_use():
    spim = read_spimdata(real(0))  # 15 setups, one ViewRegistration
    assert spim.model((0, 0)).shape == (4, 4)
    with pytest.raises(InputError) as excinfo:
        spim.model((0, 1))
    one_line(excinfo, "bigstitcher_0.xml", "setup 1", "no ViewRegistration")
    spim3 = read_spimdata(real(3))
    with pytest.raises(InputError) as excinfo:
        spim3.model((0, 13))
    one_line(excinfo, "setup 13", "empty affine")
    with pytest.raises(InputError) as excinfo:
        read_bigstitcher(real(3))
    one_line(excinfo, "no ViewSetups")


def test_real_file_without_pixels_names_the_missing_container():
    with pytest.raises(InputError) as excinfo:
        read_tileset(real(6))
    one_line(excinfo, "Reuss-MousBrain2x2tiles-2ch.ome.zarr", "not found")
    with pytest.raises(InputError) as excinfo:
        read_tileset(real(2))
    one_line(excinfo, "S3 bucket")


# --- synthetic datasets with pixels ---------------------------------------------------------

OFFSET_XYZ = (5.0, -3.0, 4.0)  # world translation added to every tile


@pytest.fixture(scope="module")
def scene():
    """4 tiles on a 2x2 grid cut from one specimen; tiles keep every 2nd z plane."""
    s = make_mosaic((1, 2, 2), (9, 32, 32), overlap=0.25, subpixel=0.0, dtype="uint16", seed=5)
    tiles = [t[::2] for t in s.tiles]  # (5, 32, 32): voxel size z = 2 x (x, y)
    return s, tiles


def setup_xml(sid, size_xyz, channel, tile, illumination=0, unit="µm"):
    return (f"<ViewSetup><id>{sid}</id><name>v{sid}</name><size>{' '.join(map(str, size_xyz))}"
            f"</size><voxelSize><unit>{unit}</unit><size>0.5 0.5 1.0</size></voxelSize>"
            f"<attributes><illumination>{illumination}</illumination><channel>{channel}"
            f"</channel><tile>{tile}</tile><angle>0</angle></attributes></ViewSetup>")


def registration_xml(sid, pos_zyx, calibration=True):
    tx, ty, tz = (p + o for p, o in zip(pos_zyx[::-1], OFFSET_XYZ, strict=True))
    cal = ("<ViewTransform type='affine'><Name>calibration</Name><affine>1 0 0 0 0 1 0 0 "
           "0 0 2 0</affine></ViewTransform>") if calibration else ""
    return (f"<ViewRegistration timepoint='0' setup='{sid}'><ViewTransform type='affine'>"
            f"<Name>Translation</Name><affine>1 0 0 {tx} 0 1 0 {ty} 0 0 1 {tz}</affine>"
            f"</ViewTransform>{cal}</ViewRegistration>")


def write_dataset(folder: Path, loader: str, scene, *, setups=None, extra_regs="") -> Path:
    s, tiles = scene
    size = tiles[0].shape[::-1]
    setups = setups or "".join(setup_xml(sid, size, sid // 4, sid % 4) for sid in range(8))
    regs = "".join(registration_xml(sid, s.positions[sid % 4]) for sid in range(8)) + extra_regs
    xml = (f"<?xml version='1.0'?><SpimData version='0.2'><BasePath type='relative'>."
           f"</BasePath><SequenceDescription>{loader}<ViewSetups>{setups}</ViewSetups>"
           f"<Timepoints type='pattern'><integerpattern>0</integerpattern></Timepoints>"
           f"</SequenceDescription><ViewRegistrations>{regs}</ViewRegistrations></SpimData>")
    path = folder / "dataset.xml"
    path.write_text(xml)
    return path


def view_pixels(tiles, sid):
    """Channel 0 = the tile, channel 1 = its inverse (so channels are told apart)."""
    tile = tiles[sid % 4]
    return tile if sid < 4 else (np.iinfo(np.uint16).max - tile).astype(np.uint16)


def write_filemap2(folder: Path, tiles) -> str:
    maps = ""
    for sid in range(8):
        tifffile.imwrite(folder / f"view{sid}.tif", view_pixels(tiles, sid))
        maps += (f"<FileMapping view_setup='{sid}' timepoint='0' series='0' channel='0'>"
                 f"<file type='relative'>view{sid}.tif</file></FileMapping>")
    return f"<ImageLoader format='spimreconstruction.filemap2'><files>{maps}</files></ImageLoader>"


def write_filemap2_hyperstacks(folder: Path, tiles) -> str:
    """One ImageJ hyperstack (Z, C, Y, X) per tile; FileMapping picks the channel."""
    maps = ""
    for sid in range(8):
        if sid < 4:
            zcyx = np.stack([view_pixels(tiles, sid), view_pixels(tiles, sid + 4)], axis=1)
            tifffile.imwrite(folder / f"tile{sid}.tif", zcyx, imagej=True)
        maps += (f"<FileMapping view_setup='{sid}' timepoint='0' series='0' channel='{sid // 4}'>"
                 f"<file type='relative'>tile{sid % 4}.tif</file></FileMapping>")
    return f"<ImageLoader format='spimreconstruction.filemap2'><files>{maps}</files></ImageLoader>"


def write_n5_dataset(path: Path, data: np.ndarray, block_xyz, compression: str) -> None:
    """Minimal N5 writer (spec: big-endian header + pixels, x fastest, i/j/k block files)."""
    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({
        "dimensions": list(data.shape[::-1]), "blockSize": list(block_xyz),
        "dataType": data.dtype.name, "compression": {"type": compression}}))
    bz, by, bx = block_xyz[::-1]
    for k in range(0, data.shape[0], bz):
        for j in range(0, data.shape[1], by):
            for i in range(0, data.shape[2], bx):
                block = data[k : k + bz, j : j + by, i : i + bx]
                header = struct.pack(">HH3I", 0, 3, *block.shape[::-1])
                payload = block.astype(block.dtype.newbyteorder(">")).tobytes()
                if compression == "gzip":
                    payload = gzip.compress(payload)
                target = path / str(i // bx) / str(j // by) / str(k // bz)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(header + payload)


def write_n5(folder: Path, tiles, compression="gzip") -> str:
    for sid in range(8):
        write_n5_dataset(folder / "dataset.n5" / f"setup{sid}" / "timepoint0" / "s0",
                         view_pixels(tiles, sid), (20, 12, 2), compression)
    return ("<ImageLoader format='bdv.n5' version='1.0'><n5 type='relative'>dataset.n5</n5>"
            "</ImageLoader>")


def write_zarr(folder: Path, tiles, version: int = 3, zarr_format: int = 2) -> str:
    """OME-Zarr groups (NGFF 0.4 on Zarr v2, or 0.5 on Zarr v3), 5D (t, c, z, y, x)."""
    import zarr

    groups = ""
    for sid in range(8):
        group = zarr.open_group(folder / "tiles.ome.zarr" / f"s{sid}-t0.zarr", mode="w",
                                zarr_format=zarr_format)
        data = view_pixels(tiles, sid)[None, None]
        array = group.create_array("0", shape=data.shape, dtype=data.dtype,
                                   chunks=(1, 1, 3, 16, 16))
        array[...] = data
        multiscales = [{"version": "0.4", "datasets": [{"path": "0"}]}]
        if zarr_format == 2:
            group.attrs["multiscales"] = multiscales
        else:
            group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
        groups += (f"<zgroup setup='{sid}' tp='0' path='s{sid}-t0.zarr' indicies='0 0' />"
                   if version == 3 else
                   f"<zgroup setup='{sid}' timepoint='0'><path>s{sid}-t0.zarr</path></zgroup>")
    return (f"<ImageLoader format='bdv.multimg.zarr' version='{version}.0'><zarr type='relative'>"
            f"tiles.ome.zarr</zarr><zgroups>{groups}</zgroups></ImageLoader>")


def write_hdf5(folder: Path, tiles) -> str:
    h5py = pytest.importorskip("h5py")
    with h5py.File(folder / "dataset.h5", "w") as f:
        for sid in range(8):
            f[f"t00000/s{sid:02d}/0/cells"] = view_pixels(tiles, sid).view(np.int16)
    return "<ImageLoader format='bdv.hdf5'><hdf5 type='relative'>dataset.h5</hdf5></ImageLoader>"


LOADERS = {
    "filemap2": write_filemap2,
    "filemap2-hyperstack": write_filemap2_hyperstacks,
    "n5-gzip": write_n5,
    "n5-raw": lambda folder, tiles: write_n5(folder, tiles, "raw"),
    "zarr-v3-xml": write_zarr,
    "zarr-v1-xml": lambda folder, tiles: write_zarr(folder, tiles, 1),
    "zarr-format3": lambda folder, tiles: write_zarr(folder, tiles, 3, zarr_format=3),
    "hdf5": write_hdf5,
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_fuse_3d_dataset_matches_ground_truth(tmp_path, scene, kind):
    s, tiles = scene
    xml = write_dataset(tmp_path, LOADERS[kind](tmp_path, tiles), scene)
    ts = read_tileset(xml)
    assert (ts.ndim, ts.n_tiles, ts.n_channels) == (3, 4, 2)
    assert ts.channel_names == ["channel 0", "channel 1"]
    assert ts.pixel_size == pytest.approx((0.5, 0.5, 0.5)) and ts.unit == "micrometer"
    # index order: z row scaled by the calibration, translations (z, y, x)
    np.testing.assert_allclose(ts.affines[1], [[2, 0, 0, 4], [0, 1, 0, -3],
                                               [0, 0, 1, 24 + 5], [0, 0, 0, 1]])
    src = pickle.loads(pickle.dumps(ts.sources[0][3]))
    np.testing.assert_array_equal(src.read((slice(1, 3), slice(5, 30), slice(0, 7))),
                                  tiles[3][1:3, 5:30, 0:7])
    m0, m1 = ts.mosaics()
    assert m0.shape == (9, 56, 56) and tuple(m0.origin) == (4, -3, 5)
    truth = s.ground_truth((0, 0, 0), m0.shape)
    fused = gpufusion.fuse(m0, chunks=(9, 32, 32)).compute()
    inverse = gpufusion.fuse(m1, chunks=(9, 32, 32)).compute()
    # planes on the tiles' sampling grid (world z = 4 + 2k) are exact copies
    np.testing.assert_allclose(fused[::2], truth[::2], atol=1)
    np.testing.assert_allclose(inverse[::2], 65535 - truth[::2].astype(np.int64), atol=1)
    # planes between samples are linear interpolations of their neighbours
    between = (fused[:-2:2].astype(float) + fused[2::2]) / 2
    np.testing.assert_allclose(fused[1::2], between, atol=1)


def test_output_pixel_size_option_resamples(tmp_path, scene):
    s, tiles = scene
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, tiles), scene)
    ts = read_tileset(xml, pixel_size=1.0, channel=1)
    assert ts.pixel_size == (1.0, 1.0, 1.0) and ts.channel_names == ["channel 1"]
    np.testing.assert_allclose(ts.affines[3][:3, :3], np.diag([1.0, 0.5, 0.5]))
    np.testing.assert_allclose(ts.affines[3][:3, 3], (np.array([4, -3, 5]) + s.positions[3]) / 2)


# --- bad input -------------------------------------------------------------------------------


def test_truncated_xml(tmp_path, scene):
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, scene[1]), scene)
    xml.write_text(xml.read_text()[:700])
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, "dataset.xml", "truncated XML", "line 1")


@pytest.mark.parametrize(("loader", "expected"), [
    ("", "no ImageLoader"),
    ("<ImageLoader format='spimreconstruction.stack.loci'/>", "not supported"),
    ("<ImageLoader format='bdv.n5'><n5 type='relative'>gone.n5</n5></ImageLoader>",
     "gone.n5: N5 container"),
    ("<ImageLoader format='bdv.n5'></ImageLoader>", "has no <n5> path"),
])
def test_missing_or_unsupported_loader(tmp_path, scene, loader, expected):
    xml = write_dataset(tmp_path, loader, scene)
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, expected)


def test_missing_image_file(tmp_path, scene):
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, scene[1]), scene)
    (tmp_path / "view5.tif").unlink()
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, "view5.tif", "not found")


def test_missing_n5_dataset_and_corrupt_block(tmp_path, scene):
    xml = write_dataset(tmp_path, write_n5(tmp_path, scene[1]), scene)
    block = tmp_path / "dataset.n5" / "setup2" / "timepoint0" / "s0" / "0" / "0" / "0"
    block.write_bytes(block.read_bytes()[:30])
    ts = read_tileset(xml)
    with pytest.raises(InputError) as excinfo:
        ts.sources[0][2].read((slice(0, 2), slice(0, 2), slice(0, 2)))
    one_line(excinfo, "corrupt N5 block")
    (tmp_path / "dataset.n5" / "setup6" / "timepoint0" / "s0" / "attributes.json").unlink()
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, "setup6", "N5 dataset not found")


def test_n5_missing_blocks_read_as_zero(tmp_path):
    data = np.arange(5 * 7 * 9, dtype=np.uint16).reshape(5, 7, 9)
    write_n5_dataset(tmp_path / "d", data, (4, 4, 2), "raw")
    (tmp_path / "d" / "1" / "0" / "2").unlink()
    src = N5DatasetSource(tmp_path / "d", "d")
    out = src.read((slice(None), slice(None), slice(None)))
    expected = data.copy()
    expected[4:6, 0:4, 4:8] = 0
    np.testing.assert_array_equal(out, expected)


def test_unknown_unit(tmp_path, scene):
    size = scene[1][0].shape[::-1]
    setups = "".join(setup_xml(sid, size, sid // 4, sid % 4, unit="furlong") for sid in range(8))
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, scene[1]), scene, setups=setups)
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, "dataset.xml", "unknown unit 'furlong'")


def test_tile_without_every_channel(tmp_path, scene):
    size = scene[1][0].shape[::-1]
    setups = "".join(setup_xml(sid, size, sid // 4, sid % 4) for sid in range(7))
    setups += setup_xml(7, size, 1, 9)  # channel 1 of a tile that has no channel 0
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, scene[1]), scene, setups=setups)
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, "inconsistent channel counts per tile", "tile 3 has channels [0]")


def test_size_mismatch_between_xml_and_pixels(tmp_path, scene):
    setups = "".join(setup_xml(sid, (32, 32, 6), sid // 4, sid % 4) for sid in range(8))
    xml = write_dataset(tmp_path, write_filemap2(tmp_path, scene[1]), scene, setups=setups)
    with pytest.raises(InputError) as excinfo:
        read_tileset(xml)
    one_line(excinfo, "differs from the ViewSetup size (32, 32, 6)")
