"""Errors shared by every subcommand of the `tracetape` command."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one line (or `{"error": ...}` with `--json`), never a traceback."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
