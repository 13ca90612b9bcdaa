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
"""

from __future__ import annotations

from typing import Any

from tracetape.instrumentation import contract
from tracetape.replayer.envelopes import envelope_diff, recorded_envelope
from tracetape.replayer.matching import EXHAUSTED, Claim
from tracetape.replayer.session import ReplaySession

MAX_CANDIDATES = 3
MAX_SCANNED = 64
MAX_DIFF = 50
PREVIEW_CHARS = 500


def _step_envelope(session: ReplaySession, index: int) -> dict[str, Any] | None:
    step = session.steps[index]
    if not step.attempts or step.kind == contract.STEP_KIND_TOOL:
        return None
    attempt = step.attempts[0]
    try:
        body = session.blob(attempt.request_body)
    except Exception:
        return None
    return recorded_envelope(attempt, body)


def _summary(session: ReplaySession, index: int) -> dict[str, Any]:
    step = session.steps[index]
    return {"index": index, "name": step.name, "envelope_hash": step.envelope_hash}


def miss_body(session: ReplaySession, received: dict[str, Any], received_hash: str, claim: Claim) -> dict[str, Any]:
    method, path = received.get("method"), received.get("path")
    http = [i for i, s in enumerate(session.steps) if s.kind != contract.STEP_KIND_TOOL and s.attempts]
    envs: dict[int, dict[str, Any] | None] = {}

    def env(i: int) -> dict[str, Any] | None:
        if i not in envs:
            envs[i] = _step_envelope(session, i)
        return envs[i]

    same_route: list[int] = []
    for i in http:
        e = env(i) if len(same_route) < MAX_SCANNED else None
        if e is not None and e.get("method") == method and e.get("path") == path:
            same_route.append(i)

    expected: int | None = None
    if claim.kind == EXHAUSTED:
        slots = session.index.slots(received_hash)
        expected = slots[-1].step_index if slots else None
    else:
        unserved = [i for i in same_route if not session.coverage.is_served(i)]
        any_unserved = [i for i in http if not session.coverage.is_served(i)]
        if unserved:
            expected = unserved[0]
        elif any_unserved:
            expected = any_unserved[0]

    candidates: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in same_route:
        step = session.steps[i]
        if step.envelope_hash in seen:
            continue
        seen.add(step.envelope_hash)
        e = env(i)
        assert e is not None
        n = len(envelope_diff(e, received, limit=MAX_DIFF))
        candidates.append({**_summary(session, i), "differences": n, "served": session.coverage.is_served(i)})
    candidates.sort(key=lambda c: (c["differences"], c["served"], c["index"]))
    candidates = candidates[:MAX_CANDIDATES]
    if expected is None and candidates:
        expected = candidates[0]["index"]

    diff: list[dict[str, Any]] = []
    if expected is not None and claim.kind != EXHAUSTED:
        e = env(expected)
        if e is not None:
            diff = [ch.to_json(PREVIEW_CHARS) for ch in envelope_diff(e, received, limit=MAX_DIFF)]

    body: dict[str, Any] = {
        "error": "replay_exhausted" if claim.kind == EXHAUSTED else "replay_miss",
        "run": session.run.run_id,
        "session_id": session.id,
        "mode": session.options.mode,
        "expected_step": _summary(session, expected) if expected is not None else None,
        "received_envelope_hash": received_hash,
        "received": {"method": method, "path": path},
        "candidates": candidates,
        "diff": diff,
        "hint": _hint(session, claim, method, path, expected, diff, same_route),
    }
    if claim.kind == EXHAUSTED:
        body["recorded_occurrences"] = claim.recorded
        body["occurrence"] = claim.ordinal
    return body


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
