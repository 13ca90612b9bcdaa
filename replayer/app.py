"""The replayer's aiohttp application: the sessions API, the proxy and tool routes, JSON errors.

Routes:
- `POST /v1/replay/sessions` → 201 `{"session_id", "base_urls": {profile: URL}, "replay_base_url",
  "upstream_paths": {proxy path prefix: upstream base path}, ...}` (an instrumented client recording through
  the proxy hashes the upstream path, so its envelopes equal the original run's)
- `GET /v1/replay/sessions` → the open sessions; `GET /v1/replay/sessions/{sid}` → the session's report;
  `DELETE /v1/replay/sessions/{sid}` → the final report (the replay run, when recorded, is ended and its
  spans exported before the answer).
- `GET /v1/replay/health` → `{"status": "ok", "sessions": N}`
- `POST /s/{sid}/_tool` → tools answered from the tape (`proxy.handle_tool`)
- `* /s/{sid}/{profile}/{tail}` → the proxy (`proxy.handle_proxy`)
Every error is JSON `{"error": code, ...}` with a 4xx for client mistakes (a path no route has: 404
`not_found`, another method: 405 `method_not_allowed`); an unexpected failure is a 500 `{"error": "internal"}`
whose details go to the log only. Request bodies are capped (`client_max_size`).

Access control, when the state has an `Authenticator` (API keys configured):
- every `/v1/replay/sessions` route needs the tracetape key (`x-api-key` or `Authorization: Bearer`),
  else 401 `unauthenticated`; the session is opened on the key's `TenantStore`, so a run outside the
  key's tenant is 403 `forbidden` exactly as an absent one (`session.open_session`); the list shows the
  key's tenant's sessions only; reading or deleting another tenant's session is 403 `forbidden`.
- `/s/{sid}/...` (proxy and `_tool`) are authorised by the session id itself, a 128-bit random
  capability returned only to the key that created the session: the SDKs under replay send THEIR
  provider's key in `x-api-key`/`Authorization`, so those headers are not tracetape's there (and are
  neither checked, stored nor logged).
- `/v1/replay/health` answers `{"status": "ok"}` and gives the session count only to a valid key.
Without keys nothing is checked (the replayer binds 127.0.0.1 by default).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from tracetape.collector.auth import Principal, presented_key
from tracetape.instrumentation import redaction
from tracetape.replayer import proxy
from tracetape.replayer.errors import ApiError, read_json
from tracetape.replayer.proxy import STATE_KEY
from tracetape.replayer.session import ReplaySession, SessionOptions, open_session
from tracetape.replayer.state import ReplayerState

log = logging.getLogger("tracetape.replayer")

DEFAULT_CLIENT_MAX_SIZE = 64 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


DRAIN_S = 10.0
"""How long a DELETE waits for the session's requests still being answered (a paced stream, a live call)."""


def json_errors(handler: Handler) -> Handler:
    """`handler` with every error answered as JSON (see module doc). A wrapper per route rather than an aiohttp
    middleware: a middleware costs every request two more coroutines and a cache lookup."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as err:
            return error_response(request, err)

    return answer


def error_response(request: web.Request, err: Exception) -> web.StreamResponse:
    """The JSON answer to an exception a handler raised; re-raises what must not be answered (a redirect, a
    connection gone)."""
    if isinstance(err, ApiError):
        return web.json_response(err.body, status=err.status, headers=err.headers)
    if isinstance(err, web.HTTPException):
        if err.status < 400:
            raise err
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status, "http_error")
        return web.json_response({"error": code, "message": err.reason}, status=err.status)
    if isinstance(err, web.RequestPayloadError):  # a body that does not decode as its Content-Encoding
        return web.json_response({"error": "bad_request", "message": "the request body could not be read"},
                                 status=400)
    if isinstance(err, ConnectionError):
        raise err
    log.error("replayer request failed: %s %s", request.method, redaction.redact_text(request.rel_url.raw_path[:200]),
              exc_info=err)
    return web.json_response({"error": "internal"}, status=500)


def _principal(request: web.Request, state: ReplayerState) -> Principal | None:
    """The key's principal; None when no keys are configured; 401 when they are and none valid was sent."""
    if state.authenticator is None:
        return None
    principal = state.authenticator.authenticate(presented_key(request.headers))
    if principal is None:
        raise ApiError(401, "unauthenticated", "missing or invalid API key (send it as x-api-key or "
                       "Authorization: Bearer)")
    return principal


def _own_session(request: web.Request, state: ReplayerState, principal: Principal | None) -> ReplaySession:
    session = state.sessions.get(request.match_info["sid"])
    _check_owner(session, principal)
    return session


def _check_owner(session: ReplaySession, principal: Principal | None) -> None:
    if principal is not None and session.owner != principal.tenant:
        raise ApiError(403, "forbidden", "this replay session belongs to another tenant")


def _base_urls(request: web.Request, state: ReplayerState, sid: str) -> dict[str, str]:
    root = f"{request.scheme}://{request.host}/s/{sid}"
    return {name: f"{root}/{name}" for name in sorted(state.profiles)}


