"""Small output files written together and atomically (positions CSV, edge table, report).

:func:`check_outputs` refuses, before any work, an output that already exists (unless
``overwrite``), is a folder, is named twice, or is, is inside or contains one of the inputs
(:func:`gpufusion.writers.target.check_not_input`); :func:`staged`
lets the caller write every file under a hidden temporary name in the same folder and
renames them into place only when all were written, so a failure leaves no output that
looks complete (an existing file is replaced only then); a file-system error becomes a
one-line :class:`InputError` naming the output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..writers.target import check_not_input, paths_read


def check_outputs(outputs: Iterable[Path], inputs: Iterable[str | Path], overwrite: bool,
                  option: str = "--overwrite") -> None:
    """Raise :class:`InputError` for an output that may not be written.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "a.csv").write_text("x")
    >>> check_outputs([d / "b.csv"], [d / "a.csv"], overwrite=False)
    >>> check_outputs([d / "a.csv"], [], overwrite=True)
    >>> check_outputs([d / "a.csv"], [], overwrite=False)
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: ...a.csv: already exists (use --overwrite to replace it)
    """
    protected = list(inputs)
    seen: set[Path] = set()
    for out in outputs:
        resolved = out.resolve()
        check_not_input(out, protected)
        if resolved in seen:
            raise InputError(f"{out}: named for two outputs")
        seen.add(resolved)
        if out.is_dir():
            raise InputError(f"{out}: is a folder; give a file name")
        if not out.parent.resolve().is_dir():
            raise InputError(f"{out}: folder {out.parent} does not exist")
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise InputError(f"{out}: already exists (use {option} to replace it)")


def input_files(*tilesets: Any) -> list[Path]:
    """Every file and folder the tile sets read (all channels; tile files, plane files,
    N5/Zarr containers): what no output may be, be inside or contain (see
    :func:`gpufusion.writers.target.paths_read`)."""
    return paths_read(src for ts in tilesets for channel in ts.sources for src in channel)


def _temporary_name(out: Path) -> Path:
    """A hidden sibling with the same suffix (writers choose the format by suffix)."""
    return out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")


@contextmanager
def staged(outputs: Iterable[Path]) -> Iterator[dict[Path, Path]]:
    """Yield ``{output: temporary path}``; on success rename every temporary file into
    place, on failure remove them all (existing outputs stay untouched).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with staged([d / "a.txt", d / "b.txt"]) as tmp:
    ...     for path in tmp.values():
    ...         _ = path.write_text("done")
    >>> sorted(p.name for p in d.iterdir())
    ['a.txt', 'b.txt']
    >>> try:
    ...     with staged([d / "c.txt"]) as tmp:
    ...         _ = tmp[d / "c.txt"].write_text("half")
    ...         raise OSError(28, "No space left on device")
    ... except InputError as exc:
    ...     print(str(exc).replace(str(d), "D"))
    D/c.txt: cannot write (No space left on device); nothing was written
    >>> sorted(p.name for p in d.iterdir())
    ['a.txt', 'b.txt']
    """
    temporary = {out: _temporary_name(out) for out in outputs}
    try:
        yield temporary
        for out, tmp in temporary.items():
            os.replace(tmp, out)
    except OSError as exc:  # a full disk, a folder gone read-only: name the output
        names = {str(t): o for o, t in temporary.items()}
        at = names.get(str(exc.filename), exc.filename) or ", ".join(map(str, temporary))
        raise InputError(f"{at}: cannot write ({exc.strerror or exc}); nothing was "
                         "written") from exc
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
