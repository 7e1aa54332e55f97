"""Command-line interface: ``gpufusion <command> ...``.

The CLI only parses arguments and calls the public API. Each command lives in its own module
(``gpufusion/cli/<command>.py``) with ``add_parser(subparsers)`` (which sets ``run`` as the
parser default) and ``run(args) -> int``.

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
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import InputError

COMMANDS = ("demo", "fuse", "register", "info", "bench")


def common_options() -> argparse.ArgumentParser:
    """Options every command accepts (``--quiet``, ``--debug``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notices")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="gpufusion",
        description="Fuse overlapping microscope tiles into one seamless multiscale image.",
        parents=[common_options()],
    )
    parser.add_argument("--version", action="version", version=f"gpufusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gpufusion`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    """Progress bars only on a terminal and without ``--quiet``."""
    return not args.quiet and sys.stderr.isatty()


def notice(args: argparse.Namespace, message: str) -> None:
    """A one-line notice on stderr (suppressed by ``--quiet``)."""
    if not args.quiet:
        print(f"gpufusion: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
