"""The forwarded copy of a stored span: payloads as ref + preview, every attribute within a byte cap.

Contract
--------
A stored span (the store's `outbox` / `spans` value) carries each payload attribute `X` of
`contract.PAYLOAD_ATTRIBUTES` as `X.ref` (sha256 hex of the blob) and `X.size` (bytes). The forwarded
copy keeps those and adds `X.preview`: at most `cap` bytes of UTF-8, the start of the payload as text
(cut on a character boundary, ending in `…[truncated N bytes]` when cut), or `hex:` and the hex of its
first bytes when it is binary. A response body stored with a content encoding (gzip, deflate, zstd)
is previewed decoded. A span that still carries a raw payload `X` has it replaced the same way.

Every other attribute (span, event, link, scope and resource) is kept, GenAI attributes included;
a string over `cap` bytes is cut the same way, a long bytes value becomes a hex preview string, and an
array whose JSON form is over `cap` becomes a string preview of that JSON. Span names are capped too.
So no single attribute of a forwarded span exceeds `cap` bytes (Jaeger with Badger rejects a span with
an attribute over about 64 KB).

Functions are pure except for the `fetch(tenant, scope, digest) -> bytes | None` callback, which reads
a payload from the store (already decompressed, as the store returns it).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import msgspec
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from tracetape.collector import keys
from tracetape.instrumentation import contract

BlobFetch = Callable[[str, str, bytes], "bytes | None"]
"""`fetch(tenant, scope, digest)`: the payload's bytes, or None when the store does not have it."""

ELLIPSIS = "…"
BINARY_PREFIX = "hex:"
_PAYLOADS = frozenset(contract.PAYLOAD_ATTRIBUTES)
_REF = contract.PAYLOAD_REF_SUFFIX
_PREVIEW = contract.PAYLOAD_PREVIEW_SUFFIX
_SIZE = contract.PAYLOAD_SIZE_SUFFIX
_DECODABLE = ("gzip", "x-gzip", "deflate", "zstd")


def truncation_marker(omitted: int, note: str = "") -> str:
    """`…[truncated N bytes]` (or with a note instead of the count when the total is unknown)."""
    return f"{ELLIPSIS}[truncated {note}]" if note else f"{ELLIPSIS}[truncated {omitted} bytes]"


# --- previews ---------------------------------------------------------------------------------------------


def cap_string(value: str, cap: int) -> str:
    """`value` if its UTF-8 form fits in `cap` bytes, else its start plus a truncation marker, within `cap`."""
    if len(value) * 4 <= cap:  # cheap: cannot be over
        return value
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) <= cap:
        return value
    return _cut_text(raw, cap, total=len(raw))


def preview_payload(data: bytes, cap: int, *, content_encoding: str = "") -> str:
    """A valid UTF-8 preview of a payload in at most `cap` bytes (see the module docstring)."""
    coding = (content_encoding or "").strip().lower()
    if coding in _DECODABLE:
        decoded = _decode_prefix(data, coding, cap + 4)
        if decoded is not None:
            head, complete = decoded
            whole = _strict_text(head) if complete and len(head) <= cap else None
            if whole is not None:
                return whole
            note = f"{coding} body of {len(data)} bytes"
            if _as_text(head[: cap + 3]) is not None:
                return _cut_text(head, cap, total=None, note=note)
            return _hex_preview(head, cap, total=None, note=note)
    if len(data) <= cap:
        whole = _strict_text(data)
        return whole if whole is not None else _hex_preview(data, cap, total=len(data))
    if _as_text(data[: cap + 3]) is not None:
        return _cut_text(data, cap, total=len(data))
    return _hex_preview(data, cap, total=len(data))


def _strict_text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _as_text(head: bytes) -> str | None:
    """`head` decoded if it is UTF-8 text (allowing a character cut at the end), else None."""
    if b"\x00" in head:
        return None
    for trim in range(4):
        try:
            return head[: len(head) - trim].decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start < len(head) - 4:  # invalid well before the end: not a cut character
                return None
    return None


def _cut_text(raw: bytes, cap: int, *, total: int | None, note: str = "") -> str:
    """The longest character-aligned start of `raw` that, with its marker, fits in `cap` bytes."""
    longest = truncation_marker(total if total is not None else 0, note).encode()
    keep = max(0, cap - len(longest))
    head = raw[:keep]
    for trim in range(4):
        try:
            text = head[: len(head) - trim].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        text = head.decode("utf-8", "ignore")
    kept = len(text.encode("utf-8", "surrogatepass"))
    marker = truncation_marker(total - kept if total is not None else 0, note)
    return text + marker


