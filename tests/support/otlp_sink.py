"""A minimal OTLP/HTTP receiver for tests: `POST /v1/traces` (protobuf, optionally gzip), spans kept in memory.

It runs an aiohttp server on 127.0.0.1 (port chosen by the OS) in its own thread. Every request is decoded
as `ExportTraceServiceRequest`; its spans become `SinkSpan`s (ids as hex, attributes as Python values,
bytes attributes as bytes) and each request's body size is kept in `request_sizes`. The answer is an empty
`ExportTraceServiceResponse` (200), or `fail_status` while that is set.

    with OtlpSink() as sink:
        ... export to sink.endpoint ...
        spans = sink.wait_for(lambda spans: any(s.name == "x" for s in spans))
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

MAX_BODY = 64 * 1024 * 1024


@dataclass
class SinkSpan:
    """One received span."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status_code: int
    status_message: str
    events: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.attributes.get(key, default)


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP AnyValue."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def decode_request(body: bytes) -> list[SinkSpan]:
    """The spans of one `ExportTraceServiceRequest`."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[SinkSpan] = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    SinkSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                        resource=resource,
                        scope=scope_spans.scope.name,
                        status_code=span.status.code,
                        status_message=span.status.message,
                        events=[e.name for e in span.events],
                    )
                )
    return spans


class OtlpSink:
    """The receiver; see the module docstring."""

    def __init__(self) -> None:
        self.spans_received: list[SinkSpan] = []
        self.request_sizes: list[int] = []
        self.fail_status: int | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """The OTLP/HTTP base URL (`TRACETAPE_ENDPOINT`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[SinkSpan]:
        with self._lock:
            return list(self.spans_received)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if self.fail_status is not None:
            return web.Response(status=self.fail_status)
        if "protobuf" not in request.headers.get("Content-Type", ""):
            return web.Response(status=415, text="protobuf only")
        spans = decode_request(body)
        with self._changed:
            self.request_sizes.append(len(body))
            self.spans_received.extend(spans)
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def start(self) -> OtlpSink:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=MAX_BODY)
            app.router.add_post("/v1/traces", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server = site._server  # noqa: SLF001 - the only way to learn the port the OS picked
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="otlp-sink", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the OTLP sink did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(
        self, predicate: Callable[[list[SinkSpan]], bool], timeout: float = 15.0
    ) -> list[SinkSpan]:
        """The spans received, once `predicate(spans)` holds; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self.spans_received)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({s.name for s in self.spans_received})
                    raise AssertionError(f"timed out waiting for spans; received {names}")
                self._changed.wait(remaining)
            return list(self.spans_received)

    def by_run(self, run_id: str) -> list[SinkSpan]:
        from tracetape.instrumentation import contract

        return [s for s in self.spans if s.get(contract.RUN_ID) == run_id]
