"""Exporting a replayer's recorded replays to a collector that requires API keys.

Contract: `KeyedExporter(collector)` sends each span with the API key bound to its replay run
(`bind(run, key)`, from the session-creating request; a run is its span attributes' (tenant, scope, run
id), so two tenants' runs of the same id never share a key), and the collector stores the replay run under
that key's tenant, the same tenant as the run replayed. Spans of a run with no key bound go without one
(collectors without keys). Keys are held in memory only, one OTLP exporter per distinct key (so at most as
many as are configured); the key is never logged nor put on a span. `release(run)` forgets a run once
its spans have been flushed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracetape.instrumentation import contract

MakeExporter = Callable[[str | None], SpanExporter]
"""Builds the exporter that sends with this API key (None: without one)."""

RunKey = tuple[str, str, str]
"""(tenant, scope, run id) of a replay run, as its spans' attributes say."""


class KeyedExporter(SpanExporter):
    """Routes spans to per-key exporters by their replay run (see module doc)."""

    def __init__(self, make_exporter: MakeExporter) -> None:
        self._make = make_exporter
        self._lock = threading.Lock()
        self._by_digest: dict[bytes | None, SpanExporter] = {}
        self._run_digest: dict[RunKey, bytes] = {}
        self._key_by_digest: dict[bytes, str] = {}

    def bind(self, run: RunKey, api_key: str | None) -> None:
        """Export `run`'s spans with `api_key` (None: without a key)."""
        if not api_key:
            return
        digest = hashlib.sha256(api_key.encode()).digest()
        with self._lock:
            self._run_digest[run] = digest
            self._key_by_digest.setdefault(digest, api_key)

    def release(self, run: RunKey) -> None:
        with self._lock:
            self._run_digest.pop(run, None)

    def _exporter(self, digest: bytes | None) -> SpanExporter:
        with self._lock:
            exporter = self._by_digest.get(digest)
            if exporter is None:
                key = self._key_by_digest.get(digest) if digest is not None else None
                exporter = self._by_digest[digest] = self._make(key)
            return exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        groups: dict[bytes | None, list[ReadableSpan]] = {}
        with self._lock:
            for span in spans:
                attrs = span.attributes or {}
                run = (attrs.get(contract.TENANT), attrs.get(contract.SCOPE), attrs.get(contract.RUN_ID))
                groups.setdefault(self._run_digest.get(run), []).append(span)  # type: ignore[arg-type]
        result = SpanExportResult.SUCCESS
        for digest, group in groups.items():
            if self._exporter(digest).export(group) is not SpanExportResult.SUCCESS:
                result = SpanExportResult.FAILURE
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            exporters = list(self._by_digest.values())
        return all(e.force_flush(timeout_millis) for e in exporters)

    def shutdown(self) -> None:
        with self._lock:
            exporters = list(self._by_digest.values())
            self._by_digest.clear()
            self._key_by_digest.clear()
        for exporter in exporters:
            exporter.shutdown()
