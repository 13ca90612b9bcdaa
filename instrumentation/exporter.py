"""The span exporter tracetape's recording processes use: OTLP/HTTP protobuf, in requests of bounded size.

`SizeSplittingExporter` wraps another exporter (by default `OTLPSpanExporter` on `{endpoint}/v1/traces`)
and cuts each batch the batch processor hands it into sub-batches of at most `max_spans` spans and at most
`max_bytes` estimated encoded bytes, so one large payload never gets a whole batch rejected by a receiver's
request-size limit. A span whose own estimate exceeds `max_bytes` is sent alone. The estimate
(`estimate_span_bytes`) is a cheap upper-ish bound computed from the attribute values' lengths; nothing is
encoded twice.

Unreachable collector: before the first export, and after any failed export, the exporter checks with one
TCP connect (0.5 s timeout) that the endpoint accepts connections; when it does not, the sub-batches are
dropped at once (FAILURE) instead of waiting out the OTLP client's retries, and one warning is written to
stderr for the whole process (`on_unreachable` replaces that warning). Recording is lost; the application
is never slowed down by more than that connect.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracetape.instrumentation import redaction

DEFAULT_MAX_SPANS = 512
_SPAN_OVERHEAD = 96  # ids, timestamps, kind, flags, status and framing of one span
_ATTR_OVERHEAD = 8  # KeyValue + AnyValue framing
_SCALAR = 10  # varint / fixed64 / bool
_PROBE_TIMEOUT_S = 0.5


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes):
        return len(value) + 4
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))) + 4
    if isinstance(value, (tuple, list)):
        return sum(_value_bytes(v) + 2 for v in value) + 4
    return _SCALAR


def _attributes_bytes(attributes: object) -> int:
    if not attributes:
        return 0
    return sum(len(k) + _ATTR_OVERHEAD + _value_bytes(v) for k, v in attributes.items())  # type: ignore[attr-defined]


def estimate_span_bytes(span: ReadableSpan) -> int:
    """An estimate of the span's size in an OTLP protobuf request (resource and scope not included)."""
    size = _SPAN_OVERHEAD + len(span.name) + _attributes_bytes(span.attributes)
    for event in span.events:
        size += 24 + len(event.name) + _attributes_bytes(event.attributes)
    for link in span.links:
        size += 48 + _attributes_bytes(link.attributes)
    description = span.status.description if span.status is not None else None
    if description:
        size += len(description) + 4
    return size


def split_batches(
    spans: Sequence[ReadableSpan], max_bytes: int, max_spans: int = DEFAULT_MAX_SPANS
) -> Iterator[list[ReadableSpan]]:
    """`spans` in order, cut into lists of at most `max_spans` spans and `max_bytes` estimated bytes.

    The resource and scope of the first span are counted once per list. A span larger than `max_bytes`
    on its own makes a list of one.
    """
    if not spans:
        return
    fixed = 64 + _attributes_bytes(getattr(spans[0].resource, "attributes", None))
    batch: list[ReadableSpan] = []
    size = fixed
    for span in spans:
        span_size = estimate_span_bytes(span)
        if batch and (len(batch) >= max_spans or size + span_size > max_bytes):
            yield batch
            batch, size = [], fixed
        batch.append(span)
        size += span_size
    if batch:
        yield batch


def endpoint_reachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether a TCP connection to the URL's host and port succeeds, and the error when it does not."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        return False, str(err)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as err:
        return False, err.strerror or str(err)


_APPLICATION_EXPORTER_ENV = tuple(
    f"OTEL_EXPORTER_OTLP_{signal}{name}"
    for signal in ("", "TRACES_")
    for name in ("HEADERS", "CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE", "COMPRESSION")
)


@contextmanager
def _without_env(names: Sequence[str]) -> Iterator[None]:
    """`os.environ` without `names` for the duration (the OTLP exporter reads them when constructed)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _warn_stderr(url: str, error: str) -> None:
    print(
        f"tracetape: collector unreachable at {redaction.without_userinfo(url)} ({error}); spans are dropped, "
        "the command still runs",
        file=sys.stderr,
        flush=True,
    )


class SizeSplittingExporter(SpanExporter):
    """Exports through `inner` in sub-batches bounded by count and estimated encoded size (see module doc)."""

    def __init__(
        self,
        inner: SpanExporter,
        *,
        url: str,
        max_bytes: int,
        max_spans: int = DEFAULT_MAX_SPANS,
        warned: bool = False,
        on_unreachable: Callable[[str, str], None] = _warn_stderr,
    ) -> None:
        self._inner = inner
        self._url = url
        self._max_bytes = max_bytes
        self._max_spans = max_spans
        self._on_unreachable = on_unreachable
        self._lock = threading.Lock()
        self._check_before_export = True
        self.warned = warned
        """Whether the unreachable-collector warning has been given (by this process or its parent)."""
        self.dropped_spans = 0
        """Spans dropped because the collector was unreachable."""

    @classmethod
    def otlp_http(
        cls, endpoint: str, *, max_bytes: int, warned: bool = False, api_key: str | None = None
    ) -> SizeSplittingExporter:
        """Over `OTLPSpanExporter` (HTTP protobuf, uncompressed) sending to `{endpoint}/v1/traces`.

        The application's `OTEL_EXPORTER_OTLP_*` headers, certificates and compression are meant for its
        own backend: they are not applied to tracetape's collector (its credentials never reach it).
        `api_key` (`TRACETAPE_API_KEY`) is sent as the `x-api-key` header, to tracetape's collector only;
        it is never logged nor put on a span.
        """
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = f"{endpoint.rstrip('/')}/v1/traces"
        headers = {"x-api-key": api_key} if api_key else None
        with _without_env(_APPLICATION_EXPORTER_ENV):
            inner = OTLPSpanExporter(endpoint=url, headers=headers)
        return cls(inner, url=url, max_bytes=max_bytes, warned=warned)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = SpanExportResult.SUCCESS
        for batch in split_batches(spans, self._max_bytes, self._max_spans):
            if self._check_before_export and not self._reachable():
                self.dropped_spans += len(batch)
                result = SpanExportResult.FAILURE
                continue
            if self._inner.export(batch) is not SpanExportResult.SUCCESS:
                self._check_before_export = True
                result = SpanExportResult.FAILURE
        return result

    def _reachable(self) -> bool:
        ok, error = endpoint_reachable(self._url)
        if ok:
            self._check_before_export = False
            return True
        with self._lock:
            first = not self.warned
            self.warned = True
        if first:
            self._on_unreachable(self._url, error)
        return False

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
