"""Recording a replay as a new run, from the replayer itself (proxy-mode clients that are not instrumented).

Contract:
- `ReplayRecorder` owns one OTel `TracerProvider` for the replayer process, exporting over OTLP/HTTP to the
  collector (`{collector}/v1/traces`, size-split batches) or to a given exporter; `shutdown` flushes.
- `SessionRecorder` (one per recording session) follows the span contract exactly as the in-process
  instrumentation does: at open, a zero-length `run_start` span; per proxied attempt, one `step` span (same
  attribute names and encodings, request body redacted, credential headers dropped, the envelope hash
  that matched) with a span link to the original attempt's span when it came from (or matched) the tape;
  at `close`, the run span with `RUN_REPLAY_OF`, `RUN_REPLAY_MODE`, `RUN_REPLAY_FORCED`,
  `RUN_LINEAGE_DEPTH` = original + 1, and one `tracetape.mutation_suppressed` event per suppressed tool.
- Attempts of one original step (the SDK's retries) share one replay step (id, start, index); unmatched
  requests with `x-stainless-retry-count` N > 0 join the latest step with the same envelope.
- Never raises into the proxy: a failure to record is logged and counted, the client is still answered.
  Spans wait for export within a byte budget (`replayer/bounded_export.py`); one the budget cannot take (the
  collector not keeping up) is dropped, counted, and its run span says so (`RECORDING_ERROR`: the run is a
  recording failure). A session ended with requests still being answered waits for them (`drain`); one
  answered after its run ended is not recorded (counted).
- When the collector requires API keys, `open(session, api_key=KEY)` makes that session's spans go with the
  key that created the session (`replayer/keyed_export.py`), so the replay run lands in the same tenant.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tracetape.collector.records import AttemptRecord
from tracetape.instrumentation import contract, redaction
from tracetape.instrumentation.exporter import SizeSplittingExporter
from tracetape.replayer.bounded_export import DEFAULT_MAX_BYTES, BoundedBatchProcessor
from tracetape.replayer.keyed_export import KeyedExporter, RunKey
from tracetape.replayer.tape import Outcome

log = logging.getLogger("tracetape.replayer")

SERVICE = "tracetape-replayer"
RECENT_ENVELOPES = 4096
"""Envelopes a session remembers for grouping live retries into steps (a long live session stays bounded)."""
MAX_EXPORT_BYTES = 8 << 20


class ReplayRecorder:
    """The replayer's tracer provider (see module doc)."""

    def __init__(self, collector: str | None = None, exporter: SpanExporter | None = None, *,
                 max_pending_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.keyed: KeyedExporter | None = None
        if exporter is None:
            if not collector:
                raise ValueError("give a collector URL or an exporter")
            url = collector
            self.keyed = KeyedExporter(
                lambda key: SizeSplittingExporter.otlp_http(url, max_bytes=MAX_EXPORT_BYTES, api_key=key))
            exporter = self.keyed
        self._ended: list[RunKey] = []
        self._lock = threading.Lock()  # guards `_ended`, `_lost` and `failures` counted on drops
        self._lost: dict[RunKey, int] = {}  # spans of a run the export budget could not take
        self._lost_logged = 0.0
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
        self.export_budget = BoundedBatchProcessor(exporter, max_bytes=max_pending_bytes, on_drop=self._dropped)
        self.provider.add_span_processor(self.export_budget)
        self.tracer = self.provider.get_tracer("tracetape.replayer")
        self.failures = 0

    def _dropped(self, span: ReadableSpan) -> None:
        """A span past the export budget (the collector is not keeping up): counted, and said on its run."""
        attrs = span.attributes or {}
        run = (str(attrs.get(contract.TENANT, "")), str(attrs.get(contract.SCOPE, "")), str(attrs.get(contract.RUN_ID, "")))
        with self._lock:
            self.failures += 1
            self._lost[run] = self._lost.get(run, 0) + 1
            now = time.monotonic()
            if now - self._lost_logged < 10:
                return
            self._lost_logged = now
        log.warning("the collector is not taking replay spans fast enough: spans dropped, their replay runs "
                    "marked as recording failures")

    def take_lost(self, run: RunKey) -> int:
        """How many spans of `run` were dropped (forgotten once asked)."""
        with self._lock:
            return self._lost.pop(run, 0)

    def open(self, session: Any, api_key: str | None = None) -> SessionRecorder:
        """A recorder for `session`'s replay run; its spans are exported with `api_key` when given."""
        if api_key and self.keyed is not None:
            self.keyed.bind(session.replay_run, api_key)
        return SessionRecorder(self, session)

    def ended(self, run: RunKey) -> None:
        with self._lock:
            self._ended.append(run)

    def flush(self) -> None:
        """Export what has ended, then forget the keys of the runs that had ended before."""
        with self._lock:
            done, self._ended = self._ended, []
        self.provider.force_flush(10_000)
        if self.keyed is not None:
            for run in done:
                self.keyed.release(run)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _link(attempt: AttemptRecord | None) -> list[Link]:
    if attempt is None or len(attempt.trace_id) != 16 or len(attempt.span_id) != 8:
        return []
    ctx = SpanContext(int.from_bytes(attempt.trace_id, "big"), int.from_bytes(attempt.span_id, "big"),
                      is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return [Link(ctx, {"tracetape.link": "replay_of"})]


class SessionRecorder:
    """Spans of one replay run (see module doc)."""

    def __init__(self, owner: ReplayRecorder, session: Any) -> None:
        self.owner = owner
        self.session = session
        run = session.run
        self.base = {contract.RUN_ID: session.replay_run_id, contract.TENANT: run.tenant, contract.SCOPE: run.scope}
        tracer = owner.tracer
        self.run_span = tracer.start_span(
            f"invoke_agent {run.agent_name}".strip(), context=context_api.Context(), kind=SpanKind.INTERNAL,
            attributes={**self.base, **self._run_attributes()})
        self.parent = trace.set_span_in_context(self.run_span)
        now = time.time_ns()
        tracer.start_span("tracetape.run.start", context=self.parent, start_time=now,
                          attributes={**self.base, **self._run_attributes(),
                                      contract.SPAN_KIND: contract.SPAN_KIND_RUN_START}).end(end_time=now)
        self._lock = threading.Lock()
        self._by_original: dict[int, tuple[str, int, int]] = {}
        self._by_envelope: OrderedDict[str, tuple[str, int, int]] = OrderedDict()  # the latest, for retries
        self._index = 0
        self._closed = False

    def _run_attributes(self) -> dict[str, Any]:
        s = self.session
        return {
            contract.SPAN_KIND: contract.SPAN_KIND_RUN,
            contract.RUN_COMMAND: ["tracetape-replayer", "session", s.id],
            contract.RUN_CANON_PROFILE: contract.CANON_PROFILE,
            contract.RUN_REPLAY_OF: s.run.run_id,
            contract.RUN_REPLAY_MODE: s.options.mode,
            contract.RUN_REPLAY_FORCED: bool(s.forced),
            contract.RUN_LINEAGE_DEPTH: s.run.lineage_depth + 1,
            contract.GEN_AI_OPERATION_NAME: "invoke_agent",
            **({contract.GEN_AI_AGENT_NAME: s.run.agent_name} if s.run.agent_name else {}),
        }

    def _step_identity(self, original: int | None, envelope_hash: str, retry: int, started_ns: int) -> tuple[str, int, int]:
        with self._lock:
            if original is not None and original in self._by_original:
                return self._by_original[original]
            if original is None and retry > 0 and envelope_hash in self._by_envelope:
                return self._by_envelope[envelope_hash]
            ident = (os.urandom(8).hex(), started_ns, self._index)
            self._index += 1
            if original is not None:
                self._by_original[original] = ident
            self._by_envelope[envelope_hash] = ident
            self._by_envelope.move_to_end(envelope_hash)
            if len(self._by_envelope) > RECENT_ENVELOPES:  # a retry follows its first attempt closely
                self._by_envelope.popitem(last=False)
            return ident

    def http_attempt(self, *, method: str, url: str, request_headers: list[tuple[str, str]], redacted_body: bytes,
                     envelope_hash: str, provider: str, outcome: Outcome, original_index: int | None = None,
                     original: AttemptRecord | None = None, served_from: str = "tape") -> None:
        """Record one proxied attempt (served from the tape or forwarded live)."""
        if self._closed:  # answered after its session was deleted and the run ended (past the drain)
            self.owner.failures += 1
            log.warning("an attempt answered after its replay run ended was not recorded")
            return
        try:
            self._http_attempt(method, url, request_headers, redacted_body, envelope_hash, provider, outcome,
                               original_index, original, served_from)
        except Exception:  # recording must never break the replay
            self.owner.failures += 1
            log.exception("recording a replayed attempt failed")

    def _http_attempt(self, method: str, url: str, request_headers: list[tuple[str, str]], body: bytes,
                      envelope_hash: str, provider: str, outcome: Outcome, original_index: int | None,
                      original: AttemptRecord | None, served_from: str) -> None:
        kept = redaction.drop_secret_headers(request_headers)
        retry = 0
        for name, value in kept:
            if name == "x-stainless-retry-count" and value.isdigit():
                retry = int(value)
        path = contract.normalize_path(redaction.redact_text(urlsplit(url).path))  # it names the span
        kind = contract.STEP_KIND_MODEL if provider and contract.is_model_path(path) else contract.STEP_KIND_HTTP
        model = contract.request_model(body)  # not the whole body parsed on the event loop (a huge one: bug R5)
        step_id, step_started, index = self._step_identity(original_index, envelope_hash, retry, outcome.started_ns)
        attempt_no = original.attempt if original is not None else retry
        encoding = ""
        content_type = ""
        for name, value in outcome.headers:
            if name.lower() == "content-encoding":
                encoding = value.strip().lower()
            elif name.lower() == "content-type":
                content_type = value.lower()
        if encoding == "identity":
            encoding = ""
        streamed = content_type.startswith("text/event-stream")
        decoded = False
        if encoding:
            resp_body, stored_encoding = redaction.redact_encoded(outcome.body, encoding)
            decoded, encoding = stored_encoding != encoding, stored_encoding
        else:
            resp_body = redaction.redact_body(outcome.body)
        attrs: dict[str, Any] = {
            **self.base,
            contract.SPAN_KIND: contract.SPAN_KIND_STEP, contract.STEP_ID: step_id,
            contract.STEP_STARTED_NS: step_started, contract.STEP_INDEX: index, contract.STEP_KIND: kind,
            contract.STEP_ATTEMPT: attempt_no, contract.ENVELOPE_HASH: envelope_hash,
            contract.ENVELOPE_PROFILE: contract.CANON_PROFILE, contract.REQUEST_METHOD: method.upper(),
            contract.REQUEST_URL: redaction.redact_text(redaction.without_userinfo(url)), contract.REQUEST_HEADERS: contract.encode_headers(kept),
            contract.REQUEST_BODY: body, contract.STREAM_END_REASON: outcome.end_reason,
            "tracetape.replay.source": served_from,
        }
        if outcome.status is not None:
            attrs.update({
                contract.RESPONSE_STATUS: outcome.status,
                contract.RESPONSE_HEADERS: contract.encode_headers(redaction.drop_secret_headers(outcome.headers)),
                contract.RESPONSE_BODY: resp_body, contract.RESPONSE_BYTES_READ: len(resp_body),
                contract.RESPONSE_CONTENT_ENCODING: encoding, contract.RESPONSE_STREAMED: streamed,
            })
            if streamed:  # decoded to mask a secret: one identity chunk
                attrs[contract.RESPONSE_CHUNK_ENDS] = [len(resp_body)] if decoded else list(outcome.chunk_ends)
                attrs[contract.RESPONSE_CHUNK_TIMES_US] = (list(outcome.chunk_times_us[-1:]) if decoded
                                                           else list(outcome.chunk_times_us))
        attrs.update(contract.genai_request_attributes(kind, provider, model))
        if outcome.error_type:
            attrs[contract.ERROR_TYPE] = outcome.error_type
            attrs[contract.ERROR_MESSAGE] = outcome.error_message
        elif outcome.status is not None and outcome.status >= 400:
            attrs[contract.ERROR_TYPE] = str(outcome.status)
        name = contract.step_span_name(kind, model=model, method=method.upper(), path=path)
        span = self.owner.tracer.start_span(name, context=self.parent, kind=SpanKind.CLIENT, attributes=attrs,
                                            links=_link(original), start_time=outcome.started_ns or None)
        if contract.ERROR_TYPE in attrs:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=outcome.ended_ns or None)

    def mutation_suppressed(self, tool: str, step_index: int) -> None:
        try:
            self.run_span.add_event(contract.EVENT_MUTATION_SUPPRESSED,
                                    {"gen_ai.tool.name": tool, "tracetape.replay.original_step": step_index})
        except Exception:
            log.exception("recording a suppressed mutation failed")

    def close(self, *, cancelled: bool = False) -> None:
        """End the run span (once): failed when the tape missed or ran out, cancelled when the replayer stopped
        with the session still open (its client never finished), else completed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        failed = self.session.coverage.counts["misses"] > 0 or self.session.coverage.counts["exhausted"] > 0
        outcome, code = ((contract.OUTCOME_CANCELLED, -int(signal.SIGTERM)) if cancelled else
                         (contract.OUTCOME_FAILED, 1) if failed else (contract.OUTCOME_COMPLETED, 0))
        lost = self.owner.take_lost(self.session.replay_run)
        if lost:  # the run is then not replayable (`recording_failure`)
            self.run_span.set_attribute(contract.RECORDING_ERROR, f"{lost} span(s) of this replay were dropped: "
                                        "the collector did not take them fast enough")
        self.run_span.set_attribute(contract.RUN_OUTCOME, outcome)
        self.run_span.set_attribute(contract.RUN_EXIT_CODE, code)
        self.run_span.end()
        self.owner.ended(self.session.replay_run)
