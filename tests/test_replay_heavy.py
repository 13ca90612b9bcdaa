"""Huge request bodies (bug R5): their envelope, redaction and miss diagnostics are computed in a bounded pool of
worker processes (`replayer/heavy.py`) with exactly the answers the event loop would compute, over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.replay_support import api
from tests.replay_support import open_session as open_http_session
from tests.replay_support import start_replayer
from tests.replay_support import standin, store  # noqa: F401 - fixtures
from tests.support.reliability import descendants, survivors
from tests.support.spans import Agent, chat_request
from tests.support.standin import Standin
from tracetape.collector import ingest
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c
from tracetape.instrumentation import redaction
from tracetape.replayer import heavy
from tracetape.replayer.envelopes import received_envelope
from tracetape.replayer.errors import ApiError

SECRET = "sk-" + "Z" * 30


def _fill(store: Store, bodies: list[bytes]) -> None:
    agent = Agent(run_id="run-h", tenant="default", scope="default")
    for i, body in enumerate(bodies):
        agent.model_step(i, body=body, response=json.dumps({"id": f"r{i}"}).encode())
    agent.run_span()
    batch = ingest.prepare(agent.request(), store)
    assert batch.rejected == 0, batch.errors
    store.apply([batch])
    agent.shutdown()


def _inline(body: bytes, headers: list[tuple[str, str]] | None = None) -> tuple[str, bytes]:
    envelope, redacted = received_envelope("POST", "/v1/chat/completions", "", headers or [], body)
    return c.envelope_hash(envelope), redacted


def test_a_worker_computes_what_the_event_loop_would(tmp_path: Path) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"x {SECRET} private-123456"}]}).encode()
    headers = [("anthropic-version", "2023-06-01")]
    saved = redaction._RULES  # noqa: SLF001 - restored below (the worker must follow the parent's rules)
    redaction.configure(redaction.DEFAULT_RULES + (redaction.Rule(r"private-[0-9]{6}"),))
    try:
        expected_hash, expected_redacted = _inline(body, headers)
        rules = heavy.current_rules()

        async def run() -> tuple[Any, Any]:
            pool = heavy.HeavyPool(workers=1)
            try:
                got = await pool.run(len(body), heavy.job_envelope, rules, "POST", "/v1/chat/completions", "",
                                     headers, body, True)
                masked = await pool.run(len(body), heavy.job_redact, rules, body)
                return got, masked
            finally:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

        (env_hash, redacted), masked = asyncio.run(run())
    finally:
        redaction._RULES = saved  # noqa: SLF001
    assert env_hash == expected_hash and redacted == expected_redacted == masked
    assert SECRET.encode() not in redacted and b"priv**********" in redacted  # the extra rule applied in the worker too


def test_past_the_budget_a_body_is_refused_with_retry_after() -> None:
    async def run() -> tuple[int, str | None, int]:
        pool = heavy.HeavyPool(workers=1, budget_bytes=100)
        try:
            body = b"[" + b"1," * 30 + b"1]"
            first = asyncio.ensure_future(pool.run(60, heavy.job_redact, None, body))
            await asyncio.sleep(0)  # admitted, waiting for its worker
            with pytest.raises(ApiError) as refused:
                await pool.run(60, heavy.job_redact, None, body)
            assert await first is None  # nothing to mask
            alone = await pool.run(10_000, heavy.job_redact, None, body)  # bigger than the budget, but alone
            assert alone is None
            return refused.value.status, (refused.value.headers or {}).get("Retry-After"), pool.admitted
        finally:
            pool.shutdown()

    status, retry_after, admitted = asyncio.run(run())
    assert status == 503 and retry_after == str(heavy.RETRY_AFTER_S) and admitted == 0


def _die(*_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_costs_its_request_a_503_and_the_next_one_gets_a_new_worker() -> None:
    async def run() -> tuple[ApiError, Any]:
        pool = heavy.HeavyPool(workers=1)
        try:
            with pytest.raises(ApiError) as failed:
                await pool.run(10, _die)
            return failed.value, await pool.run(10, heavy.job_redact, None, b'{"a": 1}')
        finally:
            pool.shutdown()

    failed, after = asyncio.run(run())
    assert (failed.status, failed.body["error"], (failed.headers or {}).get("Retry-After")) == (503, "busy", str(heavy.RETRY_AFTER_S))
    assert after is None  # answered by a fresh worker (nothing to mask)


def _post(url: str, body: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_heavy_body_gets_the_answers_a_light_one_gets(store: Store, standin: Standin,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests through the proxy, processed inline and then (threshold lowered to 1 byte) in the
    worker: identical hits and identical 409 diagnostics, a miss's diff included."""
    bodies = [chat_request(f"question {i}") for i in range(3)]
    _fill(store, bodies)
    changed = json.dumps(json.loads(chat_request("question 2, changed")), indent=1).encode()
    replayer = start_replayer(store, standin)
    try:
        answers: dict[str, list[tuple[int, Any]]] = {}
        for mode, threshold in (("inline", heavy.HEAVY_BYTES), ("worker", 1)):
            monkeypatch.setattr(heavy, "HEAVY_BYTES", threshold)
            sid = open_http_session(replayer, "run-h", record=False)["session_id"]
            url = f"{replayer.url}/s/{sid}/openai/chat/completions"
            got = [_post(url, b) for b in (bodies[0], bodies[1], changed, bodies[0])]
            for status, body in got:
                if isinstance(body, dict):
                    body.pop("session_id", None)
            answers[mode] = got
        assert answers["inline"] == answers["worker"]
        statuses = [status for status, _ in answers["worker"]]
        assert statuses == [200, 200, 409, 409]  # hit, hit, miss (diff), exhausted
        miss = answers["worker"][2][1]
        assert miss["error"] == "replay_miss" and miss["diff"][0]["path"] == "messages[0].content"
        assert answers["worker"][3][1]["error"] == "replay_exhausted"
    finally:
        replayer.stop()


