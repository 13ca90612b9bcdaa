"""OTLP/HTTP request bodies to `ExportTraceServiceRequest`, and responses back in the request's encoding.

Contract
--------
`decode_request(body, content_type, content_encoding, max_size=...)` returns `Decoded(request, encoding,
size)` where `encoding` is `PROTOBUF` or `JSON` (answer in the same one), or raises:
- `UnsupportedMediaType` (415): a content type other than `application/x-protobuf` / `application/json`,
  or a content encoding other than identity, gzip, deflate, zstd;
- `TooLarge` (413): the body, or what it inflates to, is over `max_size`; inflation stops at the limit,
  so a compression bomb never costs more than `max_size` bytes of memory;
- `Undecodable` (400): corrupt compression, malformed protobuf, or JSON that is not OTLP/JSON.
Error messages name what is wrong and never quote attribute values from the request.

OTLP/JSON (spec, proto v1.x): field names lowerCamelCase (snake_case accepted too); `traceId`, `spanId`,
`parentSpanId` and the links' ids are hex strings, not base64; enums are integers (names accepted);
int64 values are strings or numbers; `bytesValue` is base64; unknown fields are ignored.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal, NamedTuple

import msgspec
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tracetape.instrumentation import encodings

PROTOBUF: Literal["protobuf"] = "protobuf"
JSON: Literal["json"] = "json"
Encoding = Literal["protobuf", "json"]
CONTENT_TYPES: dict[str, str] = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}
CONTENT_ENCODINGS = ("identity", "gzip", "x-gzip", "deflate", "zstd")


class DecodeFailure(Exception):
    """Base of the decoding errors; `status` is the HTTP status the receiver answers with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Undecodable(DecodeFailure):
    """The body is not a valid OTLP trace export request (400, not retryable)."""

    status = 400


class TooLarge(DecodeFailure):
    """The body, as sent or inflated, is over the configured limit (413)."""

    status = 413


class UnsupportedMediaType(DecodeFailure):
    """Unsupported `Content-Type` or `Content-Encoding` (415)."""

    status = 415


# --- content negotiation ----------------------------------------------------------------------------------


def media_encoding(content_type: str | None) -> Encoding:
    """`PROTOBUF` or `JSON` for a Content-Type header value (parameters ignored), else `UnsupportedMediaType`."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in ("application/x-protobuf", "application/protobuf"):
        return PROTOBUF
    if mime == "application/json":
        return JSON
    shown = mime[:100] if mime else "none"
    raise UnsupportedMediaType(
        f"unsupported content type {shown!r}: send application/x-protobuf or application/json"
    )


def response_encoding(content_type: str | None) -> Encoding:
    """The encoding to answer in: the request's if it is JSON, protobuf otherwise (also for a 415)."""
    try:
        return media_encoding(content_type)
    except UnsupportedMediaType:
        return PROTOBUF


# --- decompression ------------------------------------------------------------------------------------------


def decompress(body: bytes, content_encoding: str | None, max_size: int) -> bytes:
    """`body` decoded per Content-Encoding (a comma list, applied in order), never more than `max_size`."""
    try:
        return encodings.decode(body, content_encoding, max_size)
    except encodings.InflatesTooLarge as err:
        raise TooLarge(f"request {err}") from None
    except encodings.UnknownEncoding as err:
        raise UnsupportedMediaType(str(err)) from None
    except encodings.CorruptEncoding as err:
        raise Undecodable(str(err)) from None


# --- requests -----------------------------------------------------------------------------------------------


class Decoded(NamedTuple):
    """A decoded request, the encoding to answer in, and its decompressed size in bytes."""

    request: ExportTraceServiceRequest
    encoding: Encoding
    size: int


def decode_request(
    body: bytes, content_type: str | None, content_encoding: str | None, *, max_size: int
) -> Decoded:
    """The export request in `body`. See the module docstring for the errors."""
    received = receive_request(body, content_type, content_encoding, max_size=max_size)
    request = received.request
    return Decoded(parse_protobuf(request) if isinstance(request, bytes) else request, received.encoding,
                   received.size)


class Received(NamedTuple):
    """A request body made ready for ingest: protobuf bytes not parsed yet (the ingest step parses them, off
    the event loop, `Undecodable` if malformed) or a parsed OTLP/JSON request; the encoding to answer in;
    the decompressed size."""

    request: ExportTraceServiceRequest | bytes
    encoding: Encoding
    size: int


