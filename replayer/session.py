"""Replay sessions: one recorded run loaded once, its match index, its options and its coverage.

Contract:
- `SessionOptions.from_json` validates a `POST /v1/replay/sessions` body (400 `ApiError` naming the
  field on any bad value; unknown fields are rejected too, so a typo never silently changes behaviour).
- `open_session(store, options, principal=None)` finds the run (404 when absent; 409 `ambiguous_run` when
  the id exists in several tenant/scopes and none was given), refuses a run that is not replayable (409
  `not_replayable` with the reason: `running`, `execution_incomplete`, `recording_failure`,
  `manually_invalidated`, `canon_profile`, ...) unless `force`, then reads the run's steps with ONE store scan and builds the
  `MatchIndex` and the `ExactIndex` (`replayer/exact.py`: recorded requests by their exact bytes). Nothing else
  reads the store per request except payload blobs (one get each). Each attempt's response headers and chunk
  boundaries are worked out once per session (`served_headers`, `chunk_bounds`).
- Every read of a session goes through a `TenantStore` (`session.store`): with an API key's `principal`,
  that of the key's tenant (and scopes), so the run is looked up ONLY there, and a run that is not there —
  absent, or another tenant's — is 403 `forbidden`, the same answer either way (it never says whether the
  run exists elsewhere); `tenant` naming another tenant is 403 too. Without a principal (no keys
  configured), the run is found in any tenant and read through its tenant's `TenantStore`.
  `owner` is the creating principal's tenant (None without keys): only it may read or delete the session.
- `replay_run_id` names the run the replay is recorded as (generated when absent): never one already
  recorded in the run's tenant and scope (409 `replay_run_exists`), nor one another session holds
  (`SessionManager`, 409 `replay_run_in_use`).
- `SessionManager` holds at most `max_sessions` live sessions (503 `too_many_sessions` beyond), at most
  `max_per_tenant` of them for one API key's tenant (429 `tenant_session_quota`); ids are random 128-bit
  hex. A session no request or API call has named for the service's idle limit is ended as a DELETE would
  end it, its replay run as cancelled (`SessionManager.idle`; `replayer/service.py`).
- Step mode routing (`route_step_mode`): a request matching a recorded step before `until_step` is served
  from the tape; one matching a step at or after `until_step` goes live, unless the session has already
  diverged (a request that matched nothing) — then a request that matches the tape again is served from it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tracetape.collector import keys, records
from tracetape.collector.auth import Principal
from tracetape.collector.records import AttemptRecord, PayloadRef, RunRecord, StepRecord
from tracetape.collector.store import Store
from tracetape.collector.tenant_store import TenantStore
from tracetape.instrumentation import contract, redaction
from tracetape.replayer.coverage import Coverage
from tracetape.replayer.errors import ApiError
from tracetape.replayer.exact import ExactIndex
from tracetape.replayer.matching import ON_EXHAUSTED, ON_EXHAUSTED_ERROR, MatchIndex
from tracetape.replayer.payloads import PayloadCache
from tracetape.replayer.tape import AttemptHeaders, attempt_bounds, attempt_headers

MODE_EXACT = "exact"
MODE_STEP = "step"
MODE_LIVE = "live"
MODES = (MODE_EXACT, MODE_STEP, MODE_LIVE)

DEFAULT_MAX_SESSIONS = 1000
MAX_PACE = 1000.0

_FIELDS = {"run_id", "mode", "until_step", "pace", "force", "tenant", "scope", "on_exhausted",
           "allow_mutations", "record", "replay_run_id"}


@dataclass(frozen=True)
class SessionOptions:
    run_id: str
    mode: str = MODE_EXACT
    until_step: int | None = None
    pace: float = 0.0
    force: bool = False
    tenant: str | None = None
    scope: str | None = None
    on_exhausted: str = ON_EXHAUSTED_ERROR
    allow_mutations: frozenset[str] = frozenset()
    record: bool = True
    """Whether the replayer records this replay as a new run (False when the client is instrumented)."""
    replay_run_id: str | None = None
    """The new run's id (generated when absent)."""

    @classmethod
    def from_json(cls, data: Any) -> SessionOptions:
        if not isinstance(data, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise ApiError(400, "bad_request", f"unknown field(s): {', '.join(unknown)}")
        run_id = data.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise ApiError(400, "bad_request", "run_id (a string) is required")
        _check_id(run_id, "run_id")
        mode = data.get("mode", MODE_EXACT)
        if mode not in MODES:
            raise ApiError(400, "bad_request", f"mode must be one of {', '.join(MODES)}")
        until = data.get("until_step")
        if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < 0):
            raise ApiError(400, "bad_request", "until_step must be a non-negative integer")
        if mode == MODE_STEP and until is None:
            raise ApiError(400, "bad_request", "step mode needs until_step")
        pace = data.get("pace", 0)
        if isinstance(pace, bool) or not isinstance(pace, (int, float)) or not 0 <= pace <= MAX_PACE:
            raise ApiError(400, "bad_request", f"pace must be a number from 0 to {MAX_PACE:g}")
        on_exhausted = data.get("on_exhausted", ON_EXHAUSTED_ERROR)
        if on_exhausted not in ON_EXHAUSTED:
            raise ApiError(400, "bad_request", f"on_exhausted must be one of {', '.join(ON_EXHAUSTED)}")
        allow = data.get("allow_mutations", [])
        if isinstance(allow, str):
            allow = [a for a in (x.strip() for x in allow.split(",")) if a]
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise ApiError(400, "bad_request", "allow_mutations must be a list of tool names")
        flags = {}
        for name, default in (("force", False), ("record", True)):
            value = data.get(name, default)
            if not isinstance(value, bool):
                raise ApiError(400, "bad_request", f"{name} must be true or false")
            flags[name] = value
        ids = {}
        for name in ("tenant", "scope", "replay_run_id"):
            value = data.get(name)
            if value is not None:
                if not isinstance(value, str):
                    raise ApiError(400, "bad_request", f"{name} must be a string")
                _check_id(value, name)
            ids[name] = value
        return cls(run_id=run_id, mode=mode, until_step=until, pace=float(pace), on_exhausted=on_exhausted,
                   allow_mutations=frozenset(allow), **flags, **ids)


