"""`tracetape runs` and `tracetape show RUN`: read the store (read-only, alongside a running collector).

`runs` lists runs newest first; `show` prints a run's status, replayability verdict and timeline (one line
per step: index, kind, name, model or tool, status, duration, tokens, envelope hash, attempts, stream end
reason). `--json` prints the same as one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import msgspec

from tracetape.collector import keys, records
from tracetape.collector.config import DATA_ENV, DEFAULT_STORE_PATH
from tracetape.collector.records import RunRecord, StepRecord
from tracetape.collector.store import Store, StoreError
from tracetape.errors import CliError


def default_data_dir() -> str:
    """`$TRACETAPE_DATA`, else the collector's default store path (`.tracetape/data`)."""
    return os.environ.get(DATA_ENV) or DEFAULT_STORE_PATH


def open_store_readonly(path: str | None) -> Store:
    """The store at `path` (or the default) opened read-only; a one-line CliError when there is none."""
    path = path or default_data_dir()
    try:
        return Store(path, readonly=True)
    except StoreError as err:
        raise CliError(f"{err} (start the collector with `tracetape up`, or pass --data DIR)") from err


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help=f"store directory (default: ${DATA_ENV} or {DEFAULT_STORE_PATH})")
    parser.add_argument("--tenant", help="only this tenant")
    parser.add_argument("--scope", help="only this scope (with --tenant)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN")
    _common(parser)


def checked_where(tenant: str | None, scope: str | None) -> None:
    """CliError unless `--tenant`/`--scope`, when given, are ids a store can hold."""
    for value, what in ((tenant, "tenant"), (scope, "scope")):
        if value is not None:
            try:
                keys.check_id(value, what)
            except keys.InvalidId as err:
                raise CliError(str(err)) from None


def find_one_run(store: Store, run_id: str, tenant: str | None, scope: str | None) -> RunRecord:
    """The run with this id; CliError when there is none or the id is ambiguous across tenants/scopes."""
    checked_where(tenant, scope)
    try:
        keys.check_id(run_id, "run id")
    except keys.InvalidId:  # no such id can be stored (e.g. bytes that are not UTF-8 on the command line)
        raise CliError(f"no run {run_id!r} in {store.path}") from None
    found = store.find_run(run_id, tenant, scope)
    if scope is not None and tenant is None:
        found = [r for r in found if r.scope == scope]
    if not found:
        raise CliError(f"no run {run_id!r} in {store.path}")
    if len(found) > 1:
        where = ", ".join(f"{r.tenant}/{r.scope}" for r in found)
        raise CliError(f"run {run_id!r} exists in several tenant/scopes ({where}); pass --tenant and --scope")
    return found[0]


def to_jsonable(value: Any) -> Any:
    """msgspec records (and containers of them) as JSON-ready builtins, bytes as hex."""
    return _hex_bytes(msgspec.to_builtins(value, builtin_types=(bytes,)))


def _hex_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hex_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex_bytes(v) for v in value]
    return value


