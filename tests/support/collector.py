"""Running a real collector in the test's own event loop, on free 127.0.0.1 ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from tracetape.collector import config as cfg
from tracetape.collector.service import CollectorService

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test scenario with a hard time limit (no pytest-timeout here)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def collector_config(
    data: Path,
    *,
    forward: dict[str, Any] | None = None,
    slim_cap: int = 16384,
    max_body: int | str = 64 * 1024 * 1024,
    max_grpc_mib: int = 64,
    max_pending: int | str = "256MiB",
) -> cfg.CollectorConfig:
    """Receivers on port 0, the store in `data`; `forward` = {exporter id: exporter body} adds traces/fwd."""
    doc: dict[str, Any] = {
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": "127.0.0.1:0", "max_recv_msg_size_mib": max_grpc_mib},
            "http": {"endpoint": "127.0.0.1:0", "max_request_body_size": max_body},
        }}},
        "processors": {"tracetape_slim": {"max_attribute_bytes": slim_cap}},
        "exporters": {"tracetape": {"path": str(data), "max_pending_bytes": max_pending}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
    }
    if forward:
        doc["exporters"].update(forward)
        doc["service"]["pipelines"]["traces/fwd"] = {
            "receivers": ["otlp"], "processors": ["tracetape_slim"], "exporters": list(forward),
        }
    return cfg.parse(doc)


def fast_retry() -> dict[str, Any]:
    """A `retry_on_failure` block that retries quickly, for tests."""
    return {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": 0}


@asynccontextmanager
async def running_collector(config: cfg.CollectorConfig) -> AsyncIterator[CollectorService]:
    service = CollectorService(config)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def http_url(service: CollectorService) -> str:
    return service.addresses["http"][0]


def grpc_endpoint(service: CollectorService) -> str:
    return service.addresses["grpc"][0]
