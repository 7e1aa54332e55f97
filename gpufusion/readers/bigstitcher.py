"""BigStitcher / BigDataViewer ``dataset.xml`` (SpimData 0.2).

A dataset.xml lists ViewSetups (size and voxel size in ``x y z`` order, attributes tile,
channel, illumination, angle), Timepoints, MissingViews and, per view ``(timepoint,
setup)``, a ViewRegistration: a list of 3x4 affines (row-major, ``x y z`` order).

Composition. BigDataViewer's ``ViewRegistration.updateModel()`` starts from the identity
and calls ``model.concatenate(t)`` for each transform in list order (spimdata,
``mpicbg/spim/data/registration/ViewRegistration.java``), and imglib2 defines
``b.concatenate(a)`` as "apply ``a`` first, then ``b``" (``net/imglib2/concatenate/
Concatenable.java``). So ``world = A_first @ ... @ A_last @ pixel``: the calibration,
listed last, is applied first.

World unit. BigStitcher's calibration transform is ``diag(voxel / minResolution)``, where
``minResolution`` is the smallest voxel size of the dataset; its own comment says "the
distance between two pixels in the output image will be that wide" (multiview-
reconstruction, ``spim/fiji/datasetmanager/LightSheetZ1.java``,
``createViewRegistrations``). gpufusion therefore fuses one world unit per output pixel
and reports ``pixel_size = voxel / calibration`` per axis: ``minResolution`` on every axis
with BigStitcher's calibration, the voxel size of each axis for files without one (their
world is in pixels). ``pixel_size=`` resamples the output to another size.

Affines are converted to gpufusion's index order ``(z, y, x)`` by reversing rows and
columns: ``A_zyx = P @ A_xyz @ P`` with ``P`` the axis-reversal permutation.

Image loaders: ``spimreconstruction.filemap2`` (TIFF files), ``bdv.n5`` (a minimal N5
reader here: zarr 3 has no N5 support; raw, gzip, bzip2, xz, and with numcodecs blosc and
zstd blocks), ``bdv.multimg.zarr`` (OME-Zarr groups via zarr, versions 1 and 3 of the XML)
and ``bdv.hdf5`` (needs h5py). Grouping: one tile per (tile, angle) attribute pair, one
channel per channel attribute; one illumination (default the first; ``"all"`` fuses every
illumination as separate tiles).
"""

from __future__ import annotations

import bz2
import functools
import json
import lzma
import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .ome_tiff import open_tiff_planes, tiff_series_planes
from .tileset import TileSet, channel_index, ngff_length_unit, normalise_pixel_size

__all__ = ["N5DatasetSource", "SpimData", "ViewSetup", "ZarrArraySource", "compose",
           "group_views", "read_bigstitcher", "read_spimdata", "spimdata_timepoints",
           "world_unit", "xyz_to_index"]

View = tuple[int, int]  # (timepoint, setup)
_PERMUTE = np.eye(4)[[2, 1, 0, 3]]


def compose(affines: Sequence[np.ndarray]) -> np.ndarray:
    """Compose a ViewRegistration's transforms: the first listed is applied last.

    Examples
    --------
    >>> t = np.eye(4); t[0, 3] = 10.0          # translate x by 10
    >>> s = np.diag([1.0, 1.0, 2.0, 1.0])      # calibration: z scaled by 2
    >>> (compose([t, s]) @ [1, 1, 1, 1]).tolist()
    [11.0, 1.0, 2.0, 1.0]
    """
    out = np.eye(4)
    for a in affines:
        out = out @ a
    return out


def xyz_to_index(affine: np.ndarray) -> np.ndarray:
    """Convert a 4x4 affine in ``(x, y, z)`` order to index order ``(z, y, x)``.

    Examples
    --------
    >>> a = np.eye(4); a[0, 3] = 5.0           # x + 5
    >>> float(xyz_to_index(a)[2, 3])
    5.0
    """
    return _PERMUTE @ np.asarray(affine, dtype=np.float64) @ _PERMUTE


@dataclass(frozen=True)
class ViewSetup:
    """A ViewSetup: ``size``/``voxel_size`` in ``(x, y, z)`` order (None when absent)."""

    id: int
    name: str
    size: tuple[int, int, int] | None
    voxel_size: tuple[float, float, float] | None
    unit: str | None
    attributes: dict[str, int]


