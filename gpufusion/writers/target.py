"""Where an output may be written: never over an input, never over what it did not write.

What ``gpufusion fuse`` and :func:`gpufusion.fuse_to_file` check before any work, and what
they do about a run that was killed:

* :func:`paths_read` lists every file and folder the tile sources read (tile files, the
  files of a tile's planes, the N5/Zarr container holding a dataset);
  :func:`check_not_input` refuses an output equal to, inside, or containing one of them,
  after resolving symbolic links.
* :func:`check_replaceable`: ``overwrite`` replaces only what is recognisably an earlier
  output of the same kind: an OME-Zarr image group (Zarr v2 ``.zattrs`` or Zarr v3
  ``zarr.json`` with ``multiscales``, holding nothing a Zarr hierarchy would not hold) for
  a folder output, a TIFF file with OME-XML for ``*.tif``/``*.tiff``.
* :func:`recover_interrupted` and :func:`leftovers`: the writers build an output in a
  hidden sibling ``.NAME.tmp-XXXXXXXX`` and swap a folder output in by renaming the old
  one aside into ``.NAME.old-XXXXXXXX`` (:mod:`gpufusion.writers.ome_zarr`). A run killed
  between the two renames leaves no ``NAME``: the next run puts the earlier output back.
  Leftover ``.tmp-``/``.old-`` folders are named, and removed when overwriting.
* :func:`no_space_message`: a full disk (or a file size limit) as one line naming the
  output and about how much more space it needs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpufusion.errors import InputError

#: Tags of the hidden sibling folders the writers create (``.NAME.TAG-XXXXXXXX``).
SIBLING_TAGS = ("tmp", "old")

#: A ``.NAME.tmp-*`` folder holding this file was left by a resumable run (``--resume``):
#: the run's fingerprint; see :func:`gpufusion.writers.ome_zarr.write_ome_zarr`.
RESUME_FILE = ".gpufusion-resume.json"

#: errno values meaning "the output does not fit": full disk, quota, file size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_ZARR_METADATA = frozenset({".zgroup", ".zattrs", ".zarray", ".zmetadata", "zarr.json"})
_CHUNK_KEY = re.compile(r"\d+(\.\d+)*")  # v2 "0.1.2" or "/"-separated; v3 "c/0/1/2"
_BDV_N5_LEVELS = (re.compile(r"s\d+"), re.compile(r"timepoint\d+"), re.compile(r"setup\d+"))


def is_tiff_path(path: str | os.PathLike[str]) -> bool:
    """True for ``*.tif``/``*.tiff`` outputs (pyramidal OME-TIFF); else OME-Zarr."""
    return str(path).lower().endswith((".tif", ".tiff"))


# --------------------------------------------------------------------------- output kind

#: Output name endings (case-insensitive) -> what is written there.
OUTPUT_SUFFIXES = {
    ".ome.zarr": "OME-Zarr",
    ".zarr": "OME-Zarr",
    ".ome.tif": "OME-TIFF",
    ".ome.tiff": "OME-TIFF",
    ".tif": "OME-TIFF",
    ".tiff": "OME-TIFF",
}

#: Compression presets per output kind, the default first (the writers' ``COMPRESSORS``
#: and ``COMPRESSIONS``); TIFF ``lzw`` and ``zstd`` need imagecodecs to write.
OUTPUT_COMPRESSIONS = {
    "OME-Zarr": ("blosc-zstd", "blosc-lz4", "zstd", "none"),
    "OME-TIFF": ("zlib", "lzw", "zstd", "none"),
}

#: Where the TIFF codecs that need imagecodecs come from.
TIFF_EXTRA = "pip install 'gpufusion[tiff]'"


def output_kind(path: str | os.PathLike[str]) -> str:
    """``"OME-Zarr"`` or ``"OME-TIFF"``, from how the output's name ends.

    Only :data:`OUTPUT_SUFFIXES` are outputs; any other name (``slide.png``, ``x.h5``, a
    name without suffix) is refused rather than silently written as an OME-Zarr folder.

    Raises
    ------
    InputError
        One line naming ``path`` and the accepted endings.

    Examples
    --------
    >>> output_kind("slide.ome.zarr"), output_kind("SLIDE.OME.TIF"), output_kind("a.tiff")
    ('OME-Zarr', 'OME-TIFF', 'OME-TIFF')
    >>> output_kind("slide.png")
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: slide.png: not an output name gpufusion writes; ...
    """
    name = Path(path).name.lower()
    for suffix, kind in OUTPUT_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    raise InputError(
        f"{path}: not an output name gpufusion writes; end it in .ome.zarr or .zarr "
        "(OME-Zarr folder), or .ome.tif, .ome.tiff, .tif or .tiff (pyramidal OME-TIFF)")


def check_compression(out: str | os.PathLike[str], compression: str | None,
                      option: str = "--compression") -> str:
    """The compression preset for ``out``: its kind's default for None, else ``compression``
    when it applies to that kind (and, for TIFF ``lzw``/``zstd``, imagecodecs is there).

    Checked before any work, so a TIFF-only codec for an OME-Zarr output (or the reverse)
    or a missing imagecodecs fails at once.

    Raises
    ------
    InputError
        One line naming ``option``, the output kind and the presets that apply, or how to
        install imagecodecs.

    Examples
    --------
    >>> check_compression("a.ome.zarr", None), check_compression("a.ome.tif", None)
    ('blosc-zstd', 'zlib')
    >>> check_compression("a.ome.zarr", "lzw")
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: --compression lzw: does not apply to OME-Zarr output ...
    """
    kind = output_kind(out)
    presets = OUTPUT_COMPRESSIONS[kind]
    if compression is None:
        return presets[0]
    if compression not in presets:
        other = [k for k, v in OUTPUT_COMPRESSIONS.items() if compression in v]
        only = f" (it is for {other[0]} output)" if other else ""
        raise InputError(
            f"{option} {compression}: does not apply to {kind} output {out}{only}; "
            f"{kind} takes {', '.join(presets)} (default {presets[0]})")
    if kind == "OME-TIFF" and not _tiff_codec_available(compression):
        raise InputError(
            f"{option} {compression}: writing {compression.upper()}-compressed TIFF needs the "
            f"imagecodecs package: {TIFF_EXTRA} (or use {option} zlib, which needs nothing "
            "extra)")
    return compression


def _tiff_codec_available(compression: str) -> bool:
    """Whether tifffile can write the TIFF preset ``compression`` here (as the writer
    checks: codecs it lacks are missing or stubs raising ImportError)."""
    if compression in ("zlib", "none"):
        return True
    import numpy as np
    import tifffile

    codec = {"lzw": tifffile.COMPRESSION.LZW, "zstd": tifffile.COMPRESSION.ZSTD}[compression]
    try:
        tifffile.TIFF.COMPRESSORS[codec](np.zeros(16, np.uint8))
    except (KeyError, ImportError):
        return False
    return True


# --------------------------------------------------------------------------- inputs


def _container_root(path: Path) -> Path | None:
    """The folder holding the N5 or Zarr hierarchy that ``path`` (a dataset) belongs to.

    BigDataViewer N5 datasets live at ``ROOT/setupS/timepointT/sL``; Zarr arrays and groups
    carry metadata files in every folder up to their root.
    """
    parts = path.parents
    if len(parts) >= 3 and all(p.fullmatch(name) for p, name in
                                zip(_BDV_N5_LEVELS, (path.name, parts[0].name, parts[1].name),
                                    strict=True)):
        return parts[2]
    if not any((path / name).exists() for name in _ZARR_METADATA):
        return None
    root = path
    for parent in parts:
        if not any((parent / name).exists() for name in _ZARR_METADATA):
            break
        root = parent
    return root


def paths_read(sources: Iterable[Any]) -> list[Path]:
    """Every file and folder that ``sources`` read: outputs must stay clear of them.

    A source's ``path``, the files of its ``planes`` (OME-TIFF planes stored in other
    files) and, for an N5 or Zarr dataset, the container folder holding it. Sources
    without a path (arrays in memory) add nothing.

    Examples
    --------
    >>> from gpufusion.sources import ArraySource
    >>> class FileTile:
    ...     path = Path("tiles/a.tif")
    ...     planes = (("tiles/a.tif", 0), ("tiles/b.tif", 0))
    >>> [p.as_posix() for p in paths_read([FileTile(), ArraySource([[0]])])]
    ['tiles/a.tif', 'tiles/b.tif']
    """
    found: dict[str, Path] = {}
    for src in sources:
        path = getattr(src, "path", None)
        if path is None:
            continue
        candidates = [Path(path), *(Path(file) for file, *_ in getattr(src, "planes", ()))]
        root = _container_root(Path(path))
        if root is not None:
            candidates.append(root)
        for p in candidates:
            found.setdefault(str(p), p)
    return list(found.values())


def check_not_input(out: str | os.PathLike[str],
                    inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse ``out`` when it is, is inside, or contains one of ``inputs``.

    Paths are compared after resolving symbolic links.

    Raises
    ------
    InputError
        One line naming ``out`` and the input at fault.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "tiles").mkdir()
    >>> _ = (d / "tiles" / "a.tif").write_bytes(b"")
    >>> check_not_input(d / "out.ome.zarr", [d / "tiles"])
    >>> try:
    ...     check_not_input(d / "tiles" / "out.ome.zarr", [d / "tiles"])
    ... except InputError as exc:
    ...     print(str(exc).replace(str(d), "D").split(", which")[0])
    D/tiles/out.ome.zarr: is inside the input folder D/tiles
    >>> try:
    ...     check_not_input(d, [d / "tiles" / "a.tif"])
    ... except InputError as exc:
    ...     print(str(exc).replace(str(d), "D"))
    D: contains D/tiles/a.tif, which this run reads; choose another output name
    """
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        path = Path(given)
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):  # a symbolic link loop (3.11: RuntimeError), which
            continue  # cannot be the output; the input's reader reports it
        kind = "folder" if resolved.is_dir() else "file"
        if resolved == target:
            raise InputError(f"{out}: is one of the input {kind}s (this run reads it); "
                             "choose another output name")
        if resolved in target.parents:
            raise InputError(f"{out}: is inside the input {kind} {path}, which this run "
                             "reads (a later run would read the output back as input); "
                             "write it elsewhere")
        if target in resolved.parents:
            raise InputError(f"{out}: contains {path}, which this run reads; choose another "
                             "output name")


