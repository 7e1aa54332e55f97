"""Command-line interface: ``gpufusion <command> ...``.

The CLI only parses arguments and calls the public API. Each command lives in its own module
(``gpufusion/cli/<command>.py``) with ``add_parser(subparsers)`` (which sets ``run`` as the
parser default; :func:`help_texts` gives its description and examples) and
``run(args) -> int``. ``--quiet`` and ``--debug`` work before or after the command name.
``gpufusion --version`` imports no command module (nor dask, zarr, scipy or tifffile).

Exit codes: 0 success; 2 bad input, or a file the system refused to read or write (a
one-line message naming the file, line or field at fault, nothing left at the output
path; a full disk names the output and about how much space it needs); 1 internal error
(traceback with ``--debug``); 130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM,
what batch schedulers send). Interrupted or terminated, the temporary output is removed
and an existing output left as it was.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import InputError

COMMANDS = ("demo", "fuse", "register", "info", "bench", "flatfield")

#: Destinations of :func:`common_options`.
COMMON_DESTS = ("quiet", "debug")

DESCRIPTION = (
    "Fuse overlapping microscope tiles (Fiji TileConfiguration, positions CSV, OME-TIFF stage "
    "positions, BigStitcher dataset.xml, CZI mosaic, or a regular grid) into one seamless, "
    "chunked, multiscale image: an OME-Zarr folder (*.ome.zarr) or a pyramidal OME-TIFF "
    "(*.ome.tif). Run 'gpufusion COMMAND --help' for a command's options and examples."
)

EXAMPLES = (
    "gpufusion demo",
    "gpufusion fuse TileConfiguration.txt -o slide.ome.zarr",
    "gpufusion -q fuse experiment_folder/ -o slide.ome.tif",
    "gpufusion register positions.csv -o registered.csv --report report.html",
)


def common_options() -> argparse.ArgumentParser:
    """Options every command accepts (``--quiet``, ``--debug``).

    Used as a parent of the top-level parser and of every command's parser, so both
    ``gpufusion -q fuse ...`` and ``gpufusion fuse ... -q`` work (:func:`build_parser` makes
    the commands' copies set the value only when given).
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notices")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def help_texts(description: str, *examples: str) -> dict[str, Any]:
    """Keyword arguments of ``add_parser`` for a command: ``description`` (wrapped) and an
    ``examples:`` epilog, one command line each, shown as written.

    Examples
    --------
    >>> kw = help_texts("Say hello.", "gpufusion hello --loud")
    >>> print(kw["epilog"])
    examples:
      gpufusion hello --loud
    """
    paragraphs = description.split("\n\n")
    return {
        "description": "\n\n".join(textwrap.fill(p, 79, break_on_hyphens=False)
                                   for p in paragraphs),
        "epilog": "examples:\n" + "\n".join(f"  {line}" for line in examples),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _top_level_parser() -> argparse.ArgumentParser:
    """The ``gpufusion`` parser without its commands (light: no command module imported)."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="gpufusion", parents=[common_options()],
                                     **help_texts(DESCRIPTION, *EXAMPLES))
    parser.add_argument("--version", action="version", version=f"gpufusion {__version__}")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``gpufusion`` parser with every command of :data:`COMMANDS`."""
    parser = _top_level_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    for command in sub.choices.values():
        _defer_common_options(command)
    return parser


def _defer_common_options(command: argparse.ArgumentParser) -> None:
    """Make a command's ``--quiet``/``--debug`` set the value only when given.

    A command's parser fills in its defaults over what the top-level parser parsed, so with
    a ``False`` default ``gpufusion -q fuse ...`` would lose the ``-q``.
    """
    for action in command._actions:
        if action.dest in COMMON_DESTS:
            action.default = argparse.SUPPRESS


def _version_only(argv: Sequence[str]) -> None:
    """``gpufusion [-q] [--debug] --version``: print the version and exit (SystemExit 0)
    without importing the command modules, as the full parser would."""
    head = list(itertools.takewhile(lambda a: a.startswith("-") and a != "--", argv))
    if "--version" in head and not any(a in ("-h", "--help") for a in head):
        _top_level_parser().parse_args(head)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpufusion`` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    _version_only(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given, for the outputs' provenance record
    try:
        with _sigterm_as_exception():
            return int(args.run(args) or 0)
    except InputError as exc:
        print(f"gpufusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpufusion: interrupted; nothing was written at the output path", file=sys.stderr)
        return 130
    except Terminated:
        print("gpufusion: terminated (SIGTERM); nothing was written at the output path",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as exc:
        if exc.filename is None:
            return _internal_error(args, exc)
        # the file system refused a named file (permissions, a missing folder)
        if args.debug:
            traceback.print_exception(exc)
        print(f"gpufusion: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _internal_error(args, exc)


class Terminated(BaseException):
    """SIGTERM arrived (what batch schedulers send): unwinds like ``KeyboardInterrupt``,
    so the writers remove their temporary output on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not stop the cleanup
    raise Terminated


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _internal_error(args: argparse.Namespace, exc: BaseException) -> int:
    """An internal error: one line, or the traceback under ``--debug``; exit code 1."""
    if args.debug:
        traceback.print_exception(exc)
    else:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"gpufusion: internal error: {msg} (run with --debug for the traceback)",
              file=sys.stderr)
    return 1


def show_progress(args: argparse.Namespace) -> bool:
    """Progress lines (:mod:`gpufusion.progress`) only when stderr is a terminal and without
    ``--quiet``: redirected to a file or a pipe, stderr gets no carriage-return redraws."""
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    return not getattr(args, "quiet", False) and callable(isatty) and bool(isatty())


def notice(args: argparse.Namespace, message: str) -> None:
    """A one-line notice on stderr (suppressed by ``--quiet``)."""
    if not args.quiet:
        print(f"gpufusion: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