def test_killing_the_replayer_leaves_no_worker_behind(store: Store, tmp_path: Path) -> None:
    """A heavy miss starts the worker pool in a real `tracetape replayer`; SIGKILL the replayer, and its
    workers exit too."""
    _fill(store, [chat_request("question 0")])
    huge = chat_request("y" * (heavy.HEAVY_BYTES + 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracetape.cli", "replayer", "--data", str(store.path), "--port", "0", "--no-record",
         "--upstream", "openai=http://127.0.0.1:9/v1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        listening = re.search(r"listening on (http://127\.0\.0\.1:\d+)", proc.stdout.readline())
        assert listening, "the replayer did not start"
        url = listening.group(1)
        status, session = api(f"{url}/v1/replay/sessions", "POST", {"run_id": "run-h", "record": False})
        assert status == 201, session
        status, answer = _post(f"{url}/s/{session['session_id']}/openai/chat/completions", huge)
        assert (status, answer["error"]) == (409, "replay_miss")  # diagnosed in a worker process
        workers = descendants(proc.pid)
        assert workers, "no worker process was started"
    finally:
        proc.kill()
        proc.wait()
    assert survivors(workers) == {}


def test_a_recording_session_records_a_heavy_live_request_with_its_model(store: Store, standin: Standin) -> None:
    """A session that records reads the model of a huge body it forwards without parsing the whole body on the
    event loop (`contract.request_model`): the recorded step is the one a small body gives, model and name."""
    _fill(store, [chat_request("question 0")])
    exporter = InMemorySpanExporter()
    replayer = start_replayer(store, standin, exporter=exporter)
    try:
        sid = open_http_session(replayer, "run-h", mode="live")["session_id"]
        huge = json.dumps({"model": "gpt-heavy", "input": [0] * (heavy.HEAVY_BYTES // 2),
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        assert len(huge) >= heavy.HEAVY_BYTES
        status, _ = _post(f"{replayer.url}/s/{sid}/openai/chat/completions", huge)
        assert status == 200 and standin.last().body == huge  # forwarded live, as sent
        api(f"{replayer.url}/v1/replay/sessions/{sid}", "DELETE")  # ends the replay run
    finally:
        replayer.stop()
    steps = [s for s in exporter.get_finished_spans() if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]
    assert len(steps) == 1
    step = steps[0]
    assert step.attributes[c.GEN_AI_REQUEST_MODEL] == "gpt-heavy" and step.name == "chat gpt-heavy"
    assert step.attributes[c.REQUEST_BODY] == huge
