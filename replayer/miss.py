"""Diagnostics for a request the tape cannot answer — computed only when that happens.

Contract: `miss_body(session, received, received_hash, claim)` returns the JSON body of the 409:
`{"error": "replay_miss" | "replay_exhausted", "run", "session_id", "expected_step": {index, name,
envelope_hash} | null, "received_envelope_hash", "candidates": [{index, name, envelope_hash, differences,
served}], "diff": [{path, op, expected, received}], "hint"}`.
- expected step: the first recorded HTTP step (issue order) not served yet with the same method and path,
  else the first HTTP step not served yet, else the closest candidate;
  for `replay_exhausted`, the last recorded step with the received envelope.
- candidates: recorded HTTP steps with the same method and path (at most `MAX_SCANNED` of them, one per
  distinct envelope), ranked by the number of differing fields, best `MAX_CANDIDATES` kept.
- diff: `envelopes.envelope_diff` between the expected step's recomputed envelope and the received one,
  values previewed (`PREVIEW_CHARS`). No header values beyond the semantic ones ever appear; bodies are
  redacted before they get here, so no secret is echoed.
It is done in three parts so that the middle one can run in another process for a huge body (bug R5):
`plan_miss` (the session's state and the store: which steps to compare, their recorded requests),
`compare` (pure: the recorded envelopes against the received one) and `assemble` (the body).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tracetape.instrumentation import contract, redaction
from tracetape.replayer.envelopes import envelope_diff, recorded_request_envelope, url_parts
from tracetape.replayer.matching import EXHAUSTED, Claim

if TYPE_CHECKING:
    from tracetape.replayer.session import ReplaySession

MAX_CANDIDATES = 3
MAX_SCANNED = 64
MAX_DIFF = 50
PREVIEW_CHARS = 500


@dataclass(frozen=True)
class RecordedRequest:
    """A recorded step's first attempt, as its envelope is recomputed (picklable)."""

    index: int
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    served: bool = False

    def envelope(self) -> dict[str, Any]:
        return recorded_request_envelope(self.method, self.url, self.headers, self.body)


@dataclass
class MissPlan:
    """What to compare the received request with (from the session and the store; see module doc)."""

    same_route: list[int]
    candidates: list[RecordedRequest]  # same route, one per distinct envelope, issue order
    expected: int | None  # None: the best candidate, once compared
    expected_request: RecordedRequest | None  # the expected step's request when it is to be diffed
    diff_expected: bool
    fallback_diff: bool = field(default=False)  # diff the best candidate when `expected` is None


@dataclass
class Comparison:
    """The result of `compare`: differences per candidate, the expected step, its diff (JSON)."""

    differences: dict[int, int]
    expected: int | None
    diff: list[dict[str, Any]]


def _head(session: ReplaySession, index: int) -> tuple[str, str]:
    """(method, path) of a recorded step's envelope, without its body."""
    attempt = session.steps[index].attempts[0]
    path = contract.normalize_path(redaction.redact_text(url_parts(attempt.url)[0]))
    return (attempt.method or "GET").upper(), path


def _recorded(session: ReplaySession, index: int) -> RecordedRequest | None:
    """A step's recorded request with its body, None when the store lost the body."""
    attempt = session.steps[index].attempts[0]
    try:
        body = session.blob(attempt.request_body)
    except Exception:
        return None
    return RecordedRequest(index, attempt.method or "GET", attempt.url, list(attempt.request_headers), body,
                           session.coverage.is_served(index))


def plan_miss(session: ReplaySession, method: Any, path: Any, received_hash: str, claim: Claim) -> MissPlan:
    """The steps to compare a request (its envelope's method and path) with (see module doc)."""
    http = [i for i, s in enumerate(session.steps) if s.kind != contract.STEP_KIND_TOOL and s.attempts]
    same_route: list[int] = []
    requests: dict[int, RecordedRequest] = {}
    for i in http:
        if len(same_route) >= MAX_SCANNED:
            break
        if _head(session, i) == (method, path):
            recorded = _recorded(session, i)
            if recorded is not None:
                same_route.append(i)
                requests[i] = recorded
    expected: int | None = None
    if claim.kind == EXHAUSTED:
        slots = session.index.slots(received_hash)
        expected = slots[-1].step_index if slots else None
    else:
        served = session.coverage.is_served
        expected = next((i for i in same_route if not served(i)), None)
        if expected is None:
            expected = next((i for i in http if not served(i)), None)
    seen: set[str] = set()
    candidates: list[RecordedRequest] = []
    for i in same_route:
        if session.steps[i].envelope_hash not in seen:
            seen.add(session.steps[i].envelope_hash)
            candidates.append(requests[i])
    diff_expected = claim.kind != EXHAUSTED
    expected_request = None
    if diff_expected and expected is not None:
        expected_request = requests.get(expected) or _recorded(session, expected)
    return MissPlan(same_route, candidates, expected, expected_request, diff_expected,
                    fallback_diff=diff_expected and expected is None)


