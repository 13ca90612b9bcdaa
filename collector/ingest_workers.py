"""Ingest worker processes: `ingest.prepare` for OTLP requests on other cores than the collector's.

Preparing a span (protobuf walk, sha256, zstd, records) is Python work that holds the GIL, so prepare threads
cannot use a second core; worker processes can. The collector process keeps the receivers and the single
LMDB writer; workers turn request bytes into the `Batch` it commits.

Contract:
- `IngestWorkers(store_path, processes)`; `await workers.prepare(payload, tenant, scopes)` returns the
  `Batch` for the serialized `ExportTraceServiceRequest` in `payload`, prepared in a worker. Each worker
  opens the store read-only (to skip compressing payloads the store already holds); the batch comes back as
  MessagePack (`store.encode_batch`).
- A malformed request raises `otlp_decode.Undecodable`; a span that cannot be stored is a rejection inside
  the batch, as in-process.
- Workers are spawned (fresh interpreters: no inherited LMDB environment or threads), all at `start()`. A
  worker that dies (killed, out of memory) breaks the pool: the pool is replaced and the request tried once
  more; if that fails too, `WorkersFailed` (nothing was written; retryable).
- A collector killed outright leaves no workers behind: each exits within a second of losing its parent.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tracetape.collector import ingest
from tracetape.collector.store import Batch, Store, decode_batch, encode_batch

log = logging.getLogger("tracetape.collector")


class WorkersFailed(Exception):
    """The ingest workers died twice while preparing this request; nothing of it was written."""


_worker_store: Store | None = None
_ORPHAN_CHECK_S = 0.5


def _open_store(path: str, collector_pid: int) -> None:
    global _worker_store
    threading.Thread(target=_exit_when_orphaned, args=(collector_pid,), name="tracetape-orphan-check",
                     daemon=True).start()
    _worker_store = Store(path, readonly=True)


def _exit_when_orphaned(parent: int) -> None:
    """A killed collector cannot stop its workers; they notice that it is no longer their parent, and exit
    (also when it was killed while this worker was still starting)."""
    while os.getppid() == parent:
        time.sleep(_ORPHAN_CHECK_S)
    os._exit(0)


def _prepare(payload: bytes, tenant: str | None, scopes: frozenset[str] | None) -> bytes:
    assert _worker_store is not None, "worker started without its store"
    return encode_batch(ingest.prepare_encoded(payload, _worker_store, tenant, scopes))


def _ready() -> bool:
    return _worker_store is not None


class IngestWorkers:
    """A pool of `processes` ingest worker processes for the store at `store_path`."""

    def __init__(self, store_path: str, processes: int) -> None:
        if processes < 1:
            raise ValueError("IngestWorkers needs at least one process")
        self.store_path = store_path
        self.processes = processes
        self._pool = self._new_pool()
        self.restarts = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_open_store, initargs=(self.store_path, os.getpid()))

    async def start(self) -> None:
        """Spawn the workers now rather than on the first request; returns once one task per worker has run."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.processes)))

    async def prepare(self, payload: bytes, tenant: str | None, scopes: frozenset[str] | None) -> Batch:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                encoded = await loop.run_in_executor(pool, _prepare, payload, tenant, scopes)
            except BrokenProcessPool:
                self._replace(pool)
                if attempt == 2:
                    raise WorkersFailed("the ingest workers stopped while preparing the request") from None
                continue
            return decode_batch(encoded)
        raise AssertionError("unreachable")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Swap in a new pool, once per broken pool (concurrent requests see the same break)."""
        if self._pool is broken:
            log.error("an ingest worker process died; starting new ones")
            self.restarts += 1
            self._pool = self._new_pool()
            broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the workers after the requests they hold (blocking; call from a thread)."""
        self._pool.shutdown(wait=True)
