"""Issue 5, item 4: hostile input. Fuzz the OTLP decoders (protobuf, JSON, content type and encoding
combinations) and the ingest path behind them, in-process and over a real socket against a collector
subprocess: no crash, no 500 (nor 503) for a client's mistake, bounded memory. Plus the classic attacks:
compression bombs (→ 413), huge attribute counts and values, invalid UTF-8, deeply nested JSON and
AnyValues, absurd values for tracetape's own attributes (→ rejected per span with partial_success).

Example counts are kept modest for CI; `TRACETAPE_FUZZ_EXAMPLES` raises them for a soak run.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from tests.support.reliability import CollectorProcess, post, read_everything, write_config
from tests.support.spans import Agent, chat_request
from tracetape.collector import ingest
from tracetape.collector import otlp_decode as od
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c

EXAMPLES = int(os.environ.get("TRACETAPE_FUZZ_EXAMPLES", "200"))
HTTP_EXAMPLES = int(os.environ.get("TRACETAPE_FUZZ_HTTP_EXAMPLES", "120"))
MAX_BODY = 4 * 1024 * 1024
CLIENT_ERRORS = {400, 413, 415}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
TRIED: dict[str, int] = {}


def _count(name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1


# --- valid material to mutate ------------------------------------------------------------------------------


def _valid_request() -> ExportTraceServiceRequest:
    agent = Agent(run_id="fuzz-base")
    agent.model_step(1)
    agent.tool_step(2, b'{"q": "x"}', b"result")
    agent.run_span()
    return agent.request()


VALID = _valid_request()
VALID_PB = VALID.SerializeToString()
VALID_JSON = od.request_to_json(VALID)


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in ops:
        if not out:
            out.append(value & 0xFF)
            continue
        pos %= len(out)
        if kind == 0:
            out[pos] = value & 0xFF  # overwrite
        elif kind == 1:
            out.insert(pos, value & 0xFF)  # insert
        elif kind == 2:
            del out[pos:pos + 1 + value % 16]  # delete a run
        else:
            out[pos:pos] = out[pos:pos + 1 + value % 64]  # duplicate a run
    return bytes(out)


mutations = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 30), st.integers(0, 255)), max_size=8)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
OTLP_KEYS = ["traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano", "endTimeUnixNano",
             "attributes", "links", "events", "status", "droppedAttributesCount", "trace_id", "span_id"]
any_value_json = st.recursive(
    st.builds(lambda v: {"stringValue": v}, st.text(max_size=30))
    | st.builds(lambda v: {"intValue": v}, st.integers(-(2**64), 2**64).map(str) | st.integers(-(2**63), 2**63 - 1))
    | st.builds(lambda v: {"boolValue": v}, st.booleans())
    | st.builds(lambda v: {"doubleValue": v}, st.floats(allow_nan=False))
    | st.builds(lambda v: {"bytesValue": v}, st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=8)),
    lambda inner: st.builds(lambda vs: {"arrayValue": {"values": vs}}, st.lists(inner, max_size=3))
    | st.builds(lambda kvs: {"kvlistValue": {"values": [{"key": k, "value": v} for k, v in kvs]}},
                st.lists(st.tuples(st.text(max_size=8), inner), max_size=3)),
    max_leaves=10,
)
hexish = st.one_of(st.binary(min_size=0, max_size=20).map(bytes.hex), st.text(max_size=34), json_values)
span_json = st.fixed_dictionaries(
    {},
    optional={
        "traceId": hexish, "spanId": hexish, "parentSpanId": hexish, "name": json_values,
        "kind": st.one_of(st.integers(-5, 10), st.sampled_from(["SPAN_KIND_CLIENT", "NOPE"]), json_values),
        "startTimeUnixNano": st.one_of(st.integers(-(2**65), 2**65), st.integers(0, 2**64).map(str), json_values),
        "attributes": st.one_of(st.lists(st.fixed_dictionaries({"key": st.text(max_size=30) | st.sampled_from(
            [c.RUN_ID, c.STEP_ID, c.SPAN_KIND, c.STEP_STARTED_NS, c.TENANT])}, optional={"value": any_value_json}),
            max_size=5), json_values),
        "links": st.lists(st.fixed_dictionaries({}, optional={"traceId": hexish, "spanId": hexish}), max_size=2),
        "status": json_values,
    },
)
otlp_json_docs = st.one_of(
    json_values,
    st.builds(lambda spans, res: {"resourceSpans": [{"resource": res, "scopeSpans": [{"spans": spans}]}]},
              st.lists(span_json, max_size=3), st.one_of(st.just({}), json_values)),
)


@pytest.fixture(scope="module")
def scratch_store() -> Iterator[Store]:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "db", map_size=64 << 20)
        yield store
        store.close()


def _ingest_never_fails(store: Store, request: ExportTraceServiceRequest) -> None:
    """What the writer does with a decoded request: must not raise for any input (a raise = 500/503)."""
    batch = ingest.prepare(request, store)
    store.apply([batch])


# --- the decoders, in-process ----------------------------------------------------------------------------


@FUZZ
@given(body=st.one_of(st.binary(max_size=2000), mutations.map(lambda m: _mutate(VALID_PB, m))))
def test_protobuf_decoder_and_ingest_on_random_and_mutated_bytes(scratch_store: Store, body: bytes) -> None:
    _count("protobuf bodies")
    try:
        decoded = od.decode_request(body, "application/x-protobuf", None, max_size=MAX_BODY)
    except od.DecodeFailure as err:
        assert err.status in CLIENT_ERRORS
        return
    _ingest_never_fails(scratch_store, decoded.request)


@FUZZ
@given(doc=otlp_json_docs)
def test_json_decoder_and_ingest_on_random_otlp_shaped_documents(scratch_store: Store, doc: Any) -> None:
    _count("JSON documents")
    raw = json.dumps(doc).encode()
    try:
        decoded = od.decode_request(raw, "application/json", None, max_size=MAX_BODY)
    except od.DecodeFailure as err:
        assert err.status in CLIENT_ERRORS
        return
    _ingest_never_fails(scratch_store, decoded.request)


@FUZZ
@given(body=st.one_of(st.binary(max_size=500), mutations.map(lambda m: _mutate(VALID_JSON, m))))
def test_json_decoder_on_mutated_bytes_and_invalid_utf8(scratch_store: Store, body: bytes) -> None:
    _count("JSON byte mutations")
    try:
        decoded = od.decode_request(body, "application/json; charset=utf-8", None, max_size=MAX_BODY)
    except od.DecodeFailure as err:
        assert err.status in CLIENT_ERRORS
        return
    _ingest_never_fails(scratch_store, decoded.request)


CONTENT_TYPES = ["application/x-protobuf", "application/protobuf", "application/json", "APPLICATION/JSON; x=y",
                 "text/plain", "", "application/x-protobuf;;;", "multipart/form-data; boundary=x", "\x00"]
ENCODINGS = ["identity", "gzip", "x-gzip", "deflate", "zstd", "br", "gzip, gzip", "zstd, gzip", "GZIP", "",
             " , ", "compress", "deflate, identity"]


def _encode(data: bytes, coding: str) -> bytes:
    for one in [x.strip().lower() for x in coding.split(",") if x.strip()]:
        if one in ("gzip", "x-gzip"):
            data = gzip.compress(data)
        elif one == "deflate":
            data = zlib.compress(data)
        elif one == "zstd":
            data = zstandard.ZstdCompressor().compress(data)
    return data


@FUZZ
@given(content_type=st.sampled_from(CONTENT_TYPES) | st.text(max_size=30),
       declared=st.sampled_from(ENCODINGS) | st.text(max_size=20),
       actual=st.sampled_from(ENCODINGS),
       payload=st.sampled_from(["pb", "json", "junk"]), cut=st.integers(0, 64))
def test_content_type_and_encoding_combinations(scratch_store: Store, content_type: str, declared: str,
                                                actual: str, payload: str, cut: int) -> None:
    _count("content type/encoding combinations")
    raw = {"pb": VALID_PB, "json": VALID_JSON, "junk": b"\x00\xff" * 50}[payload]
    body = _encode(raw, actual)
    if cut:
        body = body[:-cut] if cut < len(body) else body
    try:
        decoded = od.decode_request(body, content_type, declared, max_size=MAX_BODY)
    except od.DecodeFailure as err:
        assert err.status in CLIENT_ERRORS
        return
    _ingest_never_fails(scratch_store, decoded.request)


# --- tracetape's own attributes with absurd types and values ---------------------------------------------

STEP_ATTRS = [c.STEP_STARTED_NS, c.STEP_ATTEMPT, c.STEP_INDEX, c.STEP_ID, c.STEP_KIND, c.ENVELOPE_HASH,
              c.RESPONSE_STATUS, c.RESPONSE_BYTES_READ, c.RESPONSE_CHUNK_ENDS, c.RESPONSE_CHUNK_TIMES_US,
              c.RESPONSE_STREAMED, c.RESPONSE_CONTENT_ENCODING, c.REQUEST_HEADERS, c.RESPONSE_HEADERS,
              c.REQUEST_BODY, c.RESPONSE_BODY, c.TOOL_MUTATING]
RUN_ATTRS = [c.RUN_OUTCOME, c.RUN_EXIT_CODE, c.RUN_COMMAND, c.RUN_LINEAGE_DEPTH, c.RUN_REPLAY_FORCED]
COMMON_ATTRS = [c.TENANT, c.SCOPE, c.RUN_ID, c.SPAN_KIND]
INT_EDGES = [-1, 0, 1, 65535, 65536, 2**31, 2**32, 2**63 - 1, -(2**63)]

int_values = st.builds(lambda v: AnyValue(int_value=v), st.sampled_from(INT_EDGES) | st.integers(-(2**63), 2**63 - 1))
numeric_strings = st.builds(lambda v: AnyValue(string_value=str(v)),
                            st.sampled_from(INT_EDGES + [2**64, 10**30, -(10**30)]) | st.integers(-(2**80), 2**80))
other_scalars = (
    st.builds(lambda v: AnyValue(string_value=v), st.text(max_size=30) | st.sampled_from(["", " 1 ", "1e9", "0x10"]))
    | st.builds(lambda v: AnyValue(double_value=v), st.floats())
    | st.builds(lambda v: AnyValue(bool_value=v), st.booleans())
    | st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=30))
    | st.just(AnyValue())
)
nested_values = st.recursive(
    int_values | numeric_strings | other_scalars,
    lambda inner: st.builds(lambda vs: AnyValue(array_value=ArrayValue(values=vs)), st.lists(inner, max_size=3))
    | st.builds(lambda kvs: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in kvs])),
                st.lists(st.tuples(st.text(max_size=5), inner), max_size=3)),
    max_leaves=6,
)
any_values = st.one_of(int_values, numeric_strings, other_scalars, nested_values)


def _with_attributes(overrides: list[tuple[str, AnyValue]], run_span: bool = False) -> ExportTraceServiceRequest:
    """One valid step span (or run span) whose named attributes are replaced (or added)."""
    agent = Agent(run_id="fuzz-attrs")
    if run_span:
        agent.run_span()
    else:
        agent.model_step(1)
    request = agent.request()
    span = request.resource_spans[0].scope_spans[0].spans[0]
    for key, value in overrides:
        for kv in span.attributes:
            if kv.key == key:
                kv.value.CopyFrom(value)
                break
        else:
            span.attributes.add(key=key, value=value)
    return request


@FUZZ
@given(data=st.data(), run_span=st.booleans())
def test_absurd_tracetape_attribute_values_are_rejected_per_span_never_a_write_failure(
    scratch_store: Store, data: st.DataObject, run_span: bool
) -> None:
    """BUG (collector/ingest.py + store.py): out-of-range integers pass `prepare` and fail `apply`."""
    _count("absurd tracetape attribute sets")
    names = st.sampled_from((RUN_ATTRS if run_span else STEP_ATTRS) + COMMON_ATTRS)
    overrides = data.draw(st.lists(st.tuples(names, any_values), min_size=1, max_size=2))
    request = _with_attributes(overrides, run_span)
    batch = ingest.prepare(request, scratch_store)
    assert batch.rejected + len(batch.spans) == 1
    scratch_store.apply([batch])  # raising here fails the whole group commit (503 for every client in it)


@pytest.mark.parametrize(("key", "value"), [
    (c.STEP_STARTED_NS, AnyValue(int_value=-1)),
    (c.STEP_STARTED_NS, AnyValue(string_value="9" * 30)),
    (c.STEP_ATTEMPT, AnyValue(int_value=70_000)),
    (c.STEP_ATTEMPT, AnyValue(int_value=-1)),
    (c.RESPONSE_STATUS, AnyValue(string_value="9" * 30)),
    (c.STEP_INDEX, AnyValue(string_value="-" + "9" * 30)),
    (c.RUN_EXIT_CODE, AnyValue(string_value="9" * 30)),
])
def test_out_of_range_integers_are_rejected_in_prepare(scratch_store: Store, key: str, value: AnyValue) -> None:
    """BUG: these pass `ingest.prepare` and then raise in `Store.apply` (struct.error / OverflowError)."""
    request = _with_attributes([(key, value)], run_span=key == c.RUN_EXIT_CODE)
    batch = ingest.prepare(request, scratch_store)
    assert batch.rejected == 1 and key in batch.errors[0], batch.errors


def test_a_deeply_nested_json_response_body_does_not_break_ingest(scratch_store: Store) -> None:
    """BUG (collector/genai.py read_response): msgspec raises RecursionError, which is not caught."""
    agent = Agent(run_id="deep-response")
    agent.model_step(1, response=b"[" * 5000)
    agent.model_step(2, response=b'{"type":"message_start","message":' * 3000 + b"{}" + b"}" * 3000)
    batch = ingest.prepare(agent.request(), scratch_store)
    assert batch.rejected == 0 and len(batch.spans) == 2
    scratch_store.apply([batch])


# --- over a real socket: a collector subprocess ----------------------------------------------------------


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    tmp = tmp_path_factory.mktemp("fuzz-collector")
    proc = CollectorProcess(write_config(tmp, tmp / "data", max_body=MAX_BODY))
    proc.start()
    proc.data = tmp / "data"  # type: ignore[attr-defined]
    proc.baseline_kb = proc.rss_kb()  # type: ignore[attr-defined]
    yield proc
    try:
        assert proc.alive(), "the collector died"
        assert proc.terminate() == 0
        log = proc.stderr_path.read_text()
        assert "ERROR tracetape" not in log, log[-3000:]  # no bug surfaced as a logged 500
        read_everything(proc.data)  # type: ignore[attr-defined]
    finally:
        if proc.alive():
            proc.kill()


def _send(collector: CollectorProcess, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    assert collector.url is not None
    return post(collector.url, body, headers, timeout=30)


@settings(max_examples=HTTP_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["pb", "json", "doc"]), mutation=mutations, doc=otlp_json_docs,
       content_type=st.sampled_from([t for t in CONTENT_TYPES if t.isprintable()]), encoding=st.sampled_from(["", "gzip", "zstd", "deflate"]))
def test_http_receiver_answers_client_errors_never_500(collector: CollectorProcess, kind: str, mutation: Any,
                                                        doc: Any, content_type: str, encoding: str) -> None:
    _count("HTTP requests (fuzzed)")
    raw = {"pb": lambda: _mutate(VALID_PB, mutation), "json": lambda: _mutate(VALID_JSON, mutation),
           "doc": lambda: json.dumps(doc).encode()}[kind]()
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    status, resp_headers, body = _send(collector, _encode(raw, encoding), headers)
    assert status in CLIENT_ERRORS | {200}, (status, body[:300])
    if status != 200:
        assert resp_headers["content-type"] in ("application/x-protobuf", "application/json")


def _bomb(coding: str, size: int) -> bytes:
    if coding == "zstd":
        comp = zstandard.ZstdCompressor(level=3).compressobj()
        return b"".join(comp.compress(b"\0" * (1 << 20)) for _ in range(size >> 20)) + comp.flush()
    wbits = zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS
    comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(comp.compress(b"\0" * (1 << 20)) for _ in range(size >> 20)) + comp.flush()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
def test_compression_bombs_are_413_with_rss_bounded(collector: CollectorProcess, coding: str) -> None:
    bomb = _bomb(coding, 512 << 20)  # 512 MiB of zeros
    assert len(bomb) < MAX_BODY
    for _ in range(3):
        status, _, body = _send(collector, bomb, {"Content-Type": "application/x-protobuf", "Content-Encoding": coding})
        assert status == 413 and "inflates to more than" in status_pb2.Status.FromString(body).message
        _count("compression bombs (512 MiB inflated)")
    grown_mb = (collector.rss_kb() - collector.baseline_kb) / 1024  # type: ignore[attr-defined]
    assert grown_mb < 100, f"RSS grew by {grown_mb:.0f} MiB for a {MAX_BODY >> 20} MiB limit"


def _request_with(span_attrs: list[KeyValue], run_id: str = "hostile") -> ExportTraceServiceRequest:
    agent = Agent(run_id=run_id)
    agent.model_step(1)
    request = agent.request()
    request.resource_spans[0].scope_spans[0].spans[0].attributes.extend(span_attrs)
    return request


def _ok_and_rejected(status: int, body: bytes) -> int:
    assert status == 200, (status, body[:300])
    return ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans


def test_huge_attribute_counts_and_values_are_stored(collector: CollectorProcess) -> None:
    many = [KeyValue(key=f"attr.{i}", value=AnyValue(int_value=i)) for i in range(150_000)]
    body = _request_with(many, "many-attrs").SerializeToString()
    assert len(body) < MAX_BODY
    assert _ok_and_rejected(*_send(collector, body, {"Content-Type": "application/x-protobuf"})[::2]) == 0
    huge = [KeyValue(key="huge", value=AnyValue(string_value="é" * (1_500_000)))]  # 3 MB of UTF-8
    body = _request_with(huge, "huge-value").SerializeToString()
    assert _ok_and_rejected(*_send(collector, body, {"Content-Type": "application/x-protobuf"})[::2]) == 0
    over = [KeyValue(key="over", value=AnyValue(bytes_value=os.urandom(MAX_BODY)))]
    status, _, _ = _send(collector, _request_with(over).SerializeToString(), {"Content-Type": "application/x-protobuf"})
    assert status == 413
    _count("huge attribute requests")


def test_invalid_utf8_in_strings_is_a_client_error(collector: CollectorProcess) -> None:
    good = _request_with([KeyValue(key="marker", value=AnyValue(string_value="MARKERVALUE"))]).SerializeToString()
    bad_pb = good.replace(b"MARKERVALUE", b"MARKER\xff\xfe\xc3(E")  # same length, invalid UTF-8 in a string field
    status, _, _ = _send(collector, bad_pb, {"Content-Type": "application/x-protobuf"})
    assert status == 400
    bad_json = od.request_to_json(_request_with([])).replace(b'"chat gpt-test"', b'"chat \xff\xfe gpt"')
    status, _, _ = _send(collector, bad_json, {"Content-Type": "application/json"})
    assert status == 400
    lone_surrogate = od.request_to_json(_request_with([])).replace(b'"chat gpt-test"', b'"chat \\ud800 gpt"')
    status, _, _ = _send(collector, lone_surrogate, {"Content-Type": "application/json"})
    assert status == 400
    _count("invalid UTF-8 requests")


def test_deeply_nested_input_is_400(collector: CollectorProcess) -> None:
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b'{"resourceSpans":' + b"[" * 100_000):
        status, _, _ = _send(collector, body, {"Content-Type": "application/json"})
        assert status == 400
    # nested arrays in protobuf, far past the parser's recursion limit (appended = one more ResourceSpans)
    raw = _request_with([]).SerializeToString() + _nested_attr_bytes(5_000)
    status, _, _ = _send(collector, raw, {"Content-Type": "application/x-protobuf"})
    assert status == 400
    kv = {"stringValue": "leaf"}
    for _ in range(150):
        kv = {"kvlistValue": {"values": [{"key": "k", "value": kv}]}}
    doc = json.loads(od.request_to_json(_request_with([])))
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"].append({"key": "deep", "value": kv})
    status, _, _ = _send(collector, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    assert status == 400  # past protobuf's recursion limit (100)
    _count("deeply nested requests")


def _nested_attr_bytes(depth: int) -> bytes:
    """Wire bytes of a top-level unknown-free chain: resource_spans → resource → attribute → nested arrays."""
    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    value = field(1, b"leaf")  # AnyValue.string_value
    for _ in range(depth):
        value = field(5, field(1, value))  # AnyValue.array_value → ArrayValue.values
    kv = field(1, b"deep") + field(2, value)
    resource = field(1, kv)  # Resource.attributes
    return field(1, field(1, resource))  # ExportTraceServiceRequest.resource_spans → ResourceSpans.resource


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_absurd_tracetape_attributes_over_http_are_partial_success_never_5xx(collector: CollectorProcess) -> None:
    """BUG (see test_out_of_range_integers_are_rejected_in_prepare): today these are 503, retried forever."""
    cases = [(c.STEP_ATTEMPT, AnyValue(int_value=70_000)), (c.STEP_STARTED_NS, AnyValue(int_value=-1)),
             (c.RESPONSE_STATUS, AnyValue(string_value="9" * 30))]
    for key, value in cases:
        agent = Agent(run_id="absurd")
        agent.model_step(1, body=chat_request(f"fine {key}"))
        good = agent.request()
        bad = _with_attributes([(key, value)])
        good.resource_spans.extend(bad.resource_spans)
        status, _, body = _send(collector, good.SerializeToString(), {"Content-Type": "application/x-protobuf"})
        assert status == 200, (key, status, status_pb2.Status.FromString(body).message)
        assert ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 1
    _count("absurd attributes over HTTP")


def test_deeply_nested_response_body_over_http_is_stored_not_500(collector: CollectorProcess) -> None:
    """BUG (collector/genai.py): a model step whose recorded response is deeply nested JSON → HTTP 500."""
    agent = Agent(run_id="deep-body")
    agent.model_step(1, response=b"[" * 5000)
    status, _, body = _send(collector, agent.request().SerializeToString(), {"Content-Type": "application/x-protobuf"})
    assert status == 200, (status, body[:200])


def test_zz_memory_stayed_bounded_after_all_hostile_input(collector: CollectorProcess) -> None:
    grown_mb = (collector.rss_kb() - collector.baseline_kb) / 1024  # type: ignore[attr-defined]
    print(f"\nfuzz: inputs tried {TRIED}; collector RSS grew {grown_mb:.0f} MiB")
    assert grown_mb < 200, f"RSS grew by {grown_mb:.0f} MiB"
