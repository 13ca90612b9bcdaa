"""Record provider-SDK traffic (openai 3.x, anthropic 2.x) through httpx2 and legacy httpx transports.

`instrument()` wraps `HTTPTransport.handle_request` and `AsyncHTTPTransport.handle_async_request` of `httpx2`
and, when importable, of `httpx`; `uninstrument()` restores the originals. Both are idempotent.

Per attempt (each retry and each redirect reaches the transport separately): the request's exact bytes
(`request.content`, read first if needed) start an `HttpAttempt`; the response head is recorded when the
transport returns, and `response.stream` is replaced by a tee of the same kind (`capture.tee_stream`) that
records the raw wire bytes the application reads and ends the attempt. A transport exception ends the
attempt as `error`.

What is recorded (`should_record`): the provider SDKs' traffic whatever the host (base URLs point at proxies,
gateways and stand-ins): a request with Stainless SDK headers (`x-stainless-*`, sent by openai, anthropic and
other Stainless-generated SDKs), an `anthropic-version`/`openai-beta` header, an `OpenAI/`/`Anthropic/` user
agent, or an `api.openai.com`/`api.anthropic.com` host; plus any request to a host in
`runtime.recording().http_hosts`. Other httpx2 traffic (the MCP client's streamable-HTTP transport, whose
tool calls the MCP hook records as tool steps, and its never-ending SSE GET) is not recorded. Nothing is
recorded when `runtime.recording()` is None, which includes the OTel exporter's own (suppressed) context.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

from tracetape.instrumentation import contract, runtime
from tracetape.instrumentation.patching import Patches
from tracetape.instrumentation.capture import tee_stream
from tracetape.instrumentation.steps import HttpAttempt, start_http_attempt

_MODULES = ("httpx2", "httpx")
_patches = Patches()


_SDK_HEADERS = ("x-stainless-lang", "x-stainless-retry-count", "anthropic-version", "openai-beta")
_SDK_AGENTS = ("OpenAI/", "Anthropic/")
_PROVIDER_HOSTS = ("openai.com", "anthropic.com")


def should_record(request: Any, http_hosts: frozenset[str]) -> bool:
    """Whether an httpx/httpx2 request is provider SDK traffic or goes to a configured host."""
    try:
        return _should_record(request, http_hosts)
    except Exception:
        return False


def _should_record(request: Any, http_hosts: frozenset[str]) -> bool:
    headers = request.headers
    for name in _SDK_HEADERS:
        if name in headers:
            return True
    agent = headers.get("user-agent", "")
    if any(a in agent for a in _SDK_AGENTS):
        return True
    url = request.url
    host = (url.host or "").lower()
    if host.endswith(_PROVIDER_HOSTS):
        return True
    if http_hosts:
        port = url.port or (443 if url.scheme == "https" else 80)
        return host in http_hosts or f"{host}:{port}" in http_hosts
    return False


def header_pairs(headers: Any) -> list[tuple[str, str]]:
    """`headers.multi_items()` as far as the recorder can tell (the same pairs, names in their sent case rather
    than lower-cased: the recorder lower-cases them itself), decoded in one pass: ASCII, as HTTP mandates, and
    else with the `Headers.encoding` httpx would use."""
    raw = headers.raw
    try:
        return [(name.decode("ascii"), value.decode("ascii")) for name, value in raw]
    except UnicodeDecodeError:
        encoding = headers.encoding
        return [(name.decode(encoding), value.decode(encoding)) for name, value in raw]


def _start(request: Any) -> HttpAttempt | None:
    try:
        body, body_error = request.content, None
    except Exception as exc:  # a streamed request body that could not be read
        body, body_error = b"", exc
    try:
        attempt = start_http_attempt(
            method=request.method,
            url=str(request.url),
            headers=header_pairs(request.headers),
            body=body,
        )
    except Exception:
        return None
    if attempt is not None and body_error is not None:
        attempt.recording_error(f"request body not captured: {type(body_error).__name__}")
    return attempt


def _wrap_response(attempt: HttpAttempt, response: Any, module: ModuleType) -> None:
    try:
        headers = response.headers
        attempt.response_started(
            response.status_code, header_pairs(headers), headers.get("content-encoding", "")
        )
        response.stream = tee_stream(
            response.stream, attempt, sync_base=module.SyncByteStream, async_base=module.AsyncByteStream
        )
    except Exception as exc:  # body not teed: end now rather than never
        attempt.recording_error(exc)
        attempt.finish(contract.END_CLOSED)


_NOT_READ = (AssertionError, TypeError)
"""What `Request.read()`/`aread()` raise, before iterating anything, for a stream of the other kind."""


def _fail(request: Any, exc: BaseException) -> None:
    """Record an attempt whose request body could not be read (it never went out whole)."""
    attempt = _start(request)
    if attempt is not None:
        attempt.failed(exc)


def _sync_wrapper(original: Any, module: ModuleType) -> Any:
    @functools.wraps(original)
    def handle_request(self: Any, request: Any) -> Any:
        ctx = runtime.recording()
        if ctx is None or not should_record(request, ctx.http_hosts):
            return original(self, request)
        try:
            request.read()
        except _NOT_READ:  # a stream of the other kind (async in a sync client): httpx says so itself
            pass
        except Exception as exc:  # the body's own iterator failed: as without recording, the caller gets it
            _fail(request, exc)
            raise
        attempt = _start(request)
        if attempt is None:
            return original(self, request)
        try:
            response = original(self, request)
        except BaseException as exc:
            attempt.failed(exc)
            raise
        _wrap_response(attempt, response, module)
        return response

    return handle_request


def _async_wrapper(original: Any, module: ModuleType) -> Any:
    @functools.wraps(original)
    async def handle_async_request(self: Any, request: Any) -> Any:
        ctx = runtime.recording()
        if ctx is None or not should_record(request, ctx.http_hosts):
            return await original(self, request)
        try:
            await request.aread()
        except _NOT_READ:
            pass
        except Exception as exc:
            _fail(request, exc)
            raise
        attempt = _start(request)
        if attempt is None:
            return await original(self, request)
        try:
            response = await original(self, request)
        except BaseException as exc:
            attempt.failed(exc)
            raise
        _wrap_response(attempt, response, module)
        return response

    return handle_async_request


def instrument() -> None:
    """Patch the httpx2 (and legacy httpx) transports; a second call does nothing."""
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        _patches.patch(module.HTTPTransport, "handle_request", lambda f, m=module: _sync_wrapper(f, m))
        _patches.patch(module.AsyncHTTPTransport, "handle_async_request", lambda f, m=module: _async_wrapper(f, m))


def uninstrument() -> None:
    """Restore the original transport methods."""
    _patches.restore()


def is_instrumented() -> bool:
    return bool(_patches)
