"""OTLP/gRPC receiver: `opentelemetry.proto.collector.trace.v1.TraceService/Export` on `grpc.aio`.

Contract (same as OTLP/HTTP): the response is sent only after the store committed the spans, with
`partial_success` when some were rejected. Errors:
- undecodable request → `INVALID_ARGUMENT` (the request bytes are parsed here, not by gRPC, so a bad
  message is the client's error rather than `INTERNAL`);
- over `max_recv_msg_size_mib` (checked by gRPC on the decompressed message) → `RESOURCE_EXHAUSTED`;
- writer overloaded → `RESOURCE_EXHAUSTED` with a `google.rpc.RetryInfo` detail (OTLP: retryable
  because the server says when), store unable to write → `UNAVAILABLE` with `RetryInfo`. Admission comes
  before the message is read: each call first reserves `max_recv_msg_size` of the writer's budget (shrunk
  to the message's size once read), so memory is bounded by that budget, as on OTLP/HTTP;
- a bug → `INTERNAL` (logged; the message says nothing more).
With an `Authenticator` (API keys configured) the call's metadata must hold `x-api-key: KEY` or
`authorization: Bearer KEY`, else `UNAUTHENTICATED` before the request is parsed (nothing stored, the
key never echoed or logged); a valid key's tenant overrides the tenant the spans claim.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tracetape.collector import otlp_decode as od
from tracetape.collector.auth import Authenticator, Principal, metadata_key
from tracetape.collector.receiving import UNAUTHENTICATED_MESSAGE, OnStored, ReceiverStats, Submitter, submit_as
from tracetape.collector.writer import Overloaded, Reservation, StoreUnavailable

log = logging.getLogger("tracetape.collector.grpc")

SERVICE_NAME = "opentelemetry.proto.collector.trace.v1.TraceService"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
BUSY_MESSAGE = "the collector is busy; retry later"
STREAM_WINDOW_BYTES = 256 * 1024


class TraceService:
    """The Export method, served as stream-unary so that the request message is read only after admission:
    the budget is reserved first (`max_recv_msg_size`, shrunk to the message's size once read), as the HTTP
    receiver does, so memory is bounded by the writer's budget, not by messages times concurrent calls."""

    def __init__(
        self,
        writer: Submitter,
        stats: ReceiverStats,
        on_stored: OnStored | None = None,
        authenticator: Authenticator | None = None,
        max_recv_msg_size: int = 4 * 1024 * 1024,
    ) -> None:
        self.writer = writer
        self.stats = stats
        self.on_stored = on_stored
        self.authenticator = authenticator
        self.max_recv_msg_size = max_recv_msg_size

    async def export(
        self, _requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> ExportTraceServiceResponse:
        principal = None
        if self.authenticator is not None:
            principal = self.authenticator.authenticate(metadata_key(context.invocation_metadata()))
            if principal is None:
                await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        try:
            reservation = self.writer.reserve(self.max_recv_msg_size)
        except Overloaded as err:  # refused before the message is read
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_MESSAGE, err.retry_after)
        with reservation:
            raw = await context.read()
            if not isinstance(raw, bytes):  # EOF: the client sent no message
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no ExportTraceServiceRequest sent")
            reservation.shrink(len(raw))
            return await self._store(raw, principal, reservation, context)

    async def _store(
        self, raw: bytes, principal: Principal | None, reservation: Reservation, context: grpc.aio.ServicerContext
    ) -> ExportTraceServiceResponse:
        failure: tuple[grpc.StatusCode, str, float | None] | None = None
        try:
            result = await submit_as(self.writer, raw, principal, len(raw), reservation)  # parsed by the ingest step
        except od.Undecodable as err:
            failure = (grpc.StatusCode.INVALID_ARGUMENT, err.message, None)
        except Overloaded as err:
            failure = (grpc.StatusCode.RESOURCE_EXHAUSTED, BUSY_MESSAGE, err.retry_after)
        except StoreUnavailable as err:
            failure = (grpc.StatusCode.UNAVAILABLE, f"the store cannot take writes now: {err.message}", err.retry_after)
        except Exception:  # a bug: log it, tell the client nothing more
            log.exception("OTLP/gRPC export failed")
            failure = (grpc.StatusCode.INTERNAL, "internal error", None)
        if failure is not None:
            await self._abort(context, *failure)
        self.stats.stored(result, len(raw))
        if self.on_stored is not None:
            self.on_stored(result)
        self.stats.answered("grpc", "OK")
        return od.export_response(result.rejected, result.error_message if result.rejected else "")

    async def _abort(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, retry_after: float | None = None
    ) -> None:
        self.stats.answered("grpc", code.name)
        metadata: tuple[tuple[str, bytes], ...] = ()
        if retry_after is not None:
            status = status_pb2.Status(code=code.value[0], message=message)
            delay = Duration()
            delay.FromNanoseconds(int(max(retry_after, 0.0) * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            metadata = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
        await context.abort(code, message, trailing_metadata=metadata)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Export": grpc.stream_unary_rpc_method_handler(  # the client's unary call, read when admitted
                    self.export, response_serializer=ExportTraceServiceResponse.SerializeToString
                )
            },
        )


async def start_grpc_server(
    writer: Submitter,
    *,
    host: str,
    port: int,
    max_recv_msg_size: int,
    stats: ReceiverStats | None = None,
    on_stored: OnStored | None = None,
    authenticator: Authenticator | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A started `grpc.aio` server on host:port (0 = any free port), and the port it bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_recv_msg_size),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),  # a second collector on the same port must fail, not share it
            # What a call not yet admitted can make gRPC buffer: one flow-control window, kept small and fixed
            # (without this, BDP probing grows windows to megabytes and each waiting stream fills one).
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ]
    )
    service = TraceService(writer, stats or ReceiverStats(), on_stored, authenticator, max_recv_msg_size)
    server.add_generic_rpc_handlers((service.handler(),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError("address already in use or not available")
    await server.start()
    return server, bound
