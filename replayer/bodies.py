"""How many bytes of proxied request bodies the replayer holds at once, reserved before a body is read.

Contract: `BodyBudget(max_bytes)`, used from the event loop only; `limit` is the largest body accepted (the
app's `client_max_size`). `take(declared)` reserves a request's declared `Content-Length` (or `limit` when it
declares none: a chunked body) before its body is read, and returns what it holds; when that would pass
`max_bytes` while other bodies are held it raises a 503 `busy` `ApiError` with `Retry-After`, and nothing of
the body is read. What `take` returned is given back (`held -= n`) once the request is answered. A body alone is always admitted, so one as large as the limit still goes.
Memory for bodies is so bounded per replayer, not per connection (as the collector's writer budget bounds it).
"""

from __future__ import annotations

from tracetape.replayer.errors import ApiError

DEFAULT_MAX_BYTES = 256 << 20
RETRY_AFTER_S = 1


class BodyBudget:
    """Bytes of request bodies being read or held by the proxy (see module doc)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, limit: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.limit = limit
        self.held = 0

    def take(self, declared: int | None) -> int:
        limit = self.limit
        nbytes = limit if declared is None else min(declared, limit)
        if self.held and self.held + nbytes > self.max_bytes:
            raise ApiError(503, "busy", "too many large request bodies are being received: retry shortly",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        self.held += nbytes
        return nbytes
