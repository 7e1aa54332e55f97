"""Tests for gpufusion.readers: positions files and file-backed tile sources."""

from __future__ import annotations

import logging
import pickle
import threading
import time
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from gpufusion.errors import InputError
from gpufusion.readers import images
from gpufusion.readers.images import (
    DecodedTileSource,
    MemmapTiffSource,
    clear_tile_cache,
    open_tile,
    set_tile_cache_bytes,
    tile_cache_info,
)
from gpufusion.readers.positions import (
    PositionTable,
    read_positions,
    read_positions_csv,
    read_tile_configuration,
)
from gpufusion.sources import TileSource

from .conftest import missing_real_data

DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
LEICA = DATA / "leica_2tiles" / "experiment--test" / "slide--S00" / "chamber--U00--V00"
TMA = DATA / "tma_4x3"


def needs(folder: Path) -> Path:
    if not folder.is_dir():
        missing_real_data(folder)
    return folder


def assert_input_error(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> str:
    """The message is one line and contains every part (file name, line, reason)."""
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


@pytest.fixture
def fresh_cache():
    clear_tile_cache()
    yield
    set_tile_cache_bytes(1 << 30)
    clear_tile_cache()


def ramp(shape: tuple[int, ...], dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    high = min(info.max, 60000) if info else 1.0
    return (rng.random(shape) * high).astype(dtype)


def make_tiles(folder: Path, names: list[str], shape=(6, 8)) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, np.zeros(shape, np.uint8), photometric="minisblack")


# --- positions: real data ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "second"),
    [("TileConfiguration.txt", (921.0, 0.0)), ("TileConfiguration.registered.txt", None)],
)
def test_leica_tile_configuration_resolves_subfolders(config, second):
    folder = needs(LEICA)
    table = read_tile_configuration(folder / config)
    assert table.ndim == 2 and len(table) == 2
    assert table.source == folder / config
    assert [p.parent.name for p in table.files] == ["field--X00--Y00", "field--X00--Y01"]
    assert all(p.is_absolute() and p.is_file() for p in table.files)
    assert table.files[0].name.endswith("X00--Y00--T00--Z00--C01.ome.tif")
    assert table.positions.dtype == np.float64 and table.positions.shape == (2, 2)
    expected = [(0.0, 0.0), second or (936.7469, 3.2326183)]
    np.testing.assert_allclose(table.positions, expected, rtol=0, atol=1e-12)
    auto = read_positions(folder / config)
    np.testing.assert_array_equal(auto.positions, table.positions)
    assert auto.files == table.files


def test_tma_derived_csv_is_not_a_positions_csv():
    folder = needs(TMA)
    with pytest.raises(InputError) as excinfo:
        read_positions(folder / "DERIVED_ashlar1.20_positions.csv")
    assert_input_error(excinfo, "DERIVED_ashlar1.20_positions.csv:2:", "missing column 'file'")


# --- positions: syntax -----------------------------------------------------------------


def test_tile_configuration_syntax_variations(tmp_path):
    make_tiles(tmp_path, ["a.tif", "b.tif", "c.tif", "d.tif", "sub/e.tif"])
    text = (
        "\ufeff# comment\r\n"
        "\r\n"
        "DIM=2\r\n"
        "a.tif; ; (0.0, 0.0)\r\n"
        "  b.tif;;(1.5,-2)  \r\n"
        "c.tif ;  0 ; ( 3e1 , 4 )\r\n"
        "d.tif; (5, 6)\r\n"
        "sub/e.tif; ; (7.25, 8.5)\r\n"
    )
    (tmp_path / "tiles.txt").write_text(text, newline="")
    table = read_positions(tmp_path / "tiles.txt")
    assert [p.name for p in table.files] == ["a.tif", "b.tif", "c.tif", "d.tif", "e.tif"]
    assert table.files[4] == (tmp_path / "sub" / "e.tif").resolve()
    np.testing.assert_array_equal(
        table.positions, [[0, 0], [-2, 1.5], [4, 30], [6, 5], [8.5, 7.25]]
    )
    assert not table.positions.flags.writeable


