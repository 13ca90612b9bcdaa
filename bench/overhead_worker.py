"""One variant of the instrumentation-overhead benchmark, in its own process (so patches never leak).

`python -m bench.overhead_worker VARIANT BASE_URL COLLECTOR_URL`; then reads commands on stdin, one per line:
- `CASE N` (CASE = `1KB|1MB` + `:stream|:plain`): makes N calls, then flushes the variant's telemetry (the
  background export finishes before the answer), and answers one JSON line: `times` (wall seconds of each
  call, flush not included) and `cpu` (this process's CPU seconds, every thread, for the N calls plus the
  flush: the caller's thread and the background export thread together);
- `stats`: flushes and answers what the variant has exported so far (`ExportCounter.stats`);
- `quit` ends.

VARIANT: `none`; `tracetape` (the real recorder: BatchSpanProcessor -> SizeSplittingExporter over OTLP/HTTP to
the collector); `openai_v2` (opentelemetry-instrumentation-openai-v2 with message content captured on the spans,
exported by a BatchSpanProcessor + OTLPSpanExporter over OTLP/HTTP to the same collector). Both instrumented
variants' exporters are wrapped in an `ExportCounter`, so the output shows that the content really left the
process (bytes of content attributes in spans the collector accepted).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

VARIANT, BASE_URL, COLLECTOR = sys.argv[1], sys.argv[2], sys.argv[3]
"""COLLECTOR: the collector's OTLP/HTTP traces URL (`.../v1/traces`)."""
COLLECTOR_BASE = COLLECTOR.removesuffix("/").removesuffix("/v1/traces")
"""The base URL a tracetape recorder is configured with (it appends `/v1/traces` itself)."""
info: dict[str, object] = {"variant": VARIANT}

OPENAI_V2_ENV = {
    # util-genai 1.1b0 always takes the latest-experimental path, where `true` is not a valid content mode (it
    # logs a warning and captures nothing). The modes are NO_CONTENT / SPAN_ONLY / EVENT_ONLY / SPAN_AND_EVENT;
    # SPAN_ONLY puts the messages on the span (`gen_ai.input.messages` / `gen_ai.output.messages`, JSON strings),
    # which is what tracetape does with its bodies. The semconv opt-in is what the instrumentor's docs require
    # for these modes (a no-op with util-genai 1.1b0, set for the versions where it is not).
    "OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "SPAN_ONLY",
}
"""The environment that makes openai-v2 2.4b0 + util-genai 1.1b0 capture message content."""

CONTENT_ATTRIBUTES = {
    "tracetape": ("tracetape.request.body", "tracetape.response.body"),
    "openai_v2": ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"),
}
"""Per variant, the span attributes that carry the request/response content."""


class ExportCounter(SpanExporter):
    """Passes spans to `inner` and counts what was exported successfully: spans, and the length of their
    content attributes (bytes, or characters of a str). Runs in the batch processor's thread."""

    def __init__(self, inner: SpanExporter, content_attributes: Sequence[str]) -> None:
        self._inner = inner
        self._attributes = tuple(content_attributes)
        self.spans = 0
        self.content_bytes = 0
        self.spans_with_content = 0
        self.failed_spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._inner.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self.failed_spans += len(spans)
            return result
        for span in spans:
            attrs = span.attributes or {}
            size = sum(len(attrs[a]) for a in self._attributes if a in attrs)  # type: ignore[arg-type]
            self.spans += 1
            self.content_bytes += size
            self.spans_with_content += size > 0
        return result

    def stats(self) -> dict[str, int]:
        return {"spans_exported": self.spans, "spans_with_content": self.spans_with_content,
                "content_bytes_exported": self.content_bytes, "spans_failed": self.failed_spans}

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def setup_tracetape() -> tuple[Callable[[], None], ExportCounter]:
    from tracetape.instrumentation import httpx_hook, runtime
    from tracetape.instrumentation.config import RecorderConfig
    from tracetape.instrumentation.exporter import SizeSplittingExporter
    from tracetape.instrumentation.provider import build_recorder

    config = RecorderConfig(run_id="bench-overhead", endpoint=COLLECTOR_BASE,
                            http_hosts=frozenset({urlsplit(BASE_URL).netloc}))
    counter = ExportCounter(SizeSplittingExporter.otlp_http(config.endpoint, max_bytes=config.max_export_bytes),
                            CONTENT_ATTRIBUTES["tracetape"])
    recorder = build_recorder(config, service_name="bench", exporter=counter)
    runtime.activate(runtime.RunContext(run_id=config.run_id, tenant=config.tenant, scope=config.scope,
                                        http_hosts=config.http_hosts), recorder.tracer)
    httpx_hook.instrument()
    info["exporter"] = "BatchSpanProcessor -> SizeSplittingExporter (OTLP/HTTP) -> collector process"
    return recorder.flush, counter


