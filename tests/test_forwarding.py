"""Forwarding the stored spans to Jaeger: slim copies, delivery after commit, retries, independence.

The "Jaeger" here is `tests.support.jaeger_sink.JaegerSink`, a real OTLP server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from tests.support.collector import collector_config, fast_retry, http_url, run, running_collector
from tests.support.jaeger_sink import JaegerSink, attributes
from tests.support.spans import Agent
from tracetape.collector import config as cfg
from tracetape.collector import ingest
from tracetape.collector import slim
from tracetape.collector.forwarder import build_requests, parse_retry_after, span_count
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c

PB = {"Content-Type": "application/x-protobuf"}
GENAI = (c.GEN_AI_OPERATION_NAME, c.GEN_AI_PROVIDER_NAME, c.GEN_AI_REQUEST_MODEL, c.GEN_AI_RESPONSE_MODEL,
         c.GEN_AI_RESPONSE_ID, c.GEN_AI_USAGE_INPUT_TOKENS, c.GEN_AI_USAGE_OUTPUT_TOKENS)
BIG = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "é" * 100_000}]}, ensure_ascii=False).encode()


async def post(url: str, body: bytes) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=PB) as resp:
            await resp.read()
            return resp.status


def http_forward(sink: JaegerSink, **extra: Any) -> dict[str, Any]:
    return {"otlphttp/jaeger": {"endpoint": sink.http_url, "retry_on_failure": fast_retry(), **extra}}


def recorded_run(run_id: str = "run-1", steps: int = 3, big: bool = False) -> bytes:
    agent = Agent(run_id=run_id)
    for i in range(1, steps + 1):
        agent.model_step(i, body=BIG if big and i == 1 else None)
    agent.tool_step(steps + 1, b'{"q": "weather"}', bytes(range(256)) * 4)  # a binary tool result
    agent.run_span()
    return agent.request().SerializeToString()


# --- slim: pure functions ----------------------------------------------------------------------------------


def test_text_preview_is_cut_on_a_character_boundary_within_the_cap() -> None:
    data = ("ab" + "é" * 1000).encode()
    preview = slim.preview_payload(data, 101)
    assert len(preview.encode()) <= 101
    text, marker = preview.split(slim.ELLIPSIS)
    assert data.startswith(text.encode())
    kept = len(text.encode())
    assert marker == f"[truncated {len(data) - kept} bytes]"
    assert slim.preview_payload(b'{"short": true}', 100) == '{"short": true}'


def test_binary_preview_is_hex_of_the_first_bytes() -> None:
    data = bytes(range(256)) * 10
    preview = slim.preview_payload(data, 200)
    assert preview.startswith(slim.BINARY_PREFIX)
    assert len(preview.encode()) <= 200
    hex_part = preview[len(slim.BINARY_PREFIX):].split(slim.ELLIPSIS)[0]
    assert data.startswith(bytes.fromhex(hex_part))
    assert preview.endswith(f"[truncated {len(data) - len(hex_part) // 2} bytes]")
    assert slim.preview_payload(b"\x00\x01", 100) == "hex:0001"
    assert slim.preview_payload(b"ok\xff", 100) == "hex:6f6bff"


def test_compressed_response_bodies_are_previewed_decoded() -> None:
    text = json.dumps({"choices": [{"message": {"content": "x" * 5000}}]}).encode()
    preview = slim.preview_payload(gzip.compress(text), 300, content_encoding="gzip")
    assert preview.startswith('{"choices": [{"message": {"content": "xxx')
    assert "gzip body of" in preview and len(preview.encode()) <= 300
    assert slim.preview_payload(gzip.compress(b'{"a": 1}'), 300, content_encoding="gzip") == '{"a": 1}'
    assert slim.preview_payload(b"not gzip", 300, content_encoding="gzip") == "not gzip"


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=3000), st.text(max_size=1500).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       cap=st.integers(min_value=64, max_value=2048))
def test_any_preview_is_valid_utf8_within_the_cap(data: bytes, cap: int) -> None:
    preview = slim.preview_payload(data, cap)
    encoded = preview.encode("utf-8")  # valid UTF-8 (no lone surrogates)
    assert len(encoded) <= cap
    if len(data) <= cap and slim.ELLIPSIS not in preview and not preview.startswith(slim.BINARY_PREFIX):
        assert encoded == data


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=3000), cap=st.integers(min_value=64, max_value=2048))
def test_any_capped_string_is_within_the_cap_and_a_prefix(text: str, cap: int) -> None:
    capped = slim.cap_string(text, cap)
    assert len(capped.encode("utf-8", "surrogatepass")) <= cap
    assert text.startswith(capped.split(slim.ELLIPSIS + "[truncated")[0])


def _stored_span(attrs: dict[str, AnyValue]) -> ResourceSpans:
    rs = ResourceSpans()
    rs.resource.attributes.add(key="service.name", value=AnyValue(string_value="agent"))
    span = rs.scope_spans.add().spans.add(name="chat gpt-test", trace_id=b"\1" * 16, span_id=b"\2" * 8)
    for key, value in attrs.items():
        span.attributes.add(key=key, value=value)
    return rs


def test_slim_span_adds_previews_keeps_genai_and_caps_everything() -> None:
    body = b'{"messages": "' + b"m" * 50_000 + b'"}'
    digest = bytes.fromhex("ab" * 32)
    fetched: list[tuple[str, str, bytes]] = []

    def fetch(tenant: str, scope: str, d: bytes) -> bytes | None:
        fetched.append((tenant, scope, d))
        return body if d == digest else None

    long_array = AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=i) for i in range(5000)]))
    rs = _stored_span({
        c.TENANT: AnyValue(string_value="acme"), c.SCOPE: AnyValue(string_value="prod"),
        c.REQUEST_BODY + ".ref": AnyValue(string_value=digest.hex()),
        c.REQUEST_BODY + ".size": AnyValue(int_value=len(body)),
        c.RESPONSE_BODY + ".ref": AnyValue(string_value="cd" * 32),  # not in the store
        c.GEN_AI_REQUEST_MODEL: AnyValue(string_value="gpt-test"),
        c.GEN_AI_USAGE_INPUT_TOKENS: AnyValue(int_value=7),
        c.TOOL_RESULT: AnyValue(bytes_value=b"raw inline payload"),  # a payload left inline
        "some.long.string": AnyValue(string_value="s" * 40_000),
        "some.bytes": AnyValue(bytes_value=b"\0" * 40_000),
        c.RESPONSE_CHUNK_ENDS: long_array,
    })
    before = rs.SerializeToString()
    out = slim.slim_resource_spans(rs, cap=1024, fetch=fetch)
    assert rs.SerializeToString() == before  # the input is not modified
    span = out.scope_spans[0].spans[0]
    attrs = attributes(span)
    assert fetched == [("acme", "prod", digest), ("acme", "prod", bytes.fromhex("cd" * 32))]
    assert attrs[c.REQUEST_BODY + ".ref"] == digest.hex()
    assert attrs[c.REQUEST_BODY + ".size"] == len(body)
    assert attrs[c.REQUEST_BODY + ".preview"].startswith('{"messages": "mmm')
    assert c.RESPONSE_BODY + ".preview" not in attrs  # no blob, no preview; the ref stays
    assert attrs[c.RESPONSE_BODY + ".ref"] == "cd" * 32
    assert c.TOOL_RESULT not in attrs
    assert attrs[c.TOOL_RESULT + ".preview"] == "raw inline payload"
    assert attrs[c.TOOL_RESULT + ".size"] == len(b"raw inline payload")
    assert attrs[c.GEN_AI_REQUEST_MODEL] == "gpt-test" and attrs[c.GEN_AI_USAGE_INPUT_TOKENS] == 7
    assert attrs["some.long.string"].startswith("sss") and "[truncated" in attrs["some.long.string"]
    assert attrs["some.bytes"].startswith("hex:0000")
    assert attrs[c.RESPONSE_CHUNK_ENDS].startswith("[0,1,2,")
    for kv in span.attributes:
        assert kv.value.ByteSize() <= 1024 + 8, kv.key


def test_build_requests_groups_by_resource_and_splits_by_bytes() -> None:
    class Blobs:
        def blob(self, tenant: str, scope: str, digest: bytes) -> bytes | None:
            return b"x" * 10_000

    stored = []
    for i in range(10):
        rs = _stored_span({c.REQUEST_BODY + ".ref": AnyValue(string_value=f"{i:064x}")})
        rs.scope_spans[0].spans[0].span_id = i.to_bytes(8, "big")
        stored.append(rs.SerializeToString())
    exporter = cfg.OtlpExporter(id="otlphttp/x", protocol="http", endpoint="http://h:1", url="http://h:1/v1/traces",
                                max_batch_spans=4, max_batch_bytes=1 << 20)
    route = cfg.ForwardRoute(exporter, cfg.SlimProcessor(max_attribute_bytes=2000))
    requests, bad = build_requests(stored + [b"\xff garbage"], route, Blobs())
    assert bad == 1
    assert [span_count(r) for r in requests] == [4, 4, 2]
    assert all(len(r.resource_spans) == 1 and len(r.resource_spans[0].scope_spans) == 1 for r in requests)
    small = dataclasses.replace(route, exporter=dataclasses.replace(exporter, max_batch_spans=100, max_batch_bytes=5000))
    requests, _ = build_requests(stored, small, Blobs())
    assert [span_count(r) for r in requests] == [2, 2, 2, 2, 2]


def test_a_span_cannot_claim_another_tenant_to_get_its_payloads_forwarded(tmp_path: Path) -> None:
    """The receiver's tenant (an API key's) is the only one a stored span names, whatever the span claims
    (the key twice, a bytes value, the resource's): the forwarder, which fetches previews under the span's
    tenant, can never read another tenant's blob for it."""
    secret = b'{"messages": [{"role": "user", "content": "B-CONFIDENTIAL"}]}'

    def request(attrs: list[tuple[str, AnyValue]], resource: list[tuple[str, AnyValue]], span_id: int) -> Any:
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        for key, value in resource:
            rs.resource.attributes.add(key=key).value.CopyFrom(value)
        span = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=span_id.to_bytes(8, "big"), name="s",
                                              start_time_unix_nano=1, end_time_unix_nano=2)
        for key, value in attrs:
            span.attributes.add(key=key).value.CopyFrom(value)
        return req

    store = Store(tmp_path / "db", map_size=16 << 20)
    try:
        store.apply([ingest.prepare(request([(c.REQUEST_BODY, AnyValue(bytes_value=secret))], [], 1), store, "B")])
        ref = (c.REQUEST_BODY + ".ref", AnyValue(string_value=hashlib.sha256(secret).hexdigest()))
        b, a = AnyValue(string_value="B"), AnyValue(string_value="A")
        claims = [([(c.TENANT, b), (c.TENANT, a), ref], []),  # the key twice: the last one is the receiver's
                  ([(c.TENANT, AnyValue(bytes_value=b"A")), ref], [(c.TENANT, b), (c.SCOPE, b)]),
                  ([ref], [(c.TENANT, b)])]
        for i, (attrs, resource) in enumerate(claims, start=2):
            batch = ingest.prepare(request(attrs, resource, i), store, "A")
            assert batch.rejected == 0, batch.errors
            store.apply([batch])
        stored = [value for table, key, value in store.dump() if table == "spans" and key.startswith(b"A\0")]
        assert len(stored) == 3
        for raw in stored:
            rs = ResourceSpans.FromString(raw)
            assert not [kv for kv in rs.resource.attributes if kv.key in (c.TENANT, c.SCOPE)]
            span = rs.scope_spans[0].spans[0]
            claimed = [kv.value for kv in span.attributes if kv.key == c.TENANT]
            assert claimed and all(v.WhichOneof("value") == "string_value" and v.string_value == "A" for v in claimed)
        exporter = cfg.OtlpExporter(id="otlphttp/x", protocol="http", endpoint="http://h:1",
                                    url="http://h:1/v1/traces", max_batch_spans=100, max_batch_bytes=1 << 20)
        requests, _ = build_requests(stored, cfg.ForwardRoute(exporter, cfg.SlimProcessor(max_attribute_bytes=4096)),
                                     store)
        assert span_count(requests[0]) == 3 and b"B-CONFIDENTIAL" not in requests[0].SerializeToString()
    finally:
        store.close()


