"""Matching a request to the tape: (run, envelope hash, occurrence ordinal) → one recorded attempt, O(1).

Contract:
- `MatchIndex(steps)` is built once per replay session from the run's steps in issue order (one store
  scan); it maps every recorded attempt's envelope hash to the list of `Slot`s (step index, attempt
  position) carrying it, in issue order (step order, then attempt order). Building it is O(attempts);
  a lookup is one dict access whatever the store holds.
- `claim(hash)` assigns the next occurrence ordinal of that hash atomically (a lock; concurrent
  requests each get a distinct ordinal, in arrival order) and returns a `Claim`:
  - `hit`: the ordinal-th recorded attempt of this envelope;
  - `miss`: the run never recorded this envelope (no ordinal is consumed);
  - `exhausted`: every recorded occurrence has been claimed and the policy is `error`;
    with policy `repeat_last` the last recorded occurrence is returned again as a `hit` (`repeated`).
- Tool envelopes and HTTP envelopes live in the same index (their envelopes differ by `kind`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

from tracetape.collector.records import StepRecord

ON_EXHAUSTED_ERROR = "error"
ON_EXHAUSTED_REPEAT_LAST = "repeat_last"
ON_EXHAUSTED = (ON_EXHAUSTED_ERROR, ON_EXHAUSTED_REPEAT_LAST)

HIT = "hit"
MISS = "miss"
EXHAUSTED = "exhausted"


class Slot(NamedTuple):
    """One recorded attempt: its step's index in the run and its position in `step.attempts`."""

    step_index: int
    attempt_pos: int


class Claim(NamedTuple):
    """The outcome of matching one request (see module doc). Immutable."""

    kind: str
    envelope_hash: str
    ordinal: int = -1
    recorded: int = 0  # how many occurrences of this envelope the run recorded
    slot: Slot | None = None
    repeated: bool = False


class MatchIndex:
    """envelope hash → recorded attempts in issue order, with per-hash arrival counters."""

    def __init__(self, steps: Sequence[StepRecord], on_exhausted: str = ON_EXHAUSTED_ERROR) -> None:
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {', '.join(ON_EXHAUSTED)}")
        self.on_exhausted = on_exhausted
        self._repeat_last = on_exhausted == ON_EXHAUSTED_REPEAT_LAST
        self._slots: dict[str, list[Slot]] = {}
        for index, step in enumerate(steps):
            for pos, attempt in enumerate(step.attempts):
                env_hash = attempt.envelope_hash or step.envelope_hash
                if env_hash:  # none: its recording failed before the request was hashed; nothing matches it
                    self._slots.setdefault(env_hash, []).append(Slot(index, pos))
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def __contains__(self, envelope_hash: str) -> bool:
        return envelope_hash in self._slots

    def recorded(self, envelope_hash: str) -> int:
        """How many recorded attempts carry this envelope."""
        return len(self._slots.get(envelope_hash, ()))

    def slots(self, envelope_hash: str) -> list[Slot]:
        return list(self._slots.get(envelope_hash, ()))

    def hashes(self) -> list[str]:
        return list(self._slots)

    def claim(self, envelope_hash: str) -> Claim:
        """Assign this request its occurrence ordinal and find its recorded attempt (see module doc)."""
        slots = self._slots.get(envelope_hash)
        if not slots:
            return Claim(MISS, envelope_hash)
        lock = self._lock
        lock.acquire()
        try:
            ordinal = self._next.get(envelope_hash, 0)
            self._next[envelope_hash] = ordinal + 1
        finally:
            lock.release()
        n = len(slots)
        if ordinal < n:
            return Claim(HIT, envelope_hash, ordinal, n, slots[ordinal], False)
        if self._repeat_last:
            return Claim(HIT, envelope_hash, ordinal, n, slots[-1], True)
        return Claim(EXHAUSTED, envelope_hash, ordinal, n)

    def claimed(self, envelope_hash: str) -> int:
        """How many requests with this envelope have been matched so far."""
        with self._lock:
            return self._next.get(envelope_hash, 0)
