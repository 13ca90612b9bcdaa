"""The collector's write path: prepare off the event loop, group-commit in one writer thread, then acknowledge.

`StoreWriter.submit` returns only after the LMDB transaction holding the request's spans has committed:
that is what an OTLP success response means. Requests arriving while a commit is in progress are written
together in the next transaction (one fsync for many requests). Back-pressure: when more than
`max_pending_bytes` of requests are being prepared or waiting for a commit, `submit` raises `Overloaded`
at once (the receiver answers 503 + Retry-After, which OTLP exporters retry), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracetape.collector import ingest
from tracetape.collector.ingest_workers import IngestWorkers, WorkersFailed
from tracetape.collector.store import Batch, BatchResult, Store, StoreFull

log = logging.getLogger("tracetape.collector")

DEFAULT_MAX_PENDING_BYTES = 256 << 20
_MAX_GROUP = 64


class Overloaded(Exception):
    """Too much is pending; try again after `retry_after` seconds. Nothing of the request was written."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the collector is busy; retry after {retry_after:g}s")
        self.retry_after = retry_after


class StoreUnavailable(Exception):
    """The store cannot take writes now (full, disk full, closed). Nothing of the request was written."""

    def __init__(self, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


class IngestFailed(Exception):
    """Writing this request failed for a reason that retrying will not change (a bug): nothing was written."""


@dataclass
class IngestResult:
    accepted: int
    rejected: int
    error_message: str = ""
    duplicates: int = 0


_Item = tuple[Batch, asyncio.AbstractEventLoop, "asyncio.Future[BatchResult]"]


class Reservation:
    """Bytes of the writer's pending budget held for one request: taken before its body is read (so memory
    is bounded per collector, not per request), grown to its decoded size, released after its commit."""

    __slots__ = ("_writer", "nbytes")

    def __init__(self, writer: StoreWriter, nbytes: int) -> None:
        self._writer = writer
        self.nbytes = nbytes

    def grow(self, total: int) -> None:
        """Hold `total` bytes in all; `Overloaded` (holding what it held) when the budget cannot."""
        if total > self.nbytes:
            self._writer._take(total - self.nbytes, held=self.nbytes)
            self.nbytes = total

    def shrink(self, total: int) -> None:
        """Hold only `total` bytes (the request turned out smaller than reserved); the rest goes back."""
        if total < self.nbytes:
            self._writer._give(self.nbytes - total)
            self.nbytes = total

    def release(self) -> None:
        self._writer._give(self.nbytes)
        self.nbytes = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StoreWriter:
    """Owns the store's write side for one collector process."""

    def __init__(
        self,
        store: Store,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        prepare_threads: int = 2,
        prepare_processes: int = 0,
        outbox: bool = True,
    ) -> None:
        """`prepare_processes` > 0 prepares requests in that many worker processes (`IngestWorkers`), else in
        `prepare_threads` threads of this process. `outbox=False`: nothing is forwarded, so committed spans
        are not queued in the store's outbox."""
        self.store = store
        self.outbox = outbox
        self.max_pending_bytes = max_pending_bytes
        self._workers = IngestWorkers(store.path, prepare_processes) if prepare_processes > 0 else None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._prepare_pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="tracetape-prepare")
        self._thread: threading.Thread | None = None
        self._closed = False
        self._full_logged_at = float("-inf")
        self.stats = {"requests": 0, "spans": 0, "rejected": 0, "duplicates": 0, "commits": 0, "overloaded": 0}

    async def start(self) -> None:
        if self._workers is not None:
            await self._workers.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="tracetape-writer", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        """Finish what was submitted, then stop the writer thread (the store stays open)."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        self._prepare_pool.shutdown(wait=True)
        if self._workers is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._workers.close)

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def reserve(self, nbytes: int) -> Reservation:
        """Hold `nbytes` of the pending budget for a request about to be read; `Overloaded` when over budget.

        A request is always admitted when nothing else is pending, so one larger than the budget still goes."""
        self._take(nbytes, held=0)
        return Reservation(self, nbytes)

    def _take(self, nbytes: int, *, held: int) -> None:
        with self._pending_lock:
            others = self._pending - held
            if others and others + held + nbytes > self.max_pending_bytes:
                self.stats["overloaded"] += 1
                raise Overloaded(retry_after=1.0)
            self._pending += nbytes

    def _give(self, nbytes: int) -> None:
        with self._pending_lock:
            self._pending -= nbytes

    async def submit(
        self,
        request: ExportTraceServiceRequest | bytes,
        *,
        tenant: str | None = None,
        size: int | None = None,
        scopes: frozenset[str] | None = None,
        reservation: Reservation | None = None,
    ) -> IngestResult:
        """Store `request`'s spans (a message, or its protobuf bytes: `otlp_decode.Undecodable` if malformed);
        returns after the commit. `size` is the request's encoded size if known.

        `tenant` (an authenticated key's) overrides the tenant the spans claim; with `scopes`, spans in
        other scopes are rejected (`partial_success`). A receiver that reserved budget before reading the
        body passes its `reservation` (grown to `size` here, released by the receiver); otherwise `submit`
        reserves and releases itself."""
        if self._closed or self._thread is None:
            raise StoreUnavailable(1.0, "the collector is shutting down")
        nbytes = size if size is not None else len(request) if isinstance(request, bytes) else request.ByteSize()
        own = reservation is None
        if reservation is None:
            reservation = self.reserve(nbytes)
        else:
            reservation.grow(nbytes)
        try:
            batch = await self._prepare(request, tenant, scopes)
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[BatchResult] = loop.create_future()
            self._queue.put((batch, loop, fut))
            try:
                result = await asyncio.shield(fut)
            except asyncio.CancelledError:  # the caller is gone (a gRPC deadline); its batch is still queued:
                held, reservation.nbytes = reservation.nbytes, 0  # its bytes stay held until the commit ends
                fut.add_done_callback(lambda _: self._give(held))
                raise
        finally:
            if own:
                reservation.release()
        self.stats["requests"] += 1
        self.stats["spans"] += result.accepted
        self.stats["rejected"] += batch.rejected
        self.stats["duplicates"] += result.duplicates
        return IngestResult(
            accepted=result.accepted + result.duplicates,
            rejected=batch.rejected,
            error_message="; ".join(batch.errors),
            duplicates=result.duplicates,
        )

    async def _prepare(
        self, request: ExportTraceServiceRequest | bytes, tenant: str | None, scopes: frozenset[str] | None
    ) -> Batch:
        if self._workers is None:
            return await asyncio.get_running_loop().run_in_executor(
                self._prepare_pool, ingest.prepare_encoded, request, self.store, tenant, scopes)
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        try:
            return await self._workers.prepare(payload, tenant, scopes)
        except WorkersFailed as err:
            raise StoreUnavailable(1.0, str(err)) from None

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < _MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[_Item]) -> None:
        try:
            results = self.store.apply([batch for batch, _, _ in group], outbox=self.outbox)
            self.stats["commits"] += 1
        except Exception as err:
            # One request alone may fit where the group did not (a nearly full store), or one request may
            # break the write (a bug): retry each alone, so the others are written and the writer lives on.
            if len(group) > 1:
                for item in group:
                    self._commit([item])
                return
            _, loop, fut = group[0]
            if isinstance(err, StoreFull):
                self._log_full(err)
                loop.call_soon_threadsafe(_fail, fut, StoreUnavailable(30.0, str(err)))
                return
            log.exception("store write failed")
            loop.call_soon_threadsafe(_fail, fut, IngestFailed("the store could not write this request"))
            return
        for (_, loop, fut), result in zip(group, results):
            loop.call_soon_threadsafe(_succeed, fut, result)

    def _log_full(self, err: StoreFull) -> None:
        """Log a full store at most once a second (each request of a failed group is tried, and fails, alone)."""
        now = time.monotonic()
        if now - self._full_logged_at >= 1.0:
            self._full_logged_at = now
            log.error("store full: %s", err)


def _succeed(fut: asyncio.Future[BatchResult], result: BatchResult) -> None:
    if not fut.done():
        fut.set_result(result)


def _fail(fut: asyncio.Future[BatchResult], err: Exception) -> None:
    if not fut.done():
        fut.set_exception(err)
