"""Errors a user can cause, and the one place a command reports them.

A `UserError` is a problem the user can fix (a config value, a file, a path, a server address); its message names
which. A command's `main()` runs its body through `report_user_errors`: a user error prints one line and exits with
status 2; `--debug` or `STEPSEARCH_DEBUG=1` shows the traceback instead. Any other exception is a bug and keeps its
traceback.

Imports only the standard library, so every module can depend on it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2
DEBUG_ENV = "STEPSEARCH_DEBUG"


class UserError(Exception):
    """A problem the user can fix; the message names the file, key, line or address and says what is wrong."""


def debug_requested(flag: bool = False) -> bool:
    """True when `--debug` was passed or STEPSEARCH_DEBUG is set to anything but empty/0/false/no."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def report_user_errors(program: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run `body`; a `UserError` becomes one line on stderr and exit status 2 (re-raised when debugging)."""
    try:
        return body()
    except UserError as err:
        if debug_requested(debug):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
