"""`tracetape run [options] -- CMD ...`: run a command as one recorded run.

The wrapper owns the run. It picks the run id (`--run-id`, else `TRACETAPE_RUN_ID`, else a new one; a
`tracetape run` nested inside another run's process gets a new id and a new trace unless `--run-id` is
given), exports `tracetape.run.start` at once, starts the run span `invoke_agent {agent}`, and launches CMD
with:
- the `TRACETAPE_*` variables of the run, `TRACETAPE_RUN_SPAN=external` and `TRACEPARENT` = the run span,
  so the child's spans (through tracetape's instrumentor) all carry the run id and parent under the run span;
- PYTHONPATH prefixed with tracetape's bootstrap folder (its `sitecustomize` turns recording on in any
  Python child, then runs the `sitecustomize` it shadows).

SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 received by the wrapper are passed on to the child; so are SIGINT,
SIGQUIT and SIGWINCH, except when the wrapper is the terminal's foreground process group (the terminal has
then already sent them, Ctrl-C, Ctrl-\\ or a resize, to the child too). The wrapper waits for the child,
ends the run span with the outcome (`runspan.outcome_for_status`: exit 0 → completed, N > 0 → failed, or
cancelled when SIGINT/SIGTERM was passed on; killed by signal N → exit code -N, cancelled for
SIGINT/SIGTERM, failed otherwise), flushes, and exits with the child's status (128 + N
for a death by signal N, like a shell). A command that cannot be started: exit 127 (not found) or 126 (not
executable), outcome failed. An unreachable collector costs one warning on stderr; the command still runs.

A Python command whose options keep tracetape's bootstrap from loading (`-I` or `-E`: PYTHONPATH is ignored;
`-S`: `site`, hence `sitecustomize`, is skipped; combined forms like `-IE` too) runs as asked, but cannot be
recorded: one warning on stderr says so, and the run span carries `RECORDING_ERROR`, so the collector stores
the run as not replayable (`recording_failure`) instead of as a complete run without steps.

`--json` prints `{"run_id": ..., "exit_code": ..., "outcome": ...}` on stdout at the end, where
`exit_code` is the recorded `RUN_EXIT_CODE` (negative for a signal). When nobody reads stdout any more
(`| head -1`), that line is dropped and the exit status is still the child's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from tracetape.errors import CliError, stdout_to_devnull
from tracetape.instrumentation import config as cfg
from tracetape.instrumentation import contract, provider, runspan

BOOTSTRAP_DIR = str(Path(__file__).resolve().parent / "bootstrap")
"""The folder holding tracetape's `sitecustomize.py`."""

_FORWARDED = tuple(
    s
    for s in (
        getattr(signal, name, None)
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
    )
    if s is not None
)
_FROM_TERMINAL = frozenset(
    s for s in (getattr(signal, name, None) for name in ("SIGINT", "SIGQUIT", "SIGWINCH")) if s is not None
)
"""Signals a terminal sends to its whole foreground process group (Ctrl-C, Ctrl-\\, a resize)."""

