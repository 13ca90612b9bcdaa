"""Where a span becomes a stored step: an OTLP request → a `store.Batch` ready for one write transaction.

`prepare` is pure CPU work done outside the write transaction (and off the event loop): it validates each
span, takes its payload attributes out (hashing each payload once, sha256, for its content address, and
compressing only payloads the store does not hold yet), puts `X.ref`/`X.size` in their place, reads the
GenAI facts out of the response, and turns the span's tracetape attributes into a step attempt or a run
event. A span that cannot be stored is rejected with a reason (OTLP `partial_success`); the others go on.

Tenant and scope come from the receiver (an authenticated key, when keys are configured) or else from the
span's, then the resource's, `tracetape.tenant`/`tracetape.scope`, defaulting to `default`. When the key is
limited to some scopes (`scopes`), a span in any other scope is rejected.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tracetape.collector import genai, keys
from tracetape.collector import otlp_decode as od
from tracetape.collector.records import AttemptRecord, PayloadRef, StepRecord
from tracetape.collector.store import Batch, RunEvent, SpanWrite, StepWrite, Store, compress_blob
from tracetape.instrumentation import contract as c

_MAX_ERRORS = 5
_PAYLOADS = frozenset(c.PAYLOAD_ATTRIBUTES)


class Rejected(ValueError):
    """This span cannot be stored; the message says why (no payload content in it)."""


def value_of(v: AnyValue) -> Any:
    """The Python value of an OTLP AnyValue (arrays as lists; kvlists as dicts)."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _str(attrs: dict[str, AnyValue], name: str, default: str = "") -> str:
    v = attrs.get(name)
    if v is None:
        return default
    kind = v.WhichOneof("value")
    if kind == "string_value":  # the usual case, read without the generic conversion
        return v.string_value
    val = value_of(v)
    if isinstance(val, bytes):
        return val.decode("utf-8", "replace")
    return default if val is None else str(val)


_INT64 = (-(1 << 63), (1 << 63) - 1)
_RANGES: dict[str, tuple[int, int]] = {
    c.STEP_STARTED_NS: (0, (1 << 64) - 1),  # 8 bytes of the step key
    c.STEP_ATTEMPT: (0, 0xFFFF),  # 2 bytes of the envelope key
    c.STEP_INDEX: (0, _INT64[1]),
    c.RESPONSE_STATUS: (0, 999),
    c.RESPONSE_BYTES_READ: (0, _INT64[1]),
    c.RUN_EXIT_CODE: (-(1 << 31), (1 << 31) - 1),
    c.RUN_LINEAGE_DEPTH: (0, (1 << 31) - 1),
}
"""The values an integer attribute may take; others must fit in int64. Checked here, so that nothing that
reaches the write transaction can fail it (one bad span must never fail the other requests of a commit)."""


def _int(attrs: dict[str, AnyValue], name: str, default: int | None = None) -> int | None:
    v = attrs.get(name)
    if v is None:
        return default
    val = value_of(v)
    if isinstance(val, bool) or not isinstance(val, (int, str)):
        raise Rejected(f"attribute {name} must be an integer")
    try:
        number = int(val) if isinstance(val, int) or len(val) <= 20 else None
    except ValueError as err:
        raise Rejected(f"attribute {name} must be an integer") from err
    lo, hi = _RANGES.get(name, _INT64)
    if number is None or not lo <= number <= hi:
        raise Rejected(f"attribute {name} must be an integer from {lo} to {hi}")
    return number


def _int_list(attrs: dict[str, AnyValue], name: str) -> list[int]:
    v = attrs.get(name)
    if v is None:
        return []
    val = value_of(v)
    lo, hi = _INT64
    if not isinstance(val, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in val
    ):
        raise Rejected(f"attribute {name} must be an array of int64")
    return val


