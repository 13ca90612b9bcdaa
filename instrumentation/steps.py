"""One span per HTTP step attempt, exactly as `contract` describes it.

Transport hooks (httpx/httpx2, requests, aiohttp) call `start_http_attempt` with the request about to go out
and drive the returned `HttpAttempt` as the response arrives:

    attempt = start_http_attempt(method=..., url=..., headers=..., body=...)   # None: not recording
    attempt.response_started(status, headers, content_encoding)              # once the head is in
    attempt.chunk(data)                                                       # per body chunk read
    attempt.finish(END_EXHAUSTED | END_CLOSED | END_ERROR | END_DROPPED, error=None)
    attempt.failed(exc)                                                       # no response at all

Contract of this module:
- `start_http_attempt` returns None when `runtime.recording()` is None; otherwise it always returns an attempt
  and never raises (a recorder failure is recorded as `RECORDING_ERROR` on the span instead).
- Credentials never reach the span: secret headers are dropped, bodies, URLs and error messages redacted
  (`redaction`), and the envelope is hashed from the redacted body (`contract.http_envelope`).
- Retries are grouped: a request whose `x-stainless-retry-count` header is N > 0 joins the most recent step of
  this process with the same envelope hash whose attempt N is not taken yet (same `STEP_ID`,
  `STEP_STARTED_NS`, `STEP_INDEX`), as attempt N; with none, it starts a step of its own. Identical calls
  retried at once (two threads) so keep one step each.
- `finish` is idempotent and thread-safe: the first call ends the span, every later call is a no-op. Spans
  are ended with `span.end()` only; no OTel context is attached or detached here.
- The per-chunk path is two list appends and one `time.monotonic_ns()`; bodies are joined, redacted and
  turned into attributes once, in `finish`.
- A request body of `CAPTURE_ELSEWHERE_FROM` bytes or more (first attempts only) is redacted, parsed and
  hashed on tracetape's capture thread while the request goes out, instead of before it: its span gets
  `REQUEST_BODY`, `ENVELOPE_HASH`, the request model and its `chat {model}` name when that is done, and
  always before it ends (`finish` waits for it), so the exported span carries exactly what it would
  otherwise. A retry waits for every pending capture before it looks for its step.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tracetape.instrumentation import contract, ids, redaction, runtime

RETRY_COUNT_HEADER = "x-stainless-retry-count"
"""The header both provider SDKs send with every attempt: 0 for the first, N for the N-th retry."""

ANTHROPIC_SCOPE_PREFIX = "com.anthropic.sdk.python"
"""Instrumentation scope of the anthropic SDK's own call spans (`.bedrock` etc. for platform clients)."""

_RECENT_STEPS_MAX = 512
_RECENT_STEPS_PER_ENVELOPE = 16


class _RecentSteps:
    """A small bounded map: envelope hash -> its latest steps (oldest first, at most `per_key`), each
    `(step id, started ns, step index)` with the attempt numbers it has taken so far."""

    def __init__(self, maxlen: int = _RECENT_STEPS_MAX, per_key: int = _RECENT_STEPS_PER_ENVELOPE) -> None:
        self._items: OrderedDict[str, deque[tuple[tuple[str, int, int], set[int]]]] = OrderedDict()
        self._maxlen = maxlen
        self._per_key = per_key
        self._lock = threading.Lock()

    def claim(self, key: str, attempt: int) -> tuple[str, int, int] | None:
        """The latest step with this envelope whose attempt `attempt` is not taken yet, now taken; or None."""
        with self._lock:
            for group, taken in reversed(self._items.get(key, ())):
                if attempt not in taken:
                    taken.add(attempt)
                    return group
        return None

    def put(self, key: str, value: tuple[str, int, int], attempt: int) -> None:
        """Remember a new step whose first attempt seen (`attempt`: 0, or a retry that found no step) is taken."""
        with self._lock:
            groups = self._items.get(key)
            if groups is None:
                groups = self._items[key] = deque(maxlen=self._per_key)
            else:
                self._items.move_to_end(key)
            groups.append((value, {attempt}))
            if len(self._items) > self._maxlen:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_recent = _RecentSteps()


