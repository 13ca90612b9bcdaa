"""`TracetapeInstrumentor`: turns recording on in this process (the `opentelemetry_instrumentor` entry point
`tracetape_recorder`, also called by tracetape's bootstrap `sitecustomize`).

`instrument()` is idempotent and never raises into the application. Unless `TRACETAPE_DISABLED` is set, or
the process is the `tracetape` command itself (e.g. `opentelemetry-instrument tracetape run -- ...`), it:
1. reads `RecorderConfig` from the environment (an invalid value: one warning on stderr, nothing else);
2. builds tracetape's provider and registers it (`provider.register`: global when none is set);
3. joins the run: with `TRACETAPE_RUN_SPAN=external` (the `tracetape run` wrapper owns the run span) it
   parents its spans under `TRACEPARENT`; otherwise it owns the run: exports `tracetape.run.start` at once,
   starts the run span `invoke_agent {agent}`, and exports variables (`TRACETAPE_RUN_ID`, ...,
   `TRACETAPE_RUN_SPAN=external`, `TRACEPARENT`) into `os.environ` so instrumented subprocesses join the
   same run. The run's context is attached in the main thread, and is the default parent of tracetape's
   own spans in every other thread;
4. `runtime.activate(...)`, then `instrument()` on each hook module that imports
   (`HOOK_MODULES`; one that is missing is skipped, one that fails is reported once on stderr);
5. flushes at exit and on SIGTERM (`provider.install_exit_handlers`).

When it owns the run, the run span ends at interpreter exit with (`RUN_OUTCOME`, `RUN_EXIT_CODE`):
completed/0; failed/1 on an uncaught exception (seen through `sys.excepthook`, chained); failed/N on
`sys.exit(N)` / `exit(N)` (N & 0xFF, as the OS reports it; `raise SystemExit(N)` without `sys.exit` is not
seen and counts as 0); cancelled/-2 on an uncaught KeyboardInterrupt; cancelled/-15 on SIGTERM. A process
ended by `os._exit` or SIGKILL never ends its run span (the collector keeps the run as incomplete).

The run belongs to the process that started it. A forked child (`os.fork()`, a `multiprocessing` worker
started by fork) inherits the session, its exit tracking and its SIGTERM handler, but never ends the run:
its exit, or a SIGTERM (`Pool.terminate()`), only flushes the child's own spans, and the child then exits
or dies by the signal as it would without tracetape. (`ids` reseeds its generator in such a child for the
same reason: what the parent owns is not the child's.)
"""

from __future__ import annotations

import builtins
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from tracetape.instrumentation import contract, provider, runspan, runtime
from tracetape.instrumentation.config import ENV_RUN_SPAN, RUN_SPAN_EXTERNAL, ConfigError, RecorderConfig

HOOK_MODULES: tuple[str, ...] = (
    "tracetape.instrumentation.httpx_hook",
    "tracetape.instrumentation.requests_hook",
    "tracetape.instrumentation.aiohttp_hook",
    "tracetape.instrumentation.mcp_hook",
)


def _warn(message: str) -> None:
    print(f"tracetape: {message}", file=sys.stderr, flush=True)