def test_an_import_stores_what_ingest_prepared_not_a_line_that_says_otherwise(tmp_path: Path) -> None:
    """`tracetape import` keeps an exported span's bytes only when they are the span ingest prepares from them
    (attributes in any order): a line claiming another tenant, or carrying two spans, is stored as ingest
    stamped it, and an honest export round-trips byte for byte."""
    from tracetape.replayer import transfer

    store = Store(tmp_path / "db", map_size=16 << 20)
    try:
        agent = Agent(run_id="run-honest", tenant="default", scope="default")
        agent.model_step(0, body=b'{"model": "m", "messages": []}', response=b'{"id": "r0"}')
        agent.run_span()
        store.apply([ingest.prepare(agent.request(), store)])
        agent.shutdown()
        honest = [value for table, _, value in store.dump() if table == "spans"]
        run = store.run("default", "default", "run-honest")
        exported = transfer.export_jsonl(*transfer.run_spans(store, run))
        other = Store(tmp_path / "other", map_size=16 << 20)
        try:
            assert transfer.import_bytes(other, exported)["accepted"] == len(honest)
            assert sorted(v for t, _, v in other.dump() if t == "spans") == sorted(honest)
            claim = ResourceSpans()
            span = claim.scope_spans.add().spans.add(trace_id=b"\x02" * 16, span_id=b"\x03" * 8, name="evil",
                                                     start_time_unix_nano=1, end_time_unix_nano=2)
            for key, value in ((c.TENANT, "victim"), (c.RUN_ID, "evil"), (c.TENANT, "mallory")):
                span.attributes.add(key=key).value.string_value = value
            line = json.dumps({"type": "span", "span": base64.b64encode(claim.SerializeToString()).decode()})
            head = json.dumps({"type": "tracetape.export", "version": 1, "run": {}})
            assert transfer.import_bytes(other, f"{head}\n{line}\n".encode())["accepted"] == 1
            (stored,) = [v for t, k, v in other.dump() if t == "spans" and k.startswith(b"mallory\0")]
            tenants = [kv.value.string_value for kv in ResourceSpans.FromString(stored).scope_spans[0].spans[0].attributes
                       if kv.key == c.TENANT]
            assert tenants == ["mallory", "mallory"]
        finally:
            other.close()
    finally:
        store.close()


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(http_date) <= 31


