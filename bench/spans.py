"""OTLP requests made the way the instrumentation makes them: real OTel SDK spans with the contract's
attributes, encoded with the OTLP exporter's own `encode_spans`."""

from __future__ import annotations

import hashlib
import json
import os
import random

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracetape.instrumentation import contract as c

_WORDS = ("the agent calls a tool then reads the answer and asks the model again with more context about "
          "files tests errors plans steps budget tokens latency retries streaming json schema").split()


def corpus(size: int, seed: int = 7) -> str:
    """Prose-like text (compresses like real prompts do), deterministic."""
    rng = random.Random(seed)
    out: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:size]


class Agent:
    """Makes step spans through the real SDK, like tests/test_store.py's `Agent`."""

    def __init__(self, run_id: str, tenant: str = "bench", scope: str = "bench") -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "bench-agent"}),
                                  span_limits=SpanLimits(max_attributes=256, max_attribute_length=None))
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("tracetape")
        self.base = {c.RUN_ID: run_id, c.TENANT: tenant, c.SCOPE: scope}
        self.index = 0

    def step(self, body: bytes, response: bytes, step_id: str | None = None, started_ns: int | None = None) -> None:
        self.index += 1
        started = started_ns if started_ns is not None else 1_700_000_000_000_000_000 + self.index * 1000
        attrs = {
            **self.base, c.SPAN_KIND: c.SPAN_KIND_STEP, c.STEP_ID: step_id or f"{self.index:016x}",
            c.STEP_STARTED_NS: started, c.STEP_KIND: c.STEP_KIND_MODEL, c.STEP_ATTEMPT: 0,
            c.STEP_INDEX: self.index,
            c.ENVELOPE_HASH: hashlib.sha256(body).hexdigest(),
            c.ENVELOPE_PROFILE: c.CANON_PROFILE,
            c.REQUEST_METHOD: "POST", c.REQUEST_URL: "https://api.openai.com/v1/chat/completions",
            c.REQUEST_HEADERS: c.encode_headers([("content-type", "application/json"), ("user-agent", "OpenAI/Python")]),
            c.REQUEST_BODY: body,
            c.RESPONSE_STATUS: 200,
            c.RESPONSE_HEADERS: c.encode_headers([("content-type", "application/json")]),
            c.RESPONSE_BODY: response, c.RESPONSE_CONTENT_ENCODING: "", c.RESPONSE_STREAMED: False,
            c.RESPONSE_BYTES_READ: len(response),
            c.GEN_AI_OPERATION_NAME: "chat", c.GEN_AI_PROVIDER_NAME: "openai", c.GEN_AI_REQUEST_MODEL: "gpt-bench",
        }
        self.tracer.start_span("chat gpt-bench", attributes=attrs, start_time=started).end()

    def take(self):
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans


def chat_body(text: str) -> bytes:
    return json.dumps({"model": "gpt-bench", "messages": [{"role": "user", "content": text}]}).encode()


def chat_response(i: int) -> bytes:
    return json.dumps({"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-bench-0613",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": f"answer {i}"}}],
                       "usage": {"prompt_tokens": 100, "completion_tokens": 3}}).encode()


def make_batches(payload: int, per_batch: int, n_batches: int, *, unique: bool, run_id: str) -> list[bytes]:
    """`n_batches` encoded ExportTraceServiceRequest bodies of `per_batch` step spans; each request body is
    about `payload` bytes. `unique`: every span's payloads differ (no dedupe); else all spans repeat one."""
    text = corpus(payload + 1_000_000)
    rng = random.Random(payload)
    agent = Agent(run_id)
    out: list[bytes] = []
    n = 0
    for _ in range(n_batches):
        for _ in range(per_batch):
            n += 1
            if unique:
                off = rng.randrange(0, 1_000_000)
                body = chat_body(f"#{n} {os.urandom(8).hex()} " + text[off:off + payload - 120])
                resp = chat_response(n)
            else:
                body = chat_body(text[:payload - 100])
                resp = chat_response(0)
            agent.step(body, resp)
        out.append(encode_spans(agent.take()).SerializeToString())
    return out