# -------------------------------------------------------------------- existing output


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _has_multiscales(folder: Path) -> bool:
    """An OME-Zarr image group: ``multiscales`` in ``.zattrs`` (v2) or ``zarr.json`` (v3)."""
    v2 = _json(folder / ".zattrs") if (folder / ".zgroup").is_file() else None
    if isinstance(v2, dict) and isinstance(v2.get("multiscales"), list):
        return True
    v3 = _json(folder / "zarr.json")
    if not isinstance(v3, dict) or v3.get("node_type") != "group":
        return False
    attributes = v3.get("attributes")
    ome = attributes.get("ome") if isinstance(attributes, dict) else None
    return isinstance(ome, dict) and isinstance(ome.get("multiscales"), list)


def _foreign_file(folder: Path) -> Path | None:
    """The first file under ``folder`` that no Zarr hierarchy holds (not metadata or a
    chunk key), or a symbolic link; None when there is none."""
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in [*sorted(names), *dirs]:
            path = Path(root) / name
            if path.is_symlink():
                return path
            if name in names and name not in _ZARR_METADATA and not _CHUNK_KEY.fullmatch(name):
                return path
    return None


def _describe_folder(out: Path) -> str | None:
    if not _has_multiscales(out):
        entries = sorted(p.name for p in out.iterdir())
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        return (f"a folder that is not an OME-Zarr image (holding {shown})" if entries
                else "an empty folder, not an OME-Zarr image")
    foreign = _foreign_file(out)
    if foreign is not None:
        return f"an OME-Zarr image holding {foreign.relative_to(out)}, which is no Zarr data"
    return None


