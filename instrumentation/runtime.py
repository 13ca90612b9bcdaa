"""The recording process's state: which run it records into, and the tracer that records it.

Hooks (HTTP transports, tools, MCP) ask `recording()` before doing anything: it is None when tracetape is
not active in this process, or when instrumentation is suppressed in the current context (the OTel SDK
suppresses it while exporting, so the exporter's own traffic is never recorded). `activate` is called
once, by the instrumentor, after the tracer provider is set up.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Tracer

MODE_RECORD = "record"
MODE_REPLAY = "replay"


@dataclass(frozen=True)
class RunContext:
    """What every span of this process is recorded under."""

    run_id: str
    tenant: str
    scope: str
    mode: str = MODE_RECORD
    http_hosts: frozenset[str] = field(default_factory=frozenset)
    """Hosts (`host` or `host:port`) whose plain `requests`/`aiohttp` traffic is recorded as HTTP steps."""
    replay_url: str = ""
    """In replay mode: the replay session's base URL (tools are answered from it)."""
    allow_mutations: frozenset[str] = field(default_factory=frozenset)
    upstream_paths: tuple[tuple[str, str], ...] = ()
    """In replay mode: (proxy path prefix, upstream base path) pairs, e.g. (`/s/SID/openai`, `/v1`)."""

    def upstream_path(self, path: str) -> str:
        """The path a request through the replay proxy stands for upstream (unchanged when not proxied).

        An SDK pointed at `.../s/SID/openai` sends `/s/SID/openai/chat/completions`; recorded as-is its
        envelope would differ from the original's `/v1/chat/completions`."""
        for prefix, base in self.upstream_paths:
            if path == prefix or path.startswith(prefix + "/"):
                return base + path[len(prefix):]
        return path


@dataclass
class _State:
    context: RunContext | None = None
    tracer: Tracer | None = None
    step_counter: itertools.count[int] = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()


def activate(context: RunContext, tracer: Tracer) -> None:
    """Make this process record into `context` with `tracer`."""
    _state.context = context
    _state.tracer = tracer
    _state.step_counter = itertools.count()


def deactivate() -> None:
    _state.context = None
    _state.tracer = None


def current() -> RunContext | None:
    """The active run, whether or not recording is suppressed right now."""
    return _state.context


def recording() -> RunContext | None:
    """The active run when this call should be recorded, else None."""
    ctx = _state.context
    if ctx is None or not is_instrumentation_enabled():
        return None
    return ctx


def tracer() -> Tracer:
    """tracetape's tracer; only valid while a run is active."""
    if _state.tracer is None:
        raise RuntimeError("tracetape is not active in this process")
    return _state.tracer


def next_step_index() -> int:
    """This process's next call number (0, 1, ...); thread-safe."""
    with _state.lock:
        return next(_state.step_counter)
