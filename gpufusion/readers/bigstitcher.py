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

Image loaders: ``spimreconstruction.filemap2`` (TIFF files), ``bdv.n5``
(:mod:`gpufusion.readers.n5`: raw, gzip, bzip2, xz, blosc and zstd blocks),
``bdv.multimg.zarr`` (OME-Zarr groups via zarr, versions 1 and 3 of the XML)
and ``bdv.hdf5`` (needs h5py). Grouping: one tile per (tile, angle) attribute pair, one
channel per channel attribute; one illumination (default the first; ``"all"`` fuses every
illumination as separate tiles).

Hostile metadata: the XML is parsed without entities (:mod:`gpufusion.readers.safe_xml`);
every number must be finite and every id a whole number; a ``<Timepoints>`` range or
pattern may not list more timepoints than the file has views (ViewRegistration and
MissingView elements) to describe, so a 300-byte file cannot ask for 10^12 of them.
Loader paths may lead out of the dataset's folder (BigStitcher projects often do);
:func:`spimdata_locations` says where data is read from.
"""

from __future__ import annotations

import functools
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..units import convert_length
from .n5 import N5DatasetSource
from .ome_tiff import open_tiff_planes, tiff_series_planes
from .safe_xml import parse_xml
from .tileset import TileSet, channel_index, ngff_length_unit, normalise_pixel_size

__all__ = ["DataLocation", "N5DatasetSource", "SpimData", "ViewSetup", "ZarrArraySource",
           "compose", "group_views", "read_bigstitcher", "read_spimdata", "spimdata_locations",
           "spimdata_timepoints", "world_unit", "xyz_to_index"]

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


def _brief(text: str | None) -> str:
    text = " ".join((text or "").split())
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _numbers(text: str | None, n: int | None, path: Path, what: str) -> list[float]:
    """Finite numbers separated by white space (exactly ``n`` unless None)."""
    try:
        values = [float(v) for v in (text or "").split()]
    except ValueError:
        kind = "a number" if n == 1 else "a list of numbers"
        raise _fail(path, f"{what} is not {kind}: {_brief(text)}") from None
    if n is not None and len(values) != n:
        raise _fail(path, f"{what} needs {n} numbers, got {len(values)}")
    if not all(np.isfinite(values)):
        raise _fail(path, f"{what} has a number that is not finite: {_brief(text)}")
    return values


def _integer(text: str | None, path: Path, what: str, default: int | None = None) -> int:
    """A whole number from element text or an attribute (``default`` when absent)."""
    if default is not None and (text is None or not text.strip()):
        return default
    value = _numbers(text, 1, path, what)[0]
    if not value.is_integer():
        raise _fail(path, f"{what} is not a whole number: {_brief(text)}")
    return int(value)


_PATTERN_PART = re.compile(r"(-?\d+)(?:\s*-\s*(-?\d+)(?::(\d+))?)?")


def _int_pattern(text: str, path: Path, limit: int) -> list[int]:
    """Timepoint ``integerpattern``: ``"0"``, ``"0-9"``, ``"0,2,4"``, ``"1-10:2"``.

    Counted before it is expanded: more than ``limit`` timepoints are refused.
    """
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _PATTERN_PART.fullmatch(part)
        if match is None:
            raise _fail(path, f"timepoint pattern {_brief(text)} is not understood")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        step = int(match.group(3) or 1)
        if step < 1:
            raise _fail(path, f"timepoint pattern {_brief(text)}: step {step} must be >= 1")
        ranges.append(range(first, last + 1, step))
    _check_timepoint_count(sum(max(0, (r.stop - r.start + r.step - 1) // r.step)
                               for r in ranges), f"integerpattern {_brief(text)}", path, limit)
    return [t for r in ranges for t in r]


def _check_timepoint_count(count: int, what: str, path: Path, limit: int) -> None:
    if count > limit:
        raise _fail(path, f"<Timepoints> {what} lists {count} timepoints, more than the "
                          f"{limit} view(s) this file describes (ViewRegistration and "
                          "MissingView elements); is it mistyped?")


def _parse_timepoints(tps: ET.Element, path: Path, limit: int) -> list[int]:
    """The ids a ``<Timepoints>`` element lists (``range``, ``pattern`` or ``list``)."""
    if tps.get("type", "pattern") == "range":
        first, last = (_integer(tps.findtext(k), path, f"<Timepoints> <{k}>")
                       for k in ("first", "last"))
        _check_timepoint_count(last - first + 1, f"range {first}-{last}", path, limit)
        return list(range(first, last + 1))
    if tps.find("integerpattern") is not None:
        return _int_pattern(tps.findtext("integerpattern") or "", path, limit)
    return [_integer(e.text, path, "<Timepoints> <id>") for e in tps.iter("id")]


def _parse_setup(elem: ET.Element, path: Path) -> ViewSetup:
    sid = _integer(elem.findtext("id"), path, "ViewSetup id")
    size_text = elem.findtext("size")
    size = None
    if size_text:
        values = _numbers(size_text, 3, path, f"ViewSetup {sid} size")
        if not all(v.is_integer() and v >= 1 for v in values):
            raise _fail(path, f"ViewSetup {sid} size must be 3 whole numbers >= 1 (x y z), "
                              f"got {_brief(size_text)}")
        size = tuple(int(v) for v in values)
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
        attributes[child.tag] = _integer(child.text, path,
                                         f"ViewSetup {sid} attribute <{child.tag}>")
    return ViewSetup(sid, elem.findtext("name") or str(sid), size,  # type: ignore[arg-type]
                     voxel, unit, attributes)  # type: ignore[arg-type]


def _view_of(elem: ET.Element, path: Path, tag: str) -> View:
    """``(timepoint, setup)`` of a ViewRegistration / MissingView element."""
    return (_integer(elem.get("timepoint"), path, f"{tag} timepoint", 0),
            _integer(elem.get("setup"), path, f"{tag} setup", 0))


def read_spimdata(path: str | os.PathLike[str]) -> SpimData:
    """Parse a BigStitcher / BigDataViewer ``dataset.xml`` (metadata only, no pixels).

    Raises
    ------
    InputError
        For a missing file, malformed or truncated XML, entity declarations, a root that
        is not ``SpimData``, malformed, non-finite or non-integer numbers, or more
        timepoints than the file has views; the message names the file and the field.

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
        text = file.read_bytes()
    except FileNotFoundError:
        raise _fail(file, "dataset.xml not found") from None
    except OSError as exc:
        raise _fail(file, f"cannot read file ({exc.strerror or exc})") from None
    root = parse_xml(text, file)
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
                what = f"<Attributes name={group.get('name', '')!r}> <id>"
                names.setdefault(group.get("name", ""), {})[
                    _integer(item.findtext("id"), file, what)] = \
                    (item.findtext("name") or "").strip()
    missing_views = list(seq.iter("MissingView"))
    view_registrations = list(root.iter("ViewRegistration"))
    timepoints: list[int] = []
    tps = seq.find("Timepoints")
    if tps is not None:
        limit = max(1, len(view_registrations) + len(missing_views))
        timepoints = _parse_timepoints(tps, file, limit)
    elif setups:
        timepoints = [0]
    missing = frozenset(_view_of(e, file, "MissingView") for e in missing_views)
    registrations: dict[View, list[tuple[str, np.ndarray | None]]] = {}
    for reg in view_registrations:
        view = _view_of(reg, file, "ViewRegistration")
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


