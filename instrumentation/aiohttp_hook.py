"""Record aiohttp client traffic to the configured hosts as HTTP steps.

Choice of hook, and why: trace configs are per session and their `on_response_chunk_received` only fires for
`resp.read()` (never for `resp.content` streaming reads), and `ClientSession._request` is too early to see the
request bytes and spans redirects. So `instrument()` patches, at class level:
- `ClientRequest.send`: one attempt per request actually sent (each redirect and each reconnect-retry is its
  own), with the final headers and the exact body bytes (`BytesPayload`, which `data=bytes|str`, `json=` and
  url-encoded forms produce; other payloads are streamed and recorded as not captured);
- `ClientResponse.start`: the response head, then `resp.content` is replaced by a read-side tee that records
  exactly the bytes every read method returns (`read`, `readany`, `readchunk`, `readline`, `readuntil`,
  `readexactly`, `read_nowait`, and the `iter_*` iterators rebuilt on top of them), never reading ahead;
- `ClientResponse.close` / `release`: end as `closed` if the body was not read to its end.
The attempt ends exactly once: `exhausted` (a read reaches EOF), `error` (a read raises; cancellation
excepted), `closed`, or `dropped` (the response is garbage-collected first: `weakref.finalize`).

aiohttp decompresses before the application can read (`auto_decompress`, on by default) a body whose
`content-encoding` is exactly one of gzip, deflate, br, zstd (ASCII, any case; `x-gzip` or a list such as
`gzip, br` is left alone); the recorded body is then identity-encoded and `RESPONSE_CONTENT_ENCODING` is ""
while `RESPONSE_HEADERS` keeps the original `content-encoding`. Otherwise the wire bytes and the encoding are
recorded. Which `auto_decompress` applied to a response (the session's, or a per-request override, aiohttp
>= 3.10) is only known to the response parser, which `ResponseHandler.set_response_params(auto_decompress=)`
builds right before the response is read (after `send` for a proxy's CONNECT): that method is patched too, to
note the value on the connection's protocol, and `ClientResponse.start` takes it from there. When it cannot be
known (no note), the session's setting is assumed and the attempt carries `RECORDING_ERROR`.

A request body aiohttp compresses itself (`compress=`) is not captured (the compressed bytes exist only inside
its writer): it is recorded empty with `RECORDING_ERROR`, so the run is not replayable rather than wrong.
Only hosts in `runtime.recording().http_hosts` are recorded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import weakref
from typing import Any

from tracetape.instrumentation import contract, runtime
from tracetape.instrumentation.patching import Patches
from tracetape.instrumentation.requests_hook import host_recorded
from tracetape.instrumentation.steps import HttpAttempt, start_http_attempt

_ATTEMPT = "_tracetape_attempt"
_TEE = "_tracetape_tee"
_DECOMPRESS = "_tracetape_auto_decompress"  # on the protocol: the `auto_decompress` of its current parser
_DECODED = frozenset({"gzip", "deflate", "br", "zstd"})  # exactly the codings aiohttp's parsers decode
_patches = Patches()


def _is_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError)


class ContentTee:
    """Stands in for `ClientResponse.content`: every read goes to the real `StreamReader` and is recorded."""

    def __init__(self, inner: Any, attempt: HttpAttempt) -> None:
        self._inner = inner
        self._attempt = attempt
        self._finalizer: weakref.finalize | None = None

    # --- ending -------------------------------------------------------------------------------------------

    def end(self, reason: str, error: BaseException | None = None) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._attempt.finish(reason, error)

    def _got(self, data: bytes) -> None:
        if data:
            self._attempt.chunk(data)
        if self._inner.at_eof():
            self.end(contract.END_EXHAUSTED)

    def _failed(self, exc: BaseException) -> None:
        if not _is_cancellation(exc):
            partial = getattr(exc, "partial", None)
            if isinstance(exc, asyncio.IncompleteReadError) and partial:
                self._attempt.chunk(partial)
            self.end(contract.END_ERROR, exc)

    # --- the read methods ---------------------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        try:
            data = await self._inner.read(n)
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data

    async def readany(self) -> bytes:
        try:
            data = await self._inner.readany()
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data

    async def readchunk(self) -> tuple[bytes, bool]:
        try:
            data, end_of_chunk = await self._inner.readchunk()
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data, end_of_chunk

    async def readline(self, *args: Any, **kwargs: Any) -> bytes:
        try:
            data = await self._inner.readline(*args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data

    async def readuntil(self, *args: Any, **kwargs: Any) -> bytes:
        try:
            data = await self._inner.readuntil(*args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        try:
            data = await self._inner.readexactly(n)
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data

    def read_nowait(self, n: int = -1) -> bytes:
        try:
            data = self._inner.read_nowait(n)
        except BaseException as exc:
            self._failed(exc)
            raise
        self._got(data)
        return data

    # --- iterators, rebuilt on the recorded reads ---------------------------------------------------------------

    def __aiter__(self) -> Any:
        from aiohttp.streams import AsyncStreamIterator

        return AsyncStreamIterator(self.readline)

    def iter_chunked(self, n: int) -> Any:
        from aiohttp.streams import AsyncStreamIterator

        return AsyncStreamIterator(lambda: self.read(n))

    def iter_any(self) -> Any:
        from aiohttp.streams import AsyncStreamIterator

        return AsyncStreamIterator(self.readany)

    def iter_chunks(self) -> Any:
        from aiohttp.streams import ChunkTupleAsyncStreamIterator

        return ChunkTupleAsyncStreamIterator(self)  # type: ignore[arg-type]

    # --- everything else is the real reader's ---------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_inner", "_attempt", "_finalizer"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<ContentTee of {self._inner!r}>"


def _request_body(req: Any) -> tuple[bytes, str | None]:
    from aiohttp import payload

    body = req.body
    if not body:
        return b"", None
    compress = getattr(req, "compress", None)
    if compress:  # aiohttp's writer deflates the body on its way out: the bytes sent are not these
        coding = compress if isinstance(compress, str) else "deflate"
        return b"", f"request body not captured: compressed by aiohttp ({coding})"
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body), None
    if isinstance(body, payload.BytesPayload):
        return bytes(body._value), None
    return b"", f"request body not captured: streamed {type(body).__name__}"


def _send_wrapper(original: Any) -> Any:
    @functools.wraps(original)
    async def send(self: Any, conn: Any) -> Any:
        ctx = runtime.recording()
        if ctx is None or not host_recorded(str(self.url), ctx.http_hosts):
            return await original(self, conn)
        attempt: HttpAttempt | None = None
        try:
            body, body_error = _request_body(self)
            attempt = start_http_attempt(
                method=str(self.method), url=str(self.url), headers=list(self.headers.items()), body=body
            )
            if attempt is not None and body_error:
                attempt.recording_error(body_error)
        except Exception:
            attempt = None
        if attempt is None:
            return await original(self, conn)
        try:
            resp = await original(self, conn)
        except BaseException as exc:
            attempt.failed(exc)
            raise
        resp.__dict__[_ATTEMPT] = (attempt, getattr(self, "_session", None))
        return resp

    return send


def _set_response_params_wrapper(original: Any) -> Any:
    """Note on the protocol the `auto_decompress` its new response parser was built with."""
    try:
        parameter = inspect.signature(original).parameters.get("auto_decompress")
    except (TypeError, ValueError):
        parameter = None
    default = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    @functools.wraps(original)
    def set_response_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            if parameter is None or args:
                value = None  # unknown to us: not a keyword this aiohttp takes, or passed by position
            else:
                value = kwargs.get("auto_decompress", default)
            self.__dict__[_DECOMPRESS] = None if value is None else bool(value)
        except Exception:
            pass
        return result

    return set_response_params


def _take_auto_decompress(connection: Any) -> bool | None:
    """The `auto_decompress` noted for the parser that reads this response (taken: never read twice)."""
    try:
        protocol = connection.protocol
        return protocol.__dict__.pop(_DECOMPRESS, None) if protocol is not None else None
    except Exception:
        return None


def _recorded_encoding(headers: Any, auto_decompress: bool | None, session: Any) -> tuple[str, str | None]:
    """`(encoding of the bytes the application reads, recording error or None)` for a response's headers."""
    values = headers.getall("content-encoding", [])
    codings = {v.lower() if v.isascii() else v for v in values}
    encoding = values[0].strip().lower() if values else ""
    decodable = [c for c in codings if c in _DECODED]
    if not decodable:
        return encoding, None  # aiohttp leaves such a body alone whatever its setting
    if len(codings) > 1:  # several content-encoding headers: which one aiohttp's parser went by is not known
        return encoding, "response body encoding not known: several content-encoding headers"
    if auto_decompress is None:  # cannot happen with the aiohttp versions known; assume the session's setting
        guess = bool(getattr(session, "auto_decompress", True))
        return ("" if guess else encoding), (
            "response body encoding not known: aiohttp's auto_decompress for this response was not seen "
            f"(assumed {guess}, recorded as {'identity' if guess else encoding})"
        )
    return ("" if auto_decompress else encoding), None


