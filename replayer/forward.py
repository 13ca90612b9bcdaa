"""Forwarding one request live to its upstream, streaming the answer through as it arrives.

Contract (`forward`):
- the request goes to `profile.upstream_url(tail, raw query)` with its method, body and headers (minus
  hop-by-hop, `host` and `content-length`); credentials the client sent (authorization, x-api-key) are
  passed through to the upstream and nowhere else;
- the response is relayed chunk by chunk as read (no buffering of the whole body; `auto_decompress` off,
  so the bytes are the wire bytes and `content-encoding` stays true); the chunks and their times are kept
  in the returned `Outcome` for recording;
- an unreachable upstream answers 502 `{"error": "upstream_unreachable"}` (no secret, no URL credentials);
  an upstream that breaks mid-stream makes the client's connection break too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import aiohttp
from aiohttp import web

from tracetape.instrumentation import contract, redaction
from tracetape.replayer.profiles import Profile
from tracetape.replayer.tape import HOP_BY_HOP, Outcome, abort, response_headers

_SKIP_REQUEST = HOP_BY_HOP | {"host"}


class _ClientGone(Exception):
    """The client closed its connection while the answer was relayed to it."""


async def _to_client(write: Awaitable[object]) -> None:
    """Await a write to the client; its connection failing is `_ClientGone`, never an upstream error (aiohttp's
    `ClientConnectionResetError` is both a `ConnectionError` and a `ClientError`)."""
    try:
        await write
    except ConnectionError as err:
        raise _ClientGone from err


def new_client(timeout_s: float = 600.0) -> aiohttp.ClientSession:
    """The upstream client: raw bytes (no decompression), no cookie jar, bounded connect time."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10),
    )


async def forward(request: web.Request, client: aiohttp.ClientSession, profile: Profile, tail: str,
                  query: str, body: bytes) -> tuple[web.StreamResponse, Outcome]:
    t0 = time.monotonic()
    started_ns = time.time_ns()
    headers = [(n, v) for n, v in request.headers.items() if n.lower() not in _SKIP_REQUEST]
    url = profile.upstream_url(tail, query)
    try:
        upstream = await client.request(request.method, url, headers=headers, data=body or None,
                                        allow_redirects=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
        message = redaction.redact_text(f"{type(err).__name__}: {err}")
        outcome = Outcome(None, end_reason=contract.END_ERROR, error_type=type(err).__name__,
                          error_message=message, started_ns=started_ns, ended_ns=time.time_ns())
        return web.json_response({"error": "upstream_unreachable", "profile": profile.name,
                                  "message": type(err).__name__}, status=502), outcome
    async with upstream:
        out_headers = response_headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers])
        outcome = Outcome(upstream.status, list(out_headers.items()), started_ns=started_ns)
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out_headers)
        chunks: list[bytes] = []
        total = 0
        try:
            await _to_client(resp.prepare(request))
            async for chunk in upstream.content.iter_any():
                chunks.append(chunk)
                total += len(chunk)
                outcome.chunk_ends.append(total)
                outcome.chunk_times_us.append(int((time.monotonic() - t0) * 1e6))
                await _to_client(resp.write(chunk))
            await _to_client(resp.write_eof())
        except _ClientGone:
            outcome.end_reason = contract.END_CLOSED
            outcome.aborted = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # the upstream failed
            outcome.end_reason = contract.END_ERROR
            outcome.error_type = type(err).__name__
            outcome.error_message = redaction.redact_text(str(err))
            outcome.aborted = True
            abort(request)
        outcome.body = b"".join(chunks)
        outcome.ended_ns = time.time_ns()
        return resp, outcome
