"""What the OTLP receivers (HTTP and gRPC) share: the writer they submit to, and their counters.

A receiver answers success only after `Submitter.submit` has returned, i.e. after the store's write
transaction committed. `Overloaded` and `StoreUnavailable` (from `collector.writer`) mean nothing of
the request was written and the client should retry after `retry_after` seconds.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracetape.collector.auth import Principal
from tracetape.collector.writer import IngestResult, Reservation

OnStored = Callable[[IngestResult], None]
"""Called (on the event loop) after each committed request, e.g. to wake the forwarder."""


class Submitter(Protocol):
    """The part of `collector.writer.StoreWriter` a receiver uses."""

    async def submit(
        self,
        request: ExportTraceServiceRequest | bytes,
        *,
        tenant: str | None = None,
        size: int | None = None,
        scopes: frozenset[str] | None = None,
        reservation: Reservation | None = None,
    ) -> IngestResult: ...

    def reserve(self, nbytes: int) -> Reservation: ...


UNAUTHENTICATED_MESSAGE = "missing or invalid API key (send it as x-api-key or Authorization: Bearer)"
"""What a receiver answers without a valid key: never the key, never whether one was sent."""


async def submit_as(
    writer: Submitter,
    request: ExportTraceServiceRequest | bytes,
    principal: Principal | None,
    size: int,
    reservation: Reservation | None = None,
) -> IngestResult:
    """`writer.submit`, storing under the authenticated principal's tenant (and scopes) when there is one."""
    if principal is None:
        return await writer.submit(request, size=size, reservation=reservation)
    return await writer.submit(request, tenant=principal.tenant, scopes=principal.scopes, size=size,
                               reservation=reservation)


@dataclass
class ReceiverStats:
    """Counters for `/metrics`; one instance per collector, shared by its receivers."""

    requests: Counter[str] = field(default_factory=Counter)  # by "http"/"grpc"
    responses: Counter[str] = field(default_factory=Counter)  # by "http 200", "grpc OK", ...
    spans_accepted: int = 0
    spans_rejected: int = 0
    spans_duplicate: int = 0
    bytes_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stored(self, result: IngestResult, size: int) -> None:
        with self._lock:
            self.spans_accepted += result.accepted
            self.spans_rejected += result.rejected
            self.spans_duplicate += getattr(result, "duplicates", 0)
            self.bytes_received += size

    def answered(self, transport: str, status: str) -> None:
        with self._lock:
            self.requests[transport] += 1
            self.responses[f"{transport} {status}"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "responses": dict(self.responses),
                "spans_accepted": self.spans_accepted,
                "spans_rejected": self.spans_rejected,
                "spans_duplicate": self.spans_duplicate,
                "bytes_received": self.bytes_received,
            }


def retry_after_seconds(retry_after: float) -> int:
    """A `Retry-After` delay in whole seconds (at least 1)."""
    return max(1, math.ceil(retry_after))