def _start_wrapper(original: Any) -> Any:
    @functools.wraps(original)
    async def start(self: Any, connection: Any) -> Any:
        auto_decompress = _take_auto_decompress(connection)
        pending = self.__dict__.pop(_ATTEMPT, None)
        if pending is None:
            return await original(self, connection)
        attempt, session = pending
        try:
            result = await original(self, connection)
        except BaseException as exc:
            attempt.failed(exc)
            raise
        try:
            headers = self.headers
            encoding, problem = _recorded_encoding(headers, auto_decompress, session)
            attempt.response_started(self.status, list(headers.items()), encoding)
            if problem is not None:
                attempt.recording_error(problem)
            tee = ContentTee(self.content, attempt)
            tee._finalizer = weakref.finalize(self, attempt.finish, contract.END_DROPPED)
            self.content = tee
            self.__dict__[_TEE] = tee
        except Exception as exc:
            attempt.recording_error(exc)
            attempt.finish(contract.END_CLOSED)
        return result

    return start


def _closing_wrapper(original: Any) -> Any:
    @functools.wraps(original)
    def closing(self: Any, *args: Any, **kwargs: Any) -> Any:
        tee: ContentTee | None = self.__dict__.get(_TEE)
        if tee is None:
            return original(self, *args, **kwargs)
        try:
            at_end = bool(tee._inner.at_eof())
        except Exception:
            at_end = False
        try:
            return original(self, *args, **kwargs)
        finally:
            tee.end(contract.END_EXHAUSTED if at_end else contract.END_CLOSED)

    return closing


def instrument() -> None:
    """Patch aiohttp's client request/response classes; no-op when aiohttp is missing or already patched."""
    try:
        from aiohttp.client_proto import ResponseHandler
        from aiohttp.client_reqrep import ClientRequest, ClientResponse
    except ImportError:
        return
    _patches.patch(ResponseHandler, "set_response_params", _set_response_params_wrapper)
    _patches.patch(ClientRequest, "send", _send_wrapper)
    _patches.patch(ClientResponse, "start", _start_wrapper)
    _patches.patch(ClientResponse, "close", _closing_wrapper)
    _patches.patch(ClientResponse, "release", _closing_wrapper)


def uninstrument() -> None:
    _patches.restore()