def _check_id(value: str, what: str) -> None:
    try:
        keys.check_id(value, what)
    except keys.InvalidId as err:
        raise ApiError(400, "bad_request", str(err)) from err


def refusal_reason(run: RunRecord) -> str | None:
    """Why this run must not be replayed without `force`, or None when it may be."""
    if run.status == records.STATUS_RUNNING:
        return "running"
    ok, reason = records.verdict(run)
    if not ok:
        return reason
    if run.canon_profile and run.canon_profile != contract.CANON_PROFILE:
        return "canon_profile"
    return None


@dataclass
class ReplaySession:
    """A live replay of one recorded run."""

    id: str
    options: SessionOptions
    run: RunRecord
    steps: list[StepRecord]
    index: MatchIndex
    store: TenantStore
    replay_run_id: str
    owner: str | None = None
    """The tenant whose API key created the session (None when no keys are configured)."""
    forced: bool = False
    refusal: str | None = None
    created_ns: int = field(default_factory=time.time_ns)
    coverage: Coverage = field(default_factory=Coverage)
    diverged: bool = False
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    """`time.monotonic()` of the last lookup by id (`SessionManager.get`): idle sessions expire."""
    inflight: int = 0
    """Requests of this session being answered (counted by the proxy and tools handlers, on the event loop)."""
    _drained: asyncio.Event | None = None
    recorder: Any = None  # replayer.recorder.SessionRecorder when this session records
    exact: ExactIndex | None = None
    """Recorded requests by their exact bytes (built by `open_session`; None: every request takes the slow path)."""
    payloads: PayloadCache | None = None
    """The replayer's cache of decompressed payloads (None: every payload is read from the store)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _headers: dict[tuple[int, int], AttemptHeaders] = field(default_factory=dict)
    _bounds: dict[tuple[int, int, int], list[tuple[int, int]]] = field(default_factory=dict)

    def leave(self) -> None:
        """A request of this session is answered (the handlers count it in with `inflight += 1`; see `drain`)."""
        self.inflight -= 1
        if not self.inflight and self._drained is not None:
            self._drained.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until no request of this (removed) session is being answered, at most `timeout` seconds;
        whether none is. Its replay run ends after that, so late answers are still recorded in it."""
        if not self.inflight:
            return True
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @property
    def replay_run(self) -> tuple[str, str, str]:
        """(tenant, scope, run id) of the run this replay is recorded as."""
        return (self.run.tenant, self.run.scope, self.replay_run_id)

    @property
    def tenant(self) -> str:
        return self.run.tenant

    @property
    def scope(self) -> str:
        return self.run.scope

    def attempt(self, step_index: int, attempt_pos: int) -> tuple[StepRecord, AttemptRecord]:
        step = self.steps[step_index]
        return step, step.attempts[attempt_pos]

    def served_headers(self, step_index: int, attempt_pos: int) -> AttemptHeaders:
        """The response headers of a recorded attempt, built on first use and kept for the session."""
        key = (step_index, attempt_pos)
        headers = self._headers.get(key)
        if headers is None:
            headers = self._headers[key] = attempt_headers(self.steps[step_index].attempts[attempt_pos])
        return headers

    def chunk_bounds(self, step_index: int, attempt_pos: int, size: int) -> list[tuple[int, int]]:
        """`tape.attempt_bounds` of a recorded attempt's `size`-byte response, computed once per session."""
        key = (step_index, attempt_pos, size)
        bounds = self._bounds.get(key)
        if bounds is None:
            bounds = self._bounds[key] = attempt_bounds(self.steps[step_index].attempts[attempt_pos], size)
        return bounds

    def blob(self, ref: PayloadRef | None) -> bytes:
        """A payload's bytes (empty for None); 500-level `ApiError` when the store lost it. Read through the
        session's `TenantStore`, or from the payload cache once such a read has put it there."""
        if ref is None:
            return b""
        cache = self.payloads
        if cache is None:
            return self._stored_blob(ref.digest)
        key = self._blob_prefix + ref.digest
        data = cache.get(key)
        if data is None:
            data = self._stored_blob(ref.digest)
            cache.put(key, data)
        return data

    def _stored_blob(self, digest: bytes) -> bytes:
        data = self.store.blob(self.scope, digest)
        if data is None:
            raise ApiError(502, "payload_missing", "a recorded payload is not in the store")
        return data

    @functools.cached_property
    def _blob_prefix(self) -> bytes:
        """`tenant \\0 scope \\0`: blob keys (`keys.blob_key`) are this + the digest."""
        return keys.tenant_prefix(self.tenant, self.scope)

    def mark_diverged(self) -> None:
        with self._lock:
            self.diverged = True

    def route_step_mode(self, step_index: int) -> str:
        """`tape` or `live` for a request that matched recorded step `step_index` (see module doc)."""
        until = self.options.until_step or 0
        if step_index < until:
            return "tape"
        with self._lock:
            return "tape" if self.diverged else "live"

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {
            "session_id": self.id, "run_id": self.run.run_id, "tenant": self.tenant, "scope": self.scope,
            "mode": o.mode, "until_step": o.until_step, "pace": o.pace, "on_exhausted": o.on_exhausted,
            "forced": self.forced, "refusal_overridden": self.refusal, "record": o.record,
            "replay_run_id": self.replay_run_id, "lineage_depth": self.run.lineage_depth + 1,
            "allow_mutations": sorted(o.allow_mutations), "closed": self.closed,
        }

    def report(self) -> dict[str, Any]:
        out = self.describe()
        out.update(self.coverage.report(self.steps))
        out["diverged"] = self.diverged
        return out


