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
- The workers are a `worker_pool.WorkerPool`, all started at `start()`: a worker that dies (killed, out of
  memory) is replaced and the request tried once more; if that fails too, `WorkersFailed` (nothing was
  written; retryable). A collector killed outright leaves no workers behind.
"""

from __future__ import annotations

from tracetape.collector import ingest
from tracetape.collector.store import Batch, Store, decode_batch, encode_batch
from tracetape.collector.worker_pool import WorkerDied, WorkerPool


class WorkersFailed(Exception):
    """The ingest workers died twice while preparing this request; nothing of it was written."""


_worker_store: Store | None = None


def _open_store(path: str) -> None:
    global _worker_store
    _worker_store = Store(path, readonly=True)


def _prepare(payload: bytes, tenant: str | None, scopes: frozenset[str] | None) -> bytes:
    assert _worker_store is not None, "worker started without its store"
    return encode_batch(ingest.prepare_encoded(payload, _worker_store, tenant, scopes))


class IngestWorkers:
    """A pool of `processes` ingest worker processes for the store at `store_path`."""

    def __init__(self, store_path: str, processes: int) -> None:
        self.pool = WorkerPool(processes, _open_store, (store_path,), name="ingest worker")

    @property
    def restarts(self) -> int:
        """How often a dead worker made the pool start new ones."""
        return self.pool.restarts

    async def start(self) -> None:
        """Spawn the workers now rather than on the first request."""
        await self.pool.start()

    async def prepare(self, payload: bytes, tenant: str | None, scopes: frozenset[str] | None) -> Batch:
        try:
            encoded = await self.pool.run(_prepare, payload, tenant, scopes)
        except WorkerDied:
            try:
                encoded = await self.pool.run(_prepare, payload, tenant, scopes)
            except WorkerDied:
                raise WorkersFailed("the ingest workers stopped while preparing the request") from None
        return decode_batch(encoded)

    def close(self) -> None:
        """Stop the workers after the requests they hold (blocking; call from a thread)."""
        self.pool.shutdown()
