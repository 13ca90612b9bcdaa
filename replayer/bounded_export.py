"""The replayer's recorded spans, queued for export within a byte budget.

Contract: `BoundedBatchProcessor(exporter, max_bytes=..., on_drop=...)` hands ended spans to a
`BatchSpanProcessor` while the spans queued and not yet exported weigh at most `max_bytes` (their estimated
OTLP size, `estimate_span_bytes`: a replay step carries its request and response bodies). A span past that is
not queued: `on_drop(span)` is called, so the caller counts it and says so on its run. The SDK's own queue
(which drops by count, silently) is set far above what the budget lets in; a span leaves the budget when
its export ends, successful or not. One span is always admitted when nothing is queued.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from tracetape.instrumentation.exporter import estimate_span_bytes

DEFAULT_MAX_BYTES = 128 << 20
_SDK_QUEUE = 1 << 20


class _Releasing(SpanExporter):
    """`inner`, giving the exported spans' bytes back to the budget when each export ends."""

    def __init__(self, inner: SpanExporter, release: Callable[[int], None]) -> None:
        self._inner = inner
        self._release = release

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self._inner.export(spans)
        finally:
            self._release(sum(estimate_span_bytes(s) for s in spans))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._inner.shutdown()


class BoundedBatchProcessor(SpanProcessor):
    """A `BatchSpanProcessor` behind a byte budget (see module doc)."""

    def __init__(self, exporter: SpanExporter, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 on_drop: Callable[[ReadableSpan], None], schedule_delay_millis: int = 200) -> None:
        self.max_bytes = max_bytes
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._pending = 0
        self._batch = BatchSpanProcessor(_Releasing(exporter, self._release), max_queue_size=_SDK_QUEUE,
                                         schedule_delay_millis=schedule_delay_millis)

    @property
    def pending_bytes(self) -> int:
        return self._pending

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._pending -= nbytes

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        size = estimate_span_bytes(span)
        with self._lock:
            admitted = not self._pending or self._pending + size <= self.max_bytes
            if admitted:
                self._pending += size
        if admitted:
            self._batch.on_end(span)
        else:
            self._on_drop(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self._batch.shutdown()