def _ts(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else "-"


def _duration(run: RunRecord) -> str:
    if not run.started_ns or not run.ended_ns:
        return "-"
    return f"{(run.ended_ns - run.started_ns) / 1e9:.2f}s"


def _verdict_text(run: RunRecord) -> str:
    return "yes" if run.replayable else f"no ({run.reason})"


def run_runs(args: argparse.Namespace) -> int:
    checked_where(args.tenant, args.scope)
    store = open_store_readonly(args.data)
    try:
        runs = store.runs(args.tenant, args.scope if args.tenant else None)[: max(args.limit, 0)]
    finally:
        store.close()
    if args.json:
        print(json.dumps({"runs": [run_summary(r) for r in runs]}, indent=2))
        return 0
    if not runs:
        print("no runs recorded yet")
        return 0
    rows = [("RUN", "TENANT/SCOPE", "STATUS", "REPLAYABLE", "STEPS", "STARTED", "DURATION", "COMMAND")]
    for r in runs:
        rows.append((r.run_id, f"{r.tenant}/{r.scope}", r.status, _verdict_text(r), str(r.step_count),
                     _ts(r.started_ns), _duration(r), " ".join(r.command)[:60]))
    _print_table(rows)
    return 0


def run_summary(run: RunRecord) -> dict[str, Any]:
    out: dict[str, Any] = to_jsonable(run)
    out["replayable"], out["reason"] = run.replayable, run.reason  # always present, even when default
    return out


def step_row(index: int, step: StepRecord) -> dict[str, Any]:
    """The timeline line of one step (its last attempt's outcome, all attempts' count)."""
    last = step.last
    tokens_in = next((a.input_tokens for a in reversed(step.attempts) if a.input_tokens is not None), None)
    tokens_out = next((a.output_tokens for a in reversed(step.attempts) if a.output_tokens is not None), None)
    if last is None:
        status = "-"
    elif last.error_type:
        status = f"error:{last.error_type}"
    elif last.status is not None:
        status = str(last.status)
    else:
        status = "ok"
    return {
        "index": index,
        "kind": step.kind,
        "name": step.name,
        "model": (last.response_model if last and last.response_model else step.request_model) or None,
        "tool": step.tool_name or None,
        "status": status,
        "duration_ms": round(sum(a.duration_ms for a in step.attempts), 3),
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "envelope_hash": step.envelope_hash,
        "attempts": len(step.attempts),
        "end_reason": (last.end_reason or None) if last else None,
        "step_id": step.step_id,
        "recording_error": (last.recording_error or None) if last else None,
    }


def run_show(args: argparse.Namespace) -> int:
    store = open_store_readonly(args.data)
    try:
        found = find_one_run(store, args.run_id, args.tenant, args.scope)
        run, steps = store.run_and_steps(found.tenant, found.scope, found.run_id)  # as of one moment
        run = run or found
    finally:
        store.close()
    timeline = [step_row(i, s) for i, s in enumerate(steps)]
    if args.json:
        print(json.dumps({"run": run_summary(run), "steps": timeline}, indent=2))
        return 0
    exit_text = "" if run.exit_code is None else f", exit {run.exit_code}"
    if run.exit_code is not None and run.exit_code < 0:
        exit_text = f", killed by signal {-run.exit_code}"
    print(f"run        {run.run_id}   ({run.tenant}/{run.scope})")
    print(f"status     {run.status}{exit_text}"
          + ("   [incomplete]" if run.reason == records.REASON_EXECUTION_INCOMPLETE else ""))
    print(f"replayable {_verdict_text(run)}")
    print(f"started    {_ts(run.started_ns)}   duration {_duration(run)}")
    print(f"command    {' '.join(run.command) or '-'}")
    if run.replay_of:
        print(f"replay of  {run.replay_of} (mode {run.replay_mode or '-'}, depth {run.lineage_depth}"
              + (", forced" if run.replay_forced else "") + ")")
    print(f"trace      {run.trace_id.hex() or '-'}")
    print()
    if not timeline:
        print("no steps recorded")
        return 0
    rows = [("#", "KIND", "NAME", "MODEL/TOOL", "STATUS", "MS", "TOKENS", "ENVELOPE", "ATT", "END")]
    for t in timeline:
        tokens = "-" if t["input_tokens"] is None and t["output_tokens"] is None else (
            f"{t['input_tokens'] if t['input_tokens'] is not None else '?'}/"
            f"{t['output_tokens'] if t['output_tokens'] is not None else '?'}")
        rows.append((str(t["index"]), t["kind"], t["name"][:36], (t["model"] or t["tool"] or "-")[:28], t["status"],
                     f"{t['duration_ms']:.1f}", tokens, t["envelope_hash"][:12], str(t["attempts"]),
                     t["end_reason"] or "-"))
    _print_table(rows)
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
