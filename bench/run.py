"""`python -m bench.run [--quick] [--only NAME,...] [--json-out FILE]`: run the benchmarks, print a table,
write JSON (default bench/results/bench-<time>.json)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import RESULTS, Ctx, machine, table

BENCHES = ("ingest", "storage", "overhead", "replay")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run")
    p.add_argument("--quick", action="store_true", help="smaller runs (< 5 minutes on 2 cores)")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--json-out", metavar="FILE", help="where to write the JSON results")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [x for x in only if x not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    rows: list[dict] = []
    failures: dict[str, str] = {}
    started = time.time()
    info = machine()
    print(f"machine: {info['nproc']} cpus, {info['cpu']}, Python {info['python']}; quick={args.quick}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tracetape-bench-", dir=str(RESULTS.parent)) as tmp:
        ctx = Ctx(quick=args.quick, workdir=Path(tmp))
        for name in only:
            t = time.time()
            try:
                mod = importlib.import_module(f"bench.{name}")
                rows += mod.run(ctx)
            except Exception as err:  # one benchmark failing must not lose the others' figures
                traceback.print_exc()
                failures[name] = f"{type(err).__name__}: {err}"
            print(f"[{name}] {time.time() - t:.1f}s", flush=True)
    print()
    print(table(rows))
    for note in ctx.notes:
        print(f"note: {note}")
    for name, err in failures.items():
        print(f"FAILED {name}: {err}")
    out = Path(args.json_out) if args.json_out else RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "quick": args.quick, "seconds": time.time() - started,
                               "rows": rows, "notes": ctx.notes, "failures": failures}, indent=2))
    print(f"\nresults: {out} ({time.time() - started:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