#: ImageLoader formats read here, with the element naming their container (None: per view).
_LOADER_CONTAINERS = {"bdv.n5": "n5", "bdv.hdf5": "hdf5", "bdv.multimg.zarr": "zarr",
                      "spimreconstruction.filemap2": None}


def _loader(spim: SpimData) -> tuple[ET.Element, str]:
    """The ImageLoader element and its format, which must be one read here."""
    if spim.loader is None:
        raise _fail(spim.path, "no ImageLoader in the SequenceDescription")
    fmt = spim.loader_format
    if fmt not in _LOADER_CONTAINERS:
        raise _fail(spim.path, f"ImageLoader format {fmt!r} is not supported; supported: "
                               f"{', '.join(_LOADER_CONTAINERS)}")
    return spim.loader, fmt  # type: ignore[return-value]


def _loader_path(spim: SpimData, elem: ET.Element | None, what: str) -> Path:
    """A loader path element: ``type="absolute"`` as written, else under the BasePath."""
    if elem is None or not (elem.text or "").strip():
        raise _fail(spim.path, f"ImageLoader {spim.loader_format!r} has no {what} path")
    text = (elem.text or "").strip()
    return Path(text) if elem.get("type") == "absolute" else spim.base_path / text


def _container(spim: SpimData, loader: ET.Element, fmt: str) -> tuple[Path, str | None]:
    """The container (N5, HDF5, Zarr root) a loader reads, and its S3 bucket if any."""
    tag = _LOADER_CONTAINERS[fmt]
    path = _loader_path(spim, loader.find(tag), f"<{tag}>")  # type: ignore[arg-type]
    return path, (loader.findtext("s3bucket") or "").strip() or None


