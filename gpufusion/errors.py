"""Errors raised for bad input.

Everything the user can get wrong (a missing file, a malformed positions line, an
unknown option value) raises :class:`InputError` with a one-line message that names the
file, line or field at fault. The CLI prints it and exits with code 2; anything else is
an internal error (exit code 1).
"""

from __future__ import annotations


class InputError(ValueError):
    """Invalid user input; the message is one line naming the file, line or field at fault."""