def setup_openai_v2() -> tuple[Callable[[], None], ExportCounter]:
    os.environ.update(OPENAI_V2_ENV)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogExporter, LogExportResult
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    class CountingLogExporter(LogExporter):
        """Counts content events, were any emitted (SPAN_ONLY emits none; a check that the mode is as said)."""

        def __init__(self) -> None:
            self.records = 0

        def export(self, batch):  # type: ignore[no-untyped-def]
            self.records += len(batch)
            return LogExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    counter = ExportCounter(OTLPSpanExporter(endpoint=COLLECTOR),
                            CONTENT_ATTRIBUTES["openai_v2"])
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(counter))
    log_exporter = CountingLogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
    OpenAIInstrumentor().instrument(tracer_provider=provider, logger_provider=logger_provider)
    counter.stats = lambda base=counter.stats: {**base(), "log_records": log_exporter.records}  # type: ignore[method-assign]

    def flush() -> None:
        provider.force_flush()
        logger_provider.force_flush()

    info["exporter"] = "BatchSpanProcessor -> OTLPSpanExporter (HTTP) -> collector process"
    info["content_mode"] = OPENAI_V2_ENV
    return flush, counter


counter: ExportCounter | None = None
if VARIANT == "tracetape":
    flush, counter = setup_tracetape()
elif VARIANT == "openai_v2":
    flush, counter = setup_openai_v2()
else:
    def flush() -> None:
        pass

import openai  # noqa: E402  (after the instrumentations, as an agent would be)

client = openai.OpenAI(base_url=BASE_URL, api_key="sk-bench", max_retries=0)
_PROMPTS: dict[str, str] = {}


def prompt(size: str) -> str:
    if size not in _PROMPTS:
        n = 1024 if size == "1KB" else 1024 * 1024
        _PROMPTS[size] = ("lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]
    return _PROMPTS[size]


def call(size: str, stream: bool, i: int) -> float:
    text = f"{i} " + prompt(size)
    t = time.perf_counter()
    if stream:
        s = client.chat.completions.create(model="gpt-bench", messages=[{"role": "user", "content": text}], stream=True)
        for _ in s:
            pass
    else:
        client.chat.completions.create(model="gpt-bench", messages=[{"role": "user", "content": text}])
    return time.perf_counter() - t


def block(size: str, stream: bool, n: int, first: int) -> dict[str, Any]:
    """N calls then a flush: per-call wall times, and the process CPU of calls + flush (all threads) and its
    minor page faults (fresh memory touched: on this VM a large part of the cost of megabyte copies)."""
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0 = time.process_time()
    times = [call(size, stream, first + k) for k in range(n)]
    flush()
    cpu = time.process_time() - cpu0
    return {"times": times, "cpu": cpu, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0}


def main() -> None:
    print(json.dumps({"ready": True, **info}), flush=True)
    i = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "stats":
            flush()
            print(json.dumps({"flushed": True, **(counter.stats() if counter else {})}), flush=True)
            continue
        size, mode = cmd[0].split(":")
        n = int(cmd[1])
        print(json.dumps(block(size, mode == "stream", n, i)), flush=True)
        i += n
    flush()


main()
