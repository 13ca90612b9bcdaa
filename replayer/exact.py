"""The exact-bytes fast path of matching: a request byte-identical to a recorded one gets that attempt's envelope
hash without being redacted, parsed, re-encoded and hashed.

Contract:
- `ExactIndex(steps, run)` is built once per session from the run's step records (no blob is read): every
  recorded HTTP attempt under its `ExactKey` — method (upper-case), normalised path, raw query string,
  semantic headers (sorted `(lower-case name, value)` pairs) and the sha256 of its stored request body (the
  step record's `request_body.digest`; the digest of `b""` when it had none) — mapped to its envelope hash.
- `request_key(...)` builds the same key for a received request (the body is the decoded body, as sent);
  `key_of(...)` from its parts, when the body's digest and the semantic headers are already at hand.
- `lookup(key)` answers the envelope hash that `envelopes.received_envelope` + `contract.envelope_hash` would
  compute for that request, or None ("run the slow path"). It never answers anything else:
  - a *trusted* entry answers at once. An entry is trusted when (a) the run was hashed under this
    `CANON_PROFILE`; (b) it is not a replay run (a run recorded through the replay proxy stores the proxy's
    URL but hashed the upstream path); (c) this process redacts with exactly the default rules. Then equal
    keys mean the request's envelope IS the recorded one: the body bytes equal the stored body, which is the
    recorder's redacted body (the bytes it hashed), and the default rules leave such a body unchanged (no
    default pattern matches a `*` or anything 4 characters or shorter, so a masked secret — 4 characters
    kept, the rest `*` — never matches again; the recorder's rules start with the defaults); the request
    line and semantic headers equal the stored ones, which are what the recorder hashed (stored as redacted
    by the same rules, which also leave them unchanged);
  - any other entry is *unverified*: `lookup` answers None, so the caller runs the slow path, and
    `confirm(key, hash)` then records the slow path's answer for that key. The slow path is a function of the
    key alone (non-semantic headers never reach the envelope), so later requests with that key get the same
    answer without recomputing it.
- A request whose bytes differ from every recording (a secret the recording masked, another serialisation
  of the same JSON, an unrecorded request) finds no entry and takes the slow path, unchanged.
Memory: one entry per distinct recorded HTTP attempt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from tracetape.collector.records import AttemptRecord, RunRecord, StepRecord
from tracetape.instrumentation import contract, redaction
from tracetape.replayer.envelopes import url_parts

ExactKey = tuple[bytes, str, str, str, tuple[tuple[str, str], ...]]
"""(body sha256, METHOD, normalised path, raw query, semantic headers)."""

EMPTY_DIGEST = hashlib.sha256(b"").digest()
_SEMANTIC = tuple(sorted(contract.SEMANTIC_HEADERS))


def redaction_is_default() -> bool:
    """Whether this process redacts with exactly the default rules (no extra patterns, no own key)."""
    return tuple(r.pattern for r in redaction.current_rules()) == redaction.DEFAULT_BODY_PATTERNS


def semantic_headers(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The semantic headers among `pairs`, as sorted (lower-case name, value) pairs."""
    return tuple(sorted((n.lower(), v) for n, v in pairs if n.lower() in contract.SEMANTIC_HEADERS))


def request_semantic_headers(headers: Any) -> tuple[tuple[str, str], ...]:
    """`semantic_headers` of a received request's multidict, with one lookup per semantic header name."""
    found: list[tuple[str, str]] = []
    for name in _SEMANTIC:
        for value in headers.getall(name, ()):
            found.append((name, value))
    if not found:
        return ()
    found.sort()
    return tuple(found)


def request_key(method: str, path: str, query: str, headers: Any, body: bytes) -> ExactKey:
    """The key of a received request: `path` normalised as the envelope's (`Profile.envelope_path`), `query`
    raw, `headers` the request's multidict, `body` decoded (Content-Encoding removed)."""
    return key_of(hashlib.sha256(body).digest(), method, path, query, request_semantic_headers(headers))


def key_of(body_digest: bytes, method: str, path: str, query: str,
           semantic: tuple[tuple[str, str], ...]) -> ExactKey:
    """The key from its parts, for a caller that already has the body's sha256 and the semantic headers."""
    return (body_digest, method.upper(), path, query, semantic)


def attempt_key(attempt: AttemptRecord) -> ExactKey:
    """The key of a recorded HTTP attempt, from its step record alone."""
    path, query = url_parts(attempt.url)
    body = attempt.request_body.digest if attempt.request_body is not None else EMPTY_DIGEST
    return (body, (attempt.method or "GET").upper(), contract.normalize_path(path), query,
            semantic_headers(attempt.request_headers))


class ExactIndex:
    """`ExactKey` → envelope hash for one session's run (see module doc)."""

    def __init__(self, steps: Sequence[StepRecord], run: RunRecord, *, trusted: bool | None = None) -> None:
        if trusted is None:
            trusted = (run.canon_profile == contract.CANON_PROFILE and not run.replay_of
                       and redaction_is_default())
        self.trusted = trusted
        self._hashes: dict[ExactKey, str] = {}  # answers known: trusted entries, and confirmed ones
        self._pending: set[ExactKey] = set()  # recorded keys whose answer the slow path gives once
        for step in steps:
            if step.kind == contract.STEP_KIND_TOOL:
                continue
            for attempt in step.attempts:
                if not (attempt.envelope_hash or step.envelope_hash):  # never hashed: its recording failed
                    continue
                key = attempt_key(attempt)
                if not trusted or key in self._pending:
                    self._pending.add(key)
                    continue
                env_hash = attempt.envelope_hash or step.envelope_hash
                if self._hashes.setdefault(key, env_hash) != env_hash:  # the records disagree: verify it
                    del self._hashes[key]
                    self._pending.add(key)

    def __len__(self) -> int:
        return len(self._hashes) + len(self._pending)

    def lookup(self, key: ExactKey) -> str | None:
        """The request's envelope hash when this key's answer is known, else None (run the slow path)."""
        return self._hashes.get(key)

    def needs_confirmation(self, key: ExactKey) -> bool:
        """Whether this key is a recorded one whose answer the slow path must give once (`confirm`)."""
        return key in self._pending

    def confirm(self, key: ExactKey, env_hash: str) -> None:
        """Record the slow path's answer for a recorded key (`needs_confirmation`); other keys are ignored."""
        if key in self._pending:
            self._pending.discard(key)
            self._hashes[key] = env_hash
