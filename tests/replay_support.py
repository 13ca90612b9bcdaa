"""Helpers for the replay tests: record real SDK traffic into a store, run a replayer, call its API.

Recording goes through the real instrumentation hooks (httpx2 transport hook, `runtime`), the real OTel SDK
and OTLP encoder, then `collector.ingest.prepare` + `Store.apply` — the collector's own write path.
"""

from __future__ import annotations

import gc
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.standin import Standin
from tracetape.collector import ingest
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c
from tracetape.instrumentation import httpx_hook, runtime, steps
from tracetape.instrumentation.provider import RunAttributesProcessor
from tracetape.replayer.profiles import build_profiles
from tracetape.replayer.service import ReplayerThread

TENANT = "default"
SCOPE = "default"
API_KEY = "sk-test-abcdefghijklmnopqrstuvwxyz012345"


@pytest.fixture(scope="module")
def standin() -> Iterator[Standin]:
    """A stand-in provider per test module (import this fixture into the module)."""
    with Standin() as server:
        yield server


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store in the test's temporary directory."""
    s = Store(tmp_path / "db")
    yield s
    s.close()


def write_spans(store: Store, spans: list[ReadableSpan]) -> None:
    batch = ingest.prepare(encode_spans(spans), store)
    assert batch.rejected == 0, batch.errors
    store.apply([batch])


@contextmanager
def recording(store: Store, run_id: str, *, outcome: str = c.OUTCOME_COMPLETED, exit_code: int = 0,
              end: bool = True) -> Iterator[InMemorySpanExporter]:
    """Record what the block does through the SDKs into `store` as run `run_id` (ended unless `end=False`)."""
    exporter = InMemorySpanExporter()
    base = {c.RUN_ID: run_id, c.TENANT: TENANT, c.SCOPE: SCOPE}
    provider = TracerProvider(resource=Resource.create({"service.name": "agent-under-test"}))
    provider.add_span_processor(RunAttributesProcessor(base))  # as the real recorder stamps every span
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tracetape")
    start = time.time_ns()
    run_span = tracer.start_span("invoke_agent agent", start_time=start, attributes={
        **base, c.SPAN_KIND: c.SPAN_KIND_RUN, c.RUN_COMMAND: ["python", "agent.py"],
        c.RUN_CANON_PROFILE: c.CANON_PROFILE, c.GEN_AI_AGENT_NAME: "agent"})
    parent = trace.set_span_in_context(run_span)
    tracer.start_span("tracetape.run.start", context=parent, start_time=start,
                      attributes={**base, c.SPAN_KIND: c.SPAN_KIND_RUN_START}).end(end_time=start)
    steps.reset_retry_groups()
    runtime.activate(runtime.RunContext(run_id=run_id, tenant=TENANT, scope=SCOPE), tracer)
    httpx_hook.instrument()
    try:
        with trace.use_span(run_span, end_on_exit=False):  # steps nest under the run, in its trace
            yield exporter
    finally:
        gc.collect()
        httpx_hook.uninstrument()
        runtime.deactivate()
    if end:
        run_span.set_attributes({c.RUN_OUTCOME: outcome, c.RUN_EXIT_CODE: exit_code})
        run_span.end()
    write_spans(store, list(exporter.get_finished_spans()))
    provider.shutdown()


def start_replayer(store: Store, standin: Standin, exporter: InMemorySpanExporter | None = None,
                   **kwargs: Any) -> ReplayerThread:
    profiles = build_profiles([f"openai={standin.openai_base_url}", f"anthropic={standin.anthropic_base_url}"])
    return ReplayerThread(store=store, port=0, profiles=profiles, exporter=exporter,
                          record=exporter is not None, **kwargs).start()


def api(url: str, method: str = "GET", body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one call to the replayer's API."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def open_session(replayer: ReplayerThread, run_id: str, **options: Any) -> dict[str, Any]:
    status, body = api(f"{replayer.url}/v1/replay/sessions", "POST", {"run_id": run_id, **options})
    assert status == 201, body
    return body
