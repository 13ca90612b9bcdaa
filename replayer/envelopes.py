"""Recorded envelopes recomputed from stored attempts, and envelope-level diffs by JSON path.

Contract:
- `recorded_envelope(attempt, body)` rebuilds the canonical envelope of a recorded HTTP attempt from its
  stored method, URL (path + query), request headers (credentials were never stored) and request body
  (stored redacted, so it is hashed as recording hashed it); `contract.envelope_hash` of it equals the
  attempt's `envelope_hash` for every attempt recorded under the current `CANON_PROFILE`.
- `received_envelope(method, path, query, headers, body)` is what recording would have hashed for a live
  request: the body is redacted first (`redaction.redact_body`), credential headers are dropped. Only the
  semantic headers (`contract.SEMANTIC_HEADERS`) reach the envelope, so passing just those gives the same.
- `envelope_diff(expected, received)`: differences of the request-line parts as `$method`, `$path`,
  `$query`, `$headers.NAME`, then the body's as paths relative to the body (`messages[3].content`; `$` is
  the whole body).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tracetape.collector.records import AttemptRecord
from tracetape.instrumentation import contract, redaction
from tracetape.replayer import jsondiff
from tracetape.replayer.jsondiff import Change


def recorded_envelope(attempt: AttemptRecord, body: bytes) -> dict[str, Any]:
    return recorded_request_envelope(attempt.method or "GET", attempt.url, attempt.request_headers, body)


def recorded_request_envelope(method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """`recorded_envelope` from the attempt's stored parts."""
    path, query = url_parts(url)
    return contract.http_envelope(method or "GET", path, query, headers, body)


def url_parts(url: str) -> tuple[str, str]:
    """(path, raw query) of a recorded URL; a URL that does not parse (`http://[::1/x`) is all path, no query."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, ""
    return parts.path, parts.query


def received_envelope(method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[dict[str, Any], bytes]:
    """(envelope, redacted body) of a request as the replayer received it."""
    redacted = redaction.redact_body(body)
    kept = redaction.drop_secret_headers(headers)
    return contract.http_envelope(method, path, query, kept, redacted), redacted


def envelope_diff(expected: dict[str, Any], received: dict[str, Any], limit: int = 100) -> list[Change]:
    out: list[Change] = []
    for key in ("kind", "method", "path"):
        if expected.get(key) != received.get(key):
            out.append(Change(f"${key}", "changed", expected.get(key), received.get(key)))
    if expected.get("query") != received.get("query"):
        out.extend(jsondiff.diff(_pairs(expected.get("query")), _pairs(received.get("query")), root="$query",
                                 limit=limit))
    if expected.get("headers") != received.get("headers"):
        out.extend(jsondiff.diff(_pairs(expected.get("headers")), _pairs(received.get("headers")),
                                 root="$headers", limit=limit))
    if expected.get("kind") == "tool":
        out.extend(jsondiff.diff(expected.get("arguments"), received.get("arguments"), root="$arguments",
                                 limit=limit))
    else:
        out.extend(jsondiff.diff(expected.get("body"), received.get("body"), limit=limit))
    return out[:limit]


def _pairs(value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in value or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            name = str(item[0])
            out[name] = item[1] if name not in out else [*(out[name] if isinstance(out[name], list) else [out[name]]), item[1]]
    return out