def reset_retry_groups() -> None:
    """Forget every step that a later retry could join (a new run, or tests)."""
    _capturer.wait()
    _recent.clear()


CAPTURE_ELSEWHERE_FROM = 128 << 10
"""Request bodies at least this large are redacted, parsed and hashed on the capture thread (see the module
doc): ≈2.5 ms per MB that the caller no longer waits for. Smaller ones cost less than handing them over."""


_CAPTURE_THREAD = "tracetape-capture"


class _Request(NamedTuple):
    """What the envelope of an HTTP attempt is made of: `headers` with secrets dropped, `body` as sent."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


class _Captured(NamedTuple):
    """A request body made fit to record: redacted, its envelope hashed, the model it names (if any)."""

    body: bytes
    envelope_hash: str
    model: str | None


def _capture(request: _Request) -> _Captured:
    redacted = redaction.redact_body(request.body)
    parsed = contract.canonical_body(redacted)  # parsed once: envelope and model name
    envelope = contract.http_envelope(request.method, request.path, request.query, request.headers, redacted,
                                      parsed_body=parsed)
    return _Captured(redacted, contract.envelope_hash(envelope), contract.model_of(parsed))


class _Capturer:
    """One background thread capturing large request bodies in submission order (a step's `_recent` entry is
    put there, in the order the steps started); started on first use, forgotten in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: set[Future[_Captured]] = set()

    def submit(self, request: _Request, group: tuple[str, int, int]) -> Future[_Captured] | None:
        """The future capture of `request`, its hash remembered for retries under `group`; None when the
        thread cannot take it (the interpreter is exiting): then the caller captures it itself."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=_CAPTURE_THREAD)
            try:
                future = self._pool.submit(_capture_and_remember, request, group)
            except RuntimeError:
                return None
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[_Captured]) -> None:
        with self._lock:
            self._pending.discard(future)

    def wait(self) -> None:
        """Return once every capture submitted so far is done (and its hash in `_recent`)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - reported on the attempt's own span
                pass

    @staticmethod
    def on_own_thread() -> bool:
        """Whether this is the capture thread (a garbage-collected attempt may end there: it must not wait)."""
        return threading.current_thread().name.startswith(_CAPTURE_THREAD)

    def forget(self) -> None:
        """In a forked child: the parent's thread does not exist here."""
        self._lock = threading.Lock()
        self._pool = None
        self._pending = set()


def _capture_and_remember(request: _Request, group: tuple[str, int, int]) -> _Captured:
    captured = _capture(request)
    _recent.put(captured.envelope_hash, group, 0)  # only first attempts are captured here
    return captured


_capturer = _Capturer()
os.register_at_fork(after_in_child=_capturer.forget)


def error_type(exc: BaseException) -> str:
    """`error.type` of an exception: its fully qualified class name (builtins without module)."""
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _describe(exc: BaseException) -> str:
    return redaction.redact_text(f"{type(exc).__name__}: {exc}")


def _inside_anthropic_call_span() -> bool:
    """Whether the current span is the anthropic SDK's own call span (then ours must not be another `chat`)."""
    span = trace.get_current_span()
    scope = getattr(span, "instrumentation_scope", None)
    if scope is not None and str(getattr(scope, "name", "")).startswith(ANTHROPIC_SCOPE_PREFIX):
        return True
    name = getattr(span, "name", None)
    return isinstance(name, str) and name.startswith("anthropic.")


def _drop_secret_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """`redaction.drop_secret_headers` with one redaction scan over all values instead of one per header."""
    secret = redaction.is_secret_header
    pairs = []
    for name, value in headers:
        name = name.lower()
        if not secret(name):
            pairs.append((name, value))
    joined = "\n".join([v for _, v in pairs])
    if redaction.redact_text(joined) is joined:  # nothing to mask (the common case)
        return pairs
    return [(n, redaction.redact_text(v)) for n, v in pairs]


def _retry_count(headers: list[tuple[str, str]]) -> int:
    for name, value in headers:
        if name == RETRY_COUNT_HEADER:
            try:
                return max(int(value), 0)
            except ValueError:
                return 0
    return 0


