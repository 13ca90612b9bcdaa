"""OTLP/HTTP receiver: `POST /v1/traces` (protobuf or JSON; gzip, deflate, zstd), plus `/healthz`, `/metrics`.

Contract
--------
- 200 + `ExportTraceServiceResponse` (in the request's encoding) only after the store has committed the
  request's spans; `partial_success.rejected_spans` + `error_message` when some were rejected.
- Errors carry a `google.rpc.Status` body in the request's encoding (protobuf when it is unknown):
  400 undecodable (not retryable), 413 over `max_request_body_size` as sent or inflated (never aiohttp's
  plain-text 413), 415 unsupported content type/encoding, 405 other methods, 503 + `Retry-After` when the
  writer is overloaded or the store cannot take writes (full disk included: 503 rather than 507 so that
  OTLP exporters retry instead of dropping), 500 only for bugs (logged; the body says nothing more).
- Messages never contain payloads or attribute values.
- With an `Authenticator` (API keys configured): `POST /v1/traces` needs `x-api-key: KEY` or
  `Authorization: Bearer KEY`, else 401 + `WWW-Authenticate` and an `UNAUTHENTICATED` Status body, checked
  before the body is read (nothing is stored; the key is never echoed or logged). A valid key's tenant
  overrides the tenant the spans claim. `/metrics` needs a key too; `/healthz` then answers only
  `{"status": "ok"}` (no store figures) without one.

Serve the app with `start_http_server` (it turns aiohttp's own request decompression off, so the size
limit is enforced here while inflating and a compression bomb costs at most the limit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from google.rpc import code_pb2

from tracetape.collector import otlp_decode as od
from tracetape.collector.auth import Authenticator, Principal, presented_key
from tracetape.collector.receiving import (
    UNAUTHENTICATED_MESSAGE, OnStored, ReceiverStats, Submitter, retry_after_seconds, submit_as,
)
from tracetape.collector.writer import Overloaded, Reservation, StoreUnavailable

log = logging.getLogger("tracetape.collector.http")

TRACES_PATH = "/v1/traces"
_WRITER = web.AppKey("writer", object)
_LIMIT = web.AppKey("limit", int)
_STATS = web.AppKey("stats", ReceiverStats)
_ON_STORED = web.AppKey("on_stored", object)
_HEALTH = web.AppKey("health", object)
_STARTED = web.AppKey("started", float)
_AUTH = web.AppKey("auth", object)


def create_app(
    writer: Submitter,
    *,
    max_request_body_size: int,
    stats: ReceiverStats | None = None,
    on_stored: OnStored | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
    authenticator: Authenticator | None = None,
) -> web.Application:
    """The receiver's aiohttp application. `health()` adds fields to `/healthz` and `/metrics`;
    `authenticator` turns API keys on (see module doc)."""
    app = web.Application(client_max_size=max_request_body_size)
    app[_WRITER] = writer
    app[_LIMIT] = max_request_body_size
    app[_STATS] = stats or ReceiverStats()
    app[_ON_STORED] = on_stored
    app[_HEALTH] = health
    app[_STARTED] = time.time()
    app[_AUTH] = authenticator
    app.router.add_route("*", TRACES_PATH, export_traces)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


class _ClientProtocolErrors(logging.Filter):
    """Drops aiohttp's ERROR-with-traceback for requests that are not valid HTTP (a NUL in a header, a bad
    request line): the client already got its 400, and logging each one would let any client flood the log.
    Errors raised by tracetape's own handlers are not `HttpProcessingError` and still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_PROTOCOL_NOISE = _ClientProtocolErrors()


def quiet_client_protocol_errors() -> None:
    """Install the filter on aiohttp's server logger (idempotent); every tracetape HTTP server calls it."""
    server_log = logging.getLogger("aiohttp.server")
    if _PROTOCOL_NOISE not in server_log.filters:
        server_log.addFilter(_PROTOCOL_NOISE)


