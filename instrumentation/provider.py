"""tracetape's tracer provider, and flushing it when the process ends.

`build_recorder` makes a `TracerProvider` (resource `service.name` = the given name, `OTEL_SERVICE_NAME`
winning; always-on sampling; no attribute length limit; span and trace ids from `ids.OwnIdGenerator`, which an
application seeding `random` cannot repeat) whose spans go through a `BatchSpanProcessor`
(queue 8192, schedule delay 500 ms) to the size-splitting OTLP/HTTP exporter, and whose first processor
stamps `RUN_ID`, `TENANT` and `SCOPE` on every span it starts (tracetape's own tracer starts its spans with them).

`register` decides where the application's own spans (the anthropic SDK's call spans, other
instrumentations) go:
- no global provider set yet: tracetape's provider becomes the global one;
- the application already set an SDK `TracerProvider`: tracetape's stays private (its payload-heavy step
  spans never reach the application's exporters); the application's provider gets the stamping processor
  and a second batch processor that also sends its spans to tracetape, so the run's trace is complete;
- any other provider: tracetape's stays private and the application's spans are not stamped.
Hooks always record through `Recorder.tracer`, which parents a span with no current parent under the
run (`Recorder.set_default_parent`), in whatever thread it starts.

`install_exit_handlers` flushes at interpreter exit (atexit) and on SIGTERM. The SIGTERM handler calls
`on_terminate(will_die)`, force-flushes, then chains to the previous Python handler, or, when the
previous disposition was the default, restores it and re-sends SIGTERM to the process so that the exit
status is the one it would have been. A process that ignored SIGTERM keeps ignoring it.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

from tracetape.instrumentation import contract
from tracetape.instrumentation.config import RecorderConfig
from tracetape.instrumentation.exporter import SizeSplittingExporter
from tracetape.instrumentation.ids import OwnIdGenerator

TRACER_NAME = "tracetape"
MAX_QUEUE_SIZE = 8192
SCHEDULE_DELAY_MS = 500
FLUSH_TIMEOUT_MS = 10_000


class RunAttributesProcessor(SpanProcessor):
    """Stamps fixed attributes (the run's id, tenant and scope) on every span when it starts.

    Spans of `stamped_scope` (tracetape's own `RunTracer`, which starts its spans with these attributes
    already in place) are left as they are: setting them again would change nothing."""

    def __init__(self, attributes: Mapping[str, str]) -> None:
        self._attributes = dict(attributes)
        self.stamped_scope: object | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.stamped_scope is not None and span.instrumentation_scope is self.stamped_scope:
            return
        span.set_attributes(self._attributes)

    def on_end(self, span: ReadableSpan) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class RunTracer(trace.Tracer):
    """A tracer whose spans, when nothing is current, are parented under the run's default parent, and which
    starts every span with `run_attributes` (over the same keys in `attributes`, as a stamping processor would
    set them)."""

    def __init__(self, inner: trace.Tracer, run_attributes: Mapping[str, str] | None = None) -> None:
        self._inner = inner
        self._run_attributes = dict(run_attributes or {})
        self.default_parent: Context | None = None

    def _context(self, context: Context | None) -> Context | None:
        if context is None and self.default_parent is not None:
            if not trace.get_current_span().get_span_context().is_valid:
                return self.default_parent
        return context

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        if self._run_attributes:
            attributes = {**attributes, **self._run_attributes} if attributes else self._run_attributes
        return self._inner.start_span(
            name,
            self._context(context),
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )

    @contextmanager  # type: ignore[override]
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class RecorderProvider(TracerProvider):
    """tracetape's provider. When it is the global one, an application calling
    `trace.get_tracer_provider().shutdown()` only flushes it: tracetape closes it itself, after the run
    span has ended."""

    def shutdown(self) -> None:
        self.force_flush()

    def close(self) -> None:
        """Flush and stop for good."""
        super().shutdown()


@dataclass
class Recorder:
    """The provider a process records with, its exporter, and the tracer hooks use."""

    provider: RecorderProvider
    exporter: SpanExporter
    tracer: RunTracer
    is_global: bool = False
    extra_exporters: list[SizeSplittingExporter] = field(default_factory=list)
    _main_thread_flushing: int = 0

    def set_default_parent(self, parent: Context | None) -> None:
        """Parent spans started with nothing current under `parent` (the run span's context)."""
        self.tracer.default_parent = parent

    def flush(self, timeout_millis: int = FLUSH_TIMEOUT_MS) -> bool:
        """Export everything ended so far; blocks until done."""
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            self._main_thread_flushing += 1
        try:
            return self.provider.force_flush(timeout_millis)
        finally:
            if in_main:
                self._main_thread_flushing -= 1

    @property
    def flushing_in_main_thread(self) -> bool:
        """True while the main thread is inside `flush` (a signal handler must not flush then)."""
        return self._main_thread_flushing > 0

    @property
    def collector_warned(self) -> bool:
        """Whether the unreachable-collector warning has been printed by this process (or its parent)."""
        return bool(getattr(self.exporter, "warned", False)) or any(e.warned for e in self.extra_exporters)

    def shutdown(self) -> None:
        """Flush and stop the provider; idempotent."""
        self.provider.close()


def build_recorder(
    config: RecorderConfig,
    *,
    service_name: str,
    exporter: SpanExporter | None = None,
) -> Recorder:
    """A provider exporting to `config.endpoint` (or to `exporter`), stamping the run's attributes on every
    span it starts."""
    name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
    resource = Resource.create({SERVICE_NAME: name})
    provider = RecorderProvider(
        sampler=ALWAYS_ON,
        resource=resource,
        id_generator=OwnIdGenerator(),
        shutdown_on_exit=False,
        span_limits=SpanLimits(max_attribute_length=SpanLimits.UNSET, max_span_attribute_length=SpanLimits.UNSET),
    )
    stamping = RunAttributesProcessor(run_attributes(config))
    provider.add_span_processor(stamping)
    exporter = exporter or SizeSplittingExporter.otlp_http(
        config.endpoint, max_bytes=config.max_export_bytes, warned=config.collector_warned,
        api_key=config.api_key or None,
    )
    provider.add_span_processor(_batch_processor(exporter))
    inner = provider.get_tracer(TRACER_NAME, _version())
    # The SDK tracer's scope (a private attribute; without it every span is stamped again, which is only slower).
    stamping.stamped_scope = getattr(inner, "_instrumentation_scope", None)
    tracer = RunTracer(inner, run_attributes(config))
    return Recorder(provider=provider, exporter=exporter, tracer=tracer)


def run_attributes(config: RecorderConfig) -> dict[str, str]:
    """The attributes every span of the run carries."""
    return {contract.RUN_ID: config.run_id, contract.TENANT: config.tenant, contract.SCOPE: config.scope}


def register(recorder: Recorder, config: RecorderConfig) -> None:
    """Make tracetape's provider the global one, or hook into the application's; see the module doc."""
    current = trace.get_tracer_provider()
    if isinstance(current, trace.ProxyTracerProvider):
        trace.set_tracer_provider(recorder.provider)
        recorder.is_global = trace.get_tracer_provider() is recorder.provider
        return
    if isinstance(current, TracerProvider) and current is not recorder.provider:
        current.add_span_processor(RunAttributesProcessor(run_attributes(config)))
        forward = SizeSplittingExporter.otlp_http(
            config.endpoint, max_bytes=config.max_export_bytes, warned=True, api_key=config.api_key or None
        )
        current.add_span_processor(_batch_processor(forward))
        recorder.extra_exporters.append(forward)


def _batch_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    return BatchSpanProcessor(exporter, max_queue_size=MAX_QUEUE_SIZE, schedule_delay_millis=SCHEDULE_DELAY_MS)


def _version() -> str:
    try:
        from tracetape import __version__

        return __version__
    except ImportError:  # pragma: no cover - the package is always importable with its version
        return ""


_Handler = Callable[[int, FrameType | None], Any] | int | None


def install_exit_handlers(
    recorder: Recorder,
    *,
    before_exit: Callable[[], None] | None = None,
    on_terminate: Callable[[bool], None] | None = None,
    signals: Sequence[int] = (signal.SIGTERM,),
) -> None:
    """Flush at exit and on SIGTERM (see the module doc).

    `before_exit` runs at interpreter exit before the provider shuts down (it ends the run span).
    `on_terminate(will_die)` runs first in the SIGTERM handler; `will_die` is True when the signal's
    default action (terminate) follows. Signal handlers are only installed from the main thread.
    """

    def at_exit() -> None:
        if before_exit is not None:
            try:
                before_exit()
            except Exception:  # noqa: BLE001 - exiting; the flush below matters more
                pass
        recorder.shutdown()

    atexit.register(at_exit)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signals:
        previous: _Handler = signal.getsignal(signum)
        if previous is signal.SIG_IGN or previous is None:
            continue
        try:
            signal.signal(signum, _make_handler(recorder, previous, on_terminate))
        except (ValueError, OSError):
            continue


def _make_handler(
    recorder: Recorder, previous: _Handler, on_terminate: Callable[[bool], None] | None
) -> Callable[[int, FrameType | None], Any]:
    def handler(signum: int, frame: FrameType | None) -> Any:
        will_die = previous is signal.SIG_DFL
        if on_terminate is not None:
            try:
                on_terminate(will_die)
            except Exception:  # noqa: BLE001 - never turn a termination into a traceback
                pass
        if not recorder.flushing_in_main_thread:
            try:
                recorder.flush()
            except Exception:  # noqa: BLE001
                pass
        if callable(previous):
            return previous(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        raise SystemExit(128 + signum)  # only reached if the signal is blocked

    return handler


def current_context_with(span: trace.Span) -> Context:
    """A context whose current span is `span` (a parent for spans in other threads)."""
    return trace.set_span_in_context(span, context_api.Context())