def _describe_file(out: Path) -> str | None:
    import tifffile

    try:
        with tifffile.TiffFile(out, is_ome=False) as tif:
            description = tif.pages[0].description if len(tif.pages) else ""
    except Exception:  # tifffile raises several types for what is no TIFF
        return "a file that is not a TIFF"
    if "<OME" not in (description or ""):
        return "a TIFF without OME-XML, not an OME-TIFF"
    return None


def describe_existing(out: str | os.PathLike[str]) -> str | None:
    """What is at ``out`` when it is not an earlier output of the kind ``out`` names.

    Returns None when ``overwrite`` may replace it: for ``*.tif``/``*.tiff``, a TIFF file
    with OME-XML; otherwise an OME-Zarr image group holding nothing but Zarr metadata and
    chunks. Otherwise a short description of what is there.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "a.ome.zarr").mkdir()
    >>> _ = (d / "a.ome.zarr" / "notes.docx").write_text("x")
    >>> describe_existing(d / "a.ome.zarr")
    'a folder that is not an OME-Zarr image (holding notes.docx)'
    >>> (d / "b.ome.tif").mkdir()
    >>> describe_existing(d / "b.ome.tif")
    'a folder, not an OME-TIFF file'
    """
    out = Path(out)
    if out.is_symlink():
        return f"a symbolic link (to {os.readlink(out)})"
    if is_tiff_path(out):
        if out.is_dir():
            return "a folder, not an OME-TIFF file"
        return _describe_file(out) if out.is_file() else "not a regular file"
    if out.is_dir():
        return _describe_folder(out)
    return "a file, not an OME-Zarr folder"


