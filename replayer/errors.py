"""The replayer's HTTP-level errors: a status and a JSON body, raised by handlers and helpers alike."""

from __future__ import annotations

import json
from typing import Any

from tracetape.instrumentation import encodings


class ApiError(Exception):
    """Answer `status` with JSON `{"error": code, **fields}` (and `headers`, e.g. `Retry-After`). Messages never
    carry payloads or secrets."""

    def __init__(self, status: int, code: str, message: str = "", *, headers: dict[str, str] | None = None,
                 **fields: Any) -> None:
        super().__init__(message or code)
        self.status = status
        self.headers = headers
        self.body: dict[str, Any] = {"error": code, **({"message": message} if message else {}), **fields}


MAX_API_BODY = 64 << 10
"""The largest JSON body the replayer's API endpoints (sessions, tool answers) read."""


def decoded_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """A request body with its Content-Encoding removed, never more than `limit` bytes (413), 415 for a coding
    the replayer does not decode, 400 for bytes that are not what their coding says. The replayer's server
    does not let aiohttp inflate bodies (it would, before any limit applies): this is where they are."""
    if not content_encoding:
        return raw
    try:
        return encodings.decode(raw, content_encoding, limit)
    except encodings.InflatesTooLarge:
        raise ApiError(413, "request_too_large", f"the body inflates to more than {limit} bytes") from None
    except encodings.UnknownEncoding as err:
        raise ApiError(415, "unsupported_encoding", str(err)) from None
    except encodings.CorruptEncoding as err:
        raise ApiError(400, "bad_request", str(err)) from None


async def read_json(request: Any, limit: int = MAX_API_BODY) -> Any:
    """The request's JSON body: 413 past `limit` bytes (counted while reading, so a chunked body cannot
    slip past a Content-Length check), 400 when it is not JSON or nests deeper than the decoder goes."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "request_too_large", f"at most {limit} bytes")
    data = await _read_at_most(request, limit + 1)
    if len(data) > limit:
        raise ApiError(413, "request_too_large", f"at most {limit} bytes")
    data = decoded_body(data, request.headers.get("Content-Encoding"), limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested past the decoder
        raise ApiError(400, "bad_request", "the body must be JSON") from err


async def _read_at_most(request: Any, size: int) -> bytes:
    """The body's first `size` bytes (all of it when shorter): `read(n)` returns what has arrived, up to n."""
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = await request.content.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
