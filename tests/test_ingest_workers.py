"""Ingest in worker processes: same batches as in-process, malformed input refused, dead workers replaced,
no workers left behind when the collector is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.reliability import descendants, survivors
from tests.support.spans import Agent, chat_request
from tracetape.collector import ingest, otlp_decode
from tracetape.collector.ingest_workers import IngestWorkers
from tracetape.collector.store import Store, encode_batch
from tracetape.collector.writer import StoreWriter


def _request_bytes(run_id: str, steps: int = 5) -> bytes:
    agent = Agent(run_id=run_id)
    for i in range(steps):
        agent.model_step(i, chat_request(f"question {i} of {run_id}"))
    agent.run_span()
    return agent.request().SerializeToString()


def test_a_worker_prepares_the_same_batch_as_the_collector_process(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    payload = _request_bytes("run-same")
    local = encode_batch(ingest.prepare_encoded(payload, store, None, None))

    async def scenario() -> bytes:
        workers = IngestWorkers(store.path, 1)
        await workers.start()
        try:
            return encode_batch(await workers.prepare(payload, None, None))
        finally:
            await asyncio.to_thread(workers.close)

    assert asyncio.run(scenario()) == local
    store.close()


def test_malformed_protobuf_is_undecodable_from_a_worker(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")

    async def scenario() -> None:
        workers = IngestWorkers(store.path, 1)
        await workers.start()
        try:
            with pytest.raises(otlp_decode.Undecodable):
                await workers.prepare(b"\x0a\xff\xff\xff\xff\x0f", None, None)
            batch = await workers.prepare(_request_bytes("run-after"), None, None)  # the worker still serves
            assert len(batch.spans) == 6 and batch.rejected == 0
        finally:
            await asyncio.to_thread(workers.close)

    asyncio.run(scenario())
    store.close()


def test_a_killed_worker_is_replaced_and_nothing_is_lost(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")

    async def scenario() -> None:
        writer = StoreWriter(store, prepare_processes=2)
        await writer.start()
        try:
            await writer.submit(_request_bytes("run-0"))
            workers = writer._workers
            assert workers is not None
            worker = await workers.pool.run(os.getpid)
            assert worker in descendants(os.getpid())
            os.kill(worker, signal.SIGKILL)
            results = await asyncio.gather(*(writer.submit(_request_bytes(f"run-{i}")) for i in range(1, 9)))
            assert [r.accepted for r in results] == [6] * 8
            assert workers.restarts == 1
        finally:
            await writer.close()

    asyncio.run(scenario())
    assert sorted(r.run_id for r in store.runs()) == sorted(f"run-{i}" for i in range(9))
    assert all(r.step_count == 5 for r in store.runs())
    store.close()


def test_killing_the_collector_leaves_no_worker_behind(tmp_path: Path) -> None:
    config = tmp_path / "collector.yaml"
    config.write_text(json.dumps({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:0"}}}},
        "exporters": {"tracetape": {"path": str(tmp_path / "db"), "ingest_processes": 2}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "tracetape.cli", "collector", "--config", str(config), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline(), "the collector did not start"
        workers = descendants(proc.pid)
        assert len(workers) >= 2  # the fork server and its workers (and the resource tracker)
    finally:
        proc.kill()
        proc.wait()
    assert survivors(workers) == {}
