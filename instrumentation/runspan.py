"""The run's own spans: the run span, the `run_start` marker, their outcome, and passing the run to a child.

- `start_run` starts the run span `invoke_agent {agent}` as a root span (`SPAN_KIND` = `run`,
  `GEN_AI_OPERATION_NAME` = `invoke_agent`, `GEN_AI_AGENT_NAME`, `RUN_COMMAND`, `RUN_CANON_PROFILE`) and
  ends, at the same instant, its child `tracetape.run.start` (`SPAN_KIND` = `run_start`, same
  attributes but the operation name). The caller force-flushes so the start is exported at once.
- `end_run` sets `RUN_OUTCOME` and `RUN_EXIT_CODE` (status ERROR when failed) and ends the run span.
- `outcome_for_status` maps a child's wait status to (outcome, exit code): 0 → completed; N > 0 →
  failed (cancelled when the run was asked to stop, i.e. a SIGINT/SIGTERM was passed on); killed by
  signal N (`-N`) → cancelled for SIGINT/SIGTERM, failed otherwise. The exit code is kept as `-N`.
- `agent_name_from_command` / `python_command` read a command line (the agent's name; the options a
  Python command gives its interpreter).
- `traceparent_env` / `context_from_env` carry the run span to a child process as `TRACEPARENT`
  (W3C trace context) in its environment.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tracetape.instrumentation import contract, redaction

RUN_START_SPAN_NAME = "tracetape.run.start"
OPERATION_INVOKE_AGENT = "invoke_agent"
CANCEL_SIGNALS = frozenset({int(signal.SIGINT), int(signal.SIGTERM)})

_PYTHON = re.compile(r"(python|pypy)[0-9.]*[a-z]?(\.exe)?", re.IGNORECASE)
_LAUNCHERS = frozenset({"opentelemetry-instrument", "env", "nohup", "time", "exec"})
_PY_OPTS_WITH_VALUE = frozenset({"-W", "-X", "-Q"})
_PY_LONG_OPTS_WITH_VALUE = frozenset({"--check-hash-based-pycs"})
_propagator = TraceContextTextMapPropagator()


def agent_name_from_command(argv: Sequence[str]) -> str:
    """The agent's name as the command shows it: the script's stem, the `-m` module, or the program name.

    `python agent.py` → `agent`; `python -m pkg.main` → `pkg.main`; `opentelemetry-instrument python
    x.py` → `x`; `./my-agent --flag` → `my-agent`; `python -c ...` → `python`.
    """
    args = [a for a in argv if a]
    i = _program_index(args)
    if i is None:
        return "agent"
    py = _parse_python(args, i)
    if py is None:
        return _stem(os.path.basename(args[i]))
    if py.module:
        return py.module
    if py.script and py.script != "-":
        return _stem(os.path.basename(py.script))
    return _stem(py.interpreter)


@dataclass(frozen=True)
class PythonCommand:
    """What a command line asks of the Python interpreter it runs (see `python_command`)."""

    interpreter: str  # the program's base name, e.g. `python3.11`
    flags: frozenset[str] = frozenset()  # its one-letter options that take no value, e.g. {"I", "u"}
    module: str | None = None  # `-m MODULE`
    code: bool = False  # `-c CODE`
    script: str | None = None  # the script's path (`-` for stdin)


def python_command(argv: Sequence[str]) -> PythonCommand | None:
    """The interpreter's options when `argv` runs Python (after launchers such as `env VAR=x`), else None.

    Options are read as Python reads them: combined (`-IE`, `-Im pkg`, `-Wignore`), `-W`/`-X` taking the
    rest of their argument or the next one, up to the script, `-m`, `-c`, `-` or `--`."""
    args = [a for a in argv if a]
    i = _program_index(args)
    return None if i is None else _parse_python(args, i)


def _program_index(args: Sequence[str]) -> int | None:
    """The index of the program `args` runs, past launchers and `VAR=value` words."""
    for i, arg in enumerate(args):
        if os.path.basename(arg) in _LAUNCHERS or "=" in arg:
            continue
        return i
    return None


def _parse_python(args: Sequence[str], i: int) -> PythonCommand | None:
    base = os.path.basename(args[i])
    if not _PYTHON.fullmatch(base):
        return None
    flags: set[str] = set()

    def done(**found: Any) -> PythonCommand:
        return PythonCommand(interpreter=base, flags=frozenset(flags), **found)

    j = i + 1
    while j < len(args):
        arg = args[j]
        if arg == "--":
            return done(script=args[j + 1] if j + 1 < len(args) else None)
        if arg == "-" or not arg.startswith("-"):
            return done(script=arg)
        if arg.startswith("--"):  # --help, --version, --check-hash-based-pycs MODE
            j += 2 if arg in _PY_LONG_OPTS_WITH_VALUE else 1
            continue
        for k in range(1, len(arg)):
            letter = arg[k]
            if letter in ("c", "m"):
                value = arg[k + 1 :] or (args[j + 1] if j + 1 < len(args) else None)
                if letter == "c":
                    return done(code=True)
                return done(module=value)
            if "-" + letter in _PY_OPTS_WITH_VALUE:
                if k + 1 == len(arg):
                    j += 1  # the value is the next argument
                break
            flags.add(letter)
        j += 1
    return done()


def _stem(name: str) -> str:
    for suffix in (".py", ".pyw", ".exe"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name or "agent"


def run_span_name(agent: str) -> str:
    return f"{OPERATION_INVOKE_AGENT} {agent}"


REPLAY_ENV = {
    "TRACETAPE_REPLAY_OF": contract.RUN_REPLAY_OF,
    "TRACETAPE_REPLAY_MODE": contract.RUN_REPLAY_MODE,
    "TRACETAPE_REPLAY_FORCED": contract.RUN_REPLAY_FORCED,
    "TRACETAPE_LINEAGE_DEPTH": contract.RUN_LINEAGE_DEPTH,
}
"""Environment variables `tracetape replay` sets, and the run-span attribute each becomes."""


def replay_lineage(environ: Mapping[str, str]) -> dict[str, Any]:
    """The run-span attributes that mark a replay run; an original recording has only its lineage depth, 0."""
    out: dict[str, Any] = {contract.RUN_LINEAGE_DEPTH: 0}
    for name, attribute in REPLAY_ENV.items():
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if attribute == contract.RUN_REPLAY_FORCED:
            out[attribute] = raw.lower() in ("1", "true", "yes")
        elif attribute == contract.RUN_LINEAGE_DEPTH:
            out[attribute] = int(raw) if raw.isdigit() else 0
        else:
            out[attribute] = raw
    return out


def start_run(
    tracer: trace.Tracer, *, agent: str, command: Sequence[str], environ: Mapping[str, str] | None = None
) -> trace.Span:
    """Start the run span (a root) and export-queue the zero-length `run_start` span under it.

    A replay run (`tracetape replay` sets `REPLAY_ENV`) also carries its lineage on both spans.
    """
    now = time.time_ns()
    common = {
        contract.GEN_AI_AGENT_NAME: agent,
        contract.RUN_COMMAND: [redaction.redact_text(str(a)) for a in command],  # `--api-key sk-...` happens
        contract.RUN_CANON_PROFILE: contract.CANON_PROFILE,
        **replay_lineage(os.environ if environ is None else environ),
    }
    run = tracer.start_span(
        run_span_name(agent),
        context=Context(),
        kind=SpanKind.INTERNAL,
        attributes={
            **common,
            contract.SPAN_KIND: contract.SPAN_KIND_RUN,
            contract.GEN_AI_OPERATION_NAME: OPERATION_INVOKE_AGENT,
        },
        start_time=now,
    )
    marker = tracer.start_span(
        RUN_START_SPAN_NAME,
        context=trace.set_span_in_context(run, Context()),
        kind=SpanKind.INTERNAL,
        attributes={**common, contract.SPAN_KIND: contract.SPAN_KIND_RUN_START},
        start_time=now,
    )
    marker.end(end_time=now)
    return run


def end_run(span: trace.Span, outcome: str, exit_code: int) -> None:
    """Record the outcome on the run span and end it (no-op when it has already ended)."""
    if not span.is_recording():
        return
    span.set_attributes({contract.RUN_OUTCOME: outcome, contract.RUN_EXIT_CODE: int(exit_code)})
    if outcome == contract.OUTCOME_FAILED:
        span.set_status(Status(StatusCode.ERROR, f"exit status {exit_code}"))
    span.end()


def outcome_for_status(returncode: int, *, cancel_requested: bool = False) -> tuple[str, int]:
    """(outcome, exit code) for a child's `returncode` (negative = killed by that signal); see module doc."""
    if returncode == 0:
        return contract.OUTCOME_COMPLETED, 0
    if returncode < 0:
        cancelled = -returncode in CANCEL_SIGNALS
        return (contract.OUTCOME_CANCELLED if cancelled else contract.OUTCOME_FAILED), returncode
    return (contract.OUTCOME_CANCELLED if cancel_requested else contract.OUTCOME_FAILED), returncode


def shell_status(returncode: int) -> int:
    """The exit status a shell gives for `returncode`: itself, or 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def traceparent_env(span: trace.Span) -> dict[str, str]:
    """`{"TRACEPARENT": ...}` (and `TRACESTATE` when there is one) for a child process."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span, Context()))
    return {key.upper(): value for key, value in carrier.items()}


def context_from_env(environ: Mapping[str, str]) -> Context | None:
    """The parent context `TRACEPARENT` (and `TRACESTATE`) in `environ` give, or None when absent/invalid."""
    traceparent = environ.get("TRACEPARENT", "")
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if environ.get("TRACESTATE"):
        carrier["tracestate"] = environ["TRACESTATE"]
    ctx = _propagator.extract(carrier, context=Context())
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx
