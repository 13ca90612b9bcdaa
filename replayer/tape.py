"""Serving one recorded attempt back to the client, byte-exact, with the recorded chunking and timing.

Contract (`serve_attempt`):
- status and headers as recorded, minus hop-by-hop headers and `content-length` (recomputed), body bytes
  as recorded (still compressed when the recording was: `content-encoding` is kept);
- a streamed response (`streamed` with `chunk_ends`) is written chunk by chunk at the recorded boundaries
  through a `web.StreamResponse` (each recorded chunk is one write, one HTTP chunk); `pace` 0 writes at
  once, `pace` p sleeps so that chunk i leaves at p × `chunk_times_us[i]` after the request arrived; a
  non-streamed response waits p × the recorded duration;
- a recorded transport failure (no status) aborts the connection without a response; a stream that broke
  (`end_reason` error) writes the bytes recorded, then aborts the connection, so the client sees the same
  broken stream and its retry logic runs again; a stream the application closed early (`closed`,
  `dropped`) writes the bytes recorded and ends cleanly (the application stops reading there again);
- nothing here talks to an upstream. A client that disconnects mid-stream ends the write quietly.
Returns an `Outcome` (what was sent) for coverage and recording.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from tracetape.collector.records import AttemptRecord
from tracetape.instrumentation import contract

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authenticate", "proxy-authorization", "content-length",
})


@dataclass
class Outcome:
    """What the client got: for the report and for recording the replay run."""

    status: int | None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    chunk_ends: list[int] = field(default_factory=list)
    chunk_times_us: list[int] = field(default_factory=list)
    end_reason: str = contract.END_EXHAUSTED
    aborted: bool = False
    error_type: str = ""
    error_message: str = ""
    started_ns: int = 0
    ended_ns: int = 0


def response_headers(pairs: list[tuple[str, str]]) -> CIMultiDict[str]:
    """Recorded/upstream headers fit to send: hop-by-hop and content-length removed."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


def abort(request: web.Request) -> None:
    """Drop the client's connection at once (no response, or a response cut short)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _sleep_until(t0: float, offset_s: float) -> None:
    delay = t0 + offset_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _chunks(body: bytes, ends: list[int]) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    for end in ends:
        end = min(max(end, start), len(body))
        if end > start:
            out.append(body[start:end])
        start = end
    if start < len(body):
        out.append(body[start:])
    return out


async def serve_attempt(request: web.Request, attempt: AttemptRecord, body: bytes, *, pace: float) -> tuple[web.StreamResponse, Outcome]:
    t0 = time.monotonic()
    started_ns = time.time_ns()
    broken = attempt.end_reason == contract.END_ERROR
    if attempt.status is None:
        if pace:
            await _sleep_until(t0, attempt.duration_ms / 1000 * pace)
        abort(request)
        outcome = Outcome(None, aborted=True, end_reason=contract.END_ERROR, error_type=attempt.error_type,
                          error_message=attempt.error_message, started_ns=started_ns, ended_ns=time.time_ns())
        return web.Response(status=499), outcome  # never sent: the connection is gone
    headers = response_headers(attempt.response_headers)
    if not attempt.content_encoding:  # the body was stored decoded (a masked secret, or an aiohttp recording)
        headers.popall("content-encoding", None)
    outcome = Outcome(attempt.status, list(headers.items()), body, started_ns=started_ns,
                      end_reason=attempt.end_reason or contract.END_EXHAUSTED)
    headers[contract.REPLAYED_FROM_HEADER] = f"{attempt.trace_id.hex()}-{attempt.span_id.hex()}"  # lineage only
    if not (attempt.streamed and attempt.chunk_ends) and not broken:
        if pace:
            await _sleep_until(t0, attempt.duration_ms / 1000 * pace)
        outcome.ended_ns = time.time_ns()
        return web.Response(status=attempt.status, headers=headers, body=body), outcome
    resp = web.StreamResponse(status=attempt.status, headers=headers)
    chunks = _chunks(body, attempt.chunk_ends or [len(body)])
    times = attempt.chunk_times_us
    try:
        await resp.prepare(request)
        sent = 0
        for i, chunk in enumerate(chunks):
            if pace and i < len(times):
                await _sleep_until(t0, times[i] / 1e6 * pace)
            await resp.write(chunk)
            sent += len(chunk)
            outcome.chunk_ends.append(sent)
            outcome.chunk_times_us.append(int((time.monotonic() - t0) * 1e6))
        if broken:
            outcome.aborted = True
            abort(request)
        else:
            await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError) as err:
        outcome.aborted = True
        outcome.end_reason = contract.END_CLOSED
        if isinstance(err, asyncio.CancelledError):
            outcome.ended_ns = time.time_ns()
            raise
    outcome.ended_ns = time.time_ns()
    return resp, outcome
