"""Forwards what the store has committed to OTLP backends (Jaeger), from the store's outbox.

Contract
--------
- Runs as one background task beside the receivers and never touches the receive path: a slow, failing
  or absent backend only makes the outbox longer. Store reads and slimming run in worker threads.
- Reads the outbox in batches (oldest first), turns each stored span into its slim copy
  (`collector.slim`, cap from the route's `tracetape_slim`), groups spans by resource and scope, splits
  by the exporter's `sending_queue.batch` limits (spans and bytes), and sends each request to its route.
- Each route progresses on its own: it reads the entries after its own cursor (the last outbox sequence
  it delivered or permanently dropped, kept in the store), so one route down or slow never holds back
  another. After each batch the route's cursor is stored, and the entries every configured route is done
  with are deleted, in one write transaction (`Store.outbox_advance`); a route no longer configured does
  not hold entries back. Delivery is at least once per route: a batch interrupted by a stop or crash is
  sent again to that route (only) on the next start.
- Retries only what OTLP says is retryable — HTTP 429/502/503/504 and connection failures; gRPC
  UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, DATA_LOSS, and RESOURCE_EXHAUSTED
  when the server sends RetryInfo — with exponential backoff (`retry_on_failure`) that waits at least
  what `Retry-After` / RetryInfo asks. Anything else (400, ...) drops that request with one log line
  and is counted in `dropped_spans`; the route then reports `failing` until its next success. Failure
  and drop lines are logged at most once per minute per route.
- With no routes, the outbox is drained (acknowledged unread) so it does not grow without bound.
- `stop()` lets an in-flight send finish for up to `grace` seconds, then cancels it (not acknowledged).
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

from tracetape.collector.config import ForwardRoute, OtlpExporter
from tracetape.collector.slim import slim_resource_spans

log = logging.getLogger("tracetape.collector.forward")

RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
RETRYABLE_GRPC = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
MAX_RETRY_AFTER = 3600.0
_FAILURE_LOG_INTERVAL = 60.0


class OutboxStore(Protocol):
    """The part of `collector.store.Store` the forwarder uses (thread-safe; called from worker threads)."""

    def outbox_read(self, limit: int) -> list[tuple[int, bytes]]: ...
    def outbox_ack(self, seqs: Sequence[int]) -> None: ...
    def outbox_read_after(self, route: str, limit: int) -> list[tuple[int, bytes | None]]: ...
    def outbox_advance(self, route: str, seq: int, routes: Sequence[str]) -> int: ...
    def outbox_backlog(self, routes: Sequence[str]) -> dict[str, int]: ...
    def blob(self, tenant: str, scope: str, digest: bytes) -> bytes | None: ...


@dataclass(frozen=True)
class SendResult:
    """One attempt's outcome. `retry_after` is the server's requested delay, when it gave one."""

    ok: bool
    retryable: bool = False
    retry_after: float | None = None
    detail: str = ""
    rejected_spans: int = 0


@dataclass
class RouteStats:
    spans_sent: int = 0
    requests_sent: int = 0
    attempts_failed: int = 0
    dropped_spans: int = 0
    rejected_spans: int = 0
    last_error: str = ""
    failing_since: float | None = None


# --- building requests ------------------------------------------------------------------------------------


def build_requests(
    stored: Sequence[bytes], route: ForwardRoute, store: OutboxStore
) -> tuple[list[ExportTraceServiceRequest], int]:
    """Slim copies of the stored spans as export requests within the exporter's batch limits.

    Returns the requests and how many stored spans could not be parsed (skipped).
    """
    exporter = route.exporter
    cap = route.slim.max_attribute_bytes
    requests: list[ExportTraceServiceRequest] = []
    groups: dict[bytes, tuple[ResourceSpans, dict[bytes, ScopeSpans]]] = {}
    size = count = bad = 0

    def flush() -> None:
        nonlocal groups, size, count
        if groups:
            request = ExportTraceServiceRequest()
            request.resource_spans.extend(rs for rs, _ in groups.values())
            requests.append(request)
        groups, size, count = {}, 0, 0

    for raw in stored:
        try:
            rs = ResourceSpans.FromString(raw)
        except DecodeError:
            bad += 1
            continue
        slim = slim_resource_spans(rs, cap=cap, fetch=store.blob)
        n = sum(len(ss.spans) for ss in slim.scope_spans)
        nbytes = slim.ByteSize()
        if count and (count + n > exporter.max_batch_spans or size + nbytes > exporter.max_batch_bytes):
            flush()
        rkey = slim.resource.SerializeToString(deterministic=True) + b"\0" + slim.schema_url.encode()
        if rkey not in groups:
            groups[rkey] = (ResourceSpans(resource=slim.resource, schema_url=slim.schema_url), {})
        target, scopes = groups[rkey]
        for ss in slim.scope_spans:
            skey = ss.scope.SerializeToString(deterministic=True) + b"\0" + ss.schema_url.encode()
            if skey not in scopes:
                scopes[skey] = target.scope_spans.add(scope=ss.scope, schema_url=ss.schema_url)
            scopes[skey].spans.extend(ss.spans)
        size += nbytes
        count += n
    flush()
    return requests, bad


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


# --- senders ----------------------------------------------------------------------------------------------


class HttpSender:
    """OTLP/HTTP protobuf sender (`otlphttp` exporters)."""

    def __init__(self, exporter: OtlpExporter) -> None:
        self.exporter = exporter
        self._session: aiohttp.ClientSession | None = None

    async def send(self, request: ExportTraceServiceRequest) -> SendResult:
        exp = self.exporter
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=exp.timeout))
        body = request.SerializeToString()
        headers = {k: v for k, v in exp.headers}
        headers["Content-Type"] = "application/x-protobuf"
        if exp.compression == "gzip":
            body = gzip.compress(body, compresslevel=1, mtime=0)
            headers["Content-Encoding"] = "gzip"
        try:
            async with self._session.post(exp.url, data=body, headers=headers) as resp:
                payload = await resp.read()
                if 200 <= resp.status < 300:
                    return _http_success(payload)
                detail = f"HTTP {resp.status}{_status_text(payload)}"
                if resp.status in RETRYABLE_HTTP:
                    return SendResult(False, True, parse_retry_after(resp.headers.get("Retry-After")), detail)
                return SendResult(False, False, None, detail)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
            return SendResult(False, True, None, f"{type(err).__name__}: {err}"[:300])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class GrpcSender:
    """OTLP/gRPC sender (`otlp` exporters)."""

    def __init__(self, exporter: OtlpExporter) -> None:
        self.exporter = exporter
        self._channel: grpc.aio.Channel | None = None
        self._stub: TraceServiceStub | None = None

    async def send(self, request: ExportTraceServiceRequest) -> SendResult:
        exp = self.exporter
        if self._stub is None:
            options = [("grpc.max_send_message_length", max(exp.max_batch_bytes * 2, 4 * 1024 * 1024))]
            if exp.insecure:
                self._channel = grpc.aio.insecure_channel(exp.url, options=options)
            else:
                self._channel = grpc.aio.secure_channel(exp.url, grpc.ssl_channel_credentials(), options=options)
            self._stub = TraceServiceStub(self._channel)
        metadata = tuple((k.lower(), v) for k, v in exp.headers)
        compression = grpc.Compression.Gzip if exp.compression == "gzip" else grpc.Compression.NoCompression
        try:
            response = await self._stub.Export(request, timeout=exp.timeout, metadata=metadata, compression=compression)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            detail = f"gRPC {code.name}: {(err.details() or '')[:200]}"
            retry_after = _grpc_retry_delay(err.trailing_metadata())
            retryable = code in RETRYABLE_GRPC or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None)
            return SendResult(False, retryable, retry_after, detail)
        rejected = response.partial_success.rejected_spans if response.HasField("partial_success") else 0
        return SendResult(True, rejected_spans=rejected, detail=response.partial_success.error_message)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


def make_sender(exporter: OtlpExporter) -> HttpSender | GrpcSender:
    return HttpSender(exporter) if exporter.protocol == "http" else GrpcSender(exporter)


def _http_success(payload: bytes) -> SendResult:
    try:
        response = ExportTraceServiceResponse.FromString(payload)
    except DecodeError:
        return SendResult(True)
    if response.HasField("partial_success") and response.partial_success.rejected_spans:
        return SendResult(True, rejected_spans=response.partial_success.rejected_spans,
                          detail=response.partial_success.error_message[:200])
    return SendResult(True)


def _status_text(payload: bytes) -> str:
    try:
        status = status_pb2.Status.FromString(payload)
    except DecodeError:
        return ""
    return f": {status.message[:200]}" if status.message else ""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delay-seconds or HTTP-date), None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)


def _grpc_retry_delay(metadata: Any) -> float | None:
    for key, value in metadata or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except (DecodeError, TypeError):
            return None
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return min(info.retry_delay.ToNanoseconds() / 1e9, MAX_RETRY_AFTER)
    return None


# --- the task ---------------------------------------------------------------------------------------------


@dataclass
class _Route:
    route: ForwardRoute
    sender: HttpSender | GrpcSender
    stats: RouteStats = field(default_factory=RouteStats)
    last_log: float = 0.0
    unlogged_drops: int = 0  # spans dropped since the last drop line (the limiter held it back)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.route.exporter.id


class Forwarder:
    """The outbox → backends task. `start()` once, `notify()` after commits (optional), `stop()` at the end."""

    def __init__(
        self, store: OutboxStore, routes: Sequence[ForwardRoute], *, poll_interval: float = 0.5, drain_batch: int = 4096
    ) -> None:
        self.store = store
        self.routes = [_Route(r, make_sender(r.exporter)) for r in routes]
        self.poll_interval = poll_interval
        self.drain_batch = drain_batch  # with no routes, outbox entries acknowledged per read
        self._route_ids = [r.id for r in self.routes]
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.acked = 0
        self.skipped = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tracetape-forwarder")

    def notify(self, *_: object) -> None:
        """Something was committed: look at the outbox now rather than at the next poll."""
        self._wake.set()
        for r in self.routes:
            r.wake.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop after the in-flight send (at most `grace` seconds), then close connections."""
        self._stopping.set()
        self.notify()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
            except Exception:  # noqa: BLE001 - already logged by _run
                pass
            self._task = None
        for r in self.routes:
            await r.sender.close()

    def snapshot(self) -> dict[str, Any]:
        """Counters per route, for `/metrics`; `backlog` = outbox entries the route has not done yet."""
        try:
            backlog: dict[str, int] = self.store.outbox_backlog(self._route_ids) if self.routes else {}
        except Exception:  # noqa: BLE001 - the store is closing or gone: report no figure
            backlog = {}
        return {
            "acked": self.acked,
            "skipped": self.skipped,
            "routes": {
                r.route.exporter.id: {
                    "endpoint": r.route.exporter.url,
                    "spans_sent": r.stats.spans_sent,
                    "requests_sent": r.stats.requests_sent,
                    "attempts_failed": r.stats.attempts_failed,
                    "dropped_spans": r.stats.dropped_spans,
                    "rejected_spans": r.stats.rejected_spans,
                    "failing": r.stats.failing_since is not None,
                    "last_error": r.stats.last_error,
                    "backlog": backlog.get(r.id),
                }
                for r in self.routes
            },
        }

    async def _run(self) -> None:
        if not self.routes:
            await self._drain()
        else:
            await asyncio.gather(*(self._run_route(r) for r in self.routes))

    async def _drain(self) -> None:
        """No routes: acknowledge the outbox unread, so it does not grow without bound."""
        while not self._stopping.is_set():
            try:
                self._wake.clear()  # before reading: a commit after this read wakes the next wait
                entries = await asyncio.to_thread(self.store.outbox_read, self.drain_batch)
                if not entries:
                    await self._idle(self._wake)
                    continue
                await asyncio.to_thread(self.store.outbox_ack, [seq for seq, _ in entries])
                self.acked += len(entries)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug, or the store went away: log, back off, keep going
                log.exception("forwarding failed")
                await self._sleep(self.poll_interval * 10)

    async def _run_route(self, route: _Route) -> None:
        """One route's loop: the entries after its cursor, delivered (or dropped), then its cursor advanced."""
        limit = route.route.exporter.max_batch_spans
        while not self._stopping.is_set():
            try:
                route.wake.clear()  # before reading: a commit after this read wakes the next wait
                entries = await asyncio.to_thread(self.store.outbox_read_after, route.id, limit)
                if not entries:
                    await self._idle(route.wake)
                    continue
                stored = [raw for _, raw in entries if raw is not None]  # None: the span is gone, pass over it
                if stored and not await self._forward_route(route, stored):
                    return  # stopping: the batch stays after this route's cursor
                self.acked += await asyncio.to_thread(
                    self.store.outbox_advance, route.id, entries[-1][0], self._route_ids)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug, or the store went away: log, back off, keep going
                log.exception("%s: forwarding failed", route.id)
                await self._sleep(self.poll_interval * 10)

    async def _idle(self, wake: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(wake.wait(), self.poll_interval)
        except asyncio.TimeoutError:
            pass

    async def _forward_route(self, route: _Route, stored: list[bytes]) -> bool:
        """Deliver one outbox batch to one route; False if interrupted by `stop()`."""
        requests, bad = await asyncio.to_thread(build_requests, stored, route.route, self.store)
        if bad:
            self.skipped += bad
            log.warning("%s: skipped %d stored spans that do not parse", route.id, bad)
        for request in requests:
            if not await self._deliver(route, request):
                return False
        return True

    async def _deliver(self, route: _Route, request: ExportTraceServiceRequest) -> bool:
        """Send until accepted, permanently rejected, or out of retry time; False only when stopping."""
        exp = route.route.exporter
        policy = exp.retry
        n = span_count(request)
        started = time.monotonic()
        delay = policy.initial_interval
        attempt = 0
        while True:
            result = await route.sender.send(request)
            attempt += 1
            if result.ok:
                route.stats.spans_sent += n
                route.stats.requests_sent += 1
                if result.rejected_spans:
                    route.stats.rejected_spans += result.rejected_spans
                    log.warning("%s rejected %d of %d spans: %s", exp.id, result.rejected_spans, n, result.detail)
                if route.stats.failing_since is not None:
                    dropped = f" ({route.unlogged_drops} spans dropped meanwhile)" if route.unlogged_drops else ""
                    log.info("%s: delivering again after %.0fs%s", exp.id,
                             time.monotonic() - route.stats.failing_since, dropped)
                    route.stats.failing_since = None
                    route.unlogged_drops = 0
                return True
            route.stats.attempts_failed += 1
            route.stats.last_error = result.detail
            out_of_time = policy.max_elapsed_time and time.monotonic() - started >= policy.max_elapsed_time
            if not result.retryable or not policy.enabled or out_of_time:
                route.stats.dropped_spans += n
                self._log_failure(route, result, dropped=n)
                return True
            self._log_failure(route, result)
            wait = min(delay, policy.max_interval) * random.uniform(0.75, 1.25)
            if result.retry_after is not None:
                wait = max(wait, result.retry_after)
            delay = min(delay * policy.multiplier, policy.max_interval)
            if not await self._sleep(wait):
                return False

    def _log_failure(self, route: _Route, result: SendResult, dropped: int = 0) -> None:
        """The route is failing (until its next success); one line at most per minute: a retry, or `dropped`
        spans given up on (those held back by the limiter are counted into the next drop line)."""
        now = time.monotonic()
        first = route.stats.failing_since is None
        if first:
            route.stats.failing_since = now
        elif now - route.last_log < _FAILURE_LOG_INTERVAL:
            route.unlogged_drops += dropped
            return
        route.last_log = now
        exp = route.route.exporter
        if dropped:
            why = "permanent error" if not result.retryable else "giving up retrying"
            more = f", {route.unlogged_drops} more since the last report" if route.unlogged_drops else ""
            route.unlogged_drops = 0
            log.error("%s: dropped %d spans (%s%s): %s", exp.id, dropped, why, more, result.detail)
        elif first:
            log.warning("%s: cannot deliver to %s (%s); retrying, recording is not affected",
                        exp.id, exp.url, result.detail)
        else:
            log.warning("%s: still cannot deliver after %.0fs: %s", exp.id, now - route.stats.failing_since,
                        result.detail)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False if `stop()` was called."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return True
        return False