_NO_BOOTSTRAP_FLAGS = {
    "I": "-I (isolated mode) ignores PYTHONPATH",
    "E": "-E ignores PYTHONPATH",
    "S": "-S skips site and sitecustomize",
}
"""Python options that keep tracetape's bootstrap `sitecustomize` from loading in the child."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", help="id of the run (default: TRACETAPE_RUN_ID or a new one)")
    parser.add_argument("--tenant", help="tenant (default: TRACETAPE_TENANT or 'default')")
    parser.add_argument("--scope", help="scope within the tenant (default: TRACETAPE_SCOPE or 'default')")
    parser.add_argument("--endpoint", help=f"collector's OTLP/HTTP base URL (default: {cfg.DEFAULT_ENDPOINT})")
    parser.add_argument(
        "--http-host",
        dest="http_hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="also record plain HTTP calls to HOST or HOST:PORT (repeatable)",
    )
    parser.add_argument("--agent", help="the agent's name (default: derived from the command)")
    parser.add_argument("--json", action="store_true", help="print the run id, exit code and outcome as JSON")
    # `args.command` is the subcommand's name (set by the dispatcher), so the wrapped command is `args.cmd`.
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run, after --")


def run(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("missing command: tracetape run [options] -- CMD ...")
    config = _config(args, os.environ)
    if config.disabled:
        return _run_unrecorded(command)
    agent = config.agent_name or runspan.agent_name_from_command(command)
    recorder = provider.build_recorder(config, service_name=agent)
    run_span = runspan.start_run(recorder.tracer, agent=agent, command=command)
    recorder.flush()
    unrecordable = _unrecordable_reason(command)
    if unrecordable is not None:
        print(f"tracetape run: {unrecordable}, so tracetape cannot record this command; the run is stored as a "
              "recording failure", file=sys.stderr, flush=True)
        run_span.set_attribute(contract.RECORDING_ERROR, f"{unrecordable}: tracetape's recorder cannot load in it")

    child = _Child(command, _child_env(config, run_span, recorder.collector_warned, os.environ))
    returncode = child.run()
    if returncode is None:
        outcome, exit_code = contract.OUTCOME_FAILED, child.start_error_status
    else:
        outcome, exit_code = runspan.outcome_for_status(returncode, cancel_requested=child.cancel_requested)
    runspan.end_run(run_span, outcome, exit_code)
    recorder.shutdown()

    if args.json:
        _print_json({"run_id": config.run_id, "exit_code": exit_code, "outcome": outcome})
    return runspan.shell_status(exit_code) if returncode is not None else exit_code


def _print_json(document: Mapping[str, Any]) -> None:
    """Print `document` as one JSON line on stdout; a reader that has gone (`| head -1`) only loses it."""
    try:
        print(json.dumps(document), flush=True)
    except BrokenPipeError:
        stdout_to_devnull()


def _unrecordable_reason(command: Sequence[str]) -> str | None:
    """Why the bootstrap cannot load in `command` (a Python option that disables it), or None."""
    python = runspan.python_command(command)
    if python is None:
        return None
    found = [why for flag, why in _NO_BOOTSTRAP_FLAGS.items() if flag in python.flags]
    return f"python {', '.join(found)}" if found else None


def _config(args: argparse.Namespace, environ: Mapping[str, str]) -> cfg.RecorderConfig:
    env = dict(environ)
    nested = env.get(cfg.ENV_RUN_SPAN, "").strip().lower() == cfg.RUN_SPAN_EXTERNAL
    if nested:
        env.pop(cfg.ENV_RUN_ID, None)
    overrides = {
        cfg.ENV_RUN_ID: args.run_id,
        cfg.ENV_TENANT: args.tenant,
        cfg.ENV_SCOPE: args.scope,
        cfg.ENV_ENDPOINT: args.endpoint,
        cfg.ENV_AGENT_NAME: args.agent,
        cfg.ENV_HTTP_HOSTS: ",".join(args.http_hosts) if args.http_hosts else None,
    }
    env.update({k: v for k, v in overrides.items() if v is not None})
    env.pop(cfg.ENV_RUN_SPAN, None)
    env.pop(cfg.ENV_COLLECTOR_WARNED, None)
    try:
        return cfg.RecorderConfig.from_env(env)
    except cfg.ConfigError as err:
        raise CliError(str(err)) from None


def _child_env(
    config: cfg.RecorderConfig, run_span: Any, warned: bool, environ: Mapping[str, str]
) -> dict[str, str]:
    env = dict(environ)
    env.pop("TRACESTATE", None)
    env.pop(cfg.ENV_COLLECTOR_WARNED, None)
    env.update(config.to_env())
    env[cfg.ENV_RUN_SPAN] = cfg.RUN_SPAN_EXTERNAL
    if warned:
        env[cfg.ENV_COLLECTOR_WARNED] = "1"
    env.update(runspan.traceparent_env(run_span))
    env["PYTHONPATH"] = prepend_path(BOOTSTRAP_DIR, env.get("PYTHONPATH", ""))
    return env


def prepend_path(directory: str, path: str) -> str:
    """`path` (an os.pathsep list) with `directory` first and not repeated; other entries, empty ones
    (the current directory) included, are kept in order."""
    if not path:
        return directory
    parts = [p for p in path.split(os.pathsep) if not p or os.path.abspath(p) != directory]
    return os.pathsep.join([directory, *parts])


def _run_unrecorded(command: Sequence[str]) -> int:
    child = _Child(command, dict(os.environ))
    returncode = child.run()
    return child.start_error_status if returncode is None else runspan.shell_status(returncode)


def _tty_signals_reach_child() -> bool:
    """Whether this process is in the terminal's foreground process group (what the terminal sends, Ctrl-C,
    Ctrl-\\ or a resize, reaches the child too)."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


class _Child:
    """The wrapped command: started, sent the signals the wrapper receives, waited for."""

    def __init__(self, command: Sequence[str], env: dict[str, str]) -> None:
        self.command = list(command)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.cancel_requested = False
        self.start_error_status = 0
        self._pending: list[int] = []

    def run(self) -> int | None:
        """The child's return code (negative: killed by that signal), or None when it could not start."""
        previous = self._install_handlers()
        try:
            try:
                self.proc = subprocess.Popen(self.command, env=self.env)
            except FileNotFoundError:
                print(f"tracetape run: command not found: {self.command[0]}", file=sys.stderr)
                self.start_error_status = 127
                return None
            except PermissionError:
                print(f"tracetape run: permission denied: {self.command[0]}", file=sys.stderr)
                self.start_error_status = 126
                return None
            except OSError as err:
                print(f"tracetape run: cannot run {self.command[0]}: {err.strerror or err}", file=sys.stderr)
                self.start_error_status = 126
                return None
            for signum in self._pending:
                self._send(signum)
            self._pending.clear()
            return self.proc.wait()
        finally:
            self._restore_handlers(previous)

    def _install_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum in _FORWARDED:
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):  # not the main thread, or not settable
                continue
        return previous

    @staticmethod
    def _restore_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            try:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                continue

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in runspan.CANCEL_SIGNALS:
            self.cancel_requested = True
        if signum in _FROM_TERMINAL and _tty_signals_reach_child():
            return
        if self.proc is None:
            self._pending.append(signum)
        else:
            self._send(signum)

    def _send(self, signum: int) -> None:
        assert self.proc is not None
        try:
            self.proc.send_signal(signum)
        except (ProcessLookupError, OSError):
            pass