def check_replaceable(out: str | os.PathLike[str]) -> None:
    """Refuse to replace an existing ``out`` that is not an earlier output of its kind.

    Raises
    ------
    InputError
        One line naming ``out`` and saying what is there.
    """
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    what = describe_existing(out)
    if what is not None:
        kind = "OME-TIFF file" if is_tiff_path(out) else "OME-Zarr image"
        raise InputError(f"{out}: already exists and is {what}; --overwrite replaces only an "
                         f"earlier {kind}, so it is left as it is (remove it yourself or "
                         "choose another output name)")


# ------------------------------------------------------------ interrupted earlier runs


def _sibling_pattern(out: Path) -> re.Pattern[str]:
    tags = "|".join(SIBLING_TAGS)
    return re.compile(rf"\.{re.escape(out.name)}\.({tags})-[0-9a-f]{{8}}")


def leftovers(out: str | os.PathLike[str]) -> list[Path]:
    """The hidden ``.NAME.tmp-*`` and ``.NAME.old-*`` folders beside ``out`` (sorted).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / ".a.ome.zarr.tmp-0123abcd").mkdir()
    >>> (d / ".a.ome.zarr.notes").mkdir()
    >>> [p.name for p in leftovers(d / "a.ome.zarr")]
    ['.a.ome.zarr.tmp-0123abcd']
    """
    out = Path(out)
    pattern = _sibling_pattern(out)
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries
                  if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_interrupted(out: str | os.PathLike[str], overwrite: bool,
                        resume: bool = False) -> list[str]:
    """Undo or tidy what a run killed while writing ``out`` left; return what was done.

    * ``out`` missing while a ``.NAME.old-*`` folder holds ``NAME`` (a run killed between
      renaming the earlier output aside and renaming the new one in): the earlier output
      is renamed back to ``out`` (the newest, if there are several).
    * With ``overwrite``, every leftover ``.NAME.tmp-*``/``.NAME.old-*`` folder is then
      removed (see :func:`leftovers` for finding them without removing), except, with
      ``resume``, the temporary folders of resumable runs (:data:`RESUME_FILE`): the run
      continues the newest one.

    Returns one message per action taken (empty when there was nothing to do).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / ".a.zarr.old-0123abcd" / "a.zarr").mkdir(parents=True)
    >>> [m.replace(str(d), "D").split(", where")[0]
    ...  for m in recover_interrupted(d / "a.zarr", overwrite=False)]
    ['D/a.zarr: restored the earlier output from .a.zarr.old-0123abcd']
    >>> (d / "a.zarr").is_dir(), leftovers(d / "a.zarr")
    (True, [])
    """
    out = Path(out)
    messages = []
    if not (out.exists() or out.is_symlink()):
        held = [p for p in leftovers(out) if p.name.startswith(f".{out.name}.old-")
                and ((p / out.name).exists() or (p / out.name).is_symlink())]
        if held:
            newest = max(held, key=lambda p: (p / out.name).lstat().st_mtime_ns)
            os.rename(newest / out.name, out)
            if not any(newest.iterdir()):
                newest.rmdir()
            messages.append(f"{out}: restored the earlier output from {newest.name}, where a "
                            "run that was stopped while replacing it had left it")
    if overwrite:
        stale = [p for p in leftovers(out) if not (resume and (p / RESUME_FILE).is_file())]
        for path in stale:
            _remove_tree(path)
        if stale:
            messages.append(f"{out}: removed {_names(stale)}, left by an earlier run that was "
                            "stopped")
    return messages


