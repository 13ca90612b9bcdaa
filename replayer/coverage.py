"""What a replay session did: tape hits, live calls, misses, divergences, exhaustion, suppressed mutations.

Contract: every method is cheap (a counter, a set add, or a bounded list append: at most `max_events`
events of each kind are kept, the counters keep counting) and never touches the store. Coverage is updated
by the replayer's event loop only (every handler runs there), so it takes no lock; a read from another
thread (`is_served`, one set lookup) sees a consistent value. `report(steps)` lists the recorded steps (and
attempts) the session never served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tracetape.collector.records import StepRecord

DEFAULT_MAX_EVENTS = 200


class Coverage:
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.max_events = max_events
        self.served: dict[tuple[int, int], int] = {}  # (step index, attempt position) -> times served
        self._served_steps: set[int] = set()
        self.counts = {"requests": 0, "tape": 0, "live": 0, "misses": 0, "exhausted": 0, "divergences": 0,
                       "aborted": 0, "tools_answered": 0, "suppressed_mutations": 0, "tools_live": 0}
        self.events: dict[str, list[dict[str, Any]]] = {
            "misses": [], "divergences": [], "live": [], "suppressed_mutations": [], "exhausted": []}

    def _event(self, kind: str, event: dict[str, Any]) -> None:
        items = self.events[kind]
        if len(items) < self.max_events:
            items.append(event)

    def _use(self, step_index: int, attempt_pos: int) -> None:
        key = (step_index, attempt_pos)
        self.served[key] = self.served.get(key, 0) + 1
        self._served_steps.add(step_index)

    def request(self) -> None:
        self.counts["requests"] += 1

    def tape(self, step_index: int, attempt_pos: int) -> None:
        """A request answered from the tape (`request()` counted separately)."""
        self.counts["tape"] += 1
        self._use(step_index, attempt_pos)

    def request_from_tape(self, step_index: int, attempt_pos: int) -> None:
        """`request()` + `tape(...)` in one call: the exact-mode hot path."""
        counts = self.counts
        counts["requests"] += 1
        counts["tape"] += 1
        self._use(step_index, attempt_pos)

    def tool(self, step_index: int, attempt_pos: int, *, suppressed_mutation: bool, name: str) -> None:
        self.counts["tools_answered"] += 1
        self._use(step_index, attempt_pos)
        if suppressed_mutation:
            self.counts["suppressed_mutations"] += 1
            self._event("suppressed_mutations", {"tool": name, "step": step_index})

    def tool_live(self, step_index: int | None = None, attempt_pos: int | None = None) -> None:
        """A tool call that ran live; when it matched the tape, the recorded attempt counts as used."""
        self.counts["tools_live"] += 1
        if step_index is not None and attempt_pos is not None:
            self._use(step_index, attempt_pos)

    def live(self, event: dict[str, Any], step_index: int | None = None, attempt_pos: int | None = None) -> None:
        """A call forwarded upstream; when it matched the tape, the recorded attempt counts as used."""
        self.counts["live"] += 1
        self._event("live", event)
        if step_index is not None and attempt_pos is not None:
            self._use(step_index, attempt_pos)

    def miss(self, event: dict[str, Any]) -> None:
        self.counts["misses"] += 1
        self._event("misses", event)

    def exhausted(self, event: dict[str, Any]) -> None:
        self.counts["exhausted"] += 1
        self._event("exhausted", event)

    def divergence(self, event: dict[str, Any]) -> None:
        self.counts["divergences"] += 1
        self._event("divergences", event)

    def aborted(self) -> None:
        self.counts["aborted"] += 1

    def is_served(self, step_index: int) -> bool:
        return step_index in self._served_steps

    def unserved_steps(self, steps: Sequence[StepRecord]) -> list[int]:
        used = set(self._served_steps)
        return [i for i in range(len(steps)) if i not in used]

    def report(self, steps: Sequence[StepRecord]) -> dict[str, Any]:
        served = dict(self.served)
        used_steps = set(self._served_steps)
        unused = [
            {"index": i, "name": s.name, "kind": s.kind, "envelope_hash": s.envelope_hash}
            for i, s in enumerate(steps) if i not in used_steps
        ]
        unused_attempts = sum(
            1 for i, s in enumerate(steps) for pos in range(len(s.attempts)) if (i, pos) not in served)
        return {
            "counts": dict(self.counts),
            "recorded_steps": len(steps),
            "used_steps": len(used_steps),
            "unused_steps": unused,
            "unused_attempts": unused_attempts,
            **{k: list(v) for k, v in self.events.items()},
        }
