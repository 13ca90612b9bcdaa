"""What the replay-side commands share: opening the store read-only and naming one run."""

from __future__ import annotations

import argparse

from tracetape.collector.inspect import default_data_dir, find_one_run
from tracetape.collector.store import Store, StoreError
from tracetape.errors import CliError


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="the store directory (default $TRACETAPE_DATA or .tracetape/data)")
    parser.add_argument("--tenant", default=None, help="the run's tenant (when the id exists in several)")
    parser.add_argument("--scope", default=None, help="the run's scope (when the id exists in several)")


def open_store(data: str | None, *, readonly: bool = True) -> Store:
    path = data or default_data_dir()
    try:
        return Store(path, readonly=readonly)
    except (StoreError, OSError) as err:  # OSError: creating a writable store's directory failed
        raise CliError(f"cannot open the store at {path}: {err}") from None


resolve_run = find_one_run
"""The one run with this id (CliError when absent or ambiguous): the same rule as `tracetape show`."""