def find_run(store: Store, options: SessionOptions) -> RunRecord:
    found = store.find_run(options.run_id, options.tenant, options.scope)
    if options.scope is not None and options.tenant is None:
        found = [r for r in found if r.scope == options.scope]
    if not found:
        raise ApiError(404, "run_not_found", f"no recorded run {options.run_id!r}", run=options.run_id)
    if len(found) > 1:
        raise ApiError(409, "ambiguous_run", "the run id exists in several tenants/scopes: give tenant and scope",
                       run=options.run_id, candidates=[{"tenant": r.tenant, "scope": r.scope} for r in found])
    return found[0]


def forbidden_run(options: SessionOptions) -> ApiError:
    """The one answer for a run this key may not replay, whether it is absent or another tenant's."""
    return ApiError(403, "forbidden", f"run {options.run_id!r} cannot be replayed with this API key "
                    "(403 does not say whether it exists)", run=options.run_id)


def find_own_run(reader: TenantStore, options: SessionOptions) -> RunRecord:
    """The run in the key's tenant (see module doc): 403 when it is not there, 409 when ambiguous there."""
    if options.tenant is not None and options.tenant != reader.tenant:
        raise forbidden_run(options)
    found = reader.find_run(options.run_id, options.scope)
    if not found:
        raise forbidden_run(options)
    if len(found) > 1:
        raise ApiError(409, "ambiguous_run", "the run id exists in several scopes: give scope",
                       run=options.run_id, candidates=[{"tenant": r.tenant, "scope": r.scope} for r in found])
    return found[0]


def new_replay_run_id(original: str) -> str:
    suffix = f"-replay-{os.urandom(6).hex()}"
    return original[: 128 - len(suffix)] + suffix