class HttpAttempt:
    """One attempt of an HTTP/model step: owns its span from `start_http_attempt` until `finish`.

    Read-only facts for other hooks: `span`, `step_id`, `attempt`, `step_kind`, `envelope_hash`,
    `provider`, `model`.
    """

    __slots__ = (
        "span",
        "step_id",
        "attempt",
        "step_kind",
        "_capture",
        "_named_by_model",
        "provider",
        "_t0",
        "_chunks",
        "_times",
        "_status",
        "_response_attrs",
        "_encoding",
        "_streamed",
        "_once",
        "_recording_error",
        "__weakref__",
    )

    def __init__(
        self,
        span: Span,
        *,
        step_id: str,
        attempt: int,
        step_kind: str,
        capture: _Captured | Future[_Captured],
        named_by_model: bool,
        provider: str | None,
        t0: int,
    ) -> None:
        self.span = span
        self.step_id = step_id
        self.attempt = attempt
        self.step_kind = step_kind
        self._capture = capture
        self._named_by_model = named_by_model
        self.provider = provider
        self._t0 = t0
        self._chunks: list[bytes] = []
        self._times: list[int] = []
        self._status: int | None = None
        self._response_attrs: dict[str, Any] = {}
        self._encoding = ""
        self._streamed = False
        self._once = threading.Lock()
        self._recording_error: str | None = None

    def _captured(self) -> _Captured:
        """The captured request (waits for the capture thread when it is captured there)."""
        value = self._capture
        if isinstance(value, _Captured):
            return value
        if not value.done() and _capturer.on_own_thread():
            raise RuntimeError("the request is not captured yet")  # waiting here would never end
        return value.result()

    @property
    def envelope_hash(self) -> str:
        """The request's envelope hash."""
        return self._captured().envelope_hash

    @property
    def model(self) -> str | None:
        """The model the request names, if any."""
        return self._captured().model

    def _capture_attributes(self, attrs: dict[str, Any]) -> None:
        """The request's attributes into `attrs` when it was captured on the capture thread (waiting for it),
        and the span's `chat {model}` name."""
        if isinstance(self._capture, _Captured):
            return
        try:
            captured = self._capture = self._captured()
        except Exception as exc:  # noqa: BLE001 - the span still ends, saying why it has no body or hash
            self.recording_error(exc)
            return
        attrs[contract.REQUEST_BODY] = captured.body
        attrs[contract.ENVELOPE_HASH] = captured.envelope_hash
        if captured.model is not None:
            attrs[contract.GEN_AI_REQUEST_MODEL] = captured.model
            if self._named_by_model:
                self.span.update_name(contract.step_span_name(self.step_kind, model=captured.model))

    # --- driven by the hooks ----------------------------------------------------------------------------

    def response_started(self, status: int, headers: Iterable[tuple[str, str]], content_encoding: str) -> None:
        """The response head: status, headers (credentials dropped) and the body's content encoding."""
        try:
            kept = _drop_secret_headers(headers)
            kept = self._link_replayed_from(kept)
            content_type = ""
            for name, value in kept:
                if name == "content-type":
                    content_type = value
                    break
            self._status = int(status)
            self._encoding = (content_encoding or "").strip().lower()
            if self._encoding == "identity":
                self._encoding = ""
            self._streamed = content_type.lower().startswith("text/event-stream")
            self._response_attrs = {
                contract.RESPONSE_STATUS: self._status,
                contract.RESPONSE_HEADERS: contract.encode_headers(kept),
                contract.RESPONSE_CONTENT_ENCODING: self._encoding,
                contract.RESPONSE_STREAMED: self._streamed,
            }
        except Exception as exc:  # the recorder never breaks the call
            self.recording_error(exc)

    def _link_replayed_from(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Link this attempt to the recorded attempt a replayer served it from; the headers without that header."""
        rest = [(n, v) for n, v in headers if n != contract.REPLAYED_FROM_HEADER]
        if len(rest) == len(headers):
            return headers
        ids = contract.parse_replayed_from(next(v for n, v in headers if n == contract.REPLAYED_FROM_HEADER))
        if ids is not None:
            original = SpanContext(trace_id=ids[0], span_id=ids[1], is_remote=True,
                                   trace_flags=TraceFlags(TraceFlags.SAMPLED))
            self.span.add_link(original, {contract.LINK_KIND: contract.LINK_REPLAY_OF})
        return rest

    def chunk(self, data: bytes) -> None:
        """One chunk of the response body as read from the wire (hot path: no work beyond two appends)."""
        self._chunks.append(data)
        self._times.append(time.monotonic_ns())

    def failed(self, exc: BaseException) -> None:
        """The transport raised before any response: end the attempt as an error."""
        self.finish(contract.END_ERROR, exc)

    def recording_error(self, exc: BaseException | str) -> None:
        """Note that the recorder itself failed for this attempt; the span still ends normally."""
        message = exc if isinstance(exc, str) else _describe(exc)
        self._recording_error = message if self._recording_error is None else self._recording_error
        try:
            self.span.set_attribute(contract.RECORDING_ERROR, message)
        except Exception:
            pass

    @property
    def finished(self) -> bool:
        return self._once.locked()

    @property
    def bytes_read(self) -> int:
        return sum(len(c) for c in self._chunks)

    def finish(self, end_reason: str, error: BaseException | None = None) -> None:
        """End the attempt: the first call ends the span, later calls do nothing (thread-safe)."""
        if not self._once.acquire(blocking=False):
            return
        span = self.span
        try:
            attrs = self._response_attrs
            self._capture_attributes(attrs)
            chunks, times = self._chunks, self._times
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if not self._encoding:
                body = redaction.redact_body(body)
            else:
                body, encoding = redaction.redact_encoded(body, self._encoding)
                if encoding != self._encoding:  # stored decoded to mask a secret: one identity chunk
                    attrs[contract.RESPONSE_CONTENT_ENCODING] = encoding
                    chunks, times = [body], times[-1:]
            attrs[contract.RESPONSE_BODY] = bytes(body)
            attrs[contract.RESPONSE_BYTES_READ] = len(body)
            attrs[contract.STREAM_END_REASON] = end_reason
            if self._streamed:
                ends: list[int] = []
                total = 0
                for c in chunks:
                    total += len(c)
                    ends.append(total)
                t0 = self._t0
                attrs[contract.RESPONSE_CHUNK_ENDS] = ends
                attrs[contract.RESPONSE_CHUNK_TIMES_US] = [(t - t0) // 1000 for t in times]
            if error is not None:
                message = redaction.redact_text(str(error))
                attrs[contract.ERROR_TYPE] = error_type(error)
                attrs[contract.ERROR_MESSAGE] = message
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {message}"))
            elif self._status is not None and self._status >= 400:
                attrs[contract.ERROR_TYPE] = str(self._status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attrs)
        except Exception as exc:
            self.recording_error(exc)
        finally:
            self._chunks = []
            self._times = []
            try:
                span.end()
            except Exception:
                pass


def start_http_attempt(
    *,
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | None,
) -> HttpAttempt | None:
    """Start the span of one HTTP attempt; None when this process is not recording right now.

    `headers` are the request's headers as sent (str pairs, any case); `body` the exact request bytes.
    Never raises: if the recorder fails, a bare span with `RECORDING_ERROR` is returned, or None when even
    that is impossible.
    """
    ctx = runtime.recording()
    if ctx is None:
        return None
    t0 = time.monotonic_ns()
    try:
        return _start(ctx, method, url, headers, body or b"", t0)
    except Exception as exc:
        return _start_broken(ctx, method, exc, t0)


def _start(
    ctx: runtime.RunContext,
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    t0: int,
) -> HttpAttempt:
    method = method.upper()
    parts = urlsplit(url)
    path = contract.normalize_path(ctx.upstream_path(parts.path))
    kept = _drop_secret_headers(headers)
    provider = contract.detect_provider(parts.hostname or "", kept)
    kind = contract.STEP_KIND_MODEL if provider and contract.is_model_path(path) else contract.STEP_KIND_HTTP
    started_ns = time.time_ns()
    retry = _retry_count(kept)
    request = _Request(method, path, parts.query, kept, bytes(body))
    capture, (step_id, step_started_ns, step_index) = _step_of(request, retry, started_ns)

    attrs: dict[str, Any] = {
        contract.RUN_ID: ctx.run_id,
        contract.TENANT: ctx.tenant,
        contract.SCOPE: ctx.scope,
        contract.SPAN_KIND: contract.SPAN_KIND_STEP,
        contract.STEP_ID: step_id,
        contract.STEP_STARTED_NS: step_started_ns,
        contract.STEP_INDEX: step_index,
        contract.STEP_KIND: kind,
        contract.STEP_ATTEMPT: retry,
        contract.ENVELOPE_PROFILE: contract.CANON_PROFILE,
        contract.REQUEST_METHOD: method,
        contract.REQUEST_URL: redaction.redact_text(redaction.without_userinfo(url)),
        contract.REQUEST_HEADERS: contract.encode_headers(kept),
    }
    model = None
    if isinstance(capture, _Captured):  # else set in `finish`, from the capture thread
        model = capture.model
        attrs[contract.REQUEST_BODY] = capture.body
        attrs[contract.ENVELOPE_HASH] = capture.envelope_hash
    attrs.update(contract.genai_request_attributes(kind, provider, model))

    named_by_model = kind == contract.STEP_KIND_MODEL and not _inside_anthropic_call_span()
    if named_by_model:
        name = contract.step_span_name(kind, model=model)
    else:
        name = contract.step_span_name(contract.STEP_KIND_HTTP, method=method, path=redaction.redact_text(path))
    span = runtime.tracer().start_span(name, kind=SpanKind.CLIENT, attributes=attrs, start_time=started_ns)
    return HttpAttempt(
        span,
        step_id=step_id,
        attempt=retry,
        step_kind=kind,
        capture=capture,
        named_by_model=named_by_model,
        provider=provider,
        t0=t0,
    )


def _step_of(
    request: _Request, retry: int, started_ns: int
) -> tuple[_Captured | Future[_Captured], tuple[str, int, int]]:
    """The captured request (or its future, for a large body captured on the capture thread) and the step the
    attempt belongs to, `(step id, started ns, index)`. A retry N joins the latest step with the same envelope
    whose attempt N is not taken yet (concurrent identical calls retried at once each keep their own); any
    other attempt starts a new step, remembered for its retries."""
    captured: _Captured | None = None
    if retry > 0:
        _capturer.wait()  # the attempt it retries may still be being captured
        captured = _capture(request)
        group = _recent.claim(captured.envelope_hash, retry)
        if group is not None:
            return captured, group
    group = (ids.new_step_id(), started_ns, runtime.next_step_index())
    if captured is None:
        if len(request.body) >= CAPTURE_ELSEWHERE_FROM:
            future = _capturer.submit(request, group)  # puts the step in `_recent` once captured
            if future is not None:
                return future, group
        captured = _capture(request)
    _recent.put(captured.envelope_hash, group, retry)
    return captured, group


def _start_broken(ctx: runtime.RunContext, method: str, exc: Exception, t0: int) -> HttpAttempt | None:
    """A minimal span saying the recorder failed, so the step is not silently missing."""
    try:
        attrs: dict[str, Any] = {
            contract.RUN_ID: ctx.run_id,
            contract.TENANT: ctx.tenant,
            contract.SCOPE: ctx.scope,
            contract.SPAN_KIND: contract.SPAN_KIND_STEP,
            contract.STEP_ID: ids.new_step_id(),
            contract.STEP_STARTED_NS: time.time_ns(),
            contract.STEP_INDEX: runtime.next_step_index(),
            contract.STEP_KIND: contract.STEP_KIND_HTTP,
            contract.STEP_ATTEMPT: 0,
            contract.RECORDING_ERROR: _describe(exc),
        }
        span = runtime.tracer().start_span(
            contract.step_span_name(contract.STEP_KIND_HTTP, method=str(method).upper()),
            kind=SpanKind.CLIENT,
            attributes=attrs,
        )
        attempt = HttpAttempt(
            span,
            step_id=attrs[contract.STEP_ID],
            attempt=0,
            step_kind=contract.STEP_KIND_HTTP,
            capture=_Captured(b"", "", None),
            named_by_model=False,
            provider=None,
            t0=t0,
        )
        attempt._recording_error = attrs[contract.RECORDING_ERROR]
        return attempt
    except Exception:
        return None
