"""Pytest fixtures for recording against the stand-in: import them into a test module (or a conftest).

    from tests.support.fixtures import recorder, standin, other_standin  # noqa: F401

- `standin`: one stand-in provider server for the session (a real socket on 127.0.0.1), reset per test
  by `recorder`.
- `other_standin`: a second server whose host is NOT in `http_hosts` (for "not recorded" checks).
- `recorder`: a real OTel SDK `TracerProvider` with an `InMemorySpanExporter` (`SimpleSpanProcessor`), the run
  activated in `runtime` with `http_hosts = {standin.hostport}`, and the httpx/requests/aiohttp hooks installed;
  everything undone afterwards.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.standin import Standin
from tracetape.instrumentation import aiohttp_hook, contract, httpx_hook, requests_hook, runtime, steps

RUN_ID = "run-capture-test"
TENANT = "tenant-test"
SCOPE = "scope-test"


@dataclass
class Recorder:
    exporter: InMemorySpanExporter
    provider: TracerProvider
    context: runtime.RunContext

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def steps(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if (s.attributes or {}).get(contract.SPAN_KIND) == contract.SPAN_KIND_STEP]

    def wait_steps(self, n: int, timeout: float = 5.0) -> list[ReadableSpan]:
        """The step spans once at least `n` have ended (collecting garbage while waiting)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.steps()
            if len(found) >= n or time.monotonic() > deadline:
                return found
            gc.collect()
            time.sleep(0.005)

    def clear(self) -> None:
        self.exporter.clear()


@pytest.fixture(scope="session")
def standin() -> Iterator[Standin]:
    with Standin() as server:
        yield server


@pytest.fixture(scope="session")
def other_standin() -> Iterator[Standin]:
    with Standin() as server:
        yield server


@pytest.fixture
def recorder(standin: Standin) -> Iterator[Recorder]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    context = runtime.RunContext(
        run_id=RUN_ID, tenant=TENANT, scope=SCOPE, http_hosts=frozenset({standin.hostport})
    )
    standin.reset()
    steps.reset_retry_groups()
    runtime.activate(context, provider.get_tracer("tracetape"))
    httpx_hook.instrument()
    requests_hook.instrument()
    aiohttp_hook.instrument()
    try:
        yield Recorder(exporter, provider, context)
    finally:
        aiohttp_hook.uninstrument()
        requests_hook.uninstrument()
        httpx_hook.uninstrument()
        runtime.deactivate()
        provider.shutdown()