def leftovers_notice(out: str | os.PathLike[str]) -> str | None:
    """A one-line notice naming leftover temporary folders of ``out``, or None."""
    stale = leftovers(out)
    if not stale:
        return None
    return (f"{Path(out)}: found {_names(stale)}, left by an earlier run that was stopped; "
            "--overwrite removes them")


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"{len(paths)} temporary folder{'s' if len(paths) > 1 else ''} ({shown})"


# ----------------------------------------------------------------------------- no space


def human_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units).

    Examples
    --------
    >>> human_bytes(999), human_bytes(1.2e9), human_bytes(5e12)
    ('999 bytes', '1.2 GB', '5 TB')
    """
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2g} {unit}" if n < 10 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def output_size_estimate(shape: Sequence[int], itemsize: int, tiff: bool) -> int:
    """Bytes an output of ``shape`` needs at most, uncompressed, with its pyramid.

    Lower levels add at most a third of level 0 (each halves ``y`` and ``x``); an OME-TIFF
    is staged beside the file first, so it needs about twice that while it is written.
    """
    level0 = itemsize
    for n in shape:
        level0 *= int(n)
    total = level0 * 4 // 3
    return 2 * total if tiff else total


def no_space_message(out: str | os.PathLike[str], exc: OSError, needed: int) -> str:
    """One line for an output that did not fit (``exc.errno`` in :data:`NO_SPACE_ERRNOS`).

    ``needed`` is :func:`output_size_estimate`; the message gives it and, for a full disk,
    how much more than the free space it is.

    Examples
    --------
    >>> exc = OSError(errno.EFBIG, "File too large")
    >>> for part in no_space_message(Path("slide.ome.tif"), exc, 3_000_000).split("; "):
    ...     print(part)
    slide.ome.tif: cannot write: the file size limit (ulimit -f) was reached
    the output needs up to about 3 MB (estimated from its uncompressed size)
    nothing was written
    """
    out = Path(out)
    size = f"up to about {human_bytes(needed)}"
    if exc.errno == errno.EFBIG:
        return (f"{out}: cannot write: the file size limit (ulimit -f) was reached; the output "
                f"needs {size} (estimated from its uncompressed size); nothing was written")
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = None
    what = "the disk quota is exceeded" if exc.errno == errno.EDQUOT else \
        "no space left on the device"
    if free is None:
        need = f"the output needs {size} (estimated from its uncompressed size)"
    elif needed > free:
        need = (f"about {human_bytes(needed - free)} more free space is needed (the output "
                f"needs {size}, estimated from its uncompressed size, and {human_bytes(free)} "
                "is free)")
    else:
        need = (f"the output needs {size} (estimated from its uncompressed size) and "
                f"{human_bytes(free)} is free now")
    return f"{out}: cannot write: {what}; {need}; nothing was written"