@dataclass(frozen=True)
class SpimData:
    """Parsed dataset.xml: setups, timepoints, missing views and registrations."""

    path: Path
    base_path: Path
    loader: ET.Element | None
    setups: dict[int, ViewSetup]
    timepoints: list[int]
    missing: frozenset[View]
    registrations: dict[View, list[tuple[str, np.ndarray | None]]]
    attribute_names: dict[str, dict[int, str]]

    @property
    def loader_format(self) -> str | None:
        """The ImageLoader's ``format`` attribute (e.g. ``"bdv.n5"``), if any."""
        return None if self.loader is None else self.loader.get("format")

    def views(self) -> list[View]:
        """All present views ``(timepoint, setup)``; from the registrations if no setups."""
        if not self.setups:
            return sorted(self.registrations)
        return [(t, s) for t in self.timepoints for s in sorted(self.setups)
                if (t, s) not in self.missing]

    def model(self, view: View) -> np.ndarray:
        """Composed 4x4 affine (``x, y, z`` order) of a view: pixel -> world."""
        if view not in self.registrations:
            raise InputError(
                f"{self.path}: view (timepoint {view[0]}, setup {view[1]}) has no "
                "ViewRegistration"
            )
        transforms = self.registrations[view]
        for name, a in transforms:
            if a is None:
                raise InputError(
                    f"{self.path}: view (timepoint {view[0]}, setup {view[1]}) has an empty "
                    f"affine in its transform {name!r}"
                )
        return compose([a for _, a in transforms])


def _fail(path: Path, message: str) -> InputError:
    return InputError(" ".join(f"{path}: {message}".split()))


def _numbers(text: str | None, n: int | None, path: Path, what: str) -> list[float]:
    try:
        values = [float(v) for v in (text or "").split()]
    except ValueError:
        raise _fail(path, f"{what} is not a list of numbers: {text!r}") from None
    if n is not None and len(values) != n:
        raise _fail(path, f"{what} needs {n} numbers, got {len(values)}")
    return values