def _headers(attrs: dict[str, AnyValue], name: str) -> list[tuple[str, str]]:
    raw = _str(attrs, name)
    if not raw:
        return []
    try:
        return c.decode_headers(raw)
    except Exception as err:  # malformed JSON or shape
        raise Rejected(f"attribute {name} is not a JSON list of [name, value] pairs") from err


def _set_value(target: AnyValue, value: Any) -> None:
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, list):
        target.array_value.values.extend(AnyValue(string_value=str(x)) for x in value)
    else:
        target.string_value = str(value)


def _add(span: Span, key: str, value: Any) -> None:
    """Append attribute `key` = `value` to `span` (built in place, not copied in)."""
    _set_value(span.attributes.add(key=key).value, value)


_HEX16 = re.compile(r"[0-9a-f]{16}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: tag, varint length, payload."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Envelope:
    """The encoded ResourceSpans/ScopeSpans around one span: computed once per scope, reused per span.

    A stored span is `ResourceSpans{resource, scope_spans: [ScopeSpans{scope, spans: [span], schema_url}],
    schema_url}`; encoding it by hand around `span.SerializeToString()` gives the same bytes without
    copying the resource, scope and span into new messages for every span.
    """

    def __init__(self, rs: ResourceSpans, ss: ScopeSpans) -> None:
        self.resource = _field(1, _stored_resource(rs).SerializeToString()) if rs.HasField("resource") else b""
        self.rs_tail = _field(3, rs.schema_url.encode()) if rs.schema_url else b""
        self.scope = _field(1, ss.scope.SerializeToString()) if ss.HasField("scope") else b""
        self.ss_tail = _field(3, ss.schema_url.encode()) if ss.schema_url else b""

    def wrap(self, span: Span) -> bytes:
        scope_spans = self.scope + _field(2, span.SerializeToString()) + self.ss_tail
        return self.resource + _field(2, scope_spans) + self.rs_tail


_WHERE = (c.TENANT, c.SCOPE)


def _stored_resource(rs: ResourceSpans) -> Resource:
    """The resource as stored: without `tracetape.tenant`/`tracetape.scope` (each stored span names its own)."""
    if not any(kv.key in _WHERE for kv in rs.resource.attributes):
        return rs.resource
    resource = Resource()
    resource.CopyFrom(rs.resource)
    kept = [kv for kv in resource.attributes if kv.key not in _WHERE]
    del resource.attributes[:]
    resource.attributes.extend(kept)
    return resource


def _stamp(span: Span, attrs: dict[str, AnyValue], values: dict[str, str], duplicated: bool) -> None:
    """Make each attribute of `values` say exactly its value (a string), wherever the span claims otherwise: a
    different value (e.g. a tenant the receiver overrode), another type, or the key repeated (`duplicated`:
    some key occurs more than once). Attributes keep their positions."""
    for name, value in values.items():
        current = attrs.get(name)
        if current is None:
            _add(span, name, value)
            continue
        if not duplicated and current.WhichOneof("value") == "string_value" and current.string_value == value:
            continue
        for kv in span.attributes:
            if kv.key == name:
                kv.value.string_value = value


class _Preparer:
    def __init__(self, store: Store, tenant_override: str | None, scopes: frozenset[str] | None = None) -> None:
        self.store = store
        self.tenant_override = tenant_override
        self.scopes = scopes
        self.batch = Batch()
        self.blob_raw: dict[bytes, bytes] = {}  # blob key -> raw payload
        self.raw_by_digest: dict[bytes, bytes] = {}

    def reject(self, index: int, reason: str) -> None:
        self.batch.rejected += 1
        if len(self.batch.errors) < _MAX_ERRORS:
            self.batch.errors.append(f"span {index}: {reason}")

    def run(self, request: ExportTraceServiceRequest) -> Batch:
        index = 0
        for rs in request.resource_spans:
            resource = {kv.key: kv.value for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                envelope = _Envelope(rs, ss)
                for span in ss.spans:
                    try:
                        self.span(envelope, span, resource)
                    except (Rejected, keys.InvalidId) as err:
                        self.reject(index, str(err))
                    index += 1
        self.compress_new_blobs()
        return self.batch

    def span(self, envelope: _Envelope, span: Span, resource: dict[str, AnyValue]) -> None:
        if len(span.trace_id) != 16 or not any(span.trace_id):
            raise Rejected("invalid trace_id (16 non-zero bytes)")
        if len(span.span_id) != 8 or not any(span.span_id):
            raise Rejected("invalid span_id (8 non-zero bytes)")
        attrs: dict[str, AnyValue] = {}
        payload_at: list[int] = []  # indices of the payload attributes, found in the same pass
        for i, kv in enumerate(span.attributes):
            key = kv.key
            attrs[key] = kv.value
            if key in _PAYLOADS:
                payload_at.append(i)
        tenant = keys.check_id(
            self.tenant_override or _str(attrs, c.TENANT) or _str(resource, c.TENANT) or keys.DEFAULT_TENANT, "tenant"
        )
        scope = keys.check_id(_str(attrs, c.SCOPE) or _str(resource, c.SCOPE) or keys.DEFAULT_SCOPE, "scope")
        if self.scopes is not None and scope not in self.scopes:
            raise Rejected(f"scope {scope!r} is not one this API key may write")
        run_id = keys.check_id(_str(attrs, c.RUN_ID) or keys.NO_RUN, "run id")
        kind = _str(attrs, c.SPAN_KIND)
        duplicated = len(attrs) != len(span.attributes)
        _stamp(span, attrs, {c.TENANT: tenant, c.SCOPE: scope}, duplicated)  # the stored span says where it is

        refs, blobs = self.take_payloads(span, payload_at, tenant, scope) if payload_at else ({}, [])
        write = SpanWrite(tenant=tenant, scope=scope, run_id=run_id, span_key=b"", stored_span=b"", blobs=blobs)
        if run_id != keys.NO_RUN:
            if kind == c.SPAN_KIND_STEP:
                write.step = self.step(span, attrs, refs, tenant, scope, run_id)
            elif kind in (c.SPAN_KIND_RUN, c.SPAN_KIND_RUN_START):
                write.run_event = self.run_event(span, attrs, resource, kind)
                write.forward = kind == c.SPAN_KIND_RUN  # the zero-length start marker is not worth a trace line
        write.span_key = keys.span_key(tenant, scope, run_id, bytes(span.trace_id), bytes(span.span_id))
        write.stored_span = envelope.wrap(span)
        self.batch.spans.append(write)

    def take_payloads(
        self, span: Span, payload_at: list[int], tenant: str, scope: str
    ) -> tuple[dict[str, PayloadRef], list[tuple[bytes, bytes | None]]]:
        """Replace the payload attributes at `payload_at` by `X.ref` + `X.size`; their refs, and their blob keys."""
        refs: dict[str, PayloadRef] = {}
        blobs: list[tuple[bytes, bytes | None]] = []
        attributes = span.attributes
        for index in payload_at:
            kv = attributes[index]
            value = kv.value
            kind = value.WhichOneof("value")
            if kind == "bytes_value":
                val = value.bytes_value
            elif kind == "string_value":
                val = value.string_value.encode()
            else:
                raise Rejected(f"payload attribute {kv.key} must be bytes or a string")
            digest = hashlib.sha256(val).digest()
            refs[kv.key] = PayloadRef(digest=digest, size=len(val))
            key = keys.blob_key(tenant, scope, digest)
            self.blob_raw.setdefault(key, val)
            self.raw_by_digest.setdefault(digest, val)
            blobs.append((key, None))
        for index in reversed(payload_at):  # in place: the other attributes are not copied
            del attributes[index]
        for name, ref in refs.items():
            attributes.add(key=name + c.PAYLOAD_REF_SUFFIX).value.string_value = ref.digest.hex()
            attributes.add(key=name + c.PAYLOAD_SIZE_SUFFIX).value.int_value = ref.size
        return refs, blobs

    def compress_new_blobs(self) -> None:
        """Compress the payloads the store does not hold yet; each once, however many spans carry it."""
        if not self.blob_raw:
            return
        missing = self.store.missing_blobs(list(self.blob_raw))
        packed = {key: compress_blob(self.blob_raw[key]) for key in missing}
        for write in self.batch.spans:
            write.blobs = [(key, packed.get(key)) for key, _ in write.blobs]

    def step(
        self, span: Span, attrs: dict[str, AnyValue], refs: dict[str, PayloadRef],
        tenant: str, scope: str, run_id: str,
    ) -> StepWrite:
        step_id = _str(attrs, c.STEP_ID)
        if _HEX16.fullmatch(step_id) is None:
            raise Rejected(f"{c.STEP_ID} must be 16 lower-case hex characters")
        envelope_hash = _str(attrs, c.ENVELOPE_HASH)
        recording_error = _str(attrs, c.RECORDING_ERROR)
        if _HEX64.fullmatch(envelope_hash) is None and not (recording_error and not envelope_hash):
            # a step whose recording failed before its envelope was hashed is kept: the run must say so
            raise Rejected(f"{c.ENVELOPE_HASH} must be a sha256 hex digest")
        step_kind = _str(attrs, c.STEP_KIND, c.STEP_KIND_HTTP)
        if step_kind not in c.STEP_KINDS:
            raise Rejected(f"{c.STEP_KIND} must be one of {', '.join(c.STEP_KINDS)}")
        started = _int(attrs, c.STEP_STARTED_NS, span.start_time_unix_nano) or span.start_time_unix_nano
        attempt = AttemptRecord(
            attempt=_int(attrs, c.STEP_ATTEMPT, 0) or 0,
            trace_id=bytes(span.trace_id),
            span_id=bytes(span.span_id),
            started_ns=span.start_time_unix_nano,
            ended_ns=span.end_time_unix_nano,
            envelope_hash=envelope_hash,
            method=_str(attrs, c.REQUEST_METHOD),
            url=_str(attrs, c.REQUEST_URL),
            request_headers=_headers(attrs, c.REQUEST_HEADERS),
            request_body=refs.get(c.REQUEST_BODY),
            status=_int(attrs, c.RESPONSE_STATUS),
            response_headers=_headers(attrs, c.RESPONSE_HEADERS),
            response_body=refs.get(c.RESPONSE_BODY),
            content_encoding=_str(attrs, c.RESPONSE_CONTENT_ENCODING),
            streamed=bool(value_of(attrs[c.RESPONSE_STREAMED])) if c.RESPONSE_STREAMED in attrs else False,
            chunk_ends=_int_list(attrs, c.RESPONSE_CHUNK_ENDS),
            chunk_times_us=_int_list(attrs, c.RESPONSE_CHUNK_TIMES_US),
            bytes_read=_int(attrs, c.RESPONSE_BYTES_READ, 0) or 0,
            end_reason=_str(attrs, c.STREAM_END_REASON),
            tool_arguments=refs.get(c.TOOL_ARGUMENTS),
            tool_result=refs.get(c.TOOL_RESULT),
            error_type=_str(attrs, c.ERROR_TYPE),
            error_message=_str(attrs, c.ERROR_MESSAGE),
            recording_error=recording_error,
        )
        if step_kind == c.STEP_KIND_MODEL and attempt.response_body is not None:
            self.read_genai(span, attrs, attempt)
        header = StepRecord(
            step_id=step_id,
            started_ns=started,
            kind=step_kind,
            name=span.name,
            envelope_hash=envelope_hash,
            process_index=_int(attrs, c.STEP_INDEX, 0) or 0,
            provider=_str(attrs, c.GEN_AI_PROVIDER_NAME),
            request_model=_str(attrs, c.GEN_AI_REQUEST_MODEL),
            tool_name=_str(attrs, c.GEN_AI_TOOL_NAME),
            tool_call_id=_str(attrs, c.GEN_AI_TOOL_CALL_ID),
            mutating=bool(value_of(attrs[c.TOOL_MUTATING])) if c.TOOL_MUTATING in attrs else False,
        )
        return StepWrite(tenant=tenant, scope=scope, run_id=run_id, step=header, attempt=attempt)

    def read_genai(self, span: Span, attrs: dict[str, AnyValue], attempt: AttemptRecord) -> None:
        """Fill the attempt's GenAI facts from its response, and add the missing `gen_ai.*` attributes."""
        assert attempt.response_body is not None
        body = self.raw_by_digest[attempt.response_body.digest]
        info = genai.read_response(body, attempt.content_encoding, attempt.streamed)
        attempt.response_model, attempt.response_id = info.model, info.response_id
        attempt.finish_reasons = info.finish_reasons
        attempt.input_tokens, attempt.output_tokens = info.input_tokens, info.output_tokens
        extra = {
            c.GEN_AI_RESPONSE_MODEL: info.model or None,
            c.GEN_AI_RESPONSE_ID: info.response_id or None,
            c.GEN_AI_RESPONSE_FINISH_REASONS: info.finish_reasons or None,
            c.GEN_AI_USAGE_INPUT_TOKENS: info.input_tokens,
            c.GEN_AI_USAGE_OUTPUT_TOKENS: info.output_tokens,
        }
        for k, v in extra.items():
            if v is not None and k not in attrs:
                _add(span, k, v)

    def run_event(
        self, span: Span, attrs: dict[str, AnyValue], resource: dict[str, AnyValue], kind: str
    ) -> RunEvent:
        outcome = _str(attrs, c.RUN_OUTCOME)
        is_end = kind == c.SPAN_KIND_RUN
        if is_end and outcome not in c.OUTCOMES:
            raise Rejected(f"{c.RUN_OUTCOME} must be one of {', '.join(c.OUTCOMES)}")
        command = value_of(attrs[c.RUN_COMMAND]) if c.RUN_COMMAND in attrs else []
        return RunEvent(
            kind="end" if is_end else "start",
            started_ns=span.start_time_unix_nano,
            ended_ns=span.end_time_unix_nano,
            trace_id=bytes(span.trace_id),
            service_name=_str(resource, "service.name"),
            agent_name=_str(attrs, c.GEN_AI_AGENT_NAME),
            command=[str(x) for x in command] if isinstance(command, list) else [str(command)],
            outcome=outcome,
            exit_code=_int(attrs, c.RUN_EXIT_CODE),
            canon_profile=_str(attrs, c.RUN_CANON_PROFILE),
            replay_of=_str(attrs, c.RUN_REPLAY_OF),
            replay_mode=_str(attrs, c.RUN_REPLAY_MODE),
            replay_forced=bool(value_of(attrs[c.RUN_REPLAY_FORCED])) if c.RUN_REPLAY_FORCED in attrs else False,
            lineage_depth=_int(attrs, c.RUN_LINEAGE_DEPTH, 0) or 0,
            recording_error=_str(attrs, c.RECORDING_ERROR),  # e.g. `tracetape run` knew it could not record
        )


def prepare(
    request: ExportTraceServiceRequest, store: Store, tenant: str | None = None, scopes: frozenset[str] | None = None
) -> Batch:
    """The batch to write for `request` (mutated: payload attributes are moved out of its spans).

    `tenant` overrides what the spans claim; `scopes` (None = any) are the only scopes accepted."""
    return _Preparer(store, tenant, scopes).run(request)


def prepare_encoded(
    payload: bytes | ExportTraceServiceRequest, store: Store, tenant: str | None = None,
    scopes: frozenset[str] | None = None,
) -> Batch:
    """`prepare` for a request still in protobuf bytes (parsed here: `otlp_decode.Undecodable` if malformed)."""
    request = payload if isinstance(payload, ExportTraceServiceRequest) else od.parse_protobuf(payload)
    return prepare(request, store, tenant, scopes)