def test_tile_configuration_3d(tmp_path):
    make_tiles(tmp_path, ["a.tif", "b.tif"], shape=(3, 6, 8))
    (tmp_path / "TileConfiguration.txt").write_text(
        "dim = 3\na.tif; ; (0.0, 0.0, 0.0)\nb.tif; ; (10.5, 20.25, -3.0)\n"
    )
    table = read_positions(tmp_path / "TileConfiguration.txt")
    assert table.ndim == 3
    np.testing.assert_array_equal(table.positions, [[0, 0, 0], [-3.0, 20.25, 10.5]])


def test_tile_configuration_absolute_paths(tmp_path):
    make_tiles(tmp_path / "elsewhere", ["a.tif"])
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "t.txt").write_text(
        f"dim = 2\n{tmp_path / 'elsewhere' / 'a.tif'}; ; (1, 2)\n"
    )
    table = read_tile_configuration(tmp_path / "cfg" / "t.txt")
    assert table.files == [(tmp_path / "elsewhere" / "a.tif").resolve()]
    np.testing.assert_array_equal(table.positions, [[2, 1]])


def test_bare_name_found_in_unique_subfolder(tmp_path):
    make_tiles(tmp_path, ["f0/deep/a.tif", "f1/b.tif", "c.tif", "f2/c.tif"])
    (tmp_path / "t.txt").write_text("dim = 2\na.tif; ; (0, 0)\nb.tif; ; (0, 9)\nc.tif; ; (1, 1)\n")
    table = read_tile_configuration(tmp_path / "t.txt")
    # c.tif exists beside the file, so the copy in f2/ is not considered
    assert table.files == [
        (tmp_path / "f0" / "deep" / "a.tif").resolve(),
        (tmp_path / "f1" / "b.tif").resolve(),
        (tmp_path / "c.tif").resolve(),
    ]


def test_bare_name_ambiguous_or_missing(tmp_path):
    make_tiles(tmp_path, ["f0/a.tif", "f1/a.tif"])
    (tmp_path / "t.txt").write_text("dim = 2\n\na.tif; ; (0, 0)\n")
    with pytest.raises(InputError) as excinfo:
        read_tile_configuration(tmp_path / "t.txt")
    assert_input_error(excinfo, "t.txt:3:", "ambiguous", "f0/a.tif", "f1/a.tif")
    (tmp_path / "u.txt").write_text("dim = 2\nzz.tif; ; (0, 0)\n")
    with pytest.raises(InputError) as excinfo:
        read_tile_configuration(tmp_path / "u.txt")
    assert_input_error(excinfo, "u.txt:2:", "not found", "zz.tif", "sub-folders")
    # a name with a folder part is not searched for elsewhere
    (tmp_path / "v.txt").write_text("dim = 2\nf9/a.tif; ; (0, 0)\n")
    with pytest.raises(InputError) as excinfo:
        read_tile_configuration(tmp_path / "v.txt")
    assert_input_error(excinfo, "v.txt:2:", "not found", "f9/a.tif")


def test_csv_columns_any_order_extra_and_whitespace(tmp_path):
    make_tiles(tmp_path, ["a.tif", "b c.tif", "sub/d.tif"])
    (tmp_path / "pos.csv").write_text(
        "# made by hand\n"
        " Y , note, File , x\n"
        "1.5, first, a.tif, 2.5\n"
        '-3, "with, comma", "b c.tif", 4e2\n'
        "\n"
        "0, , sub/d.tif, 0\n"
    )
    table = read_positions(tmp_path / "pos.csv")
    assert table.ndim == 2
    assert [p.name for p in table.files] == ["a.tif", "b c.tif", "d.tif"]
    np.testing.assert_array_equal(table.positions, [[1.5, 2.5], [-3, 400], [0, 0]])