def _zgroups(spim: SpimData, loader: ET.Element) -> dict[View, tuple[str, list[int]]]:
    """``bdv.multimg.zarr``: each view's group path (under the root) and leading indices."""
    groups = {}
    for z in loader.iter("zgroup"):
        key = (_integer(z.get("timepoint", z.get("tp")), spim.path, "zgroup timepoint", 0),
               _integer(z.get("setup"), spim.path, "zgroup setup", 0))
        indices = [_integer(i, spim.path, f"zgroup {key} indicies")
                   for i in z.get("indicies", z.get("indices", "")).split()]
        groups[key] = (z.get("path") or z.findtext("path") or "").strip(), indices
    return groups


def _file_mappings(spim: SpimData, loader: ET.Element) -> dict[View, tuple[Path, int, int]]:
    """``filemap2``: each view's TIFF file, series and channel."""
    mapping = {}
    for e in loader.iter("FileMapping"):
        key = (_integer(e.get("timepoint"), spim.path, "FileMapping timepoint", 0),
               _integer(e.get("view_setup"), spim.path, "FileMapping view_setup", 0))
        file = _loader_path(spim, e.find("file"), f"<file> (FileMapping {key})")
        mapping[key] = (file, _integer(e.get("series"), spim.path, "FileMapping series", 0),
                        _integer(e.get("channel"), spim.path, "FileMapping channel", 0))
    return mapping


def _view_sources(spim: SpimData, views: list[View], tp_index: int) -> dict[View, Any]:
    """Open a lazy source per view through the dataset's ImageLoader."""
    loader, fmt = _loader(spim)
    out: dict[View, Any] = {}
    if fmt == "spimreconstruction.filemap2":
        mapping = _file_mappings(spim, loader)
        for view in views:
            if view not in mapping:
                raise _fail(spim.path, f"no FileMapping for view (timepoint {view[0]}, "
                                       f"setup {view[1]})")
            file, series, channel = mapping[view]
            planes = tiff_series_planes(file, series=series, channel=channel,
                                        timepoint=tp_index)
            out[view] = open_tiff_planes(planes, name=spim.setups[view[1]].name)
        return out
    root, bucket = _container(spim, loader, fmt)
    if bucket is not None:
        raise _fail(spim.path, f"ImageLoader reads from the S3 bucket {bucket!r}; only local "
                               "files are supported")
    if fmt == "bdv.n5":
        if not root.is_dir():
            raise _fail(root, "N5 container of the dataset.xml not found")
        for t, s in views:
            out[(t, s)] = N5DatasetSource(root / f"setup{s}" / f"timepoint{t}" / "s0",
                                          spim.setups[s].name)
    elif fmt == "bdv.hdf5":
        for t, s in views:
            out[(t, s)] = Hdf5DatasetSource(root, f"t{t:05d}/s{s:02d}/0/cells",
                                            spim.setups[s].name)
    else:
        if not root.is_dir():
            raise _fail(root, "Zarr container of the dataset.xml not found")
        groups = _zgroups(spim, loader)
        for view in views:
            if view not in groups:
                raise _fail(spim.path, f"no zgroup for view (timepoint {view[0]}, setup {view[1]})")
            rel, indices = groups[view]
            out[view] = ZarrArraySource(_zarr_array_path(root / rel), indices,
                                        spim.setups[view[1]].name)
    return out


