"""One variant of the instrumentation-overhead benchmark, in its own process (so patches never leak).

`python -m bench.overhead_worker VARIANT BASE_URL COLLECTOR_URL`; then reads commands on stdin, one per line:
`CASE N` (CASE = `1KB|1MB` + `:stream|:plain`) makes N calls and answers one JSON line with their durations
in seconds; `quit` ends. VARIANT: `none`, `tracetape`, `openai_v2`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from urllib.parse import urlsplit

VARIANT, BASE_URL, COLLECTOR = sys.argv[1], sys.argv[2], sys.argv[3]
info: dict[str, object] = {"variant": VARIANT}

if VARIANT == "tracetape":
    from tracetape.instrumentation import httpx_hook, runtime
    from tracetape.instrumentation.config import RecorderConfig
    from tracetape.instrumentation.provider import build_recorder

    config = RecorderConfig(run_id="bench-overhead", endpoint=COLLECTOR,
                            http_hosts=frozenset({urlsplit(BASE_URL).netloc}))
    recorder = build_recorder(config, service_name="bench")
    runtime.activate(runtime.RunContext(run_id=config.run_id, tenant=config.tenant, scope=config.scope,
                                        http_hosts=config.http_hosts), recorder.tracer)
    httpx_hook.instrument()
    flush = recorder.flush
    info["exporter"] = "BatchSpanProcessor -> SizeSplittingExporter (OTLP/HTTP) -> collector process"
elif VARIANT == "openai_v2":
    os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogExporter, LogExportResult
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class EncodingLogExporter(LogExporter):
        """Encodes the content events to OTLP like a real exporter would, then drops them (no logs endpoint)."""

        def __init__(self) -> None:
            self.records = 0

        def export(self, batch):  # type: ignore[no-untyped-def]
            encode_logs(batch).SerializeToString()
            self.records += len(batch)
            return LogExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=COLLECTOR)))
    probe = InMemorySpanExporter()
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    provider.add_span_processor(SimpleSpanProcessor(probe))
    log_exporter = EncodingLogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
    set_logger_provider(logger_provider)
    OpenAIInstrumentor().instrument(tracer_provider=provider, logger_provider=logger_provider)

    def flush() -> None:
        provider.force_flush()
        logger_provider.force_flush()

    info["exporter"] = "BatchSpanProcessor -> OTLPSpanExporter (HTTP) -> collector; content log events encoded, dropped"
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


def main() -> None:
    print(json.dumps({"ready": True, **info}), flush=True)
    i = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "flush":
            flush()
            extra = {}
            if VARIANT == "openai_v2":
                extra = {"spans_seen": len(probe.get_finished_spans()), "log_records": log_exporter.records}
            print(json.dumps({"flushed": True, **extra}), flush=True)
            continue
        size, mode = cmd[0].split(":")
        times = []
        for _ in range(int(cmd[1])):
            i += 1
            times.append(call(size, mode == "stream", i))
        print(json.dumps({"times": times}), flush=True)
    flush()


main()