def test_csv_3d_and_sniffed_without_suffix(tmp_path):
    make_tiles(tmp_path, ["a.tif", "b.tif"], shape=(2, 4, 4))
    text = "file,x,y,z\na.tif,1,2,3\nb.tif,4,5,6\n"
    (tmp_path / "pos.csv").write_text(text)
    (tmp_path / "pos.txt").write_text(text)
    for name in ("pos.csv", "pos.txt"):
        table = read_positions(tmp_path / name)
        assert table.ndim == 3
        np.testing.assert_array_equal(table.positions, [[3, 2, 1], [6, 5, 4]])
    assert read_positions_csv(tmp_path / "pos.txt").ndim == 3


def test_position_table_checks_shape():
    with pytest.raises(ValueError, match="expected"):
        PositionTable([Path("/a.tif")], np.zeros((2, 2)), 2, Path("/p.csv"))


# --- positions: every bad input -----------------------------------------------------------

TC_BAD = [
    ("dim = 2\na.tif (0, 0)\n", 2, "malformed line"),
    ("dim = 2\na.tif; ; (0, 0, 0)\n", 2, "expected 2 coordinates (x, y) for dim = 2, got 3"),
    ("dim = 3\na.tif; ; (0, 0)\n", 2, "expected 3 coordinates (x, y, z) for dim = 3, got 2"),
    ("dim = 2\na.tif; ; (nan, 0)\n", 2, "x is not finite: 'nan'"),
    ("dim = 2\na.tif; ; (0, -inf)\n", 2, "y is not finite: '-inf'"),
    ("dim = 2\na.tif; ; (0, abc)\n", 2, "y is not a number: 'abc'"),
    ("dim = 2\na.tif; ; (0, )\n", 2, "y is not a number: ''"),
    ("dim = 2\na.tif; ; (0, 0)\nb.tif; ; (1, 1)\na.tif; ; (2, 2)\n", 4, "lines 2 and 4"),
    ("dim = 2\n# no tiles\n", None, "no tiles listed"),
    ("dim = 2\nmissing.tif; ; (0, 0)\n", 2, "tile file not found: 'missing.tif'"),
    ("dim = 4\na.tif; ; (0, 0)\n", 1, "dim must be 2 or 3, got '4'"),
    ("dim = two\n", 1, "dim must be 2 or 3, got 'two'"),
    ("a.tif; ; (0, 0)\n", 1, "before the 'dim = 2' or 'dim = 3' line"),
    ("dim = 2\ndim = 2\n", 2, "dim is given twice (first on line 1)"),
    ("dim = 2\na.tif; 2; (0, 0)\n", 2, "series index '2' is not supported"),
    ("dim = 2\nsub; ; (0, 0)\n", 2, "tile path is not a file"),
]


@pytest.mark.parametrize(("text", "line", "reason"), TC_BAD)
def test_tile_configuration_errors(tmp_path, text, line, reason):
    make_tiles(tmp_path, ["a.tif", "b.tif"])
    (tmp_path / "sub").mkdir()
    path = tmp_path / "TileConfiguration.txt"
    path.write_text(text)
    for reader in (read_tile_configuration, read_positions):
        with pytest.raises(InputError) as excinfo:
            reader(path)
        where = f"TileConfiguration.txt:{line}: " if line else "TileConfiguration.txt: "
        assert_input_error(excinfo, where, reason)


def test_missing_dim_line(tmp_path):
    (tmp_path / "t.txt").write_text("# only a comment\n")
    with pytest.raises(InputError) as excinfo:
        read_tile_configuration(tmp_path / "t.txt")
    assert_input_error(excinfo, "t.txt: ", "no 'dim = 2' or 'dim = 3' line")


