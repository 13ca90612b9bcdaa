"""The CPU work on huge request bodies, in a small bounded pool of worker processes (bug R5).

Why a process: redacting (regular expressions), canonicalising (msgspec decode + sorted encode) and diffing a body
hold the GIL for the whole call — measured here ≈10 ms per MiB for chat JSON and ≈27 ms per MiB for the worst
case, an array of small numbers (a 32 MiB one: 0.6 s to build its envelope, 0.26 s to hash it). In a worker
thread that stalls the event loop, and so every other session, just as much. Handed to a process, the loop
pays only for pickling the body (≈1 ms per MiB) and the answer comes back small.

Contract:
- `HEAVY_BYTES` (1 MiB): a decoded request body at least this large has its envelope built and hashed, its
  redacted form made and its miss diagnostics compared in a worker process; a smaller one inline on the event
  loop (at most ≈10–27 ms of loop time, the price of one such request, against ≈1 ms of IPC latency and the
  pool's bound for anything bigger).
- `HeavyPool(workers, budget_bytes)`: a `collector.worker_pool.WorkerPool`, started on first use (spawned: no
  fork of a threaded process holding an LMDB environment; its workers exit if the replayer is killed) and
  `shutdown()` with the service. At most `workers` bodies are processed at once (default 1 on a 2-core
  machine, so the event loop keeps a core); bodies waiting for a worker and those being processed total at
  most `budget_bytes` (a single body is always admitted when none is in flight); beyond that `run` raises a
  503 `busy` with `Retry-After`, so memory stays bounded (each worker also holds its body's parsed form, a
  few times the body). A worker that dies is replaced; its request gets the same 503.
- The job functions are pure; they take the parent's redaction rules (`current_rules()`), so a worker redacts
  exactly as the replayer does, whatever configured it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, TypeVar

from tracetape.collector.worker_pool import WorkerDied, WorkerPool
from tracetape.instrumentation import contract, redaction
from tracetape.replayer import miss
from tracetape.replayer.envelopes import received_envelope
from tracetape.replayer.errors import ApiError

T = TypeVar("T")

HEAVY_BYTES = 1 << 20
DEFAULT_BUDGET = 256 << 20
RETRY_AFTER_S = 1

Rules = tuple[redaction.Rule, ...]


def default_workers() -> int:
    """One worker per core beyond the one the event loop needs, at most 2."""
    return max(1, min(2, (os.cpu_count() or 2) - 1))


def current_rules() -> Rules:
    """This process's redaction rules, hints included (`redaction.current_rules`)."""
    return redaction.current_rules()


_worker_rules: list[Rules | None] = [None]


def _use_rules(rules: Rules) -> None:
    """In a worker: redact with the parent's rules (kept until they change)."""
    if rules != _worker_rules[0]:
        redaction.configure(rules)
        _worker_rules[0] = rules


def job_envelope(rules: Rules, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                 want_redacted: bool) -> tuple[str, bytes | None]:
    """(envelope hash, the redacted body when wanted and different from `body`, else None)."""
    _use_rules(rules)
    envelope, redacted = received_envelope(method, path, query, headers, body)
    return contract.envelope_hash(envelope), (redacted if want_redacted and redacted is not body else None)


def job_redact(rules: Rules, body: bytes) -> bytes | None:
    """The redacted body, None when nothing was masked."""
    _use_rules(rules)
    redacted = redaction.redact_body(body)
    return None if redacted is body else redacted


def job_compare(rules: Rules, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                plan: miss.MissPlan) -> miss.Comparison:
    """`miss.compare` of the received request (its envelope rebuilt here) with the plan's recorded requests."""
    _use_rules(rules)
    envelope, _ = received_envelope(method, path, query, headers, body)
    return miss.compare(envelope, plan)


class HeavyPool:
    """The bounded worker pool for huge bodies (see module doc). Used from one event loop."""

    def __init__(self, workers: int | None = None, budget_bytes: int = DEFAULT_BUDGET) -> None:
        self.workers = workers or default_workers()
        self.budget_bytes = budget_bytes
        self._pool = WorkerPool(self.workers, name="heavy-body worker")
        self._slots: asyncio.Semaphore | None = None
        self._admitted = 0
        self._admitted_bytes = 0

    @property
    def admitted(self) -> int:
        """Bodies waiting for a worker or being processed."""
        return self._admitted

    def _busy(self, message: str) -> ApiError:
        return ApiError(503, "busy", message, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker, for a body of `size` bytes; 503 `busy` past the budget (see module doc)."""
        if self._admitted and self._admitted_bytes + size > self.budget_bytes:
            raise self._busy("too many large request bodies are being processed: retry shortly")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        self._admitted += 1
        self._admitted_bytes += size
        try:
            async with self._slots:
                return await self._pool.run(fn, *args)
        except WorkerDied:
            raise self._busy("the worker processing a large request body failed: retry shortly") from None
        finally:
            self._admitted -= 1
            self._admitted_bytes -= size

    def shutdown(self) -> None:
        """Stop the workers (a job in progress is finished first); the next `run` starts a new pool."""
        self._pool.shutdown(cancel_pending=True)
