"""What a replay session did: tape hits, live calls, misses, divergences, exhaustion, suppressed mutations.

Contract: every method is cheap (a counter, a set add, or a bounded list append: at most `max_events`
events of each kind are kept, the counters keep counting), thread-safe, and never touches the store.
`report(steps)` lists the recorded steps (and attempts) the session never served.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from tracetape.collector.records import StepRecord

DEFAULT_MAX_EVENTS = 200


class Coverage:
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.max_events = max_events
        self._lock = threading.Lock()
        self.served: dict[tuple[int, int], int] = {}  # (step index, attempt position) -> times served
        self.counts = {"requests": 0, "tape": 0, "live": 0, "misses": 0, "exhausted": 0, "divergences": 0,
                       "aborted": 0, "tools_answered": 0, "suppressed_mutations": 0, "tools_live": 0}
        self.events: dict[str, list[dict[str, Any]]] = {
            "misses": [], "divergences": [], "live": [], "suppressed_mutations": [], "exhausted": []}

    def _event(self, kind: str, event: dict[str, Any]) -> None:
        items = self.events[kind]
        if len(items) < self.max_events:
            items.append(event)

    def request(self) -> None:
        with self._lock:
            self.counts["requests"] += 1

    def tape(self, step_index: int, attempt_pos: int) -> None:
        with self._lock:
            self.counts["tape"] += 1
            key = (step_index, attempt_pos)
            self.served[key] = self.served.get(key, 0) + 1

    def tool(self, step_index: int, attempt_pos: int, *, suppressed_mutation: bool, name: str) -> None:
        with self._lock:
            self.counts["tools_answered"] += 1
            key = (step_index, attempt_pos)
            self.served[key] = self.served.get(key, 0) + 1
            if suppressed_mutation:
                self.counts["suppressed_mutations"] += 1
                self._event("suppressed_mutations", {"tool": name, "step": step_index})

    def tool_live(self) -> None:
        with self._lock:
            self.counts["tools_live"] += 1

    def live(self, event: dict[str, Any], step_index: int | None = None, attempt_pos: int | None = None) -> None:
        """A call forwarded upstream; when it matched the tape, the recorded attempt counts as used."""
        with self._lock:
            self.counts["live"] += 1
            self._event("live", event)
            if step_index is not None and attempt_pos is not None:
                key = (step_index, attempt_pos)
                self.served[key] = self.served.get(key, 0) + 1

    def miss(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.counts["misses"] += 1
            self._event("misses", event)

    def exhausted(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.counts["exhausted"] += 1
            self._event("exhausted", event)

    def divergence(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.counts["divergences"] += 1
            self._event("divergences", event)

    def aborted(self) -> None:
        with self._lock:
            self.counts["aborted"] += 1

    def is_served(self, step_index: int) -> bool:
        with self._lock:
            return any(k[0] == step_index for k in self.served)

    def unserved_steps(self, steps: Sequence[StepRecord]) -> list[int]:
        with self._lock:
            used = {k[0] for k in self.served}
        return [i for i in range(len(steps)) if i not in used]

    def report(self, steps: Sequence[StepRecord]) -> dict[str, Any]:
        with self._lock:
            served = dict(self.served)
            counts = dict(self.counts)
            events = {k: list(v) for k, v in self.events.items()}
        used_steps = {k[0] for k in served}
        unused = [
            {"index": i, "name": s.name, "kind": s.kind, "envelope_hash": s.envelope_hash}
            for i, s in enumerate(steps) if i not in used_steps
        ]
        unused_attempts = sum(
            1 for i, s in enumerate(steps) for pos in range(len(s.attempts)) if (i, pos) not in served)
        return {
            "counts": counts,
            "recorded_steps": len(steps),
            "used_steps": len(used_steps),
            "unused_steps": unused,
            "unused_attempts": unused_attempts,
            **events,
        }