CSV_BAD = [
    ("file,x\na.tif,1\n", 1, "missing column 'y'"),
    ("name,x,y\na.tif,1,2\n", 1, "missing column 'file'"),
    ("file,x,y,x\na.tif,1,2,3\n", 1, "column 'x' appears 2 times"),
    ("file,x,y\na.tif,1\n", 2, "expected 3 fields as in the header, got 2"),
    ("file,x,y\na.tif,1,2,3\n", 2, "expected 3 fields as in the header, got 4"),
    ("file,x,y\na.tif,1,2\nb.tif,abc,2\n", 3, "x is not a number: 'abc'"),
    ("file,x,y\na.tif,1,NaN\n", 2, "y is not finite: 'NaN'"),
    ("file,x,y,z\na.tif,1,2,inf\n", 2, "z is not finite: 'inf'"),
    ("file,x,y\na.tif,1,2\nb.tif,1,2\n./a.tif,3,4\n", 4, "lines 2 and 4"),
    ("file,x,y\n", None, "no tiles listed"),
    ("", None, "empty CSV"),
    ("file,x,y\nnope.tif,1,2\n", 2, "tile file not found: 'nope.tif'"),
    ("file,x,y\n,1,2\n", 2, "empty file name"),
]


@pytest.mark.parametrize(("text", "line", "reason"), CSV_BAD)
def test_csv_errors(tmp_path, text, line, reason):
    make_tiles(tmp_path, ["a.tif", "b.tif"])
    path = tmp_path / "positions.csv"
    path.write_text(text)
    with pytest.raises(InputError) as excinfo:
        read_positions(path)
    where = f"positions.csv:{line}: " if line else "positions.csv: "
    assert_input_error(excinfo, where, reason)


