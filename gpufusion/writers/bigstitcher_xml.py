"""Write registered positions back into a BigStitcher ``dataset.xml``: a "Stitching Transform".

BigStitcher keeps a view's registration as the list of ViewTransforms of its
ViewRegistration, composed first-listed-applied-last (:func:`gpufusion.readers.bigstitcher.
compose`): the calibration, listed last, maps pixels to world units first; its own stitching
adds a translation in world coordinates by *prepending* a ViewTransform named
``Stitching Transform`` (``ViewRegistration.preconcatenateTransform``). So does
:func:`write_stitched_xml`: one such transform per view, the first of its list, holding

    T = the translation that moves the view from its nominal world position to the
        registered one, in world units (x, y, z), calibration included.

With the reader's output grid ``out = S @ P @ world`` (``S`` the resampling scale, 1 unless
``pixel_size=`` asks for another pixel size, ``P`` the axis reversal to ``(z, y, x)``;
:func:`gpufusion.readers.bigstitcher.read_bigstitcher`), a tile's affine is
``A = S P M P`` for the view model ``M``. Registration moves tile ``k`` by ``d`` output
pixels (``A' = T_out(d) A``), so ``M' = P S^-1 T_out(d) S P M = T_world(P S^-1 d) M``:
prepending ``T_world`` and reading the file back gives ``A'`` exactly
(:func:`stitching_translations` computes it from ``A`` and ``A'`` and checks that it is a
translation).

The file is edited as text: each ``<ViewRegistration>`` start tag found (outside comments,
CDATA and processing instructions) gets the new element inserted right after it, indented
as its first child is; every other byte of the file stays as it was (comments, the XML
declaration, attribute order, number formatting), except the ``<BasePath>`` when the copy
is written to another folder (rewritten relative to the new folder, so that the loader
still finds the pixels).

Which views: all views of the registered time point whose ViewSetup has the tile's
``tile`` and ``angle`` attributes: every channel, and every illumination (one physical
tile) unless the tiles were read per illumination (``illumination="all"``).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..readers.bigstitcher import SpimData, group_views, read_spimdata, xyz_to_index
from ..readers.safe_xml import parse_xml

__all__ = ["STITCHING_TRANSFORM", "backup_path", "stitching_translations", "tile_views",
           "write_stitched_xml"]

#: The name BigStitcher gives the translation its stitching prepends to a ViewRegistration.
STITCHING_TRANSFORM = "Stitching Transform"

View = tuple[int, int]  # (timepoint, setup)

_SKIPPED = re.compile(r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|<!DOCTYPE[^>]*>", re.DOTALL)
_START = re.compile(r"""<ViewRegistration((?:\s+[\w:.-]+\s*=\s*(?:"[^"]*"|'[^']*'))*)\s*(/?)>""")
_ATTRIBUTE = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_BASE_PATH = re.compile(r"(<BasePath\b[^>]*>)([^<]*)(</BasePath>)")
_ENCODING = re.compile(rb"""^\s*<\?xml[^>]*encoding\s*=\s*["']([\w.-]+)["']""")


def tile_views(spim: SpimData, *, timepoint: int | None = None,
               illumination: int | str | None = None) -> list[list[View]]:
    """The views of each tile, in the tile order of :func:`read_bigstitcher` with the same
    ``timepoint`` and ``illumination``: first the view whose model the reader gives the
    tile, then every other view with a registration of the same tile (``tile`` and
    ``angle`` attributes) at that time point: the other channels, and the other
    illuminations unless ``illumination="all"`` (then each illumination is its own tile).

    Examples
    --------
    >>> import tempfile
    >>> xml = Path(tempfile.mkdtemp()) / "dataset.xml"
    >>> setup = ("<ViewSetup><id>{0}</id><attributes><channel>{1}</channel><tile>{2}</tile>"
    ...          "</attributes></ViewSetup>")
    >>> setups = "".join(setup.format(k, k // 2, k % 2) for k in range(4))
    >>> regs = "".join(f"<ViewRegistration setup='{k}'/>" for k in range(4))
    >>> _ = xml.write_text(f"<SpimData><SequenceDescription><ViewSetups>{setups}"
    ...                    "</ViewSetups></SequenceDescription><ViewRegistrations>"
    ...                    f"{regs}</ViewRegistrations></SpimData>")
    >>> tile_views(read_spimdata(xml))   # tile 0: channels 0 and 1 (setups 0 and 2)
    [[(0, 0), (0, 2)], [(0, 1), (0, 3)]]
    """
    tp, tiles, channels = group_views(spim, timepoint=timepoint, illumination=illumination)
    every = isinstance(illumination, str) and illumination.strip().lower() == "all"
    out = []
    for key in sorted(tiles):
        first = tiles[key][channels[0]]  # the view whose model the reader gives the tile
        views = [first]
        for view in spim.views():
            a = spim.setups[view[1]].attributes
            if (view == first or view[0] != tp or view not in spim.registrations
                    or (a.get("tile", view[1]), a.get("angle", 0)) != key[:2]):
                continue
            if every and a.get("illumination", 0) != key[2]:
                continue
            views.append(view)
        out.append(views)
    return out


def stitching_translations(spim: SpimData, before: np.ndarray, after: np.ndarray, *,
                           timepoint: int | None = None,
                           illumination: int | str | None = None) -> dict[View, np.ndarray]:
    """The world translation ``(x, y, z)`` to prepend to each view's registration.

    Parameters
    ----------
    spim : SpimData
        The dataset the tiles were read from.
    before, after : ndarray (n, 4, 4)
        Each tile's affine (index order ``z, y, x``; tile pixels to output pixels) as
        :func:`read_bigstitcher` gave it with ``timepoint`` and ``illumination``, and as
        registered (the same with a translation added in output pixels).
    timepoint, illumination
        As given to :func:`read_bigstitcher`.

    Returns
    -------
    dict
        ``{(timepoint, setup): translation}`` for every view of every tile.

    Raises
    ------
    InputError
        If the tiles do not match the dataset's views (count, or an affine that is not the
        view's model up to the reader's scale), or a tile moved other than by a
        translation.
    """
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    views = tile_views(spim, timepoint=timepoint, illumination=illumination)
    if len(views) != len(before) or before.shape != after.shape or before.shape[1:] != (4, 4):
        raise InputError(f"{spim.path}: {len(before)} registered tiles for the dataset's "
                         f"{len(views)} tiles; write the XML from the tiles read from it")
    out: dict[View, np.ndarray] = {}
    for k, tile in enumerate(views):
        model = xyz_to_index(spim.model(tile[0]))
        # the reader's scale S: A = S @ model, a diagonal without translation
        scale = before[k] @ np.linalg.inv(model)
        if not (np.allclose(scale[:3, 3], 0.0, atol=1e-6 * max(1.0, np.abs(model).max()))
                and np.allclose(scale[:3, :3], np.diag(np.diag(scale[:3, :3])), atol=1e-9)):
            raise InputError(f"{spim.path}: tile {k} does not come from view {tile[0]} as "
                             "read; write the XML from the tiles read from this dataset")
        scale[:3, 3] = 0.0
        moved = after[k] @ np.linalg.inv(before[k])  # T_out(d), output pixels
        if not np.allclose(moved[:3, :3], np.eye(3), atol=1e-9):
            raise InputError(f"{spim.path}: tile {k} was not moved by a translation; only a "
                             "translation can be written as a Stitching Transform")
        world = np.linalg.inv(scale) @ moved @ scale  # a translation in index order
        shift = world[:3, 3][::-1].copy()  # (x, y, z)
        for view in tile:
            out[view] = shift
    return out


def _format_affine(shift: np.ndarray) -> str:
    """The 12 numbers of a 3x4 translation, as BigStitcher writes them (``repr``: shortest
    text that reads back to the same double)."""
    x, y, z = (float(v) + 0.0 for v in shift)  # no "-0.0"
    return f"1.0 0.0 0.0 {x!r} 0.0 1.0 0.0 {y!r} 0.0 0.0 1.0 {z!r}"


def _decode(raw: bytes, path: Path) -> tuple[str, str]:
    match = _ENCODING.match(raw)
    encoding = match.group(1).decode("ascii") if match else "utf-8"
    try:
        return raw.decode(encoding), encoding
    except (LookupError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot decode the XML as {encoding} ({exc})") from None


def _skipped_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _SKIPPED.finditer(text)]


def _outside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return not any(a <= pos < b for a, b in spans)


def _indent_before(text: str, pos: int) -> str:
    """The blanks between the start of ``pos``'s line and ``pos`` (if only blanks)."""
    line = text.rfind("\n", 0, pos) + 1
    lead = text[line:pos]
    return lead if not lead.strip() else ""


def insert_stitching_transforms(text: str, translations: Mapping[View, np.ndarray],
                                path: Path, registrations: Sequence[View]) -> str:
    """``text`` with a Stitching Transform first in each listed view's ViewRegistration.

    ``registrations``: the views of the ViewRegistration elements the XML parser finds, in
    document order (the text's start tags must be the same).

    Raises
    ------
    InputError
        If the ViewRegistrations found in the text are not those the XML parser finds, or
        a view in ``translations`` has none.
    """
    spans = _skipped_spans(text)
    starts = [m for m in _START.finditer(text) if _outside(m.start(), spans)]
    if len(starts) != len(registrations):
        raise InputError(f"{path}: found {len(starts)} <ViewRegistration> tags in the text but "
                         f"{len(registrations)} in the XML; cannot edit it safely")
    pieces, last, found = [], 0, set()
    for match, expected in zip(starts, registrations, strict=True):
        attrs = {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
                 for m in _ATTRIBUTE.finditer(match.group(1))}
        view = (int(float(attrs.get("timepoint") or 0)), int(float(attrs.get("setup") or 0)))
        if view != tuple(expected):
            raise InputError(f"{path}: <ViewRegistration> tags in the text and in the XML "
                             "differ; cannot edit it safely")
        if view not in translations:
            continue
        found.add(view)
        parent = _indent_before(text, match.start())
        after = text[match.end():]
        blanks = after[: len(after) - len(after.lstrip())] if not match.group(2) else ""
        child = blanks.rsplit("\n", 1)[-1] if "\n" in blanks else ""
        unit = child[len(parent):] if child.startswith(parent) and child != parent else "  "
        nl = "\n" if "\n" in blanks or match.group(2) else ""
        if "\r\n" in blanks or (match.group(2) and "\r\n" in text):
            nl = "\r\n"  # the file's line ends
        if match.group(2):  # <ViewRegistration .../>: open it
            child = parent + unit
        inner = f"{nl}{child}{unit}" if nl else ""
        element = (f'<ViewTransform type="affine">{inner}<Name>{STITCHING_TRANSFORM}</Name>'
                   f"{inner}<affine>{_format_affine(translations[view])}</affine>"
                   f"{nl}{child}</ViewTransform>")
        if match.group(2):
            tag = match.group(0)[:-2].rstrip() + ">"
            insert = f"{tag}{nl}{child}{element}{nl}{parent}</ViewRegistration>"
        else:
            insert = f"{match.group(0)}{blanks}{element}"
        pieces += [text[last:match.start()], insert]
        last = match.end()
    missing = sorted(set(translations) - found)
    if missing:
        raise InputError(f"{path}: view (timepoint {missing[0][0]}, setup {missing[0][1]}) has "
                         "no <ViewRegistration> to add its Stitching Transform to")
    pieces.append(text[last:])
    return "".join(pieces)


def _moved_base_path(text: str, source: Path, target: Path, spim: SpimData) -> str:
    """``text`` with a relative ``<BasePath>`` rewritten for a copy in ``target``'s folder."""
    old, new = source.resolve().parent, target.resolve().parent
    if old == new:
        return text
    spans = _skipped_spans(text)
    match = next((m for m in _BASE_PATH.finditer(text) if _outside(m.start(), spans)), None)
    if match is None:
        raise InputError(f"{source}: has no <BasePath>, so its data paths are relative to its "
                         f"own folder; write the copy into that folder ({old})")
    if 'type="absolute"' in match.group(1) or "type='absolute'" in match.group(1):
        return text
    rel = Path(os.path.relpath(spim.base_path.resolve(), new)).as_posix()
    return text[:match.start(2)] + rel + text[match.end(2):]


def write_stitched_xml(source: str | os.PathLike[str], target: str | os.PathLike[str],
                       translations: Mapping[View, Sequence[float] | np.ndarray]) -> Path:
    """Write ``source`` to ``target`` with a Stitching Transform prepended per view.

    ``translations`` maps views ``(timepoint, setup)`` to world translations ``(x, y, z)``
    (:func:`stitching_translations`). ``target`` may be ``source`` itself (the caller makes
    the backup, :func:`backup_path`); the text is written to a temporary file beside
    ``target`` and renamed into place.

    Returns
    -------
    Path
        ``target``.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "dataset.xml").write_text(
    ...     "<SpimData>\\n  <ViewRegistrations>\\n    <ViewRegistration timepoint='0' "
    ...     "setup='0'>\\n      <ViewTransform type='affine'>\\n        <affine>1 0 0 0 0 1 0 0 "
    ...     "0 0 1 0</affine>\\n      </ViewTransform>\\n    </ViewRegistration>\\n"
    ...     "  </ViewRegistrations>\\n</SpimData>\\n")
    >>> out = write_stitched_xml(d / "dataset.xml", d / "out.xml", {(0, 0): (2.5, -1.0, 0.0)})
    >>> print(out.read_text())  # doctest: +NORMALIZE_WHITESPACE
    <SpimData>
      <ViewRegistrations>
        <ViewRegistration timepoint='0' setup='0'>
          <ViewTransform type="affine">
            <Name>Stitching Transform</Name>
            <affine>1.0 0.0 0.0 2.5 0.0 1.0 0.0 -1.0 0.0 0.0 1.0 0.0</affine>
          </ViewTransform>
          <ViewTransform type='affine'>
            <affine>1 0 0 0 0 1 0 0 0 0 1 0</affine>
          </ViewTransform>
        </ViewRegistration>
      </ViewRegistrations>
    </SpimData>
    """
    src, out = Path(source), Path(target)
    shifts = {}
    for view, value in translations.items():
        shift = np.asarray(value, dtype=np.float64).reshape(-1)
        if shift.shape != (3,) or not np.all(np.isfinite(shift)):
            raise InputError(f"{out}: view {view}: expected a finite translation (x, y, z), "
                             f"got {value!r}")
        shifts[(int(view[0]), int(view[1]))] = shift
    try:
        raw = src.read_bytes()
    except OSError as exc:
        raise InputError(f"{src}: cannot read ({exc.strerror or exc})") from None
    text, encoding = _decode(raw, src)
    spim = read_spimdata(src)
    registrations = [(int(float(e.get("timepoint") or 0)), int(float(e.get("setup") or 0)))
                     for e in parse_xml(raw, src).iter("ViewRegistration")]
    text = insert_stitching_transforms(text, shifts, src, registrations)
    text = _moved_base_path(text, src, out, spim)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
        shutil.copymode(src, tmp)  # the input's permissions (it may be replaced in place)
        os.replace(tmp, out)
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc}); nothing was "
                         "written") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def backup_path(path: str | os.PathLike[str], now: float | None = None) -> Path:
    """A free name for the backup of ``path`` before it is changed in place:
    ``dataset.xml~YYYYMMDD-HHMMSS`` (local time), with ``-2``, ``-3``... if taken.

    Examples
    --------
    >>> backup_path("/data/dataset.xml", now=0).name.startswith("dataset.xml~19")
    True
    """
    p = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    candidate, k = p.with_name(f"{p.name}~{stamp}"), 1
    while candidate.exists() or candidate.is_symlink():
        k += 1
        candidate = p.with_name(f"{p.name}~{stamp}-{k}")
    return candidate


def write_backup(path: Path) -> Path:
    """Copy ``path`` to :func:`backup_path` (metadata kept) and return the copy's path."""
    backup = backup_path(path)
    try:
        shutil.copy2(path, backup)
    except OSError as exc:
        raise InputError(f"{backup}: cannot write the backup of {path} "
                         f"({exc.strerror or exc}); {path} was not changed") from None
    return backup
