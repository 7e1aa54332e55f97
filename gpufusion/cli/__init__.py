"""Command-line interface: ``gpufusion <command> ...``.

The CLI only parses arguments and calls the public API. Each command lives in its own module
(``gpufusion/cli/<command>.py``) with ``add_parser(subparsers)`` (which sets ``run`` as the
parser default) and ``run(args) -> int``.

Exit codes: 0 success; 2 bad input, or a file the system refused to read or write (a
one-line message naming the file, line or field at fault, nothing left at the output
path); 1 internal error (traceback with ``--debug``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

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
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"gpufusion: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpufusion: interrupted; nothing was written at the output path", file=sys.stderr)
        return 130
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
