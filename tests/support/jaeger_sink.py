"""A stand-in for Jaeger's OTLP receivers: keeps every span it is sent, can be made slow, failing or down.

`JaegerSink` serves OTLP/HTTP (`POST /v1/traces`, protobuf or JSON, gzip) on 127.0.0.1 and, optionally,
OTLP/gRPC. It decodes with the collector's own decoder, so what it keeps is exactly what arrived. Set
`fail_status` (and `retry_after`) to answer errors, `delay` to answer slowly; `stop()` then `start()`
brings it back on the same ports ("down then up"). Like Jaeger/Badger, it can refuse a span with an
attribute over `max_attribute_bytes` (400).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
from aiohttp import web
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from tracetape.collector import otlp_decode as od


class JaegerSink:
    """An in-process OTLP sink on 127.0.0.1. Use inside a running event loop."""

    def __init__(self, *, grpc_enabled: bool = False, max_attribute_bytes: int | None = None) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        self.delay: float = 0.0
        self.max_attribute_bytes = max_attribute_bytes
        self.http_port = 0
        self.grpc_port = 0
        self.http_hits = 0
        self.grpc_enabled = grpc_enabled
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None
        self.received = asyncio.Event()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> JaegerSink:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._http_export)
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.http_port, reuse_address=True)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        if self.grpc_enabled:
            self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcServicer(self), self._grpc)
            self.grpc_port = self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
            await self._grpc.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._grpc is not None:
            await self._grpc.stop(0)
            self._grpc = None

    async def __aenter__(self) -> JaegerSink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what arrived -----------------------------------------------------------------------------

    def spans(self) -> Iterator[tuple[ResourceSpans, Span]]:
        for request in self.requests:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        yield rs, span

    def span_count(self) -> int:
        return sum(1 for _ in self.spans())

    async def wait_for_spans(self, n: int, timeout: float = 15.0) -> None:
        """Wait until at least `n` spans arrived (AssertionError with the count on timeout)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.span_count() < n:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"the sink received {self.span_count()} spans, expected {n}")
            self.received.clear()
            try:
                await asyncio.wait_for(self.received.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass

    # --- handlers ---------------------------------------------------------------------------------

    def _accept(self, request: ExportTraceServiceRequest) -> str | None:
        """Keep the request, or say why Jaeger would refuse it."""
        if self.max_attribute_bytes is not None:
            for _, span in _iter_spans(request):
                for kv in span.attributes:
                    if _value_size(kv.value) > self.max_attribute_bytes:
                        return f"attribute {kv.key} is over {self.max_attribute_bytes} bytes"
        self.requests.append(request)
        self.received.set()
        return None

    async def _http_export(self, request: web.Request) -> web.Response:
        self.http_hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            body = status_pb2.Status(code=14, message="sink says no").SerializeToString()
            return web.Response(status=self.fail_status, body=body, headers=headers,
                                content_type="application/x-protobuf")
        raw = await request.read()
        try:
            decoded = od.decode_request(raw, request.headers.get("Content-Type"),
                                        request.headers.get("Content-Encoding"), max_size=256 * 1024 * 1024)
        except od.DecodeFailure as err:
            return web.Response(status=err.status, text=err.message)
        refusal = self._accept(decoded.request)
        if refusal is not None:
            return web.Response(status=400, body=status_pb2.Status(code=3, message=refusal).SerializeToString(),
                                content_type="application/x-protobuf")
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


class _GrpcServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: JaegerSink) -> None:
        self.sink = sink

    async def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        if self.sink.fail_status is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "sink says no")
        refusal = self.sink._accept(request)  # noqa: SLF001
        if refusal is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        return ExportTraceServiceResponse()


def _iter_spans(request: ExportTraceServiceRequest) -> Iterator[tuple[ResourceSpans, Span]]:
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                yield rs, span


def _value_size(value: AnyValue) -> int:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return len(value.string_value.encode())
    if kind == "bytes_value":
        return len(value.bytes_value)
    return value.ByteSize()


def attributes(span: Span) -> dict[str, Any]:
    """A span's attributes as plain Python values."""
    from tracetape.collector.ingest import value_of

    return {kv.key: value_of(kv.value) for kv in span.attributes}