@dataclass(frozen=True)
class DataLocation:
    """Where a dataset.xml's ImageLoader reads pixels (see :func:`spimdata_locations`)."""

    kind: str
    """What is there: ``"N5 container"``, ``"HDF5 file"``, ``"Zarr container"``,
    ``"TIFF files"`` (a folder holding them) or ``"S3 bucket"``."""
    path: str
    """Absolute path (or ``s3://bucket/key``)."""
    views: int
    """Number of views read from there."""
    outside: bool
    """The location is not inside the dataset.xml's folder."""
    exists: bool | None
    """Whether the path exists here (None for S3)."""


def spimdata_locations(spim: SpimData) -> list[DataLocation]:
    """Where the pixels of a dataset.xml are read from, resolved, without reading them.

    Loader paths leading out of the dataset's folder (absolute, or ``..``) are allowed;
    ``outside`` marks them. File-map loaders are summarised per folder.

    Raises
    ------
    InputError
        For a missing or unsupported ImageLoader, or a loader without its path.

    Examples
    --------
    >>> import tempfile
    >>> xml = Path(tempfile.mkdtemp()) / "dataset.xml"
    >>> _ = xml.write_text(
    ...     "<SpimData><SequenceDescription><ImageLoader format='bdv.n5'>"
    ...     "<n5 type='absolute'>/data/big.n5</n5></ImageLoader><ViewSetups><ViewSetup>"
    ...     "<id>0</id></ViewSetup></ViewSetups></SequenceDescription></SpimData>")
    >>> spimdata_locations(read_spimdata(xml))  # doctest: +NORMALIZE_WHITESPACE
    [DataLocation(kind='N5 container', path='/data/big.n5', views=1, outside=True,
                  exists=False)]
    """
    loader, fmt = _loader(spim)
    folder = spim.path.resolve().parent
    views = spim.views()

    def located(kind: str, path: Path, n: int) -> DataLocation:
        resolved = path.resolve()
        return DataLocation(kind, str(resolved), n, not resolved.is_relative_to(folder),
                            resolved.exists())

    if fmt == "spimreconstruction.filemap2":
        mapping = _file_mappings(spim, loader)
        folders: dict[Path, int] = {}
        for view in views:
            if view in mapping:
                parent = mapping[view][0].resolve().parent
                folders[parent] = folders.get(parent, 0) + 1
        return [located("TIFF files", path, n) for path, n in folders.items()]
    root, bucket = _container(spim, loader, fmt)
    if bucket is not None:
        return [DataLocation("S3 bucket", f"s3://{bucket}/{root.as_posix().lstrip('/')}",
                             len(views), True, None)]
    kind = {"bdv.n5": "N5 container", "bdv.hdf5": "HDF5 file",
            "bdv.multimg.zarr": "Zarr container"}[fmt]
    return [located(kind, root, len(views))]


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
    ...     "</SequenceDescription><ViewRegistrations><ViewRegistration timepoint='0' "
    ...     "setup='0'/><ViewRegistration timepoint='2' setup='0'/></ViewRegistrations>"
    ...     "</SpimData>")
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
    unit: str | None = None,
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
        Output pixel size (index order) in ``unit``; default one world unit.
    unit : str, optional
        NGFF unit (or abbreviation) of ``pixel_size``; default the dataset's voxel unit.
        Converted to the dataset's unit to resample; the TileSet keeps ``pixel_size`` in
        ``unit``.

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
    unit_size, world = world_unit(spim, views)
    size = normalise_pixel_size(pixel_size, 3, spim.path)
    size_unit, resample = unit or world, size
    if size is not None and unit is not None and unit_size is not None:
        if world is None:
            raise _fail(spim.path, f"voxel sizes have no length unit, so a pixel size in {unit} "
                                   "cannot be related to them; give --pixel-size without "
                                   "--unit (in the dataset's units)")
        resample = tuple(convert_length(p, unit, world) for p in size)
    scale = np.eye(4)
    if resample is not None and unit_size is not None:
        scale[:3, :3] = np.diag([u / p for u, p in zip(unit_size, resample, strict=True)])
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
        size, size_unit = unit_size, world
    result = TileSet(out_sources, np.stack(affines), names, channel_names, size,
                     size_unit if size is not None else None, spim.path)
    return result
