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
Returns an `Outcome` (what was sent) for coverage and recording; with `outcome=False` (the session does not
record) a complete non-streamed answer returns None instead (nothing to report).
`attempt_headers(attempt)` are the headers sent for an attempt, `x-tracetape-replayed-from` included: a session
builds them once per attempt and passes them in (aiohttp copies them into each response), as it does the
attempt's chunk boundaries (`attempt_bounds`).
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


def chunk_bounds(ends: list[int], size: int) -> list[tuple[int, int]]:
    """The (start, end) of each recorded chunk of a `size`-byte body: the recorded ends, clamped and made
    increasing; empty chunks dropped; whatever follows the last end is one more chunk."""
    out: list[tuple[int, int]] = []
    start = 0
    for end in ends:
        end = min(max(end, start), size)
        if end > start:
            out.append((start, end))
        start = end
    if start < size:
        out.append((start, size))
    return out


@dataclass(frozen=True)
class AttemptHeaders:
    """A recorded attempt's answer, prepared once: `send` goes on the wire (aiohttp copies it; never mutated),
    `reported` is what an `Outcome` carries (no lineage header); `whole`: the answer is one piece — not
    streamed, not broken, not a transport failure — so unpaced it is just `web.Response(status, send, body)`."""

    send: CIMultiDict[str]
    reported: list[tuple[str, str]]
    status: int = 0
    whole: bool = False


def attempt_headers(attempt: AttemptRecord) -> AttemptHeaders:
    """The headers sent for a recorded attempt (see module doc), and whether it is answered whole."""
    headers = response_headers(attempt.response_headers)
    if not attempt.content_encoding:  # the body was stored decoded (a masked secret, or an aiohttp recording)
        headers.popall("content-encoding", None)
    reported = list(headers.items())
    headers[contract.REPLAYED_FROM_HEADER] = f"{attempt.trace_id.hex()}-{attempt.span_id.hex()}"  # lineage only
    status = attempt.status
    broken = attempt.end_reason == contract.END_ERROR
    whole = not (status is None or broken or (attempt.streamed and attempt.chunk_ends))
    return AttemptHeaders(headers, reported, status or 0, whole)


def attempt_bounds(attempt: AttemptRecord, size: int) -> list[tuple[int, int]]:
    """`chunk_bounds` of a recorded attempt's `size`-byte response (one chunk when none were recorded)."""
    return chunk_bounds(attempt.chunk_ends or [size], size)


async def serve_attempt(request: web.Request, attempt: AttemptRecord, body: bytes, *, pace: float,
                        headers: AttemptHeaders | None = None, outcome: bool = True,
                        bounds: list[tuple[int, int]] | None = None) -> tuple[web.StreamResponse, Outcome | None]:
    """Answer `request` with the recorded `attempt` and its response `body` (see module doc). `bounds`: the
    body's `chunk_bounds`, when the caller keeps them."""
    status = attempt.status
    if status is None:
        return await _serve_failure(request, attempt, pace)
    if headers is None:
        headers = attempt_headers(attempt)
    if not headers.whole:  # streamed at its recorded chunks, or broken mid-way
        if bounds is None:
            bounds = attempt_bounds(attempt, len(body))
        broken = attempt.end_reason == contract.END_ERROR
        return await _serve_stream(request, attempt, status, body, headers, bounds, pace, broken, outcome)
    started_ns = time.time_ns() if outcome else 0
    if pace:
        await _sleep_until(time.monotonic(), attempt.duration_ms / 1000 * pace)
    resp = web.Response(status=status, headers=headers.send, body=body)
    if not outcome:
        return resp, None
    return resp, Outcome(status, list(headers.reported), body, started_ns=started_ns, ended_ns=time.time_ns(),
                         end_reason=attempt.end_reason or contract.END_EXHAUSTED)


async def _serve_failure(request: web.Request, attempt: AttemptRecord, pace: float) -> tuple[web.StreamResponse, Outcome]:
    """A recorded transport failure: no response, the connection is dropped."""
    t0 = time.monotonic()
    started_ns = time.time_ns()
    if pace:
        await _sleep_until(t0, attempt.duration_ms / 1000 * pace)
    abort(request)
    outcome = Outcome(None, aborted=True, end_reason=contract.END_ERROR, error_type=attempt.error_type,
                      error_message=attempt.error_message, started_ns=started_ns, ended_ns=time.time_ns())
    return web.Response(status=499), outcome  # never sent: the connection is gone


async def _serve_stream(request: web.Request, attempt: AttemptRecord, status: int, body: bytes,
                        headers: AttemptHeaders, bounds: list[tuple[int, int]], pace: float, broken: bool,
                        sent_chunks: bool) -> tuple[web.StreamResponse, Outcome]:
    """A streamed (or broken) response, written chunk by chunk at the recorded boundaries. The `Outcome` lists
    the chunks sent (ends, times) only when `sent_chunks` (the session records)."""
    t0 = time.monotonic()
    outcome = Outcome(status, list(headers.reported), body, started_ns=time.time_ns(),
                      end_reason=attempt.end_reason or contract.END_EXHAUSTED)
    resp = web.StreamResponse(status=status, headers=headers.send)
    try:
        await resp.prepare(request)
        if pace or sent_chunks:
            await _write_tracked(resp, body, bounds, attempt.chunk_times_us, t0, pace, outcome)
        else:
            write = resp.write
            for start, end in bounds:
                await write(body[start:end])
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


async def _write_tracked(resp: web.StreamResponse, body: bytes, bounds: list[tuple[int, int]], times: list[int],
                         t0: float, pace: float, outcome: Outcome) -> None:
    """Write the chunks, paced when `pace`, noting each one's end and time in `outcome`."""
    ends, offsets = outcome.chunk_ends, outcome.chunk_times_us
    for i, (start, end) in enumerate(bounds):
        if pace and i < len(times):
            await _sleep_until(t0, times[i] / 1e6 * pace)
        await resp.write(body[start:end])
        ends.append(end)
        offsets.append(int((time.monotonic() - t0) * 1e6))
