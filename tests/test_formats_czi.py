"""CZI mosaics: the real 2-tile Zeiss file, lazy sources, bad files, both czifile APIs."""

from __future__ import annotations

import pickle
import re
import struct
import sys
import types
from enum import StrEnum
from pathlib import Path

import numpy as np
import pytest

import gpufusion
from gpufusion.errors import InputError
from gpufusion.readers import czi as czi_reader
from gpufusion.readers.detect import detect_format, read_tileset
from gpufusion.readers.images import clear_tile_cache, tile_cache_info

from .conftest import missing_real_data

pytest.importorskip("czifile")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "czi_2tiles"
CZI = DATA / "mosaic_test.czi"


@pytest.fixture
def czi_path() -> Path:
    if not CZI.is_file():
        missing_real_data(CZI)
    return CZI


def one_line(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_real_czi_tiles_positions_and_metadata(czi_path):
    assert detect_format(czi_path) == "czi"
    ts = read_tileset(czi_path)
    assert (ts.ndim, ts.n_tiles, ts.n_channels) == (2, 2, 1)
    assert ts.names == ["M0", "M1"] and ts.channel_names == ["EGFP"]
    np.testing.assert_array_equal(ts.positions(), [[0, 0], [0, 832]])  # 924 - 832 = 92 px
    assert ts.pixel_size == pytest.approx((1.0833333, 1.0833333)) and ts.unit == "micrometer"
    assert [s.shape for s in ts.sources[0]] == [(624, 924), (624, 924)]
    assert ts.sources[0][0].dtype == np.uint16
    meta = (DATA / "metadata.xml").read_text(encoding="utf-8", errors="replace")
    size_y, size_x = (int(re.search(f"<Size{a}>(\\d+)</Size{a}>", meta).group(1)) for a in "YX")
    assert ts.mosaics()[0].shape == (size_y, size_x) == (624, 1756)


def test_real_czi_fuses_at_nominal_positions(czi_path):
    import czifile

    ts = read_tileset(czi_path)
    fused = gpufusion.fuse(ts.mosaics()[0], chunks=512).compute()
    with czifile.CziFile(str(czi_path)) as f:
        composite = f.asarray().reshape(624, 1756)  # czifile's own mosaic (no blending)
    tile0 = ts.sources[0][0].read((slice(None), slice(None)))
    tile1 = ts.sources[0][1].read((slice(None), slice(None)))
    assert tile0.max() == 65535  # the saturated pixels are kept
    np.testing.assert_array_equal(fused[:, :832], tile0[:, :832])
    np.testing.assert_array_equal(fused[:, 924:], tile1[:, 92:])
    np.testing.assert_array_equal(fused[:, :832], composite[:, :832])
    np.testing.assert_array_equal(fused[:, 924:], composite[:, 924:])
    overlap = fused[:, 832:924].astype(float)
    lo = np.minimum(tile0[:, 832:], tile1[:, :92]).astype(int)
    hi = np.maximum(tile0[:, 832:], tile1[:, :92]).astype(int)
    assert np.all((overlap >= lo - 1) & (overlap <= hi + 1))  # a blend of the two tiles


def test_sources_are_lazy_and_picklable(czi_path):
    clear_tile_cache()
    ts = read_tileset(czi_path)
    assert tile_cache_info().misses == 0  # nothing decoded while reading the directory
    src = pickle.loads(pickle.dumps(ts.sources[0][1]))
    assert len(pickle.dumps(src)) < 2000
    window = src.read((slice(10, 12), slice(0, 3)))
    assert window.shape == (2, 3) and tile_cache_info().misses == 1
    np.testing.assert_array_equal(window, ts.sources[0][1].read((slice(10, 12), slice(0, 3))))
    assert tile_cache_info().misses == 1
    clear_tile_cache()


# --- bad files -------------------------------------------------------------------------------


def test_czi_without_mosaic_positions(czi_path, tmp_path):
    data = bytearray(czi_path.read_bytes())
    directory = struct.unpack("<q", data[32 + 52 : 32 + 60])[0]
    used = struct.unpack("<q", data[directory + 24 : directory + 32])[0]
    start, stop = directory + 32, directory + 32 + used
    segment = bytes(data[start:stop])
    assert segment.count(b"M\x00\x00\x00") == 2  # one M dimension entry per sub-block
    data[start:stop] = segment.replace(b"M\x00\x00\x00", b"B\x00\x00\x00")
    (tmp_path / "single.czi").write_bytes(bytes(data))
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "single.czi")
    one_line(excinfo, "single.czi", "CZI without mosaic positions")


def test_not_a_czi_and_truncated_czi(czi_path, tmp_path):
    (tmp_path / "fake.czi").write_bytes(b"not a zeiss file" * 10)
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "fake.czi")
    one_line(excinfo, "fake.czi", "not a readable CZI file")
    (tmp_path / "cut.czi").write_bytes(czi_path.read_bytes()[:600])
    with pytest.raises(InputError) as excinfo:
        read_tileset(tmp_path / "cut.czi")
    one_line(excinfo, "cut.czi", "damaged CZI file: corrupt sub-block directory")


def test_channel_and_timepoint_selection_errors(czi_path):
    with pytest.raises(InputError) as excinfo:
        read_tileset(czi_path, timepoint=3)
    one_line(excinfo, "timepoint 3 does not exist")
    with pytest.raises(InputError) as excinfo:
        read_tileset(czi_path, channel="DAPI")
    one_line(excinfo, "no channel named 'DAPI'", "EGFP")
    assert read_tileset(czi_path, channel="EGFP").n_channels == 1


# --- the czifile >= 2026 API (Python >= 3.12), through stand-ins of its documented objects ---


class _Dim(StrEnum):
    X = "X"
    Y = "Y"
    M = "M"


def test_adapter_reads_czifile_2026_entries(monkeypatch):
    dims = {_Dim.X: types.SimpleNamespace(start=832, size=924, stored_size=0),
            _Dim.Y: types.SimpleNamespace(start=0, size=624, stored_size=0),
            _Dim.M: types.SimpleNamespace(start=1, size=1, stored_size=0)}
    entry = types.SimpleNamespace(
        read_dimension_entries=lambda czi: dims,
        pixel_type=types.SimpleNamespace(dtype=np.dtype("<u2"), samples=1))
    facts, dtype, samples = czi_reader._entry_facts(object(), entry)
    assert facts == {"X": (832, 924, 924), "Y": (0, 624, 624), "M": (1, 1, 1)}
    assert (dtype, samples) == (np.dtype("uint16"), 1)

    module = types.ModuleType("fake_czifile_2026")
    pixels = np.arange(6, dtype=np.uint16).reshape(1, 2, 3, 1)

    class CziSegment:
        def __init__(self, czi, offset):
            assert offset == 1234
            self.offset = offset

        def data(self):
            return types.SimpleNamespace(data=lambda: pixels)

    class CziFile:
        pass

    module.CziSegment = CziSegment
    CziFile.__module__ = module.__name__
    monkeypatch.setitem(sys.modules, module.__name__, module)
    np.testing.assert_array_equal(czi_reader._read_subblock(CziFile(), 1234), pixels)
