"""Record plain `requests` traffic to the configured hosts as HTTP steps.

`instrument()` wraps `requests.adapters.HTTPAdapter.send`; `uninstrument()` restores it. Both are idempotent.
Only requests to a host in `runtime.recording().http_hosts` (`host` or `host:port`) are recorded, so the
OTLP/HTTP exporter (which uses requests) never records itself.

How the body is captured: the urllib3 response that `send` returns (`response.raw`) gets its class swapped
for a subclass (same layout, `isinstance` still holds) whose raw-read primitives (`_raw_read`, `_handle_chunk`,
`_update_chunk_length`) hand every byte read from the wire to the attempt: still compressed when the
response is (`content-encoding`), de-chunked, and only what the application (or requests for it, when
`stream=False`) actually reads. The attempt ends exactly once: `exhausted` when the body end is read,
`error` on a read exception, `closed` when the response is closed before its end, `dropped` when it is
garbage-collected first. This targets urllib3 2.x: `_raw_read(amt)` (2.0, 2.1) or `_raw_read(amt, *, read1)`
(2.2+), told apart once per response class from the installed signatures; with any other urllib3 (1.26) or
signature the response is left untouched, the body is not captured and `RECORDING_ERROR` says so.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any
from urllib.parse import urlsplit

from tracetape.instrumentation import contract, runtime
from tracetape.instrumentation.patching import Patches
from tracetape.instrumentation.steps import HttpAttempt, start_http_attempt

_patches = Patches()
_ATTEMPT = "_tracetape_attempt"
_FINALIZER = "_tracetape_finalizer"
_BUSY = "_tracetape_busy"


def host_recorded(url: str, hosts: frozenset[str]) -> bool:
    """Whether `url`'s host (`host` or `host:port`, default port implied) is one of `hosts`."""
    if not hosts:
        return False
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return False
    if host in hosts:
        return True
    if port is None:
        port = 443 if parts.scheme in ("https", "wss") else 80
    return f"{host}:{port}" in hosts


def _request_body(body: Any) -> tuple[bytes, str | None]:
    if body is None:
        return b"", None
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, str):
        return body.encode("utf-8"), None
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body), None
    return b"", f"request body not captured: streamed {type(body).__name__}"


def _header_text(part: Any) -> str:
    """A request header name or value as text: requests also accepts bytes, sent as is, i.e. what a str
    encoded as latin-1 (http.client's encoding of str headers) would be; so latin-1 decoding is exact."""
    if isinstance(part, (bytes, bytearray, memoryview)):
        return bytes(part).decode("latin-1")
    return part if isinstance(part, str) else str(part)


def _request_headers(headers: Any) -> list[tuple[str, str]]:
    return [(_header_text(name), _header_text(value)) for name, value in headers.items()]


def _end(raw: Any, reason: str, error: BaseException | None = None) -> None:
    attempt: HttpAttempt | None = raw.__dict__.get(_ATTEMPT)
    if attempt is None or attempt.finished:
        return
    finalizer = raw.__dict__.get(_FINALIZER)
    if finalizer is not None:
        finalizer.detach()
    attempt.finish(reason, error)


def _body_complete(raw: Any) -> bool:
    fp = getattr(raw, "_fp", None)
    if fp is None:
        return True
    if getattr(raw, "length_remaining", None) == 0:
        return True
    try:
        return bool(fp.isclosed())
    except AttributeError:
        return bool(getattr(fp, "closed", False))


class _TeedResponse:
    """Mixin put in front of urllib3's `HTTPResponse` class on recorded responses only.

    The end of the body is only ever decided inside a read primitive (EOF, content length reached, the
    last chunk's size line): `http.client`'s own `isclosed()` cannot tell, since urllib3 also closes it when
    a read generator is abandoned. urllib3 closes the response itself inside a failing read (before
    raising); `_BUSY` makes such a close leave the end reason to the read's own outcome.
    """

    def _raw_read(self, amt: int | None = None, *, read1: bool = False) -> bytes:  # urllib3 >= 2.2
        read = functools.partial(super()._raw_read, amt, read1=read1)  # type: ignore[misc]
        return self._tracetape_raw_read(read, amt, read1)

    def _tracetape_raw_read(self, read: Any, amt: int | None, read1: bool) -> bytes:
        """Run `read` (the class's own `_raw_read`, arguments bound as the caller passed them) and tee its bytes."""
        d = self.__dict__
        if _body_complete(self):  # closed earlier (an abandoned read generator): no natural end to see here
            return read()  # type: ignore[no-any-return]
        d[_BUSY] = True
        try:
            data = read()
        except BaseException as exc:
            _end(self, contract.END_ERROR, exc)
            raise
        finally:
            d[_BUSY] = False
        if data:
            d[_ATTEMPT].chunk(data)
        if (amt is None and not read1) or (amt != 0 and not data) or _body_complete(self):
            _end(self, contract.END_EXHAUSTED)
        return data  # type: ignore[no-any-return]

    def _handle_chunk(self, amt: int | None) -> bytes:
        d = self.__dict__
        d[_BUSY] = True
        try:
            data = super()._handle_chunk(amt)  # type: ignore[misc]
        except BaseException as exc:
            _end(self, contract.END_ERROR, exc)
            raise
        finally:
            d[_BUSY] = False
        if data:
            d[_ATTEMPT].chunk(data)
        return data

    def _update_chunk_length(self) -> None:
        d = self.__dict__
        d[_BUSY] = True
        try:
            super()._update_chunk_length()  # type: ignore[misc]
        except BaseException as exc:
            _end(self, contract.END_ERROR, exc)
            raise
        finally:
            d[_BUSY] = False
        if getattr(self, "chunk_left", None) == 0:
            _end(self, contract.END_EXHAUSTED)

    def close(self) -> None:
        try:
            super().close()  # type: ignore[misc]
        finally:
            if not self.__dict__.get(_BUSY):
                _end(self, contract.END_CLOSED)  # no-op when the end of the body was already read

    def __del__(self) -> None:
        # io.IOBase's finalizer closes the response: a drop must not be recorded as a close.
        try:
            _end(self, contract.END_DROPPED)
        finally:
            super().__del__()  # type: ignore[misc]


