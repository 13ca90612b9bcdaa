"""The collector's OTLP receivers over real sockets: encodings, limits, errors, dedupe, real exporters.

Every request goes through a real collector (`CollectorService`) on 127.0.0.1 with a real LMDB store;
acknowledgements are checked against what the store holds.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import zstandard
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from tests.support.collector import collector_config, grpc_endpoint, http_url, run, running_collector
from tests.support.jaeger_sink import attributes
from tests.support.spans import Agent, chat_request

from tracetape.collector import otlp_decode as od
from tracetape.collector.service import CollectorService
from tracetape.collector.store import Store
from tracetape.errors import CliError
from tracetape.instrumentation import contract as c

PB = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}


def agent_request(steps: int = 3, run_id: str = "run-1", **kw: Any) -> ExportTraceServiceRequest:
    agent = Agent(run_id=run_id, **kw)
    for i in range(1, steps + 1):
        agent.model_step(i)
    agent.run_span()
    return agent.request()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def status_of(body: bytes, content_type: str) -> status_pb2.Status:
    if content_type.startswith("application/json"):
        return json_format.Parse(body, status_pb2.Status())
    return status_pb2.Status.FromString(body)


def stored_spans(service: CollectorService, run_id: str = "run-1") -> list[Any]:
    out = []
    for raw in service.store.spans("acme", "prod", run_id):
        for ss in ResourceSpans.FromString(raw).scope_spans:
            out.extend(ss.spans)
    return out


# --- encodings -----------------------------------------------------------------------------------------------


def test_protobuf_json_gzip_deflate_zstd_all_store_the_same_spans(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            url = http_url(svc)
            cases = [
                (lambda r: r.SerializeToString(), PB, None),
                (lambda r: od.request_to_json(r), JSON, None),
                (lambda r: gzip.compress(r.SerializeToString()), PB, "gzip"),
                (lambda r: zlib.compress(od.request_to_json(r)), JSON, "deflate"),
                (lambda r: zstandard.ZstdCompressor().compress(r.SerializeToString()), PB, "zstd"),
            ]
            for n, (encode, headers, coding) in enumerate(cases):
                request = agent_request(steps=2, run_id=f"run-{n}")
                hdrs = dict(headers, **({"Content-Encoding": coding} if coding else {}))
                status, resp_headers, body = await post(url, encode(request), hdrs)
                assert status == 200, body
                assert resp_headers["Content-Type"].startswith(headers["Content-Type"])
                if headers is JSON:
                    assert json.loads(body) == {}
                else:
                    assert ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()
                run_record = svc.store.run("acme", "prod", f"run-{n}")
                assert run_record is not None and run_record.step_count == 2 and run_record.status == "completed"
                assert len(svc.store.spans("acme", "prod", f"run-{n}")) == 3

    run(scenario())


def test_json_per_the_otlp_spec_hex_ids_int_enums_string_int64_base64_bytes(tmp_path: Path) -> None:
    body_bytes = chat_request("from json")
    envelope = c.envelope_hash(c.http_envelope("POST", "/v1/chat/completions", "", [], body_bytes))

    def kv(key: str, value: dict[str, Any]) -> dict[str, Any]:
        return {"key": key, "value": value}

    doc = {"resourceSpans": [{
        "resource": {"attributes": [kv("service.name", {"stringValue": "json-agent"})]},
        "scopeSpans": [{"scope": {"name": "hand-written"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c",
            "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "eee19b7ec3c1b173",
            "name": "chat gpt-test",
            "kind": 3,  # SPAN_KIND_CLIENT as an integer
            "startTimeUnixNano": "1700000000000000000",  # int64 as a string
            "endTimeUnixNano": 1700000000500000000,  # ... or as a number
            "attributes": [
                kv(c.RUN_ID, {"stringValue": "run-json"}), kv(c.TENANT, {"stringValue": "acme"}),
                kv(c.SCOPE, {"stringValue": "prod"}), kv(c.SPAN_KIND, {"stringValue": "step"}),
                kv(c.STEP_ID, {"stringValue": "00000000000000aa"}),
                kv(c.STEP_STARTED_NS, {"intValue": "1700000000000000000"}),
                kv(c.STEP_KIND, {"stringValue": "model"}), kv(c.STEP_ATTEMPT, {"intValue": 0}),
                kv(c.ENVELOPE_HASH, {"stringValue": envelope}),
                kv(c.REQUEST_BODY, {"bytesValue": base64.b64encode(body_bytes).decode()}),
                kv(c.RESPONSE_STATUS, {"intValue": "200"}),
                kv(c.GEN_AI_REQUEST_MODEL, {"stringValue": "gpt-test"}),
            ],
            "status": {"code": "STATUS_CODE_OK"},  # enum by name is accepted too
            "links": [{"traceId": "5b8efff798038103d269b633813fc60d", "spanId": "eee19b7ec3c1b175"}],
            "someFutureField": {"ignored": True},
        }]}],
    }]}

    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            status, headers, body = await post(http_url(svc), json.dumps(doc).encode(), JSON)
            assert status == 200, body
            assert headers["Content-Type"].startswith("application/json")
            (raw,) = svc.store.spans("acme", "prod", "run-json")
            span = ResourceSpans.FromString(raw).scope_spans[0].spans[0]
            assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
            assert span.span_id.hex() == "eee19b7ec3c1b174"
            assert span.parent_span_id.hex() == "eee19b7ec3c1b173"
            assert span.links[0].trace_id.hex() == "5b8efff798038103d269b633813fc60d"
            assert span.kind == 3 and span.status.code == 1
            assert span.start_time_unix_nano == 1700000000000000000
            assert span.end_time_unix_nano == 1700000000500000000
            attrs = attributes(span)
            assert c.REQUEST_BODY not in attrs
            digest = bytes.fromhex(attrs[c.REQUEST_BODY + c.PAYLOAD_REF_SUFFIX])
            assert svc.store.blob("acme", "prod", digest) == body_bytes
            (step,) = svc.store.steps("acme", "prod", "run-json")
            assert step.step_id == "00000000000000aa" and step.attempts[0].status == 200

    run(scenario())


def test_the_real_otlp_http_exporter_with_gzip(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            exporter = HttpSpanExporter(endpoint=http_url(svc), compression=Compression.Gzip, timeout=10)
            agent = Agent(run_id="run-http")
            for i in range(1, 4):
                agent.model_step(i, response=b"x" * 50_000)
            agent.run_span()
            spans = agent.memory.get_finished_spans()
            result = await asyncio.to_thread(exporter.export, spans)
            assert result == SpanExportResult.SUCCESS
            exporter.shutdown()
            assert len(svc.store.spans("acme", "prod", "run-http")) == 4
            assert svc.store.run("acme", "prod", "run-http").step_count == 3

    run(scenario())


def test_the_real_otlp_grpc_exporter(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            exporter = GrpcSpanExporter(endpoint=grpc_endpoint(svc), insecure=True, timeout=10)
            agent = Agent(run_id="run-grpc", extra=SimpleSpanProcessor(exporter))

            def record() -> None:  # the SDK exports synchronously on span end: off the collector's loop
                for i in range(1, 4):
                    agent.model_step(i)
                agent.run_span()
                agent.shutdown()

            await asyncio.to_thread(record)
            assert len(svc.store.spans("acme", "prod", "run-grpc")) == 4
            record_ = svc.store.run("acme", "prod", "run-grpc")
            assert record_.step_count == 3 and record_.status == "completed"

    run(scenario())


def test_the_real_http_exporter_through_the_sdk_pipeline(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            exporter = HttpSpanExporter(endpoint=http_url(svc), timeout=10)
            agent = Agent(run_id="run-sdk", extra=SimpleSpanProcessor(exporter))

            def record() -> None:
                agent.tool_step(1, b'{"q": "weather"}', b'{"answer": "sunny"}')
                agent.run_span()
                agent.shutdown()

            await asyncio.to_thread(record)
            (step,) = svc.store.steps("acme", "prod", "run-sdk")
            assert step.kind == c.STEP_KIND_TOOL
            assert svc.store.blob("acme", "prod", step.attempts[0].tool_result.digest) == b'{"answer": "sunny"}'

    run(scenario())


# --- errors --------------------------------------------------------------------------------------------------


def test_garbage_is_400_with_a_status_body_in_the_request_encoding(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            url = http_url(svc)
            status, headers, body = await post(url, b"not a protobuf", PB)
            assert status == 400
            assert headers["Content-Type"] == "application/x-protobuf"
            assert status_of(body, headers["Content-Type"]).code == 3  # INVALID_ARGUMENT
            status, headers, body = await post(url, b"{not json", JSON)
            assert status == 400 and headers["Content-Type"].startswith("application/json")
            assert "not valid JSON" in status_of(body, headers["Content-Type"]).message
            bad_id = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz", "spanId": "eee19b7ec3c1b174"}]}]}]}
            status, headers, body = await post(url, json.dumps(bad_id).encode(), JSON)
            assert status == 400
            assert "traceId must be 32 hex digits" in status_of(body, headers["Content-Type"]).message
            secret = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "5b8efff798038103d269b633813fc60c",
                      "spanId": "eee19b7ec3c1b174", "startTimeUnixNano": "sk-secret-value-123"}]}]}]}
            status, headers, body = await post(url, json.dumps(secret).encode(), JSON)
            assert status == 400
            assert b"sk-secret" not in body  # messages never quote values from the request
            status, _, body = await post(url, gzip.compress(b"x")[:-6], dict(PB, **{"Content-Encoding": "gzip"}))
            assert status == 400 and b"truncated" in body
            assert svc.store.stats()["spans"] == 0

    run(scenario())


def test_unsupported_media_type_is_415_and_other_methods_405(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            url = http_url(svc)
            status, _, body = await post(url, b"hello", {"Content-Type": "text/plain"})
            assert status == 415
            assert "unsupported content type" in status_pb2.Status.FromString(body).message
            status, _, body = await post(url, b"x", dict(PB, **{"Content-Encoding": "br"}))
            assert status == 415
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as resp:
                    assert resp.status == 405
                    assert resp.headers["Allow"] == "POST"
                    assert status_pb2.Status.FromString(await resp.read()).code == 12
                async with session.get(url.replace("/v1/traces", "/healthz")) as resp:
                    assert resp.status == 200 and (await resp.json())["status"] == "ok"

    run(scenario())


def test_over_the_limit_is_413_with_a_status_body_and_a_gzip_bomb_too(tmp_path: Path) -> None:
    limit = 256 * 1024

    def gzip_bomb(size: int) -> bytes:
        comp = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        chunk = b"\0" * (1 << 20)
        parts = [comp.compress(chunk) for _ in range(size >> 20)]
        return b"".join(parts) + comp.flush()

    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db", max_body=limit)) as svc:
            url = http_url(svc)
            status, headers, body = await post(url, b"\0" * (limit + 1), PB)
            assert status == 413
            assert headers["Content-Type"] == "application/x-protobuf"  # not aiohttp's text/plain 413
            assert status_pb2.Status.FromString(body).message.startswith("request body")

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit is found while reading
                for _ in range(6):
                    yield b"\0" * (limit // 4)

            status, headers, body = await post(url, chunked(), PB)  # type: ignore[arg-type]
            assert status == 413
            assert status_pb2.Status.FromString(body).message == f"request body is over the {limit}-byte limit"
            bomb = gzip_bomb(128 << 20)  # 128 MiB in about 128 KiB: under the limit as sent
            assert len(bomb) < limit
            started = time.monotonic()
            status, headers, body = await post(url, bomb, dict(PB, **{"Content-Encoding": "gzip"}))
            assert status == 413
            assert "inflates to more than" in status_pb2.Status.FromString(body).message
            assert time.monotonic() - started < 5  # inflation stopped at the limit
            # A request just under the limit is fine, compressed or not.
            ok = agent_request(steps=2).SerializeToString()
            assert (await post(url, gzip.compress(ok), dict(PB, **{"Content-Encoding": "gzip"})))[0] == 200

    run(scenario())


def test_decompression_stops_at_the_limit() -> None:
    bomb = zlib.compress(b"\0" * (64 << 20))
    with pytest.raises(od.TooLarge):
        od.decompress(bomb, "deflate", 1 << 20)
    gz = gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 1000)  # concatenated members are all read
    assert od.decompress(gz, "gzip", 4000) == b"a" * 1000 + b"b" * 1000
    with pytest.raises(od.TooLarge):
        od.decompress(gz, "gzip", 1500)
    with pytest.raises(od.TooLarge):
        od.decompress(zstandard.ZstdCompressor().compress(b"\0" * (8 << 20)), "zstd", 1 << 20)
    with pytest.raises(od.Undecodable):
        od.decompress(b"definitely not gzip", "gzip", 1000)
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert od.decompress(raw_deflate.compress(b"raw") + raw_deflate.flush(), "deflate", 100) == b"raw"


def test_partial_success_reports_rejected_spans(tmp_path: Path) -> None:
    agent = Agent(run_id="run-partial")
    agent.model_step(1)
    request = agent.request()
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.CopyFrom(request.resource_spans[0].scope_spans[0].spans[0])
    bad.span_id = bytes.fromhex("00000000000000ff")
    for kv in bad.attributes:
        if kv.key == c.STEP_ID:
            kv.value.string_value = "not-a-step-id"

    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            status, _, body = await post(http_url(svc), request.SerializeToString(), PB)
            assert status == 200
            response = ExportTraceServiceResponse.FromString(body)
            assert response.partial_success.rejected_spans == 1
            assert c.STEP_ID in response.partial_success.error_message
            status, _, body = await post(http_url(svc), od.request_to_json(request), JSON)
            assert status == 200
            assert json.loads(body)["partialSuccess"]["rejectedSpans"] in ("1", 1)
            assert len(stored_spans(svc, "run-partial")) == 1

    run(scenario())


def test_a_resent_batch_is_stored_once(tmp_path: Path) -> None:
    request = agent_request(steps=4, run_id="run-dup")
    body = request.SerializeToString()

    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            assert (await post(http_url(svc), body, PB))[0] == 200
            first = svc.store.stats()
            assert (await post(http_url(svc), body, PB))[0] == 200  # the exporter retried after a lost answer
            assert (await post(http_url(svc), gzip.compress(od.request_to_json(request)),
                               dict(JSON, **{"Content-Encoding": "gzip"})))[0] == 200
            async with grpc.aio.insecure_channel(grpc_endpoint(svc)) as channel:
                await TraceServiceStub(channel).Export(request, timeout=10)
            again = svc.store.stats()
            for table in ("spans", "steps", "envelopes", "blobs", "runs", "outbox"):
                assert again[table] == first[table], table
            assert first["spans"] == 5 and first["steps"] == 4
            assert svc.store.run("acme", "prod", "run-dup").span_count == 5

    run(scenario())


def test_overloaded_writer_answers_503_with_retry_after(tmp_path: Path) -> None:
    requests = [agent_request(steps=3, run_id=f"run-{i}").SerializeToString() for i in range(40)]

    async def scenario() -> None:
        conf = collector_config(tmp_path / "db", max_pending="1KiB")
        async with running_collector(conf) as svc:
            url = http_url(svc)
            results = await asyncio.gather(*(post(url, body, PB) for body in requests))
            statuses = [status for status, _, _ in results]
            assert set(statuses) <= {200, 503}
            assert 503 in statuses, "nothing was ever pending together; the test did not overload the writer"
            for status, headers, body in results:
                if status == 503:
                    assert int(headers["Retry-After"]) >= 1
                    assert status_pb2.Status.FromString(body).code == 14  # UNAVAILABLE
            # Retried one by one, as an exporter would, everything is stored.
            for (status, _, _), body in zip(results, requests):
                if status == 503:
                    assert (await post(url, body, PB))[0] == 200
            assert len(svc.store.runs("acme", "prod")) == 40

    run(scenario())


def test_overloaded_writer_over_grpc_is_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    requests = [agent_request(steps=3, run_id=f"run-{i}") for i in range(40)]

    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db", max_pending="1KiB")) as svc:
            async with grpc.aio.insecure_channel(grpc_endpoint(svc)) as channel:
                stub = TraceServiceStub(channel)
                results = await asyncio.gather(*(stub.Export(r, timeout=10) for r in requests), return_exceptions=True)
            errors = [r for r in results if isinstance(r, Exception)]
            assert errors, "the writer was never overloaded"
            for err in errors:
                assert isinstance(err, grpc.aio.AioRpcError)
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = dict(err.trailing_metadata())["grpc-status-details-bin"]
                status = status_pb2.Status.FromString(details)
                info = error_details_pb2.RetryInfo()
                assert status.details[0].Unpack(info) and info.retry_delay.seconds >= 1

    run(scenario())


def test_a_full_store_answers_503_and_keeps_what_it_had(tmp_path: Path) -> None:
    async def scenario() -> None:
        base = collector_config(tmp_path / "db")
        tiny = dataclasses.replace(base.store, map_size=2 * 1024 * 1024)  # the most the map may grow to
        conf = dataclasses.replace(base, exporters={**base.exporters, "tracetape": tiny})
        async with running_collector(conf) as svc:
            small = agent_request(steps=1, run_id="run-small").SerializeToString()
            assert (await post(http_url(svc), small, PB))[0] == 200
            agent = Agent(run_id="run-big")
            agent.model_step(1, response=os.urandom(3 * 1024 * 1024))  # incompressible, over the map's cap
            status, headers, body = await post(http_url(svc), agent.request().SerializeToString(), PB)
            assert status == 503
            assert int(headers["Retry-After"]) >= 1
            assert "store" in status_pb2.Status.FromString(body).message
            assert svc.store.run("acme", "prod", "run-small") is not None
            assert svc.store.run("acme", "prod", "run-big") is None

    run(scenario())


def test_grpc_bad_input_and_oversized_messages(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db", max_grpc_mib=1)) as svc:
            async with grpc.aio.insecure_channel(grpc_endpoint(svc)) as channel:
                raw = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw(b"not a protobuf", timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                agent = Agent(run_id="run-huge")
                agent.model_step(1, response=os.urandom(2 * 1024 * 1024))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await TraceServiceStub(channel).Export(agent.request(), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                response = await TraceServiceStub(channel).Export(agent_request(run_id="run-ok"), timeout=10,
                                                                  compression=grpc.Compression.Gzip)
                assert response == ExportTraceServiceResponse()
            assert svc.store.run("acme", "prod", "run-ok") is not None

    run(scenario())


def test_metrics_count_requests_and_spans(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            await post(http_url(svc), agent_request(steps=2).SerializeToString(), PB)
            await post(http_url(svc), b"junk", PB)
            async with aiohttp.ClientSession() as session:
                async with session.get(http_url(svc).replace("/v1/traces", "/metrics")) as resp:
                    metrics = await resp.json()
            assert metrics["receiver"]["spans_accepted"] == 3
            assert metrics["receiver"]["responses"] == {"http 200": 1, "http 400": 1}
            assert metrics["store"]["spans"] == 3

    run(scenario())


def test_a_taken_port_is_a_clear_error_and_nothing_is_left_running(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_collector(collector_config(tmp_path / "a")) as first:
            port = int(http_url(first).rsplit(":", 1)[1].split("/")[0])
            conf = collector_config(tmp_path / "b").with_overrides(http_port=port)
            second = CollectorService(conf)
            with pytest.raises(CliError) as info:
                await second.start()
            assert f"receivers.otlp: cannot listen on 127.0.0.1:{port} (OTLP/HTTP)" in str(info.value)
            assert second.store is None and second.writer is None
            # The second store was closed, so it can be opened again.
            Store(tmp_path / "b").close()

    run(scenario())


# --- the command ---------------------------------------------------------------------------------------------


def test_the_collector_command_starts_stores_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracetape.cli", "collector", "--data", str(data), "--http-port", "0",
         "--grpc-port", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert info["store"] == str(data)
        assert info["http"][0].startswith("http://127.0.0.1:") and info["grpc"][0].startswith("127.0.0.1:")

        async def send() -> list[int]:
            statuses = []
            for i in range(5):
                body = agent_request(steps=2, run_id=f"run-{i}").SerializeToString()
                statuses.append((await post(info["http"][0], body, PB))[0])
            return statuses

        assert run(send()) == [200] * 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = Store(data, readonly=True)
    try:
        assert len(store.runs("acme", "prod")) == 5  # everything acknowledged is in the store
        assert store.stats()["steps"] == 10
    finally:
        store.close()


def test_in_flight_requests_finish_when_the_service_stops(tmp_path: Path) -> None:
    bodies = [agent_request(steps=2, run_id=f"run-{i}").SerializeToString() for i in range(20)]

    async def scenario() -> None:
        svc = CollectorService(collector_config(tmp_path / "db"))
        await svc.start()
        url = http_url(svc)
        sends = [asyncio.create_task(post(url, body, PB)) for body in bodies]
        while not svc.writer.pending_bytes and not svc.writer.stats["requests"]:
            await asyncio.sleep(0.001)  # until at least one request is being written
        await svc.stop()
        acknowledged = []
        for i, task in enumerate(sends):
            try:
                status, _, _ = await task
            except aiohttp.ClientError:
                continue  # refused after the stop began: never acknowledged
            if status == 200:
                acknowledged.append(f"run-{i}")
        store = Store(tmp_path / "db", readonly=True)
        try:
            for run_id in acknowledged:
                assert store.run("acme", "prod", run_id) is not None, run_id
        finally:
            store.close()
        assert acknowledged

    run(scenario())


def test_malformed_http_is_a_400_without_an_error_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not valid HTTP (a NUL in a header): 400 from the parser, and no ERROR record a client could flood."""

    async def scenario() -> bytes:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            host, port = http_url(svc).split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            answer = await reader.read(1024)
            writer.close()
            return answer

    with caplog.at_level(logging.DEBUG):
        answer = run(scenario())
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
