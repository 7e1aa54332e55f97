"""Why a path cannot be opened, in words: a missing file, a broken link, a link loop.

``Path.exists()`` and ``Path.is_file()`` say False for a missing file, a dangling symbolic
link and a symbolic link loop (``ELOOP``) alike; readers use :func:`unreachable` and
:func:`os_error_message` so that their one-line errors tell these apart.
"""

from __future__ import annotations

import errno
import os

__all__ = ["os_error_message", "unreachable"]


def os_error_message(what: str, exc: OSError, path: str | os.PathLike[str]) -> str:
    """Say in words why ``path`` (``what``: "image file", "positions file", ...) failed.

    A symbolic link loop (ELOOP) and a broken link are told apart from a missing file,
    which ``Path.exists()`` (False for all three) does not do.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "loop").symlink_to(d / "loop")
    >>> (d / "dangling").symlink_to(d / "gone")
    >>> for name in ("missing", "loop", "dangling"):
    ...     print(unreachable(d / name, "tile").replace(str(d), "D"))
    tile not found
    tile is unreachable: symbolic link loop (ELOOP)
    tile not found: broken symbolic link to 'D/gone'
    """
    if exc.errno == errno.ELOOP:
        return f"{what} is unreachable: symbolic link loop (ELOOP)"
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"{what} not found: broken symbolic link to {os.readlink(path)!r}"
        return f"{what} not found"
    return f"cannot read {what} ({exc.strerror or exc})"


def unreachable(path: str | os.PathLike[str], what: str) -> str | None:
    """:func:`os_error_message` for ``path`` if it cannot be stat-ed, else None."""
    try:
        os.stat(path)
    except OSError as exc:
        return os_error_message(what, exc, path)
    return None