def receive_request(
    body: bytes, content_type: str | None, content_encoding: str | None, *, max_size: int
) -> Received:
    """`decode_request` up to, not including, parsing protobuf: same errors, except a malformed protobuf."""
    encoding = media_encoding(content_type)
    if len(body) > max_size:
        raise TooLarge(f"request body is over the {max_size}-byte limit")
    raw = decompress(body, content_encoding, max_size)
    return Received(raw if encoding == PROTOBUF else parse_json(raw), encoding, len(raw))


def parse_protobuf(raw: bytes) -> ExportTraceServiceRequest:
    """Parse OTLP protobuf; `Undecodable` if the wire format is invalid."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(raw)
    except (DecodeError, RecursionError, ValueError):
        raise Undecodable("body is not a valid OTLP ExportTraceServiceRequest (protobuf)") from None
    return request


_ID_FIELDS: dict[str, int] = {
    "traceId": 16, "trace_id": 16, "spanId": 8, "span_id": 8, "parentSpanId": 8, "parent_span_id": 8,
}
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
_json_decode = msgspec.json.Decoder().decode


def parse_json(raw: bytes) -> ExportTraceServiceRequest:
    """Parse OTLP/JSON (hex ids, int or name enums, int64 as string or number); `Undecodable` if invalid."""
    try:
        doc = _json_decode(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise Undecodable("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Undecodable("OTLP/JSON body must be a JSON object")
    for rs_i, rs in enumerate(_list(doc, "resourceSpans", "resource_spans", "")):
        for ss_i, ss in enumerate(_list(rs, "scopeSpans", "scope_spans", f"resourceSpans[{rs_i}]")):
            where = f"resourceSpans[{rs_i}].scopeSpans[{ss_i}]"
            for sp_i, span in enumerate(_list(ss, "spans", "spans", where)):
                _hex_ids_to_base64(span, f"{where}.spans[{sp_i}]")
                for l_i, link in enumerate(_list(span, "links", "links", f"{where}.spans[{sp_i}]")):
                    _hex_ids_to_base64(link, f"{where}.spans[{sp_i}].links[{l_i}]")
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as err:
        raise Undecodable(f"body is not valid OTLP/JSON: {_sanitize(str(err))}") from None
    return request


def _list(obj: Any, camel: str, snake: str, where: str) -> list[Any]:
    if not isinstance(obj, dict):
        raise Undecodable(f"OTLP/JSON: {where or 'body'} must be an object")
    value = obj.get(camel, obj.get(snake))
    if value is None:
        return []
    if not isinstance(value, list):
        raise Undecodable(f"OTLP/JSON: {where + '.' if where else ''}{camel} must be an array")
    return value


def _hex_ids_to_base64(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise Undecodable(f"OTLP/JSON: {where} must be an object")
    for key, length in _ID_FIELDS.items():
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise Undecodable(f"OTLP/JSON: {where}.{key} must be a hex string")
        if value == "":
            continue
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != length:
            raise Undecodable(f"OTLP/JSON: {where}.{key} must be {length * 2} hex digits")
        obj[key] = base64.b64encode(raw).decode("ascii")


def _sanitize(message: str) -> str:
    """A parser message without quoted values from the request, and not too long."""
    return _QUOTED.sub("…", message)[:300]


# --- responses ----------------------------------------------------------------------------------------------


def export_response(rejected: int = 0, error_message: str = "") -> ExportTraceServiceResponse:
    """Full success, or `partial_success` when spans were rejected (or there is a warning to pass on)."""
    response = ExportTraceServiceResponse()
    if rejected or error_message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = error_message
    return response


def status_message(code: int, message: str) -> status_pb2.Status:
    """A `google.rpc.Status` (OTLP/HTTP error body); `code` is a gRPC code number."""
    return status_pb2.Status(code=code, message=message)


def encode_message(message: Message, encoding: Encoding) -> bytes:
    """`message` in the given encoding (protobuf wire format, or proto3 JSON with hex ids not needed)."""
    if encoding == JSON:
        return json_format.MessageToJson(message, indent=None).encode("utf-8")
    return message.SerializeToString()


# --- OTLP/JSON encoding of requests (tests and exports use it) --------------------------------------------


def request_to_json(request: ExportTraceServiceRequest) -> bytes:
    """An export request as OTLP/JSON: hex ids, integer enums, camelCase."""
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                _base64_ids_to_hex(span)
                for link in span.get("links", []):
                    _base64_ids_to_hex(link)
    return msgspec.json.encode(doc)


def _base64_ids_to_hex(obj: dict[str, Any]) -> None:
    for key in ("traceId", "spanId", "parentSpanId"):
        if key in obj:
            try:
                obj[key] = base64.b64decode(obj[key]).hex()
            except (binascii.Error, ValueError):
                pass
