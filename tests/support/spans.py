"""Spans as the instrumentation makes them, through the real OTel SDK and the real OTLP encoder."""

from __future__ import annotations

import json

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracetape.instrumentation import contract as c

RESPONSE = json.dumps({
    "id": "chatcmpl-1", "model": "gpt-test-0613",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}).encode()


def chat_request(prompt: str) -> bytes:
    return json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": prompt}]}).encode()


class Agent:
    """Makes a run's spans with the SDK. `extra` span processors (e.g. a real OTLP exporter) see them too."""

    def __init__(self, run_id: str = "run-1", tenant: str = "acme", scope: str = "prod",
                 extra: SpanProcessor | None = None) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": "agent-under-test"}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        if extra is not None:
            self.provider.add_span_processor(extra)
        self.tracer = self.provider.get_tracer("tracetape.test")
        self.base = {c.RUN_ID: run_id, c.TENANT: tenant, c.SCOPE: scope}

    def model_step(self, index: int, body: bytes | None = None, response: bytes = RESPONSE,
                   attempt: int = 0, started_ns: int | None = None) -> None:
        body = body if body is not None else chat_request(f"question {index}")
        started = started_ns if started_ns is not None else 1_700_000_000_000_000_000 + index * 1_000_000
        attrs = {
            **self.base, c.SPAN_KIND: c.SPAN_KIND_STEP, c.STEP_ID: f"{index:016x}", c.STEP_STARTED_NS: started,
            c.STEP_INDEX: index, c.STEP_KIND: c.STEP_KIND_MODEL, c.STEP_ATTEMPT: attempt,
            c.ENVELOPE_HASH: c.envelope_hash(c.http_envelope("POST", "/v1/chat/completions", "", [], body)),
            c.ENVELOPE_PROFILE: c.CANON_PROFILE,
            c.REQUEST_METHOD: "POST", c.REQUEST_URL: "https://api.openai.com/v1/chat/completions",
            c.REQUEST_HEADERS: c.encode_headers([("content-type", "application/json")]),
            c.REQUEST_BODY: body, c.RESPONSE_STATUS: 200, c.RESPONSE_BODY: response,
            c.RESPONSE_HEADERS: c.encode_headers([("content-type", "application/json")]),
            c.RESPONSE_CONTENT_ENCODING: "",
            c.GEN_AI_OPERATION_NAME: "chat", c.GEN_AI_PROVIDER_NAME: "openai", c.GEN_AI_REQUEST_MODEL: "gpt-test",
        }
        self.tracer.start_span("chat gpt-test", attributes=attrs, start_time=started + attempt).end(
            end_time=started + attempt + 500_000)

    def tool_step(self, index: int, arguments: bytes, result: bytes) -> None:
        started = 1_700_000_000_000_000_000 + index * 1_000_000
        attrs = {
            **self.base, c.SPAN_KIND: c.SPAN_KIND_STEP, c.STEP_ID: f"{index:016x}", c.STEP_STARTED_NS: started,
            c.STEP_KIND: c.STEP_KIND_TOOL, c.STEP_ATTEMPT: 0,
            c.ENVELOPE_HASH: c.envelope_hash(c.tool_envelope("search", json.loads(arguments))),
            c.TOOL_ARGUMENTS: arguments, c.TOOL_RESULT: result, c.TOOL_MUTATING: False,
            c.GEN_AI_OPERATION_NAME: "execute_tool", c.GEN_AI_TOOL_NAME: "search",
        }
        self.tracer.start_span("execute_tool search", attributes=attrs, start_time=started).end(end_time=started + 1000)

    def run_span(self, outcome: str = c.OUTCOME_COMPLETED, exit_code: int = 0) -> None:
        attrs = {**self.base, c.SPAN_KIND: c.SPAN_KIND_RUN, c.RUN_OUTCOME: outcome, c.RUN_EXIT_CODE: exit_code,
                 c.RUN_COMMAND: ["python", "agent.py"], c.GEN_AI_OPERATION_NAME: "invoke_agent",
                 c.GEN_AI_AGENT_NAME: "agent"}
        self.tracer.start_span("invoke_agent agent", attributes=attrs, start_time=1_700_000_000_000_000_000).end()

    def request(self) -> ExportTraceServiceRequest:
        """The spans made so far (and not yet taken), as one OTLP request."""
        req = encode_spans(self.memory.get_finished_spans())
        self.memory.clear()
        return req

    def shutdown(self) -> None:
        self.provider.shutdown()
