"""Issue 5, item 8: concurrency. The collector writes under steady OTLP load while several reader
processes (as replayers are: `Store(path, readonly=True)`) read in loops; LMDB reader slots never run
out, however many short-lived readers come and go; slots left by SIGKILLed reader processes are cleared
(`env.reader_check()` at open).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.reliability import CollectorProcess, SteadySender, numbered_batch, read_everything, write_config
from tracetape.collector import ingest
from tracetape.collector.store import Store

READERS = 4
READ_SECONDS = 4.0


def _reader(path: str, seconds: float, out: "multiprocessing.Queue[dict[str, Any]]") -> None:
    """Open, read everything a replayer reads, close; again and again. Reports counts and errors."""
    opens = reads = max_runs = 0
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            store = Store(path, readonly=True)
        except Exception as err:  # noqa: BLE001 - reported
            errors.append(f"open: {type(err).__name__}: {err}")
            time.sleep(0.01)
            continue
        opens += 1
        try:
            runs = store.runs()
            if len(runs) < max_runs:
                errors.append(f"runs went from {max_runs} to {len(runs)}")
            max_runs = max(max_runs, len(runs))
            for run in runs[:5]:
                steps = store.steps(run.tenant, run.scope, run.run_id)
                for step in steps:
                    for attempt in step.attempts:
                        for ref in attempt.payload_refs():
                            if store.blob(run.tenant, run.scope, ref.digest) is None:
                                errors.append(f"{run.run_id}: a step refers to a missing blob")
                store.spans(run.tenant, run.scope, run.run_id)
                reads += 1
            store.stats()
        except Exception as err:  # noqa: BLE001 - reported
            errors.append(f"read: {type(err).__name__}: {err}")
        finally:
            store.close()
    out.put({"opens": opens, "reads": reads, "max_runs": max_runs, "errors": errors[:10], "pid": os.getpid()})


def test_reader_processes_read_while_the_collector_writes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    collector = CollectorProcess(write_config(tmp_path, data))
    sender = SteadySender(threads=2).start()
    ctx = multiprocessing.get_context("spawn")
    try:
        sender.url = collector.start()
        while not sender.acked_snapshot():
            time.sleep(0.02)
        queue: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
        procs = [ctx.Process(target=_reader, args=(str(data), READ_SECONDS, queue)) for _ in range(READERS)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        sender.stop_new()
        sender.drain(timeout=60)
        assert collector.terminate() == 0
    finally:
        sender.stop()
        if collector.alive():
            collector.kill()
    for r in results:
        assert not r["errors"], r
        assert r["opens"] > 0 and r["reads"] > 0
    opens = sum(r["opens"] for r in results)
    assert opens > 200
    contents = read_everything(data)
    assert contents.batches() == sender.sent()
    print(f"\nreaders: {READERS} reader processes opened the store {opens} times and read "
          f"{sum(r['reads'] for r in results)} runs in {READ_SECONDS:g}s while the collector stored "
          f"{len(sender.sent())} batches; no errors")


_HOLDER = textwrap.dedent("""
    import sys, time
    from tracetape.collector.store import Store
    store = Store(sys.argv[1], readonly=True)
    held = [store.env.begin() for _ in range(int(sys.argv[2]))]  # each read transaction holds a reader slot
    print("ready", flush=True)
    time.sleep(120)
""")


_SHORT_LIVED = textwrap.dedent("""
    import sys
    from tracetape.collector.store import Store
    for _ in range(int(sys.argv[2])):
        reader = Store(sys.argv[1], readonly=True)
        assert reader.runs()
        reader.close()
    print("ok", flush=True)
""")


def _reader_pids(env: lmdb.Environment) -> set[int]:
    """Pids in the LMDB reader table (`env.readers()` does not clear dead ones; `reader_check` does)."""
    pids = set()
    for line in env.readers().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            pids.add(int(fields[0]))
    return pids


def test_reader_slots_never_run_out_and_killed_readers_are_cleared(tmp_path: Path) -> None:
    path = tmp_path / "db"
    max_readers = 8
    writer = Store(path, max_readers=max_readers)  # the first opener sizes the reader table for everyone
    stop = threading.Event()
    written = [0]

    def write_loop() -> None:
        n = 0
        while not stop.is_set():
            body, _ = numbered_batch(n)
            writer.apply([ingest.prepare(ExportTraceServiceRequest.FromString(body), writer)])
            n += 1
            written[0] = n

    thread = threading.Thread(target=write_loop, daemon=True)
    thread.start()
    killed: list[int] = []
    rounds = 8
    per_holder = 5  # two holders' worth of stale slots would already exceed max_readers
    try:
        for _ in range(rounds):
            holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(per_holder)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert holder.stdout is not None
            line = holder.stdout.readline()
            assert line.strip() == "ready", holder.stderr.read() if holder.stderr else ""
            assert holder.pid in _reader_pids(writer.env)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
            holder.stdout.close()
            holder.stderr.close()  # type: ignore[union-attr]
            killed.append(holder.pid)
            assert holder.pid in _reader_pids(writer.env)  # its slots are still taken: stale
        # Many more short-lived readers than there are slots, each one a full open/read/close; the
        # first open's reader_check clears what the killed processes left.
        done = subprocess.run([sys.executable, "-c", _SHORT_LIVED, str(path), str(max_readers * 20)],
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "ok", done.stderr[-2000:]
        assert not set(killed) & _reader_pids(writer.env), "slots of killed readers are still taken"
    finally:
        stop.set()
        thread.join(30)
        writer.close()
    assert rounds * per_holder > max_readers
    print(f"\nreader slots: max_readers={max_readers}; {rounds} reader processes holding {per_holder} slots each "
          f"SIGKILLed ({rounds * per_holder} stale slots over time) and {max_readers * 20} short-lived readers "
          f"while {written[0]} batches were written; every open succeeded")
