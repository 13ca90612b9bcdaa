"""Issue 5, item 1: crash consistency. SIGKILL the collector subprocess at random moments under steady
OTLP/HTTP load; after each kill the store opens clean and holds every acknowledged span; the sender
retries what was not acknowledged, so in the end spans sent = spans stored, none twice.

Item 2 (the part tests/test_forwarding.py lacks): the forwarding sink down while traffic flows and the
collector restarted mid-outage (SIGKILLed once, stopped cleanly once) → the sink ends up holding exactly
the stored set.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

from tests.support.jaeger_sink import JaegerSink
from tests.support.reliability import CollectorProcess, SteadySender, read_everything, write_config

CYCLES = int(os.environ.get("TRACETAPE_CRASH_CYCLES", "20"))
SPANS_PER_BATCH = 4  # 3 model steps + the run span


def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("TRACETAPE_CRASH_SEED", "5")))
    data = tmp_path / "data"
    collector = CollectorProcess(write_config(tmp_path, data))
    sender = SteadySender(threads=3).start()
    checked_acked = 0
    kills_before_ready = 0
    try:
        for cycle in range(CYCLES):
            collector.spawn()
            if cycle % 5 == 4:
                # Now and then kill it while it is still starting (opening the store, binding).
                time.sleep(rng.uniform(0.0, 0.8))
                kills_before_ready += 1
            else:
                sender.url = collector.wait_ready()
                time.sleep(rng.uniform(0.05, 0.6))
            collector.kill()
            sender.url = None
            acked = sender.acked_snapshot()
            if not (data / "data.mdb").exists():
                continue
            contents = read_everything(data, steps_per_run=3)  # Store(path) opens clean, everything reads
            missing = sender.span_ids(acked) - set(contents.span_ids)
            assert not missing, f"cycle {cycle}: {len(missing)} acknowledged spans lost"
            assert all(count == 1 for count in contents.span_ids.values())
            assert set(contents.span_ids) <= sender.span_ids(sender.sent())  # nothing invented
            checked_acked = len(acked)
        assert checked_acked > 0, "nothing was ever acknowledged; the load did not reach the collector"

        # The agent side: everything not acknowledged is retried against a restarted collector.
        sender.stop_new()
        sender.url = collector.start()
        sender.drain(timeout=60)
        assert collector.terminate() == 0
    finally:
        sender.stop()
        if collector.alive():
            collector.kill()

    sent = sender.sent()
    contents = read_everything(data, steps_per_run=3)
    assert contents.batches() == sent
    assert set(contents.span_ids) == sender.span_ids(sent)
    assert all(count == 1 for count in contents.span_ids.values()), "a span is stored twice"
    assert contents.stats["spans"] == len(sent) * SPANS_PER_BATCH
    assert contents.stats["steps"] == len(sent) * 3
    for run in contents.runs.values():
        assert (run.status, run.span_count, run.step_count) == ("completed", 4, 3), run
    print(f"\ncrash: {CYCLES} SIGKILL cycles ({kills_before_ready} while starting), {len(sent)} batches / "
          f"{len(sent) * SPANS_PER_BATCH} spans sent, {contents.stats['spans']} stored, {sender.posts} POSTs, "
          f"outcomes {dict(sender.outcomes)}")


# --- item 2: outbox across an outage and collector restarts -----------------------------------------------


class _SinkThread:
    """A JaegerSink on its own loop in a thread, so it can go down and come back on the same port."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink = JaegerSink()

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)  # type: ignore[arg-type]

    def span_ids(self) -> list[bytes]:
        async def collect() -> list[bytes]:
            return [span.span_id for _, span in self.sink.spans()]
        return self.call(collect())  # type: ignore[return-value]

    def close(self) -> None:
        self.call(self.sink.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_sink_down_with_traffic_and_collector_restarts_then_sink_holds_exactly_the_stored_set(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sink = _SinkThread()
    sink.call(sink.sink.start())
    sink.call(sink.sink.stop())  # down: its port is known, nothing listens
    collector = CollectorProcess(write_config(tmp_path, data, forward_url=sink.sink.http_url))
    sender = SteadySender(threads=2, pause=0.01).start()
    try:
        sender.url = collector.start()
        time.sleep(1.0)
        collector.kill()  # mid-outage, unclean
        sender.url = collector.start()
        time.sleep(1.0)
        assert collector.terminate() == 0  # mid-outage, clean
        sender.url = collector.start()
        time.sleep(0.5)
        sender.stop_new()
        sender.drain(timeout=60)
        stored = read_everything(data, readonly=True)
        assert stored.stats["outbox"] == stored.stats["spans"] > 0  # nothing delivered yet, all queued
        sink.call(sink.sink.start())  # the sink comes back, same port
        deadline = time.monotonic() + 60
        while len(sink.span_ids()) < stored.stats["spans"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # anything extra (a duplicate) would arrive now
        assert collector.terminate() == 0
        delivered = sink.span_ids()
    finally:
        sender.stop()
        if collector.alive():
            collector.kill()
        sink.close()

    contents = read_everything(data)
    assert set(contents.span_ids) == sender.span_ids(sender.sent())
    assert sorted(delivered) == sorted(contents.span_ids), (
        f"sink holds {len(delivered)} spans ({len(set(delivered))} distinct), store {len(contents.span_ids)}")
    assert contents.stats["outbox"] == 0
    print(f"\noutbox: {len(sender.sent())} batches, {len(contents.span_ids)} spans stored and delivered "
          f"exactly once across an outage with 1 SIGKILL + 1 clean restart")
