"""The size-splitting OTLP/HTTP exporter, against a real receiver on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.otlp_sink import OtlpSink
from tracetape.instrumentation import contract, provider
from tracetape.instrumentation.config import RecorderConfig
from tracetape.instrumentation.exporter import SizeSplittingExporter, estimate_span_bytes, split_batches

KB = 1024


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    with OtlpSink() as s:
        yield s


def make_spans(sizes: list[int]) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(memory))
    tracer = tp.get_tracer("t")
    for i, size in enumerate(sizes):
        span = tracer.start_span(f"s{i}")
        span.set_attribute(contract.RESPONSE_BODY, bytes([65 + i % 26]) * size)
        span.set_attribute(contract.REQUEST_HEADERS, "é" * 10)
        span.end()
    return list(memory.get_finished_spans())


def test_estimate_bounds_the_encoded_size(sink: OtlpSink) -> None:
    spans = make_spans([0, 10, 5000, 200 * KB])
    for span in spans:
        exporter = SizeSplittingExporter.otlp_http(sink.endpoint, max_bytes=1 << 30)
        before = len(sink.request_sizes)
        assert exporter.export([span]) is SpanExportResult.SUCCESS
        actual = sink.request_sizes[before]
        resource_bytes = 1024  # the resource and scope, counted once per request
        assert actual <= estimate_span_bytes(span) + resource_bytes
        assert estimate_span_bytes(span) <= actual + 400


def test_split_by_bytes_and_by_count() -> None:
    spans = make_spans([100 * KB] * 10)
    batches = list(split_batches(spans, max_bytes=350 * KB, max_spans=512))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    assert [s for b in batches for s in b] == spans
    small = make_spans([10] * 7)
    assert [len(b) for b in split_batches(small, max_bytes=1 << 20, max_spans=3)] == [3, 3, 1]
    assert list(split_batches([], max_bytes=10)) == []


def test_large_payloads_arrive_in_requests_under_the_limit(sink: OtlpSink) -> None:
    config = RecorderConfig(run_id="run-split", endpoint=sink.endpoint, max_export_bytes=300 * KB)
    recorder = provider.build_recorder(config, service_name="split-test")
    for i in range(12):
        with recorder.tracer.start_as_current_span(f"payload {i}") as span:
            span.set_attribute(contract.REQUEST_BODY, b"x" * (100 * KB))
    with recorder.tracer.start_as_current_span("huge") as span:
        span.set_attribute(contract.RESPONSE_BODY, b"y" * (1024 * KB))  # over the limit on its own
    recorder.shutdown()
    spans = sink.wait_for(lambda s: len(s) == 13)
    assert all(s.get(contract.RUN_ID) == "run-split" for s in spans)
    assert len(sink.request_sizes) >= 5
    over = [n for n in sink.request_sizes if n > 300 * KB]
    assert len(over) == 1 and over[0] > 1024 * KB  # only the single huge span, sent alone
    huge = next(s for s in spans if s.name == "huge")
    assert huge.get(contract.RESPONSE_BODY) == b"y" * (1024 * KB)


def test_unreachable_endpoint_drops_fast_and_warns_once() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    warnings: list[tuple[str, str]] = []
    try:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1/traces"
        exporter = SizeSplittingExporter(
            OTLPSpanExporter(endpoint=url), url=url, max_bytes=1 << 20,
            on_unreachable=lambda u, e: warnings.append((u, e)),
        )
        spans = make_spans([10, 10])
        started = time.monotonic()
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert exporter.export(spans) is SpanExportResult.FAILURE
        assert time.monotonic() - started < 3
    finally:
        closed.close()
    assert len(warnings) == 1 and warnings[0][0] == url
    assert exporter.dropped_spans == 4


def test_application_otlp_headers_are_not_sent_to_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer app-backend-key")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-honeycomb-team=app-key")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    received: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append({k.lower(): v for k, v in self.headers.items()})
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        exporter = SizeSplittingExporter.otlp_http(f"http://127.0.0.1:{server.server_port}", max_bytes=1 << 20)
        assert exporter.export(make_spans([10])) is SpanExportResult.SUCCESS
    finally:
        server.shutdown()
    assert len(received) == 1
    headers = received[0]
    assert "authorization" not in headers and "x-honeycomb-team" not in headers
    assert "content-encoding" not in headers
    assert headers["content-type"] == "application/x-protobuf"
    assert os.environ["OTEL_EXPORTER_OTLP_HEADERS"] == "authorization=Bearer app-backend-key"
