"""The proxy route `/s/{session}/{profile}/{tail}`: match the request to the tape, then serve, refuse or forward.

Contract (per request; the session's mode decides):
- the request is turned into the envelope recording would have hashed: path = the profile's base path +
  tail (raw, percent-encoded as sent), raw query, semantic headers, body redacted then canonicalised. A
  request byte-identical to a recorded one skips that: its envelope hash comes from the session's
  `ExactIndex` (`replayer/exact.py`, one sha256 of the body), the same hash the full path gives. The envelope
  is built only when it is needed (no exact match, miss diagnostics); for a body of `heavy.HEAVY_BYTES` or
  more, that work (and the diff of a miss) runs in a worker process (`replayer/heavy.py`, bug R5), and a
  compressed body of `DECODE_OFF_LOOP` bytes or more is inflated in a thread;
- `exact`: a hit is served from the tape (`tape.serve_attempt`); a miss or an exhausted envelope is a 409
  with `miss.miss_body` diagnostics. Nothing is forwarded, ever.
- `step`: a hit is served from the tape or forwarded live as `ReplaySession.route_step_mode` says; a miss
  (or exhausted envelope) is a divergence: recorded in the report, then forwarded live;
- `live`: everything is forwarded (a recording proxy); matches against the tape are still noted;
- when the session records (`record`), every answered attempt becomes a step span of the replay run;
- each request is counted on its session while answered (a DELETE waits for it: `ReplaySession.drain`), and
  its body is reserved by its declared length from the replayer's `BodyBudget` before it is read (503
  `busy` + Retry-After past it, unread: `replayer/bodies.py`).
- The tools endpoint `POST /s/{session}/_tool` answers `{"name", "envelope_hash", "mutating", "allowed"}`
  with `{"action": "answer", "step", "result", "error_type", "error_message", "suppressed_mutation",
  "replayed_from", "duration_ms"}` (how long the recorded call ran: a recorded cancellation waits that long) or
  `{"action": "run"}` (the tool may run live), or 409 `replay_miss` (it must not run).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

import msgspec
from aiohttp import web

from tracetape.instrumentation import contract, redaction
from tracetape.replayer import forward, heavy, miss, tape
from tracetape.replayer.envelopes import received_envelope
from tracetape.replayer.errors import ApiError, decoded_body, read_json
from tracetape.replayer.exact import ExactIndex, ExactKey, key_of, request_semantic_headers
from tracetape.replayer.matching import HIT, MISS, Claim, Slot
from tracetape.replayer.profiles import Profile
from tracetape.replayer.session import MODE_EXACT, MODE_LIVE, ReplaySession
from tracetape.replayer.state import ReplayerState

STATE_KEY: web.AppKey[ReplayerState] = web.AppKey("tracetape_replayer_state", ReplayerState)
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("tracetape_replayer_max_body", int)
"""The largest request body, as sent and decoded (the app's `client_max_size`)."""

NO_RETRY = {"x-should-retry": "false"}
"""Tells the provider SDKs (which retry 409) that retrying a miss is pointless."""

DECODE_OFF_LOOP = 64 << 10
"""A compressed request body at least this large is inflated in a thread (zlib and zstd release the GIL)."""

_RAW = re.compile(r"^/s/[^/]+/[^/]+/?(.*)$")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _raw_tail(request: web.Request) -> str:
    """The proxied tail as sent (percent-encoded): what follows `/s/{sid}/{profile}/`."""
    url = request.rel_url
    raw_path = url.raw_path
    if url.path_safe == raw_path:  # the route matched these very characters: its `tail` is the raw one
        tail = request.match_info.get("tail")
        if tail is not None or raw_path.count("/") < 4:
            return tail or ""
    parts = raw_path.split("/", 4)
    if len(parts) >= 4 and parts[1] == "s" and parts[2] and parts[3]:
        return parts[4] if len(parts) == 5 else ""
    m = _RAW.match(raw_path)
    return m.group(1) if m else ""


async def _decoded(request: web.Request, raw: bytes, encoding: str) -> bytes:
    limit = request.app[MAX_BODY_KEY]
    if len(raw) < DECODE_OFF_LOOP:
        return decoded_body(raw, encoding, limit)
    return await asyncio.to_thread(decoded_body, raw, encoding, limit)


class Received:
    """One proxied request as matching sees it; each costly part is computed once, when first needed."""

    __slots__ = ("request", "profile", "tail", "query", "raw", "body", "path", "semantic", "heavy", "pool",
                 "env_hash", "_key", "_envelope", "_redacted")

    def __init__(self, request: web.Request, profile: Profile, raw: bytes, body: bytes,
                 pool: heavy.HeavyPool) -> None:
        self.request = request
        self.profile = profile
        self.tail = _raw_tail(request)
        self.query = request.rel_url.raw_query_string
        self.raw = raw  # as sent: forwarded upstream unchanged, with its Content-Encoding
        self.body = body
        self.path = _envelope_path(profile, self.tail)
        self.semantic = request_semantic_headers(request.headers)
        self.heavy = len(body) >= heavy.HEAVY_BYTES
        self.pool = pool
        self.env_hash = ""
        self._key: ExactKey | None = None
        self._envelope: dict[str, Any] | None = None
        self._redacted: bytes | None = None

    def head(self) -> tuple[str, str]:
        """The envelope's method and path (no body needed)."""
        return self.request.method.upper(), contract.normalize_path(redaction.redact_text(self.path))

    def exact_hash(self, exact: ExactIndex) -> str | None:
        """The envelope hash when the request's bytes are a recording's (one sha256 of the body), else None.
        Not for a heavy body (its sha256 runs in a thread: `match_hash`)."""
        return self._lookup(exact, hashlib.sha256(self.body).digest())

    def _lookup(self, exact: ExactIndex, body_digest: bytes) -> str | None:
        key = self._key = key_of(body_digest, self.request.method, self.path, self.query, self.semantic)
        found = exact.lookup(key)
        if found is not None:
            self.env_hash = found
        return found

    async def match_hash(self, exact: ExactIndex | None, *, want_redacted: bool) -> str:
        """The request's envelope hash: from the exact index when the bytes are a recording's, else computed
        (and then remembered by the index when it is a recorded key to confirm)."""
        if exact is not None:
            if self.heavy:
                found = self._lookup(exact, await asyncio.to_thread(_sha256, self.body))
                if found is not None:
                    return found
            elif self._key is None and self.exact_hash(exact) is not None:
                return self.env_hash
        self.env_hash = await self._computed_hash(want_redacted)
        key = self._key
        if key is not None and exact is not None and exact.needs_confirmation(key):
            exact.confirm(key, self.env_hash)
        return self.env_hash

    async def _computed_hash(self, want_redacted: bool) -> str:
        if not self.heavy:
            return contract.envelope_hash(self.envelope())
        env_hash, redacted = await self.pool.run(
            len(self.body), heavy.job_envelope, heavy.current_rules(), self.request.method, self.path, self.query,
            list(self.semantic), self.body, want_redacted)
        if want_redacted:
            self._redacted = self.body if redacted is None else redacted
        return env_hash

    def envelope(self) -> dict[str, Any]:
        """The received envelope, built inline (a body under `heavy.HEAVY_BYTES`)."""
        if self._envelope is None:
            self._envelope, self._redacted = received_envelope(
                self.request.method, self.path, self.query, list(self.semantic), self.body)
        return self._envelope

    async def redacted(self) -> bytes:
        """The body as recording stores it (secrets masked)."""
        if self._redacted is None:
            if self.heavy:
                masked = await self.pool.run(len(self.body), heavy.job_redact, heavy.current_rules(), self.body)
                self._redacted = self.body if masked is None else masked
            else:
                self._redacted = redaction.redact_body(self.body)
        return self._redacted

    async def diagnostics(self, session: ReplaySession, claim: Claim) -> dict[str, Any]:
        """The 409 body for a request the tape cannot answer (`miss`)."""
        method, path = self.head()
        plan = miss.plan_miss(session, method, path, self.env_hash, claim)
        if self.heavy:
            result = await self.pool.run(
                len(self.body), heavy.job_compare, heavy.current_rules(), self.request.method, self.path,
                self.query, list(self.semantic), self.body, plan)
        else:
            result = miss.compare(self.envelope(), plan)
        return miss.assemble(session, plan, result, method, path, self.env_hash, claim)


_PATHS: dict[tuple[str, str], str] = {}
_MAX_PATHS = 1024
_MAX_REMEMBERED_TAIL = 256


def _envelope_path(profile: Profile, tail: str) -> str:
    """`profile.envelope_path(tail)`, remembered for short tails (a replay sends the same few paths again and
    again); at most `_MAX_PATHS` of them, so a client sending arbitrary paths costs a few hundred KiB at most."""
    if len(tail) > _MAX_REMEMBERED_TAIL:
        return profile.envelope_path(tail)
    key = (profile.base_path, tail)
    path = _PATHS.get(key)
    if path is None:
        if len(_PATHS) >= _MAX_PATHS:
            _PATHS.clear()
        path = _PATHS[key] = profile.envelope_path(tail)
    return path


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def handle_proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    info = request.match_info
    session = state.sessions.get(info["sid"])
    session.inflight += 1  # counted until answered: a DELETE waits for it (`ReplaySession.drain`)
    held = 0
    try:
        profile = state.profile(info["profile"])
        declared = request.content_length
        if declared is None and not request.can_read_body:
            declared = 0
        held = state.bodies.take(declared)  # reserved before the body is read
        raw = await request.read()
        encoding = request.headers.get("Content-Encoding")
        body = (await _decoded(request, raw, encoding)) if encoding else raw
        rq = Received(request, profile, raw, body, state.heavy)
        exact = session.exact
        env_hash = rq.exact_hash(exact) if exact is not None and not rq.heavy else None
        if env_hash is None:
            env_hash = await rq.match_hash(exact, want_redacted=session.recorder is not None)
        claim = session.index.claim(env_hash)
        options = session.options
        mode = options.mode
        slot = claim.slot
        if slot is not None and mode != MODE_LIVE and claim.kind == HIT:
            if mode == MODE_EXACT or session.route_step_mode(slot.step_index) == "tape":
                index, pos = slot
                prepared = session.served_headers(index, pos)
                if prepared.whole and not options.pace and session.recorder is None:  # the common case, in one go
                    data = _tape_body(session, index, pos)
                    session.coverage.request_from_tape(index, pos)
                    return web.Response(status=prepared.status, headers=prepared.send, body=data)
                return await _from_tape(request, session, rq, slot)
        session.coverage.request()
        if mode == MODE_LIVE:
            return await _go_live(state, session, rq, slot if claim.kind == HIT else None)
        if claim.kind == HIT and slot is not None:
            return await _go_live(state, session, rq, slot)
        return await _unmatched(state, session, rq, claim)
    finally:
        session.leave()
        state.bodies.held -= held


def _tape_body(session: ReplaySession, index: int, pos: int) -> bytes:
    """The recorded response body of an attempt; a store that lost it still counts the request."""
    try:
        return session.blob(session.steps[index].attempts[pos].response_body)
    except ApiError:
        session.coverage.request()
        raise


async def _from_tape(request: web.Request, session: ReplaySession, rq: Received, slot: Slot) -> web.StreamResponse:
    """Answer from the recorded attempt the request matched (streamed, paced, recorded: `tape.serve_attempt`)."""
    index, pos = slot
    attempt = session.steps[index].attempts[pos]
    data = _tape_body(session, index, pos)
    session.coverage.request_from_tape(index, pos)
    recording = session.recorder is not None
    pace = session.options.pace
    headers = session.served_headers(index, pos)
    bounds = session.chunk_bounds(index, pos, len(data)) if attempt.streamed else None
    resp, outcome = await tape.serve_attempt(request, attempt, data, pace=pace, headers=headers, outcome=recording,
                                             bounds=bounds)
    if outcome is not None:
        if outcome.aborted:
            session.coverage.aborted()
        if recording:
            await _record(session, rq, outcome, source="tape", slot=slot)
    return resp


async def _go_live(state: ReplayerState, session: ReplaySession, rq: Received, slot: Slot | None) -> web.StreamResponse:
    """Forward the request to the profile's upstream; the answer streams through."""
    if state.client is None:
        raise ApiError(503, "no_upstream_client", "the replayer has no upstream client")
    request = rq.request
    resp, outcome = await forward.forward(request, state.client, rq.profile, rq.tail, rq.query, rq.raw)
    session.coverage.live({"method": request.method, "path": rq.head()[1], "envelope_hash": rq.env_hash,
                           "status": outcome.status,
                           "matched_step": slot.step_index if slot is not None else None},
                          slot.step_index if slot is not None else None,
                          slot.attempt_pos if slot is not None else None)
    await _record(session, rq, outcome, source="live", slot=slot)
    return resp


async def _unmatched(state: ReplayerState, session: ReplaySession, rq: Received, claim: Claim) -> web.StreamResponse:
    """A miss or an exhausted envelope: a 409 with diagnostics (exact mode), else a divergence forwarded live."""
    diagnostics = await rq.diagnostics(session, claim)
    event = {k: diagnostics[k] for k in ("error", "expected_step", "received_envelope_hash", "received")}
    event["diff"] = diagnostics["diff"][:5]
    if session.options.mode == MODE_EXACT:
        (session.coverage.miss if claim.kind == MISS else session.coverage.exhausted)(event)
        return web.json_response(diagnostics, status=409, headers=NO_RETRY)
    session.coverage.divergence(event)
    session.mark_diverged()
    return await _go_live(state, session, rq, None)


async def _record(session: ReplaySession, rq: Received, outcome: tape.Outcome, *, source: str,
                  slot: Slot | None) -> None:
    """Record the answered attempt as a step of the replay run, when the session records."""
    recorder = session.recorder
    if recorder is None:
        return
    request = rq.request
    headers = list(request.headers.items())
    profile = rq.profile
    provider = profile.name if profile.name in ("openai", "anthropic") else (
        contract.detect_provider(request.host, headers) or "")
    original = session.steps[slot.step_index].attempts[slot.attempt_pos] if slot is not None else None
    recorder.http_attempt(
        method=request.method, url=f"{profile.upstream}/{rq.tail}" + (f"?{rq.query}" if rq.query else ""),
        request_headers=headers, redacted_body=await rq.redacted(), envelope_hash=rq.env_hash, provider=provider,
        outcome=outcome, original_index=slot.step_index if slot is not None else None, original=original,
        served_from=source)


_decode_tool = msgspec.json.Decoder().decode


async def handle_tool(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    session = state.sessions.get(request.match_info["sid"])
    session.inflight += 1  # counted until answered: a DELETE waits for it (`ReplaySession.drain`)
    try:
        data = await read_json(request)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(
                data.get("envelope_hash"), str) or not _HEX64.fullmatch(data["envelope_hash"]):
            raise ApiError(400, "bad_request", "give name (string) and envelope_hash (sha256 hex)")
        name, env_hash = data["name"], data["envelope_hash"]
        mutating = bool(data.get("mutating", False))
        allowed = bool(data.get("allowed", False)) or name in session.options.allow_mutations or (
            "*" in session.options.allow_mutations)
        mode = session.options.mode
        claim = session.index.claim(env_hash)
        hit = claim.slot if claim.kind == HIT else None
        if mutating and allowed:
            session.coverage.tool_live(*(hit or (None, None)))
            return web.json_response({"action": "run", "reason": "mutation_allowed"})
        if claim.kind == HIT and claim.slot is not None:
            slot = claim.slot
            use_tape = mutating or mode == MODE_EXACT or (mode != MODE_LIVE and session.route_step_mode(slot.step_index) == "tape")
            if use_tape:
                step, attempt = session.attempt(slot.step_index, slot.attempt_pos)
                raw = session.blob(attempt.tool_result)
                try:
                    result = _decode_tool(raw) if raw else None
                except msgspec.DecodeError:
                    result = raw.decode("utf-8", "replace")
                session.coverage.tool(slot.step_index, slot.attempt_pos, suppressed_mutation=mutating, name=name)
                if mutating and session.recorder is not None:
                    session.recorder.mutation_suppressed(name, slot.step_index)
                return web.json_response({
                    "action": "answer", "step": slot.step_index, "result": result,
                    "error_type": attempt.error_type, "error_message": attempt.error_message,
                    "suppressed_mutation": mutating,
                    "replayed_from": f"{attempt.trace_id.hex()}-{attempt.span_id.hex()}",
                    "duration_ms": attempt.duration_ms})
        if mode == MODE_EXACT or mutating:
            expected = next((i for i, s in enumerate(session.steps)
                             if s.kind == contract.STEP_KIND_TOOL and s.tool_name == name
                             and not session.coverage.is_served(i)), None)
            body = {"error": "replay_miss" if claim.kind == MISS else "replay_exhausted", "run": session.run.run_id,
                    "session_id": session.id, "tool": name, "received_envelope_hash": env_hash,
                    "expected_step": None if expected is None else {
                        "index": expected, "name": session.steps[expected].name,
                        "envelope_hash": session.steps[expected].envelope_hash},
                    "hint": ("a mutating tool never runs during replay unless allowed (--allow-mutations NAME)"
                             if mutating else "the tool's arguments differ from the recording")}
            event = {k: body[k] for k in ("error", "tool", "expected_step", "received_envelope_hash")}
            (session.coverage.miss if claim.kind == MISS else session.coverage.exhausted)(event)
            return web.json_response(body, status=409, headers=NO_RETRY)
        session.coverage.tool_live(*(hit or (None, None)))
        if claim.kind != HIT:
            session.coverage.divergence({"error": "tool_miss", "tool": name, "received_envelope_hash": env_hash})
            session.mark_diverged()
        return web.json_response({"action": "run"})
    finally:
        session.leave()
