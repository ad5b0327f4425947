"""Shared command-line plumbing: turn UserErrors into one line each and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["run_cli", "print_user_error"]


def print_user_error(err, stream=None) -> None:
    stream = stream or sys.stderr
    errors = getattr(err, "errors", None) or [err]
    for e in errors:
        print(f"error: {e}", file=stream)


def run_cli(main: Callable[[], int | None]) -> int:
    """Run ``main``; a UserError prints its line(s) and returns 2, Ctrl+C returns 130."""
    from sd_scripts.core.errors import EXIT_USER_ERROR, UserError

    try:
        return int(main() or 0)
    except UserError as err:
        print_user_error(err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