def test_unreadable_or_unknown_positions_files(tmp_path):
    cases = {
        "missing.txt": (None, "positions file not found"),
        "folder.csv": ("dir", "is a directory"),
        "binary.txt": (b"\xff\xfe\x00\x01garbage", "not a UTF-8 text file"),
        "nul.txt": (b"dim = 2\x00\n", "contains NUL bytes"),
        "other.txt": ("hello world\n1 2 3\n", "unrecognised positions file"),
        "empty.txt": ("", "unrecognised positions file"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(InputError) as excinfo:
            read_positions(path)
        assert_input_error(excinfo, name, reason)


# --- images: real data ---------------------------------------------------------------------


def test_leica_ome_tiffs_open_quietly_and_read_page0(caplog):
    folder = needs(LEICA)
    files = sorted(folder.glob("field--*/*.ome.tif"))
    assert len(files) == 4
    with caplog.at_level(logging.WARNING):
        for path in files:
            src = open_tile(path)
            assert isinstance(src, MemmapTiffSource)
            assert src.shape == (1024, 1024) and src.dtype == np.uint8
            assert src.name == path.name
            with tifffile.TiffFile(path) as tif:
                page0 = tif.pages[0].asarray()
            np.testing.assert_array_equal(src.read((slice(None), slice(None))), page0)
            np.testing.assert_array_equal(
                src.read((slice(900, 1024), slice(3, 700))), page0[900:, 3:700]
            )
    assert not [r for r in caplog.records if "TiffData" in r.getMessage()]
    # each file's OME-XML also names the other channel's file: C00 and C01 must differ
    sums = [int(open_tile(p).read((slice(None), slice(None))).sum(dtype=np.int64)) for p in files]
    assert len(set(sums)) == 4 and min(sums) > 0


def test_multifile_ome_reads_only_its_own_pages(tmp_path, fresh_cache):
    """A compressed copy of the Leica pair: tifffile's OME series of C01 points at C00."""
    folder = needs(LEICA)
    originals = sorted((folder / "field--X00--Y00").glob("*.ome.tif"))
    expected = {}
    for path in originals:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            expected[path.name] = page.asarray()
            description = page.description
        tifffile.imwrite(
            tmp_path / path.name,
            expected[path.name],
            description=description,
            metadata=None,
            compression="zlib",
            photometric="minisblack",
        )
    for name, data in expected.items():
        src = open_tile(tmp_path / name)
        assert isinstance(src, DecodedTileSource) and src.shape == (1024, 1024)
        np.testing.assert_array_equal(src.read((slice(None), slice(None))), data)
        np.testing.assert_array_equal(src.read((slice(500, 600), slice(7, 9))), data[500:600, 7:9])
    assert not np.array_equal(*expected.values())


def test_tma_pngs_open_lazily_and_window_matches_imageio(fresh_cache):
    folder = needs(TMA)
    files = sorted(folder.glob("r*-c*.png"))
    assert len(files) == 12
    sources = [open_tile(p) for p in files]
    assert tile_cache_info().misses == 0  # nothing decoded by opening
    for src in sources:
        assert isinstance(src, DecodedTileSource)
        assert src.shape == (512, 512) and src.dtype == np.uint8
    full = iio.imread(files[5])
    window = (slice(37, 301), slice(450, 512))
    np.testing.assert_array_equal(sources[5].read(window), full[37:301, 450:512])
    assert tile_cache_info().misses == 1


# --- images: window reads ----------------------------------------------------------------


def _write(path: Path, data: np.ndarray, **kwargs) -> Path:
    if not kwargs.get("imagej") and "axes" not in kwargs.get("metadata", {}):
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **kwargs)
    return path


TIFF_CASES = {
    "plain-2d": (ramp((37, 53)), {}, MemmapTiffSource),
    "strips-2d": (ramp((64, 40), "uint8"), {"rowsperstrip": 5}, MemmapTiffSource),
    "zlib-2d": (ramp((37, 53)), {"compression": "zlib"}, DecodedTileSource),
    "zlib-predictor": (
        ramp((37, 53)),
        {"compression": "zlib", "predictor": True},
        DecodedTileSource,
    ),
    "tiled-2d": (ramp((40, 48)), {"tile": (16, 16)}, DecodedTileSource),
    "bigendian-2d": (ramp((21, 30)), {"byteorder": ">"}, MemmapTiffSource),
    "float-2d": (ramp((20, 30), "float32"), {}, MemmapTiffSource),
    "plain-3d": (ramp((5, 19, 23)), {}, MemmapTiffSource),
    "zlib-3d": (ramp((5, 19, 23), "uint8"), {"compression": "zlib"}, DecodedTileSource),
    "imagej-z": (ramp((4, 16, 12)), {"imagej": True, "metadata": {"axes": "ZYX"}}, None),
}


@pytest.mark.parametrize("case", list(TIFF_CASES))
def test_tiff_window_reads_equal_full_reads(tmp_path, fresh_cache, case):
    data, kwargs, kind = TIFF_CASES[case]
    path = _write(tmp_path / f"{case}.tif", data, **kwargs)
    src = open_tile(path)
    assert isinstance(src, TileSource)
    if kind is not None:
        assert type(src) is kind
    assert src.shape == data.shape and src.dtype == data.dtype.newbyteorder("=")
    full = src.read(tuple(slice(None) for _ in data.shape))
    np.testing.assert_array_equal(full, data)
    assert full.dtype.isnative
    rng = np.random.default_rng(7)
    for _ in range(6):
        window = []
        for n in data.shape:
            lo = int(rng.integers(0, n))
            hi = int(rng.integers(lo + 1, n + 1))
            window.append(slice(lo, hi))
        window = tuple(window)
        np.testing.assert_array_equal(src.read(window), data[window])
    edge = tuple(slice(n - 1, n) for n in data.shape)
    np.testing.assert_array_equal(src.read(edge), data[edge])
    strided = tuple(slice(None, None, 3) for _ in data.shape)
    np.testing.assert_array_equal(src.read(strided), data[strided])


def test_ome_singleton_axes_are_squeezed(tmp_path):
    data = ramp((3, 20, 30))
    path = _write(tmp_path / "t.ome.tif", data[None, None, :], metadata={"axes": "TCZYX"})
    src = open_tile(path)
    assert src.shape == (3, 20, 30)
    np.testing.assert_array_equal(
        src.read((slice(1, 2), slice(None), slice(5, 9))), data[1:2, :, 5:9]
    )
    flat = _write(tmp_path / "f.ome.tif", data[None, 1:2, None], metadata={"axes": "TZCYX"})
    src = open_tile(flat)
    assert src.shape == (20, 30)
    np.testing.assert_array_equal(src.read((slice(None), slice(None))), data[1])
    single = _write(tmp_path / "one-plane.tif", data[:1], photometric="minisblack")
    assert open_tile(single).shape == (20, 30)


def test_reads_are_read_only(tmp_path, fresh_cache):
    data = ramp((10, 12))
    for kwargs in ({}, {"compression": "zlib"}):
        path = _write(tmp_path / f"ro{len(kwargs)}.tif", data, **kwargs)
        src = open_tile(path)
        window = src.read((slice(0, 4), slice(0, 4)))
        assert not window.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            window[0, 0] = 1
        np.testing.assert_array_equal(src.read((slice(None), slice(None))), data)


def test_png_16bit_and_jpeg(tmp_path, fresh_cache):
    data = ramp((17, 23))
    iio.imwrite(tmp_path / "g16.png", data)
    src = open_tile(tmp_path / "g16.png", name="sixteen")
    assert src.name == "sixteen" and src.dtype == np.uint16 and src.shape == (17, 23)
    np.testing.assert_array_equal(src.read((slice(3, 9), slice(0, 23))), data[3:9])
    iio.imwrite(tmp_path / "g.jpg", ramp((16, 24), "uint8"))
    jpg = open_tile(tmp_path / "g.jpg")
    np.testing.assert_array_equal(
        jpg.read((slice(2, 5), slice(1, 4))), iio.imread(tmp_path / "g.jpg")[2:5, 1:4]
    )


# --- images: pickling, cache ---------------------------------------------------------------


def test_sources_pickle_small_and_read_after_unpickling(tmp_path, fresh_cache):
    data = ramp((300, 400))
    paths = [
        _write(tmp_path / "m.tif", data),
        _write(tmp_path / "z.tif", data, compression="zlib"),
    ]
    iio.imwrite(tmp_path / "p.png", data)
    paths.append(tmp_path / "p.png")
    for path in paths:
        src = open_tile(path)
        src.read((slice(0, 10), slice(0, 10)))  # populate caches / maps first
        blob = pickle.dumps(src)
        assert len(blob) < 2000, (path.name, len(blob))
        clear_tile_cache()
        copy = pickle.loads(blob)
        assert (copy.shape, copy.dtype, copy.name) == (src.shape, src.dtype, src.name)
        np.testing.assert_array_equal(
            copy.read((slice(100, 120), slice(390, 400))), data[100:120, 390:400]
        )


def test_cache_eviction_respects_byte_bound(tmp_path, fresh_cache):
    tile_bytes = 32 * 32 * 2
    sources = [
        open_tile(_write(tmp_path / f"c{i}.tif", ramp((32, 32), seed=i), compression="zlib"))
        for i in range(4)
    ]
    set_tile_cache_bytes(int(2.5 * tile_bytes))
    for src in sources[:3]:
        src.read((slice(0, 1), slice(0, 1)))
    info = tile_cache_info()
    assert info.entries == 2 and info.nbytes == 2 * tile_bytes <= info.max_bytes
    assert info.misses == 3
    sources[2].read((slice(0, 2), slice(0, 2)))  # hit
    sources[1].read((slice(0, 2), slice(0, 2)))  # hit, now most recent
    assert tile_cache_info().hits == 2
    sources[0].read((slice(0, 2), slice(0, 2)))  # evicted earlier: decoded again
    info = tile_cache_info()
    assert info.misses == 4 and info.entries == 2 and info.nbytes <= info.max_bytes
    sources[1].read((slice(0, 2), slice(0, 2)))  # still cached (LRU dropped tile 2)
    assert tile_cache_info().misses == 4
    set_tile_cache_bytes(tile_bytes)  # shrinking evicts down to the bound
    info = tile_cache_info()
    assert info.entries == 1 and info.nbytes == tile_bytes
    set_tile_cache_bytes(tile_bytes - 1)  # a tile larger than the bound is never kept
    np.testing.assert_array_equal(
        sources[3].read((slice(None), slice(None))), ramp((32, 32), seed=3)
    )
    assert tile_cache_info().entries == 0 and tile_cache_info().nbytes == 0
    for bad in (-1, 1.5, "1GiB", True):
        with pytest.raises(InputError, match="non-negative integer"):
            set_tile_cache_bytes(bad)


def test_concurrent_reads_decode_once(tmp_path, fresh_cache, monkeypatch):
    data = ramp((64, 64))
    src = open_tile(_write(tmp_path / "t.tif", data, compression="zlib"))
    calls = []
    original = DecodedTileSource._decode

    def slow_decode(self):
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return original(self)

    monkeypatch.setattr(DecodedTileSource, "_decode", slow_decode)
    barrier = threading.Barrier(4)
    results: list[np.ndarray] = []

    def work(row: int) -> None:
        barrier.wait()
        results.append(src.read((slice(row, row + 8), slice(None))).copy())

    threads = [threading.Thread(target=work, args=(8 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r[0, 0] for r in results) == sorted(data[8 * i, 0] for i in range(4))
    assert tile_cache_info().misses == 1


def test_file_changed_after_open_is_reported(tmp_path, fresh_cache):
    path = _write(tmp_path / "t.tif", ramp((8, 8)), compression="zlib")
    src = open_tile(path)
    _write(path, ramp((16, 16)), compression="zlib")
    with pytest.raises(InputError) as excinfo:
        src.read((slice(0, 2), slice(0, 2)))
    assert_input_error(excinfo, "t.tif", "changed since it was opened")


# --- images: every bad input -------------------------------------------------------------


def _truncate(path: Path, nbytes: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - nbytes])
    return path


def test_truncated_tiffs_fail_at_open(tmp_path):
    big = ramp((1024, 1024), "uint8")
    plain = _truncate(_write(tmp_path / "plain.tif", big, rowsperstrip=8), 100)
    with pytest.raises(InputError) as excinfo:
        open_tile(plain)
    assert_input_error(excinfo, "plain.tif", "truncated")
    zlib = _truncate(_write(tmp_path / "zlib.tif", big, compression="zlib", rowsperstrip=64), 10)
    with pytest.raises(InputError) as excinfo:
        open_tile(zlib)
    assert_input_error(excinfo, "zlib.tif", "truncated", "page 0")
    stack = _truncate(_write(tmp_path / "stack.tif", ramp((4, 64, 64))), 5000)
    with pytest.raises(InputError) as excinfo:
        open_tile(stack)
    assert_input_error(excinfo, "stack.tif", "truncated")
    header_only = tmp_path / "header.tif"
    header_only.write_bytes(_write(tmp_path / "x.tif", big).read_bytes()[:20])
    with pytest.raises(InputError) as excinfo:
        open_tile(header_only)
    assert_input_error(excinfo, "header.tif", "TIFF")


def _bad_image_files(tmp_path: Path) -> dict[str, str]:
    """Write one file per bad case; return name -> expected reason."""
    cases: dict[str, str] = {}
    (tmp_path / "text.png").write_text("not an image")
    cases["text.png"] = "not a readable image"
    (tmp_path / "text.tif").write_text("not an image either")
    cases["text.tif"] = "not a readable image"
    (tmp_path / "garbage.tif").write_bytes(b"II*\x00" + b"\xff" * 64)
    cases["garbage.tif"] = "TIFF"
    (tmp_path / "zero.tif").write_bytes(b"")
    cases["zero.tif"] = "empty (0 bytes)"
    (tmp_path / "folder.tif").mkdir()
    cases["folder.tif"] = "not a file"
    cases["missing.tif"] = "not found"
    iio.imwrite(tmp_path / "rgb.png", np.zeros((8, 9, 3), np.uint8))
    cases["rgb.png"] = "RGB image (shape (8, 9, 3)): multichannel images are not supported yet"
    iio.imwrite(tmp_path / "rgba.png", np.zeros((8, 9, 4), np.uint8))
    cases["rgba.png"] = "RGBA image"
    png = tmp_path / "trunc.png"
    iio.imwrite(png, ramp((40, 40), "uint8"))
    _truncate(png, 20)
    cases["trunc.png"] = "PNG is truncated"
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    cases["rgb.tif"] = "3 samples"
    tifffile.imwrite(tmp_path / "chan.tif", ramp((5, 8, 9)), imagej=True)
    cases["chan.tif"] = "5 channels"
    tifffile.imwrite(tmp_path / "czyx.ome.tif", ramp((2, 3, 8, 9)), metadata={"axes": "CZYX"})
    cases["czyx.ome.tif"] = "multichannel images are not supported yet"
    tifffile.imwrite(tmp_path / "time.ome.tif", ramp((2, 3, 8, 9)), metadata={"axes": "TZYX"})
    cases["time.ome.tif"] = "time series are not supported"
    tifffile.imwrite(tmp_path / "complex.tif", np.zeros((4, 4), np.complex64))
    cases["complex.tif"] = "pixel type complex64 not supported"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*writing zero-size array", UserWarning)
        tifffile.imwrite(tmp_path / "empty.tif", np.zeros((0, 10), np.uint8))
    cases["empty.tif"] = "empty"
    return cases


def test_bad_image_files(tmp_path):
    cases = _bad_image_files(tmp_path)
    for name, reason in cases.items():
        with pytest.raises(InputError) as excinfo:
            open_tile(tmp_path / name)
        assert_input_error(excinfo, str(tmp_path / name), reason)


def test_missing_codec_is_reported(tmp_path, monkeypatch):
    path = _write(tmp_path / "t.tif", ramp((8, 8)), compression="zlib")
    from tifffile import TIFF

    class NoCodecs(dict):
        def __contains__(self, key: object) -> bool:
            return False

    monkeypatch.setattr(TIFF, "DECOMPRESSORS", NoCodecs(), raising=False)
    if 8 in TIFF.DECOMPRESSORS:
        pytest.skip("cannot hide tifffile's codecs here")
    with pytest.raises(InputError) as excinfo:
        open_tile(path)
    assert_input_error(excinfo, "t.tif", "imagecodecs")


def test_open_does_not_read_pixels(tmp_path, fresh_cache):
    path = _write(tmp_path / "t.tif", ramp((16, 16)), compression="zlib")
    src = open_tile(path)
    assert tile_cache_info().misses == 0
    path.unlink()
    with pytest.raises(InputError) as excinfo:
        src.read((slice(0, 1), slice(0, 1)))
    assert_input_error(excinfo, "t.tif")
    assert images.tile_cache_info().entries == 0


def test_dask_token_is_stable_across_pickling(tmp_path):
    dask_base = pytest.importorskip("dask.base")
    src = open_tile(_write(tmp_path / "t.tif", ramp((8, 8))))
    copy = pickle.loads(pickle.dumps(src))
    assert dask_base.tokenize(src) == dask_base.tokenize(copy)
    other = open_tile(_write(tmp_path / "u.tif", ramp((8, 8))))
    assert dask_base.tokenize(src) != dask_base.tokenize(other)
