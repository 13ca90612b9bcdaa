"""`tracetape export RUN --format jsonl|otlp-json|jaeger [-o FILE]` and `tracetape import FILE`.

- `jsonl`: line 1 `{"type": "tracetape.export", "version": 1, "run": {...}}`, then one `{"type": "span",
  "span": base64(stored ResourceSpans protobuf)}` per stored span (key order), then one `{"type": "blob",
  "digest": hex, "data": base64}` per payload (digest order). Export → import → export is byte-identical.
- `otlp-json`: one OTLP/JSON `ExportTraceServiceRequest` (hex ids) with the payloads put back inline as
  `bytesValue`: what an agent would have sent; any OTLP/JSON receiver accepts it.
- `jaeger`: the Jaeger UI's upload format (`{"data": [{"traceID", "spans": [...], "processes": {...}}]}`),
  payloads as their `.ref`/`.size` tags; for viewing (not importable).
Import re-inlines each span's payloads and re-ingests it through `collector.ingest.prepare` (the collector's
own path: same steps, envelope index, verdicts), then, for jsonl, stores each span's exported bytes verbatim;
spans already stored are skipped.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from typing import Any

import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from tracetape.collector import ingest, records
from tracetape.collector.store import Store
from tracetape.errors import CliError
from tracetape.instrumentation import contract
from tracetape.replayer.runref import add_store_arguments, open_store, resolve_run

FORMATS = ("jsonl", "otlp-json", "jaeger")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN")
    parser.add_argument("--format", choices=FORMATS, default="jsonl")
    parser.add_argument("-o", "--output", default="-", metavar="FILE")
    add_store_arguments(parser)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("--data", default=None, metavar="DIR", help="the store directory to import into")
    parser.add_argument("--json", action="store_true")


def _refs(span: Any) -> dict[str, str]:
    out = {}
    for kv in span.attributes:
        if kv.key.endswith(contract.PAYLOAD_REF_SUFFIX):
            out[kv.key[: -len(contract.PAYLOAD_REF_SUFFIX)]] = kv.value.string_value
    return out


def run_spans(store: Store, run: records.RunRecord) -> tuple[records.RunRecord, list[bytes], dict[str, bytes]]:
    """The run's record and stored spans as of one moment, and the payloads they reference (digest hex →
    bytes; blobs never change)."""
    latest, spans = store.run_and_spans(run.tenant, run.scope, run.run_id)
    run = latest or run
    blobs: dict[str, bytes] = {}
    for raw in spans:
        rs = ResourceSpans.FromString(raw)
        for ss in rs.scope_spans:
            for span in ss.spans:
                for digest in _refs(span).values():
                    if digest not in blobs:
                        data = store.blob(run.tenant, run.scope, bytes.fromhex(digest))
                        if data is None:
                            raise CliError(f"payload {digest[:16]} of run {run.run_id} is missing from the store")
                        blobs[digest] = data
    return run, spans, blobs


def inline(raw: bytes, blobs: dict[str, bytes]) -> ResourceSpans:
    """A stored span with its payload attributes put back (`X.ref`/`X.size` → `X` bytes)."""
    rs = ResourceSpans.FromString(raw)
    for ss in rs.scope_spans:
        for span in ss.spans:
            refs = _refs(span)
            if not refs:
                continue
            drop = {n + contract.PAYLOAD_REF_SUFFIX for n in refs} | {n + contract.PAYLOAD_SIZE_SUFFIX for n in refs}
            kept = [KeyValue(key=kv.key, value=kv.value) for kv in span.attributes if kv.key not in drop]
            for name, digest in refs.items():
                if digest not in blobs:
                    raise CliError(f"payload {digest[:16]} is missing from the export")
                kept.append(KeyValue(key=name, value=AnyValue(bytes_value=blobs[digest])))
            del span.attributes[:]
            span.attributes.extend(kept)
    return rs


def _hexify(obj: Any) -> Any:
    """OTLP/JSON ids are hex, json_format writes base64: convert trace/span ids in place."""
    if isinstance(obj, dict):
        for key in ("traceId", "spanId", "parentSpanId"):
            if isinstance(obj.get(key), str) and obj[key]:
                obj[key] = base64.b64decode(obj[key]).hex()
        for value in obj.values():
            _hexify(value)
    elif isinstance(obj, list):
        for value in obj:
            _hexify(value)
    return obj


def export_jsonl(run: records.RunRecord, spans: list[bytes], blobs: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    header = {"type": "tracetape.export", "version": 1, "run": json.loads(msgspec.json.encode(run))}
    out.write(json.dumps(header, sort_keys=True).encode() + b"\n")
    for raw in spans:
        out.write(json.dumps({"type": "span", "span": base64.b64encode(raw).decode()}).encode() + b"\n")
    for digest in sorted(blobs):
        out.write(json.dumps({"type": "blob", "digest": digest, "data": base64.b64encode(blobs[digest]).decode()}).encode() + b"\n")
    return out.getvalue()


def export_otlp_json(spans: list[bytes], blobs: dict[str, bytes]) -> bytes:
    from google.protobuf import json_format

    req = ExportTraceServiceRequest(resource_spans=[inline(raw, blobs) for raw in spans])
    return json.dumps(_hexify(json_format.MessageToDict(req))).encode() + b"\n"


def _tag(key: str, value: AnyValue) -> dict[str, Any]:
    v = ingest.value_of(value)
    if isinstance(v, bool):
        return {"key": key, "type": "bool", "value": v}
    if isinstance(v, int):
        return {"key": key, "type": "int64", "value": v}
    if isinstance(v, float):
        return {"key": key, "type": "float64", "value": v}
    if isinstance(v, bytes):
        return {"key": key, "type": "binary", "value": base64.b64encode(v).decode()}
    if isinstance(v, (list, dict)):
        return {"key": key, "type": "string", "value": json.dumps(v, default=str)}
    return {"key": key, "type": "string", "value": "" if v is None else str(v)}


def export_jaeger(spans: list[bytes]) -> bytes:
    traces: dict[str, dict[str, Any]] = {}
    for raw in spans:
        rs = ResourceSpans.FromString(raw)
        resource = {kv.key: kv.value for kv in rs.resource.attributes}
        service = ingest.value_of(resource["service.name"]) if "service.name" in resource else "unknown"
        process = {"serviceName": str(service), "tags": [_tag(k, v) for k, v in resource.items() if k != "service.name"]}
        for ss in rs.scope_spans:
            for span in ss.spans:
                tid = span.trace_id.hex()
                trace = traces.setdefault(tid, {"traceID": tid, "spans": [], "processes": {}, "warnings": None})
                pid = next((p for p, body in trace["processes"].items() if body == process), None)
                if pid is None:
                    pid = f"p{len(trace['processes']) + 1}"
                    trace["processes"][pid] = process
                refs = []
                if span.parent_span_id:
                    refs.append({"refType": "CHILD_OF", "traceID": tid, "spanID": span.parent_span_id.hex()})
                refs += [{"refType": "FOLLOWS_FROM", "traceID": lk.trace_id.hex(), "spanID": lk.span_id.hex()}
                         for lk in span.links]
                tags = [_tag(kv.key, kv.value) for kv in span.attributes]
                tags.append({"key": "span.kind", "type": "string",
                             "value": {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}.get(span.kind, "unspecified")})
                if span.status.code == 2:
                    tags.append({"key": "error", "type": "bool", "value": True})
                trace["spans"].append({
                    "traceID": tid, "spanID": span.span_id.hex(), "operationName": span.name, "references": refs,
                    "startTime": span.start_time_unix_nano // 1000,
                    "duration": max(0, span.end_time_unix_nano - span.start_time_unix_nano) // 1000,
                    "tags": tags, "processID": pid, "warnings": None,
                    "logs": [{"timestamp": e.time_unix_nano // 1000, "fields": [
                        {"key": "event", "type": "string", "value": e.name}] + [_tag(kv.key, kv.value) for kv in e.attributes]}
                        for e in span.events],
                })
    return json.dumps({"data": list(traces.values()), "total": 0, "limit": 0, "offset": 0, "errors": None}).encode() + b"\n"


def run_export(args: argparse.Namespace) -> int:
    store = open_store(args.data)
    try:
        run = resolve_run(store, args.run_id, args.tenant, args.scope)
        run, spans, blobs = run_spans(store, run)
    finally:
        store.close()
    if args.format == "jsonl":
        data = export_jsonl(run, spans, blobs)
    elif args.format == "otlp-json":
        data = export_otlp_json(spans, blobs)
    else:
        data = export_jaeger(spans)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            with open(args.output, "wb") as fh:
                fh.write(data)
        except OSError as err:
            raise CliError(f"cannot write {args.output}: {err.strerror or err}") from None
    return 0


def import_bytes(store: Store, data: bytes) -> dict[str, Any]:
    """Import an export (jsonl or otlp-json) into `store`; counts of spans accepted and skipped."""
    head = data.lstrip()[:200]
    verbatim: dict[bytes, bytes] = {}
    if head.startswith(b'{"run"') or b'"tracetape.export"' in data.split(b"\n", 1)[0]:
        blobs: dict[str, bytes] = {}
        spans: list[bytes] = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if item.get("type") == "span":
                    spans.append(base64.b64decode(item["span"], validate=True))
                elif item.get("type") == "blob":
                    blobs[item["digest"]] = base64.b64decode(item["data"], validate=True)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CliError(f"line {n} of the export is not valid") from None
        try:
            req = ExportTraceServiceRequest(resource_spans=[inline(raw, blobs) for raw in spans])
        except Exception as err:
            if isinstance(err, CliError):
                raise
            raise CliError("a span of the export is not a valid protobuf ResourceSpans") from None
        originals = spans
    elif head.startswith(b'{"data"'):
        raise CliError("jaeger exports are for viewing in Jaeger; import a jsonl or otlp-json export")
    else:
        from tracetape.collector import otlp_decode

        try:
            req = otlp_decode.decode_request(data, "application/json", None, max_size=max(len(data), 1) * 2).request
        except otlp_decode.DecodeFailure as err:
            raise CliError(f"not an OTLP/JSON export: {err}") from None
        originals = []
    batch = ingest.prepare(req, store)
    if originals:  # keep each span's exported bytes (ids identify it: the span key ends with them) ...
        for raw in originals:
            for ss in ResourceSpans.FromString(raw).scope_spans:
                for span in ss.spans:
                    verbatim[bytes(span.trace_id) + bytes(span.span_id)] = raw
        for write in batch.spans:
            raw = verbatim.get(write.span_key[-24:])
            if raw is not None and _same_span(raw, write.stored_span):  # ... when they say what ingest stores
                write.stored_span = raw
    result = store.apply([batch])[0]
    return {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": batch.rejected,
            "errors": batch.errors}


def _same_span(a: bytes, b: bytes) -> bool:
    """Whether two stored-span encodings hold the same resource, scope and span, attributes in any order (ingest
    appends the `X.ref`/`X.size` of the payloads it takes out, where an export has them in place)."""
    x, y = ResourceSpans.FromString(a), ResourceSpans.FromString(b)
    for message in (x, y):
        for ss in message.scope_spans:
            for span in ss.spans:
                span.attributes.sort(key=lambda kv: (kv.key, kv.value.SerializeToString(deterministic=True)))
    return x == y


def run_import(args: argparse.Namespace) -> int:
    try:
        with open(args.file, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise CliError(f"cannot read {args.file}: {err.strerror}") from None
    store = open_store(args.data, readonly=False)
    try:
        counts = import_bytes(store, data)
    finally:
        store.close()
    print(json.dumps(counts) if args.json else
          f"imported {counts['accepted']} span(s), {counts['duplicates']} already stored, {counts['rejected']} rejected")
    return 0 if not counts["rejected"] else 1
