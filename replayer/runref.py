"""What the replay-side commands share: opening the store read-only and naming one run."""

from __future__ import annotations

import argparse
import os

from tracetape.collector.records import RunRecord
from tracetape.collector.store import Store, StoreError
from tracetape.errors import CliError


def default_data_dir() -> str:
    return os.environ.get("TRACETAPE_DATA") or ".tracetape/data"


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="the store directory (default $TRACETAPE_DATA or .tracetape/data)")
    parser.add_argument("--tenant", default=None, help="the run's tenant (when the id exists in several)")
    parser.add_argument("--scope", default=None, help="the run's scope (when the id exists in several)")


def open_store(data: str | None, *, readonly: bool = True) -> Store:
    path = data or default_data_dir()
    try:
        return Store(path, readonly=readonly)
    except StoreError as err:
        raise CliError(f"cannot open the store at {path}: {err}") from None


def resolve_run(store: Store, run_id: str, tenant: str | None = None, scope: str | None = None) -> RunRecord:
    """The one run with this id (CliError when absent or ambiguous)."""
    found = store.find_run(run_id, tenant, scope)
    if scope is not None and tenant is None:
        found = [r for r in found if r.scope == scope]
    if not found:
        raise CliError(f"no run {run_id!r} in the store", 2)
    if len(found) > 1:
        where = ", ".join(f"{r.tenant}/{r.scope}" for r in found)
        raise CliError(f"run {run_id!r} exists in several tenant/scopes ({where}): give --tenant and --scope", 2)
    return found[0]