# --- end to end -----------------------------------------------------------------------------------------


def test_the_sink_receives_every_span_slimmed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with JaegerSink(max_attribute_bytes=64 * 1024) as sink:
            conf = collector_config(tmp_path / "db", forward=http_forward(sink), slim_cap=4096)
            async with running_collector(conf) as svc:
                assert await post(http_url(svc), recorded_run(big=True)) == 200
                await sink.wait_for_spans(5)  # 3 model steps, 1 tool step, the run span
                spans = {attributes(s).get(c.STEP_ID, "run"): (s, attributes(s)) for _, s in sink.spans()}
                assert len(spans) == 5 and sink.span_count() == 5
                for span, attrs in spans.values():
                    for key, value in attrs.items():
                        size = len(value.encode()) if isinstance(value, str) else len(str(value))
                        assert size <= 4096, key
                    for payload in c.PAYLOAD_ATTRIBUTES:
                        assert payload not in attrs
                _, big = spans[f"{1:016x}"]
                assert big[c.REQUEST_BODY + ".size"] == len(BIG)
                digest = bytes.fromhex(big[c.REQUEST_BODY + ".ref"])
                assert svc.store.blob("acme", "prod", digest) == BIG  # the ref resolves in the store
                preview = big[c.REQUEST_BODY + ".preview"]
                assert preview.startswith('{"model": "gpt-test", "messages": [{"role": "user", "content": "ééé')
                assert preview.endswith(" bytes]")
                for name in GENAI:
                    assert name in big, name
                assert big[c.GEN_AI_RESPONSE_MODEL] == "gpt-test-0613"
                assert big[c.RESPONSE_BODY + ".preview"].startswith('{"id": "chatcmpl-1"')
                _, tool = spans[f"{4:016x}"]
                assert tool[c.TOOL_RESULT + ".preview"].startswith("hex:000102")
                assert tool[c.TOOL_ARGUMENTS + ".preview"] == '{"q": "weather"}'
                assert tool[c.GEN_AI_TOOL_NAME] == "search"
                run_span, run_attrs = spans["run"]
                assert run_attrs[c.RUN_OUTCOME] == "completed" and run_span.name == "invoke_agent agent"
                await _wait(lambda: svc.store.outbox_size() == 0)

    run(scenario())