class _ExitTracker:
    """Learns how the process is ending: `sys.exit` code, uncaught exception, SIGTERM."""

    def __init__(self) -> None:
        self.outcome: str | None = None
        self.exit_code: int | None = None
        self.cancel_requested = False
        self._previous_excepthook: Callable[..., Any] | None = None
        self._previous_exit: Callable[..., Any] | None = None

    def install(self) -> None:
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self._previous_exit = sys.exit
        sys.exit = self._sys_exit  # type: ignore[assignment]
        for name in ("exit", "quit"):
            original = getattr(builtins, name, None)
            if original is not None and callable(original):
                setattr(builtins, name, _ExitProxy(original, self.note_exit))

    def uninstall(self) -> None:
        if sys.excepthook == self._excepthook and self._previous_excepthook is not None:
            sys.excepthook = self._previous_excepthook
        if sys.exit == self._sys_exit and self._previous_exit is not None:
            sys.exit = self._previous_exit  # type: ignore[assignment]
        for name in ("exit", "quit"):
            proxy = getattr(builtins, name, None)
            if isinstance(proxy, _ExitProxy):
                setattr(builtins, name, proxy.original)

    def note_exit(self, status: object = None) -> None:
        code = _exit_status(status)
        self.outcome = contract.OUTCOME_COMPLETED if code == 0 else contract.OUTCOME_FAILED
        self.exit_code = code

    def _sys_exit(self, status: object = None) -> Any:
        self.note_exit(status)
        assert self._previous_exit is not None
        return self._previous_exit(status)

    def _excepthook(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> Any:
        if issubclass(exc_type, KeyboardInterrupt):
            self.outcome, self.exit_code = contract.OUTCOME_CANCELLED, -2
        else:
            self.outcome, self.exit_code = contract.OUTCOME_FAILED, 1
        hook = self._previous_excepthook or sys.__excepthook__
        return hook(exc_type, exc, tb)

    def result(self) -> tuple[str, int]:
        outcome = self.outcome or contract.OUTCOME_COMPLETED
        code = 0 if self.exit_code is None else self.exit_code
        if self.cancel_requested and outcome != contract.OUTCOME_COMPLETED:
            outcome = contract.OUTCOME_CANCELLED
        return outcome, code


class _ExitProxy:
    """Stands in for the `exit`/`quit` builtins, noting the status before calling the original."""

    def __init__(self, original: Callable[..., Any], note: Callable[[object], None]) -> None:
        self.original = original
        self._note = note

    def __call__(self, code: object = None) -> Any:
        self._note(code)
        return self.original(code)

    def __repr__(self) -> str:
        return repr(self.original)


def _exit_status(status: object) -> int:
    if status is None:
        return 0
    if isinstance(status, int):
        return status & 0xFF
    return 1


class _Session:
    """The process's recording session: provider, run span (when owned), exit tracking."""

    def __init__(self, config: RecorderConfig) -> None:
        self.config = config
        self.owner_pid = os.getpid()  # a forked child inherits the session but not the run
        agent = config.agent_name or runspan.agent_name_from_command(getattr(sys, "orig_argv", sys.argv))
        self.recorder = provider.build_recorder(config, service_name=agent)
        provider.register(self.recorder, config)
        self.run_span: trace.Span | None = None
        self.tracker: _ExitTracker | None = None
        self._lock = threading.Lock()

        if config.run_span_external:
            parent = runspan.context_from_env(os.environ)
        else:
            command = list(getattr(sys, "orig_argv", sys.argv))
            self.run_span = runspan.start_run(self.recorder.tracer, agent=agent, command=command)
            self.recorder.flush()
            parent = provider.current_context_with(self.run_span)
            os.environ.update(self._child_env())
        self.recorder.set_default_parent(parent)
        if parent is not None and threading.current_thread() is threading.main_thread():
            context_api.attach(parent)
        runtime.activate(config.run_context(), self.recorder.tracer)

        if self.run_span is not None:
            self.tracker = _ExitTracker()
            self.tracker.install()
            provider.install_exit_handlers(
                self.recorder, before_exit=self.end_run_at_exit, on_terminate=self.on_terminate
            )
        else:
            provider.install_exit_handlers(self.recorder)

    def _child_env(self) -> dict[str, str]:
        assert self.run_span is not None
        env = self.config.to_env()
        env[ENV_RUN_SPAN] = RUN_SPAN_EXTERNAL
        env.update(runspan.traceparent_env(self.run_span))
        os.environ.pop("TRACESTATE", None)
        return env

    @property
    def owns_run(self) -> bool:
        """Whether this process started the run span (False in a forked child, and when it is external)."""
        return self.run_span is not None and os.getpid() == self.owner_pid

    def end_run(self, outcome: str, exit_code: int, *, blocking: bool = True) -> None:
        """End the run span once, only in the process that started it. Non-blocking from a signal handler:
        if the main thread is already ending it, that ending stands."""
        if not self.owns_run:
            return  # a forked child: the parent's run is not its to end (nor its lock, copied mid-use maybe)
        if not self._lock.acquire(blocking=blocking):
            return
        try:
            if self.run_span is not None:
                runspan.end_run(self.run_span, outcome, exit_code)
        finally:
            self._lock.release()

    def end_run_at_exit(self) -> None:
        if self.tracker is not None and self.owns_run:
            self.end_run(*self.tracker.result())

    def on_terminate(self, will_die: bool) -> None:
        if not self.owns_run:
            return  # a forked child: the handler only flushes the child's spans, then the signal goes on
        if will_die:
            self.end_run(contract.OUTCOME_CANCELLED, -int(signal.SIGTERM), blocking=False)
        elif self.tracker is not None:
            self.tracker.cancel_requested = True


_session: _Session | None = None
_hooks: list[Any] = []


def session() -> _Session | None:
    """The process's recording session, when the instrumentor has started one."""
    return _session


class TracetapeInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Records this process into a tracetape run; see the module docstring."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def instrument(self, **kwargs: Any) -> Any:
        """Idempotent and quiet: a second call (several loaders) does nothing."""
        if self.is_instrumented_by_opentelemetry:
            return None
        return super().instrument(**kwargs)

    def _instrument(self, **kwargs: Any) -> None:
        global _session
        if _session is not None:  # instrumented again after `uninstrument()`
            runtime.activate(_session.config.run_context(), _session.recorder.tracer)
            _instrument_hooks()
            return
        try:
            config = RecorderConfig.from_env()
        except ConfigError as err:
            _warn(f"{err}; recording is off")
            return
        if config.disabled or _is_tracetape_cli():
            return
        try:
            _session = _Session(config)
        except Exception as err:  # noqa: BLE001 - the application must run even if recording cannot
            _warn(f"recording could not start ({type(err).__name__}: {err}); the program runs unrecorded")
            return
        _instrument_hooks()

    def _uninstrument(self, **kwargs: Any) -> None:
        """Remove the hooks and stop recording new steps; the run itself still ends at exit."""
        while _hooks:
            module = _hooks.pop()
            try:
                module.uninstrument()
            except Exception:  # noqa: BLE001
                pass
        if _session is not None and _session.tracker is not None:
            _session.tracker.uninstall()
        runtime.deactivate()


def _is_tracetape_cli() -> bool:
    """Whether this process is the `tracetape` command itself (its `run` records the run on its own)."""
    name = runspan.agent_name_from_command(getattr(sys, "orig_argv", sys.argv))
    return name in ("tracetape", "tracetape.cli")


def _instrument_hooks() -> None:
    for name in HOOK_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name or not (err.name or "").startswith("tracetape"):
                continue  # the hook, or the library it hooks, is not installed
            _warn(f"cannot load {name} ({err})")
            continue
        except Exception as err:  # noqa: BLE001
            _warn(f"cannot load {name} ({type(err).__name__}: {err})")
            continue
        try:
            module.instrument()
        except Exception as err:  # noqa: BLE001
            _warn(f"{name}.instrument() failed ({type(err).__name__}: {err})")
            continue
        _hooks.append(module)
