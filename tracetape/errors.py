"""Errors shared by every subcommand of the `tracetape` command, and what a command does when the reader of its
standard output has gone."""

from __future__ import annotations

import os
import sys


class CliError(Exception):
    """A user-facing failure: printed as one line (or `{"error": ...}` with `--json`), never a traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def stdout_to_devnull() -> None:
    """After a `BrokenPipeError` on stdout (`tracetape show RUN | head -1`): point stdout's file descriptor at the
    null device, so later writes, and the flush at interpreter exit, cannot fail on the closed pipe again."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)