def _hex_preview(data: bytes, cap: int, *, total: int | None, note: str = "") -> str:
    room = cap - len(BINARY_PREFIX)
    if len(data) * 2 <= room and total is not None and total == len(data):
        return BINARY_PREFIX + data.hex()
    longest = truncation_marker(total if total is not None else 0, note).encode()
    keep = max(0, (room - len(longest)) // 2)
    marker = truncation_marker(total - keep if total is not None else 0, note)
    return BINARY_PREFIX + data[:keep].hex() + marker


def _decode_prefix(data: bytes, coding: str, limit: int) -> tuple[bytes, bool] | None:
    """At most `limit` decoded bytes of a compressed payload, and whether that is all of it."""
    try:
        if coding in ("gzip", "x-gzip", "deflate"):
            if coding == "deflate":
                wbits = zlib.MAX_WBITS if len(data) >= 2 and ((data[0] << 8) | data[1]) % 31 == 0 else -zlib.MAX_WBITS
            else:
                wbits = zlib.MAX_WBITS | 16
            d = zlib.decompressobj(wbits)
            head = d.decompress(data, limit)
            return head, d.eof and len(head) < limit
        if coding == "zstd":
            import io

            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                head = reader.read(limit)
                complete = len(head) < limit and not reader.read(1)
            return head, complete
    except Exception:  # noqa: BLE001 - any decoding failure means "preview the raw bytes"
        return None
    return None


# --- attribute values -------------------------------------------------------------------------------------


def cap_value(value: AnyValue, cap: int) -> None:
    """Bring one attribute value within `cap` bytes, in place (see the module docstring)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        text = value.string_value
        capped = cap_string(text, cap)
        if capped is not text:
            value.string_value = capped
    elif kind == "bytes_value":
        if len(value.bytes_value) * 2 + len(BINARY_PREFIX) > cap:
            data = value.bytes_value
            value.string_value = _hex_preview(data, cap, total=len(data))
    elif kind == "array_value":
        for item in value.array_value.values:
            cap_value(item, cap)
        if value.ByteSize() > cap:
            text = msgspec.json.encode([_plain(v) for v in value.array_value.values])
            value.string_value = _cut_text(text, cap, total=len(text)) if len(text) > cap else text.decode()
    elif kind == "kvlist_value":
        for kv in value.kvlist_value.values:
            cap_value(kv.value, cap)


def _plain(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _cap_all(attributes: Iterable[KeyValue], cap: int) -> None:
    for kv in attributes:
        cap_value(kv.value, cap)


# --- spans ------------------------------------------------------------------------------------------------


def _attr(attributes: Iterable[KeyValue], key: str) -> AnyValue | None:
    for kv in attributes:
        if kv.key == key:
            return kv.value
    return None


def _str_attr(attributes: Iterable[KeyValue], key: str) -> str:
    value = _attr(attributes, key)
    return value.string_value if value is not None and value.WhichOneof("value") == "string_value" else ""


def parse_ref(ref: str) -> bytes | None:
    """The 32-byte digest of an `X.ref` value (`hex`, or `sha256:hex`), None if malformed."""
    if ref.startswith("sha256:"):
        ref = ref[7:]
    try:
        digest = bytes.fromhex(ref)
    except ValueError:
        return None
    return digest if len(digest) == 32 else None


def slim_span(span: Span, *, cap: int, fetch: BlobFetch, tenant: str, scope: str) -> None:
    """Turn one stored span into its forwarded form, in place."""
    encoding = _str_attr(span.attributes, contract.RESPONSE_CONTENT_ENCODING)
    present = {kv.key for kv in span.attributes}
    kept: list[KeyValue] = []
    added: list[KeyValue] = []
    for kv in span.attributes:
        key = kv.key
        if key in _PAYLOADS:  # a raw payload the store left inline
            kind = kv.value.WhichOneof("value")
            data = kv.value.bytes_value if kind == "bytes_value" else kv.value.string_value.encode("utf-8", "surrogatepass")
            coding = encoding if key == contract.RESPONSE_BODY else ""
            added.append(_kv_str(key + _PREVIEW, preview_payload(data, cap, content_encoding=coding)))
            if key + _SIZE not in present:
                added.append(_kv_int(key + _SIZE, len(data)))
            continue
        if key.endswith(_REF) and key[: -len(_REF)] in _PAYLOADS and key[: -len(_REF)] + _PREVIEW not in present:
            base = key[: -len(_REF)]
            digest = parse_ref(kv.value.string_value) if kv.value.WhichOneof("value") == "string_value" else None
            data = fetch(tenant, scope, digest) if digest is not None else None
            if data is not None:
                coding = encoding if base == contract.RESPONSE_BODY else ""
                added.append(_kv_str(base + _PREVIEW, preview_payload(data, cap, content_encoding=coding)))
                if base + _SIZE not in present:
                    added.append(_kv_int(base + _SIZE, len(data)))
        cap_value(kv.value, cap)
        kept.append(kv)
    if added or len(kept) != len(span.attributes):
        new = [KeyValue(key=kv.key, value=kv.value) for kv in kept] + added
        del span.attributes[:]
        span.attributes.extend(new)
    span.name = cap_string(span.name, cap)
    for event in span.events:
        event.name = cap_string(event.name, cap)
        _cap_all(event.attributes, cap)
    for link in span.links:
        _cap_all(link.attributes, cap)


def slim_resource_spans(rs: ResourceSpans, *, cap: int, fetch: BlobFetch) -> ResourceSpans:
    """A slimmed copy of `rs` (the input is not modified).

    A span's blobs are fetched under its own `tracetape.tenant` / `tracetape.scope` attributes, else the
    resource's, else the defaults.
    """
    out = ResourceSpans()
    out.CopyFrom(rs)
    res_tenant = _str_attr(out.resource.attributes, contract.TENANT) or keys.DEFAULT_TENANT
    res_scope = _str_attr(out.resource.attributes, contract.SCOPE) or keys.DEFAULT_SCOPE
    _cap_all(out.resource.attributes, cap)
    for ss in out.scope_spans:
        _cap_all(ss.scope.attributes, cap)
        for span in ss.spans:
            tenant = _str_attr(span.attributes, contract.TENANT) or res_tenant
            scope = _str_attr(span.attributes, contract.SCOPE) or res_scope
            slim_span(span, cap=cap, fetch=fetch, tenant=tenant, scope=scope)
    return out


def _kv_str(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _kv_int(key: str, value: int) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(int_value=value))