async def start_http_server(
    app: web.Application, host: str, port: int, *, shutdown_timeout: float = 10.0
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = any free port); returns the runner and the bound port.

    `runner.cleanup()` stops accepting, then waits up to `shutdown_timeout` for in-flight requests.
    """
    quiet_client_protocol_errors()
    runner = web.AppRunner(
        app, auto_decompress=False, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    server = site._server  # noqa: SLF001 - aiohttp exposes the bound sockets only here
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    return runner, bound


# --- handlers -----------------------------------------------------------------------------------------------


async def export_traces(request: web.Request) -> web.Response:
    """`POST /v1/traces`: decode, store (wait for the commit), answer."""
    app = request.app
    stats: ReceiverStats = app[_STATS]
    encoding = od.response_encoding(request.headers.get("Content-Type"))
    if request.method != "POST":
        return _answer(stats, _status(405, code_pb2.UNIMPLEMENTED, f"{TRACES_PATH} accepts POST only", encoding,
                                      headers={"Allow": "POST"}))
    authenticator: Authenticator | None = app[_AUTH]
    principal: Principal | None = None
    if authenticator is not None:
        principal = authenticator.authenticate(presented_key(request.headers))
        if principal is None:
            return _answer(stats, _unauthenticated(encoding))
    limit = app[_LIMIT]
    try:
        # Budget first, body second: memory is bounded by the writer's budget, not by clients x body size.
        reservation = app[_WRITER].reserve(min(request.content_length or limit, limit))
    except Overloaded as err:
        return _answer(stats, _overloaded(err, encoding))
    with reservation:
        try:
            body = await _read_body(request, limit)
            decoded = od.receive_request(
                body, request.headers.get("Content-Type"), request.headers.get("Content-Encoding"), max_size=limit,
            )
        except od.DecodeFailure as err:
            return _answer(stats, _status(err.status, _GRPC_CODE[err.status], err.message, encoding))
        except (RequestPayloadError, ConnectionError):
            return _answer(stats, _status(400, code_pb2.INVALID_ARGUMENT, "incomplete request body", encoding))
        del body  # the decoded request is what is held from here on
        return _answer(stats, await _store(app, decoded, principal, reservation))


def _overloaded(err: Overloaded, encoding: od.Encoding) -> web.Response:
    return _status(503, code_pb2.UNAVAILABLE, "the collector is busy; retry later", encoding,
                   headers={"Retry-After": str(retry_after_seconds(err.retry_after))})


async def _store(
    app: web.Application, decoded: od.Received, principal: Principal | None, reservation: Reservation
) -> web.Response:
    writer: Submitter = app[_WRITER]
    try:
        result = await submit_as(writer, decoded.request, principal, decoded.size, reservation)
    except od.DecodeFailure as err:  # protobuf is parsed by the ingest step
        return _status(err.status, _GRPC_CODE[err.status], err.message, decoded.encoding)
    except Overloaded as err:
        return _overloaded(err, decoded.encoding)
    except StoreUnavailable as err:
        return _status(503, code_pb2.UNAVAILABLE, f"the store cannot take writes now: {err.message}",
                       decoded.encoding, headers={"Retry-After": str(retry_after_seconds(err.retry_after))})
    except Exception:  # a bug: log it with its traceback, tell the client nothing more
        log.exception("OTLP/HTTP export failed")
        return _status(500, code_pb2.INTERNAL, "internal error", decoded.encoding)
    app[_STATS].stored(result, decoded.size)
    on_stored = app[_ON_STORED]
    if on_stored is not None:
        on_stored(result)
    message = od.export_response(result.rejected, result.error_message if result.rejected else "")
    return _message(200, message, decoded.encoding)


def _authorized(request: web.Request) -> bool:
    """Whether the request may see store figures: no keys configured, or a valid key sent."""
    authenticator: Authenticator | None = request.app[_AUTH]
    return authenticator is None or authenticator.authenticate(presented_key(request.headers)) is not None


async def healthz(request: web.Request) -> web.Response:
    if not _authorized(request):
        return web.json_response({"status": "ok"})
    extra = request.app[_HEALTH]() if request.app[_HEALTH] else {}
    return web.json_response({"status": "ok", **{k: v for k, v in extra.items() if k in ("store", "forwarding")}})


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    if not _authorized(request):
        return web.json_response({"error": "unauthenticated", "message": UNAUTHENTICATED_MESSAGE}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="tracetape"'})
    extra = app[_HEALTH]() if app[_HEALTH] else {}
    return web.json_response({
        "uptime_s": round(time.time() - app[_STARTED], 3),
        "receiver": app[_STATS].snapshot(),
        **extra,
    })


# --- helpers ------------------------------------------------------------------------------------------------

_GRPC_CODE = {400: code_pb2.INVALID_ARGUMENT, 413: code_pb2.RESOURCE_EXHAUSTED, 415: code_pb2.INVALID_ARGUMENT}


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The raw (still encoded) body; `TooLarge` past `limit` bytes (reading at most one buffer beyond it).

    The chunks are kept as the connection delivered them and joined once at the end: one copy of the body."""
    if request.content_length is not None and request.content_length > limit:
        raise od.TooLarge(f"request body of {request.content_length} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise od.TooLarge(f"request body is over the {limit}-byte limit")


def _message(status: int, message: Any, encoding: od.Encoding, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=od.encode_message(message, encoding),
        content_type=od.CONTENT_TYPES[encoding],
        headers=headers,
    )


def _status(
    status: int, code: int, text: str, encoding: od.Encoding, headers: dict[str, str] | None = None
) -> web.Response:
    return _message(status, od.status_message(code, text), encoding, headers)


def _unauthenticated(encoding: od.Encoding) -> web.Response:
    return _status(401, code_pb2.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, encoding,
                   headers={"WWW-Authenticate": 'Bearer realm="tracetape"'})


def _answer(stats: ReceiverStats, response: web.Response) -> web.Response:
    stats.answered("http", str(response.status))
    return response