def compare(received: dict[str, Any], plan: MissPlan) -> Comparison:
    """Pure: the candidates' differences from `received`, the expected step and its diff (see module doc)."""
    envelopes: dict[int, dict[str, Any]] = {}
    differences: dict[int, int] = {}
    for req in plan.candidates:
        envelopes[req.index] = req.envelope()
        differences[req.index] = len(envelope_diff(envelopes[req.index], received, limit=MAX_DIFF))
    expected = plan.expected
    target = plan.expected_request
    if expected is None and plan.candidates:
        best = min(plan.candidates, key=lambda r: (differences[r.index], r.served, r.index))
        expected = best.index
        target = best if plan.fallback_diff else None
    diff: list[dict[str, Any]] = []
    if target is not None:
        env = envelopes.get(target.index) or target.envelope()
        diff = [ch.to_json(PREVIEW_CHARS) for ch in envelope_diff(env, received, limit=MAX_DIFF)]
    return Comparison(differences, expected, diff)


def _summary(session: ReplaySession, index: int) -> dict[str, Any]:
    step = session.steps[index]
    return {"index": index, "name": step.name, "envelope_hash": step.envelope_hash}


def assemble(session: ReplaySession, plan: MissPlan, result: Comparison, method: Any, path: Any,
             received_hash: str, claim: Claim) -> dict[str, Any]:
    """The 409 body (see module doc) from a plan and its comparison."""
    candidates = [{**_summary(session, r.index), "differences": result.differences[r.index], "served": r.served}
                  for r in plan.candidates]
    candidates.sort(key=lambda c: (c["differences"], c["served"], c["index"]))
    expected = result.expected
    body: dict[str, Any] = {
        "error": "replay_exhausted" if claim.kind == EXHAUSTED else "replay_miss",
        "run": session.run.run_id,
        "session_id": session.id,
        "mode": session.options.mode,
        "expected_step": _summary(session, expected) if expected is not None else None,
        "received_envelope_hash": received_hash,
        "received": {"method": method, "path": path},
        "candidates": candidates[:MAX_CANDIDATES],
        "diff": result.diff,
        "hint": _hint(session, claim, method, path, expected, result.diff, plan.same_route),
    }
    if claim.kind == EXHAUSTED:
        body["recorded_occurrences"] = claim.recorded
        body["occurrence"] = claim.ordinal
    return body


def miss_body(session: ReplaySession, received: dict[str, Any], received_hash: str, claim: Claim) -> dict[str, Any]:
    """The 409 body for `received` (an envelope) that `claim` did not match (see module doc)."""
    method, path = received.get("method"), received.get("path")
    plan = plan_miss(session, method, path, received_hash, claim)
    return assemble(session, plan, compare(received, plan), method, path, received_hash, claim)


def _hint(session: ReplaySession, claim: Claim, method: Any, path: Any, expected: int | None,
          diff: list[dict[str, Any]], same_route: list[int]) -> str:
    if claim.kind == EXHAUSTED:
        return (f"the run recorded this exact request {claim.recorded} time(s); this is occurrence "
                f"{claim.ordinal + 1}. Create the session with on_exhausted=repeat_last to serve the last "
                "recording again, or re-record.")
    if not same_route:
        return (f"the run recorded no {method} {path}. If the SDK's base path differs from the recording's, "
                "configure the profile (--upstream NAME=URL with the recorded base path).")
    if expected is not None and diff:
        first = diff[0]["path"]
        where = "the request line" if first.startswith("$") and first != "$" else f"the body at {first}"
        return (f"the request differs from recorded step {expected} ({session.steps[expected].name}) at {where}"
                f"{' and ' + str(len(diff) - 1) + ' more place(s)' if len(diff) > 1 else ''}. The agent's input "
                f"changed: replay with --mode step --until-step {expected} to send it live from there, or re-record.")
    return "no recorded request matches; see candidates for the closest recordings."