class _TeedResponseAmtOnly(_TeedResponse):
    """`_TeedResponse` for urllib3 2.0.x/2.1.x, whose `_raw_read(amt)` has no `read1`: same signature, same call."""

    def _raw_read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
        read = functools.partial(super(_TeedResponse, self)._raw_read, amt)  # type: ignore[misc]
        return self._tracetape_raw_read(read, amt, False)


_EMPTY = inspect.Parameter.empty
_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
_SELF = ("self", _POS, _EMPTY)
_AMT = ("amt", _POS, None)
_MIXINS = {  # the installed `_raw_read` signature -> the mixin whose override has exactly that signature
    (_SELF, _AMT): _TeedResponseAmtOnly,
    (_SELF, _AMT, ("read1", inspect.Parameter.KEYWORD_ONLY, False)): _TeedResponse,
}


def _signature(cls: type, name: str) -> tuple[tuple[str, Any, Any], ...] | None:
    try:
        return tuple((p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, name)).parameters.values())
    except (AttributeError, TypeError, ValueError):
        return None


@functools.cache
def _teed_class(cls: type) -> type | None:
    """The teed subclass of urllib3 response class `cls`, decided once per class from the signatures of its read
    primitives; None when they are not ones the overrides reproduce exactly (urllib3 1.26 has none of them)."""
    if _signature(cls, "_handle_chunk") != (_SELF, ("amt", _POS, _EMPTY)):
        return None
    if _signature(cls, "_update_chunk_length") != (_SELF,):
        return None
    raw_read = _signature(cls, "_raw_read")
    mixin = _MIXINS.get(raw_read) if raw_read is not None else None
    if mixin is None:
        return None
    return type(f"Teed{cls.__name__}", (mixin, cls), {"__module__": __name__})


def _install_tee(attempt: HttpAttempt, raw: Any) -> None:
    cls = type(raw)
    teed = _teed_class(cls)
    if teed is None:
        attempt.recording_error(
            f"response body not captured: unsupported {cls.__module__}.{cls.__name__}"
            " (no urllib3 2.x read primitives with known signatures)"
        )
        attempt.finish(contract.END_CLOSED)
        return
    if _body_complete(raw):  # no body at all (HEAD, 204, 304, length 0): nothing will be read
        attempt.finish(contract.END_EXHAUSTED)
        return
    raw.__dict__[_ATTEMPT] = attempt
    raw.__dict__[_FINALIZER] = weakref.finalize(raw, attempt.finish, contract.END_DROPPED)
    raw.__class__ = teed


def _wrapper(original: Any) -> Any:
    @functools.wraps(original)
    def send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = runtime.recording()
        if ctx is None or not host_recorded(str(request.url), ctx.http_hosts):
            return original(self, request, *args, **kwargs)
        try:
            body, body_error = _request_body(request.body)
            attempt = start_http_attempt(
                method=str(request.method), url=str(request.url), headers=_request_headers(request.headers), body=body
            )
        except Exception:  # the recorder never breaks the call
            attempt, body_error = None, None
        if attempt is None:
            return original(self, request, *args, **kwargs)
        if body_error:
            attempt.recording_error(body_error)
        try:
            response = original(self, request, *args, **kwargs)
        except BaseException as exc:
            attempt.failed(exc)
            raise
        try:
            raw = response.raw
            headers = getattr(raw, "headers", None) or response.headers
            attempt.response_started(
                response.status_code, list(headers.items()), headers.get("content-encoding", "") or ""
            )
            _install_tee(attempt, raw)
        except Exception as exc:
            attempt.recording_error(exc)
            attempt.finish(contract.END_CLOSED)
        return response

    return send


def instrument() -> None:
    """Patch `requests.adapters.HTTPAdapter.send`; no-op when requests is missing or already patched."""
    try:
        from requests.adapters import HTTPAdapter
    except ImportError:
        return
    _patches.patch(HTTPAdapter, "send", _wrapper)


def uninstrument() -> None:
    _patches.restore()