def test_forwarding_over_grpc(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with JaegerSink(grpc_enabled=True) as sink:
            forward = {"otlp/jaeger": {"endpoint": sink.grpc_endpoint, "tls": {"insecure": True},
                                       "retry_on_failure": fast_retry()}}
            async with running_collector(collector_config(tmp_path / "db", forward=forward)) as svc:
                assert await post(http_url(svc), recorded_run()) == 200
                await sink.wait_for_spans(5)
                assert sink.http_hits == 0
                assert all(c.REQUEST_BODY not in attributes(s) for _, s in sink.spans())

    run(scenario())


def test_sink_down_then_up_is_eventually_delivered_and_recording_never_waits(tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = JaegerSink()
        await sink.start()
        await sink.stop()  # down: its port is known, nothing listens there
        conf = collector_config(tmp_path / "db", forward=http_forward(sink))
        async with running_collector(conf) as svc:
            for i in range(5):
                body = recorded_run(run_id=f"run-{i}")
                started = time.monotonic()
                assert await post(http_url(svc), body) == 200
                assert time.monotonic() - started < 3.0  # the forwarder's retries are not on this path
            await _wait(lambda: svc.forwarder.snapshot()["routes"]["otlphttp/jaeger"]["attempts_failed"] >= 2)
            assert svc.store.outbox_size() == 25
            await sink.start()  # up again, same port
            try:
                await sink.wait_for_spans(25)
                await _wait(lambda: svc.store.outbox_size() == 0)
                run_ids = {attributes(s)[c.RUN_ID] for _, s in sink.spans()}
                assert run_ids == {f"run-{i}" for i in range(5)}
            finally:
                await sink.stop()

    run(scenario())


def test_a_hung_sink_never_slows_the_receive_path(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with JaegerSink() as sink:
            sink.delay = 30.0  # accepts the connection, never answers in time
            forward = http_forward(sink, timeout="20s")
            async with running_collector(collector_config(tmp_path / "db", forward=forward)) as svc:
                assert await post(http_url(svc), recorded_run(run_id="run-0")) == 200
                await _wait(lambda: sink.http_hits >= 1)  # the forwarder is now stuck on the sink
                for i in range(1, 6):
                    body = recorded_run(run_id=f"run-{i}")
                    started = time.monotonic()
                    assert await post(http_url(svc), body) == 200
                    assert time.monotonic() - started < 3.0  # vs. a sink that takes 30 s to answer
                assert len(svc.store.runs("acme", "prod")) == 6
                started = time.monotonic()
            assert time.monotonic() - started < 15  # and stopping does not wait for the hung sink either

    run(scenario(), timeout=90)


def test_retryable_errors_honour_retry_after_then_deliver(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with JaegerSink() as sink:
            sink.fail_status, sink.retry_after = 503, "1"
            async with running_collector(collector_config(tmp_path / "db", forward=http_forward(sink))) as svc:
                assert await post(http_url(svc), recorded_run()) == 200
                await _wait(lambda: sink.http_hits >= 1)
                await asyncio.sleep(1.5)
                assert sink.http_hits <= 3  # backed off at least the second Retry-After asked for
                sink.fail_status = None
                await sink.wait_for_spans(5)
                assert svc.forwarder.snapshot()["routes"]["otlphttp/jaeger"]["dropped_spans"] == 0

    run(scenario())


def test_a_permanent_rejection_drops_that_batch_counted_and_moves_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with JaegerSink() as sink:
            sink.fail_status = 400
            async with running_collector(collector_config(tmp_path / "db", forward=http_forward(sink))) as svc:
                assert await post(http_url(svc), recorded_run(run_id="run-rejected")) == 200
                route = lambda: svc.forwarder.snapshot()["routes"]["otlphttp/jaeger"]  # noqa: E731
                await _wait(lambda: route()["dropped_spans"] == 5)
                assert sink.http_hits == 1  # not retried
                assert "HTTP 400" in route()["last_error"]
                await _wait(lambda: svc.store.outbox_size() == 0)
                sink.fail_status = None
                assert await post(http_url(svc), recorded_run(run_id="run-later")) == 200
                await sink.wait_for_spans(5)
                assert {attributes(s)[c.RUN_ID] for _, s in sink.spans()} == {"run-later"}
                assert svc.store.run("acme", "prod", "run-rejected") is not None  # still recorded

    run(scenario())


def test_undelivered_spans_survive_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        sink = JaegerSink()
        await sink.start()
        await sink.stop()
        conf = collector_config(tmp_path / "db", forward=http_forward(sink))
        async with running_collector(conf) as svc:
            assert await post(http_url(svc), recorded_run()) == 200
        await sink.start()
        try:
            async with running_collector(conf):
                await sink.wait_for_spans(5)
        finally:
            await sink.stop()

    run(scenario())


def test_without_forwarding_the_outbox_is_drained(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            assert await post(http_url(svc), recorded_run()) == 200
            await _wait(lambda: svc.store.outbox_size() == 0)
            assert svc.store.stats()["spans"] == 5

    run(scenario())


async def _wait(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


# --- routes progress on their own; a route that rejects everything is failing --------------------------------


def _route(svc: Any, exporter: str) -> dict[str, Any]:
    return svc.forwarder.snapshot()["routes"][exporter]


def _ids(sink: JaegerSink) -> list[tuple[bytes, bytes]]:
    return [(span.trace_id, span.span_id) for _, span in sink.spans()]


def test_a_route_that_is_down_never_holds_back_another_and_catches_up_alone(tmp_path: Path) -> None:
    """Route B down (retrying forever): route A still gets every run, also after a restart with B still down
    (without A being sent again what it had); B, back, gets everything once; then the outbox is empty."""

    async def scenario() -> None:
        a = await JaegerSink().start()
        b = JaegerSink()
        await b.start()
        await b.stop()  # down: its port is known, nothing listens there
        forward = {"otlphttp/a": {"endpoint": a.http_url, "retry_on_failure": fast_retry()},
                   "otlphttp/b": {"endpoint": b.http_url, "retry_on_failure": fast_retry()}}
        conf = collector_config(tmp_path / "db", forward=forward)
        try:
            async with running_collector(conf) as svc:
                for i in range(3):
                    assert await post(http_url(svc), recorded_run(run_id=f"run-{i}")) == 200
                    await a.wait_for_spans(5 * (i + 1), timeout=10)  # A keeps receiving while B is down
                await _wait(lambda: _route(svc, "otlphttp/b")["attempts_failed"] >= 2)
                assert _route(svc, "otlphttp/b")["failing"] and not _route(svc, "otlphttp/a")["failing"]
                await _wait(lambda: _route(svc, "otlphttp/a")["backlog"] == 0)
                assert _route(svc, "otlphttp/b")["backlog"] == 15 == svc.store.outbox_size()
            async with running_collector(conf) as svc:  # restarted, B still down
                assert await post(http_url(svc), recorded_run(run_id="run-3")) == 200
                await a.wait_for_spans(20, timeout=10)
                await asyncio.sleep(0.5)  # anything A was sent again would have arrived by now
                assert a.span_count() == 20 and len(set(_ids(a))) == 20
                assert _route(svc, "otlphttp/b")["backlog"] == 20 == svc.store.outbox_size()
                await b.start()  # up again, same port
                await b.wait_for_spans(20)
                await _wait(lambda: svc.store.outbox_size() == 0)
                await asyncio.sleep(0.3)
                assert sorted(_ids(b)) == sorted(_ids(a)) and len(set(_ids(b))) == 20  # each span once per route
                assert {attributes(s)[c.RUN_ID] for _, s in b.spans()} == {f"run-{i}" for i in range(4)}
                assert _route(svc, "otlphttp/a")["backlog"] == _route(svc, "otlphttp/b")["backlog"] == 0
                assert not _route(svc, "otlphttp/b")["failing"]
        finally:
            await a.stop()
            await b.stop()

    run(scenario())


def test_a_route_that_rejects_everything_is_failing_and_logs_its_drops_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with JaegerSink() as sink:
            sink.fail_status = 404  # e.g. a wrong path: every request refused, not retryable
            async with running_collector(collector_config(tmp_path / "db", forward=http_forward(sink))) as svc:
                for i in range(3):
                    assert await post(http_url(svc), recorded_run(run_id=f"run-{i}")) == 200
                    await _wait(lambda: _route(svc, "otlphttp/jaeger")["dropped_spans"] == 5 * (i + 1))  # noqa: B023
                healthz = http_url(svc).rsplit("/v1/", 1)[0] + "/healthz"
                async with aiohttp.ClientSession() as session:
                    async with session.get(healthz) as resp:
                        route = (await resp.json())["forwarding"]["routes"]["otlphttp/jaeger"]
                assert route["failing"] is True and "HTTP 404" in route["last_error"]
                sink.fail_status = None
                assert await post(http_url(svc), recorded_run(run_id="run-ok")) == 200
                await sink.wait_for_spans(5)
                assert not _route(svc, "otlphttp/jaeger")["failing"]  # cleared by the next success

    with caplog.at_level(logging.INFO, logger="tracetape.collector.forward"):
        run(scenario())
    drops = [r.getMessage() for r in caplog.records
             if r.name == "tracetape.collector.forward" and r.levelno == logging.ERROR and "dropped" in r.getMessage()]
    assert len(drops) == 1, drops  # 3 batches dropped within a minute: one line
    recovered = [r.getMessage() for r in caplog.records if "delivering again" in r.getMessage()]
    assert recovered and "10 spans dropped meanwhile" in recovered[0]


def test_route_cursors_never_skip_entries_numbered_again_after_the_outbox_emptied(tmp_path: Path) -> None:
    """Once every route is done the outbox is empty and the next store numbers entries from 1 again: no
    route's cursor (a configured one or one no longer configured) may then pass over them."""
    def one(store: Store, run_id: str) -> None:
        agent = Agent(run_id=run_id)
        agent.model_step(1)
        agent.run_span()
        store.apply([ingest.prepare(agent.request(), store)])
        agent.shutdown()

    path = tmp_path / "db"
    store = Store(path, map_size=16 << 20)
    try:
        one(store, "run-1")
        one(store, "run-2")
        entries = store.outbox_read_after("a", 100)
        assert [seq for seq, _ in entries] == [1, 2, 3, 4]
        store.outbox_advance("old", 2, ["old", "a", "b"])  # a route since removed from the config
        assert store.outbox_advance("a", 4, ["a", "b"]) == 0  # b holds every entry back
        assert store.outbox_backlog(["a", "b", "old"]) == {"a": 0, "b": 4, "old": 2}
        assert store.outbox_advance("b", 2, ["a", "b"]) == 2
        assert store.outbox_read_after("b", 100)[0][0] == 3 and store.outbox_read_after("a", 100) == []
        assert store.outbox_advance("b", 4, ["a", "b"]) == 2 and store.outbox_size() == 0
    finally:
        store.close()
    store = Store(path, map_size=16 << 20)  # reopened with an empty outbox: numbering starts again
    try:
        one(store, "run-3")
        for route in ("a", "b", "old"):
            assert [seq for seq, _ in store.outbox_read_after(route, 100)] == [1, 2], route
        assert store.outbox_backlog(["a", "b", "old"]) == {"a": 2, "b": 2, "old": 2}
    finally:
        store.close()
