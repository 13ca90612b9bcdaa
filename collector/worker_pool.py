"""A pool of spawned worker processes that replaces itself when a worker dies, and dies with its parent.

Used for CPU work that holds the GIL: the collector's ingest workers (`collector/ingest_workers.py`) and the
replayer's huge-body workers (`replayer/heavy.py`).

Contract:
- `WorkerPool(processes, initializer, initargs)`: up to `processes` workers, started with the `spawn` method
  (fresh interpreters: no inherited LMDB environment, locks or threads of a threaded parent). Each worker runs
  `initializer(*initargs)` once. The processes start on first use, or at `await start()`.
- `await pool.run(fn, *args)` runs `fn(*args)` in a worker (both picklable by reference). A worker that dies
  (killed, out of memory) breaks the pool: the calls it held raise `WorkerDied`, and the pool is replaced once
  per break, so the next call gets fresh workers.
- A parent killed outright leaves no workers behind: each exits within `ORPHAN_CHECK_S` of losing its parent
  (also when that happened while the worker was still starting).
- `shutdown(cancel_pending=False)` stops the workers once the calls they are running are done (and, unless
  `cancel_pending`, those still queued); it blocks, so call it from a thread. The next `run` starts a new pool.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("tracetape.workers")

ORPHAN_CHECK_S = 0.5


class WorkerDied(Exception):
    """The worker running this call died before answering; the pool has been replaced."""


def _start_worker(parent: int, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="tracetape-orphan-check", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_when_orphaned(parent: int) -> None:
    """A killed parent cannot stop its workers; they notice that it is no longer their parent, and exit."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)


def _ready() -> bool:
    return True


class WorkerPool:
    """Spawned worker processes, replaced after a worker dies (see module doc). Used from one event loop."""

    def __init__(self, processes: int, initializer: Callable[..., object] | None = None,
                 initargs: tuple[Any, ...] = (), *, name: str = "worker") -> None:
        if processes < 1:
            raise ValueError("a WorkerPool needs at least one process")
        self.processes = processes
        self.name = name
        self.restarts = 0
        self._initializer = initializer
        self._initargs = initargs
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(os.getpid(), self._initializer, self._initargs))
        return self._executor

    async def start(self) -> None:
        """Start the workers now rather than on first use: `processes` calls at once make the pool start
        them all; returns when those calls have been answered."""
        await asyncio.gather(*(self.run(_ready) for _ in range(self.processes)))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker; `WorkerDied` when its worker died meanwhile."""
        executor = self._pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except BrokenProcessPool:
            if self._executor is executor:  # once per break: concurrent calls see the same one
                log.error("a %s process died; starting new ones", self.name)
                self.restarts += 1
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise WorkerDied(f"a {self.name} process died") from None

    def shutdown(self, cancel_pending: bool = False) -> None:
        """Stop the workers after the calls they are running (blocking); the next `run` starts a new pool."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=cancel_pending)