async def create_session(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    principal = _principal(request, state)
    options = SessionOptions.from_json(await read_json(request))
    session = open_session(state.store(), options, principal, state.payloads)
    state.sessions.add(session)  # refused here, a session has recorded nothing
    if options.record and state.recorder is not None:
        api_key = presented_key(request.headers) if principal is not None else None  # the replay goes with it
        try:
            session.recorder = state.recorder.open(session, api_key=api_key)
        except Exception:
            state.sessions.remove(session.id)
            state.sessions.release(session)
            raise
    body = session.describe()
    body["base_urls"] = _base_urls(request, state, session.id)
    body["replay_base_url"] = f"{request.scheme}://{request.host}/s/{session.id}"
    body["upstream_paths"] = {f"/s/{session.id}/{name}": p.base_path for name, p in sorted(state.profiles.items())}
    body["recorded_steps"] = len(session.steps)
    body["recording"] = session.recorder is not None
    return web.json_response(body, status=201)


async def list_sessions(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    principal = _principal(request, state)
    sessions = [s for s in state.sessions.all() if principal is None or s.owner == principal.tenant]
    return web.json_response({"sessions": [s.describe() for s in sessions]})


async def get_session(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(_own_session(request, state, _principal(request, state)).report())


async def delete_session(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    principal = _principal(request, state)
    _own_session(request, state, principal)
    session = state.sessions.remove(request.match_info["sid"])
    await end_session(state, session)
    return web.json_response(session.report())


async def end_session(state: ReplayerState, session: ReplaySession, *, cancelled: bool = False) -> None:
    """After `remove`: wait for the answers still being sent (they end up in the replay run), end the run
    (cancelled: its client never finished it), export it, then free its run id."""
    try:
        await session.drain(DRAIN_S)
        if session.recorder is not None and state.recorder is not None:
            session.recorder.close(cancelled=cancelled)
            await asyncio.get_running_loop().run_in_executor(None, state.recorder.flush)  # exported when we answer
    finally:
        state.sessions.release(session)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.authenticator is not None and state.authenticator.authenticate(presented_key(request.headers)) is None:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "ok", "sessions": len(state.sessions)})


class SessionPaths(web.DynamicResource):
    """`/s/{sid}/{profile}` and `/s/{sid}/{profile}/{tail:.*}` (tail = the rest, possibly empty), matched with one
    split instead of aiohttp's regular expressions; the values as aiohttp's patterns give them (`{name}` is one
    path segment without `{` or `}`, `%2F` and `%25` decoded). `match_info` has no `tail` without one."""

    def __init__(self) -> None:
        super().__init__("/s/{sid}/{profile}/{tail:.*}")

    def _match(self, path: str) -> dict[str, str] | None:
        parts = path.split("/", 4)
        if len(parts) < 4 or parts[0] or parts[1] != "s" or not parts[2] or not parts[3]:
            return None
        if "{" in path or "}" in path or "%" in path:  # rare: check each segment, decode as aiohttp does
            return _match_slowly(parts)
        if len(parts) == 5:
            return {"sid": parts[2], "profile": parts[3], "tail": parts[4]}
        return {"sid": parts[2], "profile": parts[3]}


def _match_slowly(parts: list[str]) -> dict[str, str] | None:
    sid, profile = parts[2], parts[3]
    if any(c in sid or c in profile for c in "{}"):
        return None
    found = {"sid": _unquote(sid), "profile": _unquote(profile)}
    if len(parts) == 5:
        found["tail"] = _unquote(parts[4])
    return found


def _unquote(value: str) -> str:
    return value.replace("%2F", "/").replace("%25", "%") if "%" in value else value


async def session_path(request: web.Request) -> web.StreamResponse:
    """`POST /s/{sid}/_tool` is the tools endpoint; anything else under `/s/{sid}/{profile}` is the proxy.
    Errors are answered as `json_errors` answers them."""
    try:
        info = request.match_info
        if request.method == "POST" and info["profile"] == "_tool" and "tail" not in info:
            return await proxy.handle_tool(request)
        return await proxy.handle_proxy(request)
    except Exception as err:
        return error_response(request, err)


async def not_routed(request: web.Request) -> web.StreamResponse:
    """What no route takes: 405 when some route has the path (another method), else 404 — JSON, as every error."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        return web.json_response({"error": "method_not_allowed", "message": "Method Not Allowed"}, status=405)
    return web.json_response({"error": "not_found", "message": "Not Found"}, status=404)


def make_app(state: ReplayerState, *, client_max_size: int = DEFAULT_CLIENT_MAX_SIZE) -> web.Application:
    app = web.Application(client_max_size=client_max_size)
    app[proxy.MAX_BODY_KEY] = client_max_size
    state.bodies.limit = client_max_size
    app[STATE_KEY] = state
    sessions = SessionPaths()
    app.router.register_resource(sessions)
    sessions.add_route("*", session_path)
    app.router.add_post("/v1/replay/sessions", json_errors(create_session))
    app.router.add_get("/v1/replay/sessions", json_errors(list_sessions))
    app.router.add_get("/v1/replay/sessions/{sid}", json_errors(get_session))
    app.router.add_delete("/v1/replay/sessions/{sid}", json_errors(delete_session))
    app.router.add_get("/v1/replay/health", json_errors(health))
    app.router.add_route("*", "/{path:.*}", not_routed)  # last: resolved only when nothing else matched
    return app
