"""Tees for httpx-style response byte streams (httpx2 and legacy httpx).

`tee_stream(stream, attempt, sync_base=..., async_base=...)` returns a wrapper of the same kind as `stream`
(a `sync_base`, an `async_base`, or both, as the original was), so the client's kind checks still hold.

Contract of the wrapper:
- it yields exactly what the inner stream yields, pulling one chunk only when the consumer asks for one
  (never reads ahead), and hands every chunk to `attempt.chunk`;
- it ends the attempt exactly once, however reading ends:
  read to the end -> `exhausted`; `close()`/`aclose()` before the end -> `closed`; an exception from the inner
  stream -> `error` (with the bytes read so far); garbage-collected without either -> `dropped`
  (a `weakref.finalize` whose callback holds only the attempt, never the wrapper);
- the consumer abandoning an iterator (GeneratorExit) or being cancelled is not an error: the `close()`
  that follows (httpx closes the response in the iterator's `finally`) or the GC decides the end reason;
- several iterations of one stream (openai's async drain after `[DONE]`) feed the same attempt;
- it never attaches or detaches OTel context; the attempt ends its span with `span.end()` only.
Unknown attributes (`elapsed`, ...) are looked up on the inner stream.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any

from tracetape.instrumentation import contract
from tracetape.instrumentation.steps import HttpAttempt


def _is_cancellation(exc: BaseException) -> bool:
    """asyncio or trio/anyio cancellation: the application stopped reading, not a transport error."""
    return isinstance(exc, asyncio.CancelledError) or type(exc).__name__ == "Cancelled"


class _TeeCore:
    """State shared by the sync and async halves: the inner stream, the attempt, the drop finalizer."""

    _inner: Any
    _attempt: HttpAttempt
    _finalizer: weakref.finalize

    def __init__(self, inner: Any, attempt: HttpAttempt) -> None:
        self._inner = inner
        self._attempt = attempt
        self._finalizer = weakref.finalize(self, attempt.finish, contract.END_DROPPED)

    def _end(self, reason: str, error: BaseException | None = None) -> None:
        self._finalizer.detach()
        self._attempt.finish(reason, error)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally, e.g. `elapsed` on the inner stream.
        if name.startswith("__") or name in ("_inner", "_attempt", "_finalizer"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._inner!r}>"


class _SyncTee(_TeeCore):
    def __iter__(self) -> Iterator[bytes]:
        return self._iterate()

    def _iterate(self) -> Generator[bytes, None, None]:
        attempt = self._attempt
        inner = iter(self._inner)
        try:
            for chunk in inner:
                attempt.chunk(chunk)
                yield chunk
        except GeneratorExit:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
            raise
        except BaseException as exc:
            if not _is_cancellation(exc):
                self._end(contract.END_ERROR, exc)
            raise
        self._end(contract.END_EXHAUSTED)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._end(contract.END_CLOSED)


class _AsyncTee(_TeeCore):
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._aiterate()

    async def _aiterate(self) -> AsyncGenerator[bytes, None]:
        attempt = self._attempt
        inner = self._inner.__aiter__()
        try:
            async for chunk in inner:
                attempt.chunk(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            if not _is_cancellation(exc):
                self._end(contract.END_ERROR, exc)
            raise
        else:
            self._end(contract.END_EXHAUSTED)
        finally:
            # Close a partly read inner generator in this task, not later in one of the event loop's.
            if isinstance(inner, AsyncGenerator):
                await inner.aclose()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._end(contract.END_CLOSED)


@functools.cache
def _tee_classes(sync_base: type, async_base: type) -> tuple[type, type, type]:
    """The three wrapper classes for one library's stream base classes (sync, async, both)."""
    sync_cls = type("SyncTeeStream", (_SyncTee, sync_base), {"__module__": __name__})
    async_cls = type("AsyncTeeStream", (_AsyncTee, async_base), {"__module__": __name__})
    both_cls = type("TeeStream", (_SyncTee, _AsyncTee, sync_base, async_base), {"__module__": __name__})
    return sync_cls, async_cls, both_cls


def tee_stream(stream: Any, attempt: HttpAttempt, *, sync_base: type, async_base: type) -> Any:
    """Wrap a response byte stream so every chunk read is recorded on `attempt` (see the module doc)."""
    sync_cls, async_cls, both_cls = _tee_classes(sync_base, async_base)
    is_sync = isinstance(stream, sync_base)
    is_async = isinstance(stream, async_base)
    if is_sync and is_async:
        return both_cls(stream, attempt)
    if is_async:
        return async_cls(stream, attempt)
    return sync_cls(stream, attempt)