def _int_pattern(text: str, path: Path) -> list[int]:
    """Timepoint ``integerpattern``: ``"0"``, ``"0-9"``, ``"0,2,4"``, ``"1-10:2"``."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+)(?::(\d+))?)?", part)
        if match is None:
            raise _fail(path, f"timepoint pattern {text!r} is not understood")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        out += range(first, last + 1, int(match.group(3) or 1))
    return out


def _parse_setup(elem: ET.Element, path: Path) -> ViewSetup:
    sid = int(_numbers(elem.findtext("id"), 1, path, "ViewSetup id")[0])
    size_text = elem.findtext("size")
    size = tuple(int(v) for v in _numbers(size_text, 3, path, f"ViewSetup {sid} size")) \
        if size_text else None
    voxel, unit = None, None
    vox = elem.find("voxelSize")
    if vox is not None:
        voxel = tuple(_numbers(vox.findtext("size"), 3, path, f"ViewSetup {sid} voxelSize"))
        unit = (vox.findtext("unit") or "").strip() or None
        if voxel and min(voxel) <= 0:
            raise _fail(path, f"ViewSetup {sid} voxel size must be positive, got {voxel}")
    attributes = {}
    attrs = elem.find("attributes")
    for child in attrs if attrs is not None else []:
        attributes[child.tag] = int(_numbers(child.text, 1, path, f"attribute {child.tag}")[0])
    return ViewSetup(sid, elem.findtext("name") or str(sid), size,  # type: ignore[arg-type]
                     voxel, unit, attributes)  # type: ignore[arg-type]


def read_spimdata(path: str | os.PathLike[str]) -> SpimData:
    """Parse a BigStitcher / BigDataViewer ``dataset.xml`` (metadata only, no pixels).

    Raises
    ------
    InputError
        For a missing file, corrupt or truncated XML, a root that is not ``SpimData``,
        or malformed numbers; the message names the file.

    Examples
    --------
    >>> import tempfile
    >>> xml = Path(tempfile.mkdtemp()) / "dataset.xml"
    >>> _ = xml.write_text(
    ...     "<SpimData version='0.2'><SequenceDescription><ViewSetups><ViewSetup><id>0</id>"
    ...     "<size>64 64 8</size><voxelSize><unit>um</unit><size>0.5 0.5 2</size></voxelSize>"
    ...     "</ViewSetup></ViewSetups></SequenceDescription><ViewRegistrations>"
    ...     "<ViewRegistration timepoint='0' setup='0'><ViewTransform type='affine'>"
    ...     "<affine>1 0 0 10 0 1 0 0 0 0 1 0</affine></ViewTransform>"
    ...     "<ViewTransform type='affine'><Name>calibration</Name>"
    ...     "<affine>1 0 0 0 0 1 0 0 0 0 4 0</affine></ViewTransform></ViewRegistration>"
    ...     "</ViewRegistrations></SpimData>")
    >>> spim = read_spimdata(xml)
    >>> spim.views(), (spim.model((0, 0)) @ [0, 0, 1, 1]).tolist()
    ([(0, 0)], [10.0, 0.0, 4.0, 1.0])
    """
    file = Path(path)
    try:
        root = ET.parse(file).getroot()
    except FileNotFoundError:
        raise _fail(file, "dataset.xml not found") from None
    except ET.ParseError as exc:
        line, col = exc.position
        raise _fail(file, f"corrupt or truncated XML (line {line}, column {col})") from None
    except OSError as exc:
        raise _fail(file, f"cannot read file ({exc.strerror or exc})") from None
    if root.tag != "SpimData":
        raise _fail(file, f"not a BigStitcher/BigDataViewer dataset.xml (root <{root.tag}>)")
    base = root.find("BasePath")
    base_text = (base.text or ".").strip() if base is not None else "."
    base_path = Path(base_text) if base is not None and base.get("type") == "absolute" \
        else file.parent / base_text
    seq = root.find("SequenceDescription")
    seq = seq if seq is not None else ET.Element("SequenceDescription")
    setups = {s.id: s for s in (_parse_setup(e, file) for e in seq.iter("ViewSetup"))}
    names: dict[str, dict[int, str]] = {}
    for group in seq.iter("Attributes"):
        for item in group:
            if item.findtext("id") is not None:
                names.setdefault(group.get("name", ""), {})[int(item.findtext("id") or 0)] = \
                    (item.findtext("name") or "").strip()
    timepoints: list[int] = []
    tps = seq.find("Timepoints")
    if tps is not None:
        kind = tps.get("type", "pattern")
        if kind == "range":
            first, last = (int(_numbers(tps.findtext(k), 1, file, k)[0]) for k in ("first", "last"))
            timepoints = list(range(first, last + 1))
        elif tps.find("integerpattern") is not None:
            timepoints = _int_pattern(tps.findtext("integerpattern") or "", file)
        else:
            timepoints = [int(_numbers(e.text, 1, file, "timepoint id")[0])
                          for e in tps.iter("id")]
    elif setups:
        timepoints = [0]
    missing = frozenset((int(e.get("timepoint", 0)), int(e.get("setup", 0)))
                        for e in seq.iter("MissingView"))
    registrations: dict[View, list[tuple[str, np.ndarray | None]]] = {}
    for reg in root.iter("ViewRegistration"):
        view = (int(reg.get("timepoint", 0)), int(reg.get("setup", 0)))
        transforms = []
        for vt in reg.findall("ViewTransform"):
            if vt.get("type", "affine") != "affine":
                raise _fail(file, f"ViewTransform type {vt.get('type')!r} is not supported")
            values = _numbers(vt.findtext("affine"), None, file, f"affine of view {view}")
            a = None  # an empty <affine> (seen in real files) fails only if the view is used
            if values:
                a = np.eye(4)
                a[:3] = np.reshape(_numbers(vt.findtext("affine"), 12, file,
                                            f"affine of view {view}"), (3, 4))
            transforms.append(((vt.findtext("Name") or "").strip(), a))
        registrations[view] = transforms
    return SpimData(file, base_path, seq.find("ImageLoader"), setups, timepoints, missing,
                    registrations, names)


# --- pixel stores ------------------------------------------------------------------------

_N5_CODECS = {
    "raw": lambda b: b,
    "gzip": lambda b: zlib.decompress(b, 47),  # 47: gzip or zlib header, detected
    "bzip2": bz2.decompress,
    "xz": lzma.decompress,
}


def _n5_decoder(compression: dict[str, Any], where: Path) -> Any:
    kind = compression.get("type", "raw")
    if kind in _N5_CODECS:
        return _N5_CODECS[kind]
    if kind in ("blosc", "zstd"):
        import numcodecs

        codec = numcodecs.Blosc() if kind == "blosc" else numcodecs.Zstd()
        return codec.decode
    raise _fail(where, f"N5 compression {kind!r} is not supported (raw, gzip, bzip2, xz, "
                       "blosc, zstd are)")


class N5DatasetSource:
    """One N5 dataset (``(x, y, z)`` on disk, ``(z, y, x)`` here), read block by block.

    A minimal reader of the N5 format (github.com/saalfeldlab/n5, README "File-system
    specification"): ``attributes.json`` gives ``dimensions``, ``blockSize``, ``dataType``
    and ``compression``; block ``(i, j, k)`` is the file ``i/j/k`` holding a big-endian
    header (mode, ndim, block size) and compressed big-endian pixels, x fastest. Missing
    blocks read as 0. Pickles as the path and the attributes.
    """

    def __init__(self, path: Path, name: str) -> None:
        attrs_file = path / "attributes.json"
        try:
            attrs = json.loads(attrs_file.read_text())
            dims = [int(d) for d in attrs["dimensions"]]
            block = [int(b) for b in attrs["blockSize"]]
            dtype = np.dtype(attrs["dataType"])
        except FileNotFoundError:
            raise _fail(attrs_file, "N5 dataset not found (no attributes.json)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise _fail(attrs_file, f"not an N5 dataset's attributes ({exc!r})") from None
        compression = attrs.get("compression") or {"type": attrs.get("compressionType", "raw")}
        _n5_decoder(compression, attrs_file)
        self.path, self.name = path, name
        self.shape = tuple(dims[::-1])
        self.block = tuple(block[::-1])
        self.dtype = dtype.newbyteorder("=")
        self.compression = compression

    def _block(self, index: tuple[int, ...]) -> np.ndarray | None:
        file = self.path.joinpath(*(str(i) for i in index[::-1]))
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            mode, ndim = struct.unpack(">HH", raw[:4])
            dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
            offset = 4 + 4 * ndim + (4 if mode == 1 else 0)
            if mode == 2:
                raise ValueError("object blocks are not image data")
            data = _n5_decoder(self.compression, file)(raw[offset:])
            count = int(np.prod(dims))
            array = np.frombuffer(data, dtype=self.dtype.newbyteorder(">"), count=count)
            return array.reshape(dims[::-1]).astype(self.dtype)
        except Exception as exc:  # truncated block, wrong codec
            raise _fail(file, f"corrupt N5 block ({type(exc).__name__}: {exc})") from None

    def read(self, window: tuple[slice, ...]) -> np.ndarray:
        """Return the pixels in ``window`` (slices with step 1)."""
        bounds = [s.indices(n)[:2] for s, n in zip(window, self.shape, strict=True)]
        out = np.zeros(tuple(max(b - a, 0) for a, b in bounds), dtype=self.dtype)
        ranges = [range(a // bs, (b - 1) // bs + 1) if b > a else range(0)
                  for (a, b), bs in zip(bounds, self.block, strict=True)]
        for index in np.ndindex(*(len(r) for r in ranges)):
            grid = tuple(r[i] for r, i in zip(ranges, index, strict=True))
            block = self._block(grid)
            if block is None:
                continue
            src, dst = [], []
            for g, bs, (a, b), n in zip(grid, self.block, bounds, block.shape, strict=True):
                lo, hi = max(a, g * bs), min(b, g * bs + n)
                src.append(slice(lo - g * bs, hi - g * bs))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = block[tuple(src)]
        return out


@functools.lru_cache(maxsize=256)
def _open_zarr(path: str) -> Any:
    import zarr

    return zarr.open_array(store=path, mode="r")


class ZarrArraySource:
    """The last three axes ``(z, y, x)`` of a Zarr array (v2 or v3).

    Leading axes (OME-Zarr ``t, c``) are fixed at ``indices`` (the zgroup's ``indicies``
    attribute, matched to the leading axes from the right), or at 0 when they have size 1.
    """

    def __init__(self, path: Path, indices: Sequence[int], name: str) -> None:
        try:
            array = _open_zarr(str(path))
        except Exception as exc:  # zarr raises several types for missing or bad arrays
            raise _fail(path, f"cannot open Zarr array ({type(exc).__name__}: {exc})") from None
        lead = array.shape[:-3]
        prefix = tuple(int(i) for i in indices)[-len(lead):] if lead and indices else ()
        prefix = (0,) * (len(lead) - len(prefix)) + prefix
        if array.ndim < 3 or any(not 0 <= i < n for i, n in zip(prefix, lead, strict=True)):
            raise _fail(path, f"Zarr array of shape {array.shape} has no 3D (z, y, x) volume at "
                              f"leading indices {prefix}")
        self.path, self.prefix, self.name = path, prefix, name
        self.shape = tuple(int(n) for n in array.shape[len(prefix):])
        self.dtype = np.dtype(array.dtype)

    def read(self, window: tuple[slice, ...]) -> np.ndarray:
        """Return the pixels in ``window``."""
        return np.asarray(_open_zarr(str(self.path))[self.prefix + tuple(window)])


class Hdf5DatasetSource:
    """A BigDataViewer HDF5 ``cells`` dataset; int16 is read as uint16 (BDV's convention)."""

    def __init__(self, path: Path, dataset: str, name: str) -> None:
        try:
            import h5py
        except ImportError:
            raise _fail(path, "bdv.hdf5 datasets need the 'h5py' package") from None
        try:
            with h5py.File(path, "r") as f:
                data = f[dataset]
                self.shape = tuple(int(n) for n in data.shape)
                dtype = np.dtype(data.dtype)
        except (OSError, KeyError) as exc:
            raise _fail(path, f"cannot read HDF5 dataset {dataset!r} ({exc})") from None
        self.path, self.dataset, self.name = path, dataset, name
        self.dtype = np.dtype("uint16") if dtype == np.int16 else dtype

    def read(self, window: tuple[slice, ...]) -> np.ndarray:
        """Return the pixels in ``window``."""
        import h5py

        with h5py.File(self.path, "r") as f:
            return np.asarray(f[self.dataset][tuple(window)]).view(self.dtype)


def _zarr_array_path(group: Path) -> Path:
    """The full-resolution array of an OME-Zarr group (or ``group`` if it is an array)."""
    if (group / ".zarray").is_file():
        return group
    try:
        if (group / "zarr.json").is_file():
            node = json.loads((group / "zarr.json").read_text())
            if node.get("node_type") == "array":
                return group
            attrs = node.get("attributes", {})
            attrs = attrs.get("ome", attrs)
        elif (group / ".zattrs").is_file():
            attrs = json.loads((group / ".zattrs").read_text())
        elif (group / ".zgroup").is_file():
            attrs = {}
        else:
            raise _fail(group, "Zarr group of the dataset.xml not found")
        multiscales = attrs.get("multiscales") or [{"datasets": [{"path": "0"}]}]
        return group / multiscales[0]["datasets"][0]["path"]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _fail(group, f"unreadable OME-Zarr metadata ({type(exc).__name__}: {exc})") from None


def _view_sources(spim: SpimData, views: list[View], tp_index: int) -> dict[View, Any]:
    """Open a lazy source per view through the dataset's ImageLoader."""
    loader = spim.loader
    fmt = spim.loader_format
    if loader is None:
        raise _fail(spim.path, "no ImageLoader in the SequenceDescription")

    def located(tag: str) -> Path:
        elem = loader.find(tag)
        if elem is None or not (elem.text or "").strip():
            raise _fail(spim.path, f"ImageLoader {fmt!r} has no <{tag}> path")
        if loader.find("s3bucket") is not None:
            raise _fail(spim.path, "ImageLoader reads from an S3 bucket; only local files "
                                   "are supported")
        text = elem.text.strip()  # type: ignore[union-attr]
        return Path(text) if elem.get("type") == "absolute" else spim.base_path / text

    out: dict[View, Any] = {}
    if fmt == "bdv.n5":
        root = located("n5")
        if not root.is_dir():
            raise _fail(root, "N5 container of the dataset.xml not found")
        for t, s in views:
            out[(t, s)] = N5DatasetSource(root / f"setup{s}" / f"timepoint{t}" / "s0",
                                          spim.setups[s].name)
    elif fmt == "bdv.hdf5":
        file = located("hdf5")
        for t, s in views:
            out[(t, s)] = Hdf5DatasetSource(file, f"t{t:05d}/s{s:02d}/0/cells",
                                            spim.setups[s].name)
    elif fmt == "bdv.multimg.zarr":
        root = located("zarr")
        if not root.is_dir():
            raise _fail(root, "Zarr container of the dataset.xml not found")
        groups = {}
        for z in loader.iter("zgroup"):
            key = (int(z.get("timepoint", z.get("tp", 0))), int(z.get("setup", 0)))
            indices = z.get("indicies", z.get("indices", "")).split()
            groups[key] = (z.get("path") or z.findtext("path") or "").strip(), indices
        for view in views:
            if view not in groups:
                raise _fail(spim.path, f"no zgroup for view (timepoint {view[0]}, setup {view[1]})")
            rel, indices = groups[view]
            out[view] = ZarrArraySource(_zarr_array_path(root / rel), [int(i) for i in indices],
                                        spim.setups[view[1]].name)
    elif fmt == "spimreconstruction.filemap2":
        mapping = {}
        for e in loader.iter("FileMapping"):
            key = (int(e.get("timepoint", 0)), int(e.get("view_setup", 0)))
            mapping[key] = (e.find("file"), int(e.get("series", 0)), int(e.get("channel", 0)))
        for view in views:
            if view not in mapping:
                raise _fail(spim.path, f"no FileMapping for view (timepoint {view[0]}, "
                                       f"setup {view[1]})")
            elem, series, channel = mapping[view]
            text = (elem.text or "").strip() if elem is not None else ""
            file = Path(text) if elem is not None and elem.get("type") == "absolute" \
                else spim.base_path / text
            planes = tiff_series_planes(file, series=series, channel=channel,
                                        timepoint=tp_index)
            out[view] = open_tiff_planes(planes, name=spim.setups[view[1]].name)
    else:
        raise _fail(spim.path, f"ImageLoader format {fmt!r} is not supported; supported: "
                               "bdv.n5, bdv.multimg.zarr, bdv.hdf5, spimreconstruction.filemap2")
    return out


# --- tiles -------------------------------------------------------------------------------


def world_unit(
    spim: SpimData, views: list[View]
) -> tuple[tuple[float, float, float] | None, str | None]:
    """Physical size of one world unit per axis ``(z, y, x)``, and its NGFF unit.

    Per axis, ``voxel size / calibration scale`` (the ``calibration`` transform's diagonal,
    1 without one). With BigStitcher's calibration this is ``minResolution`` on every axis
    (see the module docs); without one the world is in pixels of each axis. All views
    must agree to 1e-4.

    Raises
    ------
    InputError
        For unknown or mixed units, or views implying different world units.
    """
    setups = [spim.setups[s] for _, s in views if spim.setups[s].voxel_size is not None]
    if not setups:
        return None, None
    units = {ngff_length_unit(s.unit, f"{spim.path}: voxelSize unit") for s in setups}
    if len(units) > 1:
        raise _fail(spim.path, f"ViewSetups use different units {sorted(map(str, units))}")
    sizes = []
    for t, s in views:
        voxel = spim.setups[s].voxel_size
        cal = [a for name, a in spim.registrations.get((t, s), [])
               if name.lower() == "calibration" and a is not None]
        scale = np.ones(3)
        if cal and np.allclose(cal[-1][:3, :3], np.diag(np.diag(cal[-1])[:3])):
            scale = np.diag(cal[-1])[:3]
        if voxel is not None:
            sizes.append((np.asarray(voxel) / scale)[::-1])
    lo, hi = np.min(sizes, axis=0), np.max(sizes, axis=0)
    if np.any(hi / lo - 1 > 1e-4):
        raise _fail(spim.path, f"views imply different world units (z, y, x from {lo.tolist()} "
                               f"to {hi.tolist()}); cannot choose one output pixel size")
    mean = np.mean(sizes, axis=0)
    return (float(mean[0]), float(mean[1]), float(mean[2])), units.pop()


def _illumination_id(illumination: int | str, path: Path) -> int:
    try:
        return int(illumination)
    except ValueError:
        raise _fail(path, f"illumination must be an id or 'all', got {illumination!r}") from None


def spimdata_timepoints(
    spim: SpimData, *, illumination: int | str | None = None
) -> list[int]:
    """Timepoint ids with at least one present view, sorted (what ``timepoint=`` takes).

    Timepoints listed in ``<Timepoints>`` whose views are all ``MissingViews`` are left
    out. With an ``illumination`` id, only timepoints holding a view of that illumination
    are kept (``"all"`` and ``None`` keep every timepoint).

    Raises
    ------
    InputError
        For a dataset without ViewSetups or without any present view.

    Examples
    --------
    >>> import tempfile
    >>> xml = Path(tempfile.mkdtemp()) / "dataset.xml"
    >>> _ = xml.write_text(
    ...     "<SpimData><SequenceDescription><ViewSetups><ViewSetup><id>0</id></ViewSetup>"
    ...     "</ViewSetups><Timepoints type='range'><first>0</first><last>2</last></Timepoints>"
    ...     "<MissingViews><MissingView timepoint='1' setup='0'/></MissingViews>"
    ...     "</SequenceDescription></SpimData>")
    >>> spimdata_timepoints(read_spimdata(xml))
    [0, 2]
    """
    if not spim.setups:
        raise _fail(spim.path, "no ViewSetups (empty SequenceDescription); nothing to read")
    views = spim.views()
    every = isinstance(illumination, str) and illumination.strip().lower() == "all"
    ill = None if illumination is None or every else _illumination_id(illumination, spim.path)
    if ill is not None:
        views = [v for v in views if spim.setups[v[1]].attributes.get("illumination", 0) == ill]
    tps = sorted({t for t, _ in views})
    if not tps:
        raise _fail(spim.path, f"no view of illumination {ill} at any timepoint"
                    if ill is not None else "every view is missing (MissingViews); nothing "
                    "to read")
    return tps


def group_views(
    spim: SpimData, *, timepoint: int | None = None, illumination: int | str | None = None
) -> tuple[int, dict[tuple[int, int, int], dict[int, View]], list[int]]:
    """Group the views of one timepoint into tiles and channels.

    Returns ``(timepoint, tiles, channels)``: ``tiles[(tile, angle, illumination)][channel]``
    is a view ``(timepoint, setup)``; the illumination part of the key is 0 unless
    ``illumination="all"``. Setups without a ``tile`` attribute are one tile each.

    Raises
    ------
    InputError
        For a dataset without ViewSetups, a timepoint or illumination that does not
        exist, or tiles that lack a channel.

    Examples
    --------
    >>> import tempfile
    >>> xml = Path(tempfile.mkdtemp()) / "dataset.xml"
    >>> setup = ("<ViewSetup><id>{0}</id><attributes><channel>{1}</channel><tile>{2}</tile>"
    ...          "</attributes></ViewSetup>")
    >>> setups = "".join(setup.format(k, k // 2, k % 2) for k in range(4))
    >>> _ = xml.write_text(f"<SpimData><SequenceDescription><ViewSetups>{setups}"
    ...                    "</ViewSetups></SequenceDescription></SpimData>")
    >>> tp, tiles, channels = group_views(read_spimdata(xml))
    >>> tiles[(1, 0, 0)], channels
    ({0: (0, 1), 1: (0, 3)}, [0, 1])
    """
    tps = spimdata_timepoints(spim)
    views = spim.views()
    tp = tps[0] if timepoint is None else int(timepoint)
    if tp not in tps:
        raise _fail(spim.path, f"timepoint {tp} does not exist (timepoints {tps})")
    views = [v for v in views if v[0] == tp]
    attrs = {v: spim.setups[v[1]].attributes for v in views}
    ills = sorted({a.get("illumination", 0) for a in attrs.values()})
    every = isinstance(illumination, str) and illumination.strip().lower() == "all"
    ill = None if every else (ills[0] if illumination is None
                              else _illumination_id(illumination, spim.path))
    if ill is not None and ill not in ills:
        raise _fail(spim.path, f"illumination {ill} does not exist (illuminations {ills})")
    tiles: dict[tuple[int, int, int], dict[int, View]] = {}
    for v in views:
        a = attrs[v]
        if ill is not None and a.get("illumination", 0) != ill:
            continue
        key = (a.get("tile", v[1]), a.get("angle", 0), a.get("illumination", 0) if every else 0)
        tiles.setdefault(key, {})[a.get("channel", 0)] = v
    channels = sorted({c for per_c in tiles.values() for c in per_c})
    for key, per_c in tiles.items():
        if sorted(per_c) != channels:
            raise _fail(spim.path, f"inconsistent channel counts per tile: tile {key[0]} has "
                                   f"channels {sorted(per_c)}, the dataset has {channels}")
    return tp, tiles, channels


def read_bigstitcher(
    path: str | os.PathLike[str],
    *,
    channel: int | str | None = None,
    timepoint: int | None = None,
    illumination: int | str | None = None,
    pixel_size: float | Sequence[float] | None = None,
) -> TileSet:
    """Read a BigStitcher / BigDataViewer ``dataset.xml`` into a 3D :class:`TileSet`.

    Parameters
    ----------
    path : path
        The dataset.xml.
    channel : int or str, optional
        Keep only this channel (index among the channels sorted by id, or name).
    timepoint : int, optional
        Timepoint id to read; default the first.
    illumination : int or "all", optional
        Illumination id to read (default the first); ``"all"`` keeps every illumination
        as separate tiles.
    pixel_size : float or sequence of float, optional
        Output pixel size (index order, the dataset's unit); default one world unit.

    Returns
    -------
    TileSet
        ``(z, y, x)`` tiles with the composed registrations as affines.

    Raises
    ------
    InputError
        For corrupt XML, unsupported or missing image loaders or files, unknown units,
        missing registrations or views, and tiles without every channel.

    Examples
    --------
    >>> ts = read_bigstitcher("dataset.xml", illumination=0)  # doctest: +SKIP
    >>> ts.n_tiles, ts.n_channels, ts.pixel_size  # doctest: +SKIP
    (4, 2, (3.26, 3.26, 3.26))
    """
    spim = read_spimdata(path)
    tp, tiles, channels = group_views(spim, timepoint=timepoint, illumination=illumination)
    names_of = spim.attribute_names.get("channel", {})
    channel_names = [names_of.get(c) or f"channel {c}" for c in channels]
    if channel is not None:
        keep = channel_index(channel_names, channel, spim.path)
        channels, channel_names = [channels[keep]], [channel_names[keep]]
        tiles = {key: {channels[0]: per_c[channels[0]]} for key, per_c in tiles.items()}
    views = [v for per_c in tiles.values() for v in per_c.values()]
    tps = sorted({t for t, _ in spim.views()})
    sources = _view_sources(spim, views, tps.index(tp))
    unit_size, unit = world_unit(spim, views)
    size = normalise_pixel_size(pixel_size, 3, spim.path)
    scale = np.eye(4)
    if size is not None and unit_size is not None:
        scale[:3, :3] = np.diag([u / p for u, p in zip(unit_size, size, strict=True)])
    out_sources: list[list[Any]] = [[] for _ in channels]
    affines, names = [], []
    multi = {k: len({key[k] for key in tiles}) > 1 for k in (1, 2)}
    every = multi[2]
    for key, per_c in sorted(tiles.items()):
        models = [spim.model(per_c[c]) for c in channels]
        for c, model in zip(channels[1:], models[1:], strict=True):
            if np.abs(model - models[0]).max() > 1e-3:
                raise _fail(spim.path, f"channels {channels[0]} and {c} of tile {key[0]} have "
                                       "different registrations, but all channels of a tile "
                                       "are fused with one transform; read one channel at a "
                                       "time (channel=...)")
        for k, c in enumerate(channels):
            view = per_c[c]
            src, setup = sources[view], spim.setups[view[1]]
            if setup.size is not None and tuple(src.shape) != tuple(setup.size[::-1]):
                raise _fail(spim.path, f"setup {view[1]}: image shape {src.shape} (z, y, x) "
                                       f"differs from the ViewSetup size {setup.size} (x, y, z)")
            out_sources[k].append(src)
        affines.append(scale @ xyz_to_index(models[0]))
        first_setup = spim.setups[per_c[channels[0]][1]]
        name = spim.attribute_names.get("tile", {}).get(key[0]) or first_setup.name
        names.append(f"tile {name}" + (f" angle {key[1]}" if multi[1] else "")
                     + (f" illumination {key[2]}" if every else ""))
    if size is None:
        size = unit_size
    result = TileSet(out_sources, np.stack(affines), names, channel_names, size,
                     unit if size is not None else None, spim.path)
    return result
