"""The proxy route `/s/{session}/{profile}/{tail}`: match the request to the tape, then serve, refuse or forward.

Contract (per request; the session's mode decides):
- the request is turned into the envelope recording would have hashed: path = the profile's base path +
  tail (raw, percent-encoded as sent), raw query, semantic headers, body redacted then canonicalised;
- `exact`: a hit is served from the tape (`tape.serve_attempt`); a miss or an exhausted envelope is a 409
  with `miss.miss_body` diagnostics. Nothing is forwarded, ever.
- `step`: a hit is served from the tape or forwarded live as `ReplaySession.route_step_mode` says; a miss
  (or exhausted envelope) is a divergence: recorded in the report, then forwarded live;
- `live`: everything is forwarded (a recording proxy); matches against the tape are still noted;
- when the session records (`record`), every answered attempt becomes a step span of the replay run.
- The tools endpoint `POST /s/{session}/_tool` answers `{"name", "envelope_hash", "mutating", "allowed"}`
  with `{"action": "answer", "step", "result", "error_type", "error_message", "suppressed_mutation"}` or
  `{"action": "run"}` (the tool may run live), or 409 `replay_miss` (it must not run).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

import msgspec
from aiohttp import web

from tracetape.instrumentation import contract
from tracetape.replayer import forward, miss, tape
from tracetape.replayer.envelopes import received_envelope
from tracetape.replayer.errors import ApiError, decoded_body, read_json
from tracetape.replayer.matching import HIT, MISS
from tracetape.replayer.session import MODE_EXACT, MODE_LIVE
from tracetape.replayer.state import ReplayerState

STATE_KEY: web.AppKey[ReplayerState] = web.AppKey("tracetape_replayer_state", ReplayerState)
MAX_BODY_KEY: web.AppKey[int] = web.AppKey("tracetape_replayer_max_body", int)
"""The largest request body, as sent and decoded (the app's `client_max_size`)."""

NO_RETRY = {"x-should-retry": "false"}
"""Tells the provider SDKs (which retry 409) that retrying a miss is pointless."""

_RAW = re.compile(r"^/s/[^/]+/[^/]+/?(.*)$")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _raw_tail(request: web.Request) -> str:
    m = _RAW.match(request.rel_url.raw_path)
    return m.group(1) if m else ""


OFF_LOOP_BYTES = 1 << 20
"""Bodies at least this large are canonicalised, hashed and diffed in a worker thread, not on the event loop
(where a 32 MiB body held every other session for seconds)."""


async def _off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size < OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _hashed_envelope(method: str, path: str, query: str, headers: list[tuple[str, str]],
                     body: bytes) -> tuple[dict[str, Any], bytes, str]:
    envelope, redacted = received_envelope(method, path, query, headers, body)
    return envelope, redacted, contract.envelope_hash(envelope)


async def handle_proxy(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    session = state.sessions.get(request.match_info["sid"])
    profile = state.profile(request.match_info["profile"])
    tail = _raw_tail(request)
    query = request.rel_url.raw_query_string
    raw = await request.read()  # as sent: forwarded upstream unchanged, with its Content-Encoding
    body = decoded_body(raw, request.headers.get("Content-Encoding"), request.app[MAX_BODY_KEY])
    headers = list(request.headers.items())
    envelope, redacted, env_hash = await _off_loop(
        len(body), _hashed_envelope, request.method, profile.envelope_path(tail), query, headers, body)
    session.coverage.request()
    provider = profile.name if profile.name in ("openai", "anthropic") else (
        contract.detect_provider(request.host, headers) or "")
    recorded_url = f"{profile.upstream}/{tail}" + (f"?{query}" if query else "")

    def record(outcome: tape.Outcome, *, source: str, slot: Any = None) -> None:
        if session.recorder is None:
            return
        original = session.steps[slot.step_index].attempts[slot.attempt_pos] if slot is not None else None
        session.recorder.http_attempt(
            method=request.method, url=recorded_url, request_headers=headers, redacted_body=redacted,
            envelope_hash=env_hash, provider=provider, outcome=outcome,
            original_index=slot.step_index if slot is not None else None, original=original, served_from=source)

    async def go_live(slot: Any = None) -> web.StreamResponse:
        if state.client is None:
            raise ApiError(503, "no_upstream_client", "the replayer has no upstream client")
        resp, outcome = await forward.forward(request, state.client, profile, tail, query, raw)
        session.coverage.live({"method": request.method, "path": envelope["path"], "envelope_hash": env_hash,
                               "status": outcome.status,
                               "matched_step": slot.step_index if slot is not None else None},
                              slot.step_index if slot is not None else None,
                              slot.attempt_pos if slot is not None else None)
        record(outcome, source="live", slot=slot)
        return resp

    if session.options.mode == MODE_LIVE:
        claim = session.index.claim(env_hash)
        return await go_live(claim.slot if claim.kind == HIT else None)

    claim = session.index.claim(env_hash)
    if claim.kind == HIT and claim.slot is not None:
        slot = claim.slot
        if session.options.mode == MODE_EXACT or session.route_step_mode(slot.step_index) == "tape":
            step, attempt = session.attempt(slot.step_index, slot.attempt_pos)
            data = session.blob(attempt.response_body)
            session.coverage.tape(slot.step_index, slot.attempt_pos)
            resp, outcome = await tape.serve_attempt(request, attempt, data, pace=session.options.pace)
            if outcome.aborted:
                session.coverage.aborted()
            record(outcome, source="tape", slot=slot)
            return resp
        return await go_live(slot)

    diagnostics = await _off_loop(len(body), miss.miss_body, session, envelope, env_hash, claim)
    event = {k: diagnostics[k] for k in ("error", "expected_step", "received_envelope_hash", "received")}
    event["diff"] = diagnostics["diff"][:5]
    if session.options.mode == MODE_EXACT:
        (session.coverage.miss if claim.kind == MISS else session.coverage.exhausted)(event)
        return web.json_response(diagnostics, status=409, headers=NO_RETRY)
    session.coverage.divergence(event)
    session.mark_diverged()
    return await go_live()


_decode_tool = msgspec.json.Decoder().decode


async def handle_tool(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    session = state.sessions.get(request.match_info["sid"])
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
    if mutating and allowed:
        session.coverage.tool_live()
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
                "replayed_from": f"{attempt.trace_id.hex()}-{attempt.span_id.hex()}"})
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
        session.coverage.miss({k: body[k] for k in ("error", "tool", "expected_step", "received_envelope_hash")})
        return web.json_response(body, status=409, headers=NO_RETRY)
    session.coverage.tool_live()
    if claim.kind != HIT:
        session.coverage.divergence({"error": "tool_miss", "tool": name, "received_envelope_hash": env_hash})
        session.mark_diverged()
    return web.json_response({"action": "run"})
