"""Ids that must not repeat within a run: step ids, and the span and trace ids of tracetape's own provider.

They are drawn from tracetape's own `random.Random`, seeded from `os.urandom` and reseeded in a forked child,
never from the global `random` that the SDK's default id generator uses. Agents seed that one for reproducible
runs; two processes, or two episodes, seeded alike would then repeat ids within one run, and the collector
takes a span id it already holds for an exporter's retry of it.
"""

from __future__ import annotations

import os
import random

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import IdGenerator

_source = random.Random()
os.register_at_fork(after_in_child=_source.seed)


def new_step_id() -> str:
    """A fresh step id: 16 hex characters (`os.urandom` would cost a system call per step)."""
    return f"{_source.getrandbits(64):016x}"


class OwnIdGenerator(IdGenerator):
    """The SDK's random id generation, from tracetape's own generator."""

    def generate_span_id(self) -> int:
        span_id = _source.getrandbits(64)
        while span_id == trace.INVALID_SPAN_ID:
            span_id = _source.getrandbits(64)
        return span_id

    def generate_trace_id(self) -> int:
        trace_id = _source.getrandbits(128)
        while trace_id == trace.INVALID_TRACE_ID:
            trace_id = _source.getrandbits(128)
        return trace_id

    def is_trace_id_random(self) -> bool:
        return True