def open_session(store: Store, options: SessionOptions, principal: Principal | None = None,
                 payloads: PayloadCache | None = None) -> ReplaySession:
    """Load a run for replay (see module doc): one scan of its steps, then the in-memory indexes. `payloads`:
    the replayer's payload cache, shared by its sessions."""
    if principal is not None:
        reader = TenantStore(store, principal.tenant, principal.scopes)
        run = find_own_run(reader, options)
    else:
        run = find_run(store, options)
        reader = TenantStore(store, run.tenant)
    reason = refusal_reason(run)
    if reason is not None and not options.force:
        raise ApiError(409, "not_replayable", f"run {run.run_id} is not replayable: {reason}", run=run.run_id,
                       reason=reason, run_status=run.status, hint="pass force: true (--force) to replay it anyway")
    if options.replay_run_id is not None and reader.run(run.scope, options.replay_run_id) is not None:
        raise ApiError(409, "replay_run_exists", f"a run {options.replay_run_id!r} is already recorded: a replay "
                       "records a new run", replay_run_id=options.replay_run_id)
    steps = reader.steps(run.scope, run.run_id)
    if options.mode != MODE_LIVE and options.until_step is not None and options.until_step > len(steps):
        raise ApiError(400, "bad_request", f"until_step {options.until_step} is past the run's {len(steps)} steps")
    return ReplaySession(
        id=os.urandom(16).hex(),
        options=options,
        run=run,
        steps=steps,
        index=MatchIndex(steps, options.on_exhausted),
        exact=ExactIndex(steps, run),
        payloads=payloads,
        store=reader,
        replay_run_id=options.replay_run_id or new_replay_run_id(run.run_id),
        owner=principal.tenant if principal is not None else None,
        forced=options.force and reason is not None,
        refusal=reason,
    )


class SessionManager:
    """The live sessions of one replayer, by id. Each holds its replay run's id (tenant, scope, run id) from
    `add` until `release`, which comes after `remove` once the run's spans are exported: two sessions never
    record into one run."""

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS, max_per_tenant: int | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_per_tenant = max(1, max_sessions // 4) if max_per_tenant is None else max_per_tenant
        """Sessions one API key's tenant may hold (a quarter of all by default): one tenant cannot take them all."""
        self._sessions: dict[str, ReplaySession] = {}
        self._per_owner: dict[str, int] = {}
        self._replay_runs: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def add(self, session: ReplaySession) -> None:
        """503 `too_many_sessions` at the limit; 429 `tenant_session_quota` when the session's owner (an API
        key's tenant) holds `max_per_tenant`; 409 `replay_run_in_use` when another session holds its run id."""
        run = session.replay_run
        owner = session.owner
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ApiError(503, "too_many_sessions", f"at most {self.max_sessions} sessions: delete some")
            if owner is not None and self._per_owner.get(owner, 0) >= self.max_per_tenant:
                raise ApiError(429, "tenant_session_quota",
                               f"this tenant holds {self.max_per_tenant} sessions, its most: delete some")
            if run in self._replay_runs:
                raise ApiError(409, "replay_run_in_use", f"another session records run {session.replay_run_id!r}",
                               replay_run_id=session.replay_run_id)
            self._sessions[session.id] = session
            self._replay_runs.add(run)
            if owner is not None:
                self._per_owner[owner] = self._per_owner.get(owner, 0) + 1

    def release(self, session: ReplaySession) -> None:
        """Free the replay run id of a removed session (its spans are exported)."""
        with self._lock:
            self._replay_runs.discard(session.replay_run)

    def get(self, sid: str) -> ReplaySession:
        session = self._sessions.get(sid)
        if session is None:
            raise ApiError(404, "session_not_found", "no such replay session", session_id=redaction.redact_text(sid[:64]))
        session.last_used = time.monotonic()
        return session

    def idle(self, seconds: float) -> list[ReplaySession]:
        """Sessions not looked up for more than `seconds`, with no request being answered."""
        cutoff = time.monotonic() - seconds
        with self._lock:
            return [s for s in self._sessions.values() if s.last_used < cutoff and not s.inflight]

    def remove(self, sid: str) -> ReplaySession:
        with self._lock:
            session = self._sessions.pop(sid, None)
            if session is not None and session.owner is not None:
                left = self._per_owner.pop(session.owner, 1) - 1
                if left:
                    self._per_owner[session.owner] = left
        if session is None:
            raise ApiError(404, "session_not_found", "no such replay session", session_id=redaction.redact_text(sid[:64]))
        session.closed = True
        return session

    def all(self) -> list[ReplaySession]:
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)
