"""Third-party log records turned into data: tifffile and czifile warnings never reach stderr.

tifffile and czifile (2026 and newer) report damaged files through :mod:`logging`
(``"tifffile"``, ``"czifile"``) and carry on. A :class:`LogCapture` on such a logger holds
back the records of the threads inside its :meth:`~LogCapture.capture` block (thread-local,
so dask workers reading other files do not interfere) for the reader to turn into one
:class:`~gpufusion.errors.InputError` naming the file; records of other threads, and of
code not inside a block, reach the logger's handlers as before.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator

__all__ = ["CZIFILE_LOG", "TIFFFILE_LOG", "LogCapture", "library_message"]


class LogCapture(logging.Filter):
    r"""Keep a library's log records from its handlers on threads inside :meth:`capture`.

    Parameters
    ----------
    logger_name : str
        The library's logger; the filter installs itself on it.

    Examples
    --------
    >>> capture = LogCapture("example-library")
    >>> with capture.capture() as messages:
    ...     logging.getLogger("example-library").warning("<Page 0 @8> bad tag \xff")
    >>> messages
    ['bad tag \\xff']
    """

    def __init__(self, logger_name: str) -> None:
        super().__init__()
        self._local = threading.local()
        logging.getLogger(logger_name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        lists = getattr(self._local, "lists", None)
        if not lists:
            return True
        lists[-1].append(library_message(record.getMessage()))
        return False

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect (instead of emitting) the records this thread logs inside the block."""
        lists = self._local.__dict__.setdefault("lists", [])
        messages: list[str] = []
        lists.append(messages)
        try:
            yield messages
        finally:
            lists.pop()


def library_message(text: str) -> str:
    r"""One printable ASCII line of a library's message, without tifffile's ``<TiffPage 0 @8>``.

    Examples
    --------
    >>> library_message("<tifffile.TiffPage 0 @8> incorrect StripOffsets count\n(1 != 9)")
    'incorrect StripOffsets count (1 != 9)'
    >>> library_message("<TiffTag.fromfile> raised TiffFileError("
    ...                 "'<tifffile.TiffTag 305 @166> invalid data type 99')")
    'tag 305 at byte 166: invalid data type 99'
    """
    text = re.sub(r"^\s*<[^<>]*>\s*", "", str(text))
    text = re.sub(r"^raised \w+\((['\"])(.*)\1\)$", r"\2", text, flags=re.DOTALL)  # an exception
    text = re.sub(r"<tifffile\.TiffTag (\d+) @(\d+)>", r"tag \1 at byte \2:", text)
    return " ".join(text.encode("ascii", "backslashreplace").decode("ascii").split())


TIFFFILE_LOG = LogCapture("tifffile")
CZIFILE_LOG = LogCapture("czifile")
