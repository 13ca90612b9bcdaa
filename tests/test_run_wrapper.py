"""`tracetape run -- CMD` and `opentelemetry-instrument` end to end: real processes exporting OTLP/HTTP to a
real receiver on 127.0.0.1 (`tests.support.otlp_sink`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.otlp_sink import OtlpSink, SinkSpan
from tracetape.instrumentation import contract

AGENT = """
import os, sys, time
import tracetape

@tracetape.tool
def lookup(city: str, units: str = "C") -> dict:
    return {"city": city, "temp": 21, "units": units}

lookup("Lisbon")
with tracetape.tool_call("notify", {"to": "ops"}) as call:
    call.set_result("sent")
print("agent done", flush=True)
mode = sys.argv[1] if len(sys.argv) > 1 else "0"
if mode == "raise":
    raise RuntimeError("agent crashed")
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "shutdown":
    from opentelemetry import trace
    trace.get_tracer_provider().shutdown()  # what some applications do at the end
    mode = "0"
if mode == "wait":
    print(f"ready {os.getpid()}", flush=True)
    time.sleep(60)
sys.exit(int(mode))
"""

OTEL_INSTRUMENT = str(Path(sys.executable).with_name("opentelemetry-instrument"))


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    with OtlpSink() as s:
        yield s


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    path = tmp_path / "agent.py"
    path.write_text(textwrap.dedent(AGENT))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without tracetape's or trace-context variables, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRACETAPE_", "OTEL_")) and k not in ("TRACEPARENT", "TRACESTATE", "PYTHONPATH")
    }
    env.update(extra)
    return env


def wrapper_cmd(sink: OtlpSink, *args: str) -> list[str]:
    return [sys.executable, "-m", "tracetape.cli", "run", "--endpoint", sink.endpoint, "--json", *args]


def run_wrapper(
    sink: OtlpSink, agent: Path, mode: str = "0", *, run_id: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wrapper_cmd(sink, "--run-id", run_id, "--", sys.executable, str(agent), mode),
        env=env or clean_env(),
        cwd=agent.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def last_json(stdout: str) -> dict[str, object]:
    return json.loads(stdout.strip().splitlines()[-1])


def run_ended(run_id: str):  # noqa: ANN201 - a predicate for OtlpSink.wait_for
    return lambda spans: any(
        s.get(contract.RUN_ID) == run_id and s.get(contract.SPAN_KIND) == "run" for s in spans
    )


def spans_of(sink: OtlpSink, run_id: str) -> dict[str, SinkSpan]:
    spans = sink.wait_for(run_ended(run_id))
    return {s.name: s for s in spans if s.get(contract.RUN_ID) == run_id}


def test_run_start_run_and_steps_share_the_run_and_the_trace(sink: OtlpSink, agent: Path) -> None:
    done = run_wrapper(sink, agent, "0", run_id="run-ok-1")
    assert done.returncode == 0, done.stderr
    assert "agent done" in done.stdout
    assert last_json(done.stdout) == {"run_id": "run-ok-1", "exit_code": 0, "outcome": "completed"}

    sink.wait_for(lambda spans: len([s for s in spans if s.get(contract.RUN_ID) == "run-ok-1"]) >= 4)
    spans = spans_of(sink, "run-ok-1")
    assert set(spans) == {"tracetape.run.start", "invoke_agent agent", "execute_tool lookup", "execute_tool notify"}
    run = spans["invoke_agent agent"]
    start = spans["tracetape.run.start"]
    assert run.parent_span_id == ""
    assert run.get(contract.SPAN_KIND) == "run"
    assert run.get(contract.GEN_AI_OPERATION_NAME) == "invoke_agent"
    assert run.get(contract.GEN_AI_AGENT_NAME) == "agent"
    assert run.get(contract.RUN_COMMAND) == [sys.executable, str(agent), "0"]
    assert run.get(contract.RUN_CANON_PROFILE) == contract.CANON_PROFILE
    assert run.get(contract.RUN_OUTCOME) == "completed" and run.get(contract.RUN_EXIT_CODE) == 0
    assert start.get(contract.SPAN_KIND) == "run_start" and start.start_ns == start.end_ns
    for span in spans.values():
        assert span.trace_id == run.trace_id
        assert span.get(contract.TENANT) == "default" and span.get(contract.SCOPE) == "default"
        assert span.resource["service.name"] == "agent"
        if span is not run:
            assert span.parent_span_id == run.span_id
    lookup = spans["execute_tool lookup"]
    assert json.loads(lookup.get(contract.TOOL_ARGUMENTS)) == {"city": "Lisbon", "units": "C"}
    assert lookup.get(contract.STEP_KIND) == "tool"


def test_exit_status_is_passed_through(sink: OtlpSink, agent: Path) -> None:
    done = run_wrapper(sink, agent, "3", run_id="run-exit-3")
    assert done.returncode == 3
    assert last_json(done.stdout) == {"run_id": "run-exit-3", "exit_code": 3, "outcome": "failed"}
    run = spans_of(sink, "run-exit-3")["invoke_agent agent"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("failed", 3)
    assert run.status_code == 2  # STATUS_CODE_ERROR

    crashed = run_wrapper(sink, agent, "raise", run_id="run-raise")
    assert crashed.returncode == 1 and "RuntimeError: agent crashed" in crashed.stderr
    assert last_json(crashed.stdout)["outcome"] == "failed"


def test_child_killed_by_sigkill(sink: OtlpSink, agent: Path) -> None:
    done = run_wrapper(sink, agent, "kill", run_id="run-killed")
    assert done.returncode == 128 + 9
    assert last_json(done.stdout) == {"run_id": "run-killed", "exit_code": -9, "outcome": "failed"}
    run = spans_of(sink, "run-killed")["invoke_agent agent"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("failed", -9)


def test_existing_user_sitecustomize_still_runs(sink: OtlpSink, agent: Path, tmp_path: Path) -> None:
    user_dir = tmp_path / "usersite"
    user_dir.mkdir()
    (user_dir / "sitecustomize.py").write_text(
        "import os\nMARK = 'user sitecustomize ran'\nos.environ['USER_SITE_MARK'] = MARK\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sitecustomize, tracetape\n"
        "print(os.environ.get('USER_SITE_MARK'), getattr(sitecustomize, 'MARK', None), flush=True)\n"
        "tracetape.tool(lambda: 1)()\n"
    )
    done = subprocess.run(
        wrapper_cmd(sink, "--run-id", "run-usersite", "--", sys.executable, str(probe)),
        env=clean_env(PYTHONPATH=str(user_dir)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "user sitecustomize ran user sitecustomize ran" in done.stdout
    spans = sink.wait_for(lambda s: any(x.name == "execute_tool <lambda>" for x in s))
    assert any(s.get(contract.RUN_ID) == "run-usersite" for s in spans if s.name == "execute_tool <lambda>")


def _start_waiting(sink: OtlpSink, agent: Path, run_id: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        wrapper_cmd(sink, "--run-id", run_id, "--", sys.executable, str(agent), "wait"),
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ready "):
            return proc, int(line.split()[1])
        assert line, f"agent ended early: {proc.stderr.read() if proc.stderr else ''}"
    proc.kill()
    raise AssertionError("agent did not get ready")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize(("signum", "run_id"), [(signal.SIGTERM, "run-sigterm"), (signal.SIGINT, "run-sigint")])
def test_signal_to_wrapper_cancels_the_run(sink: OtlpSink, agent: Path, signum: int, run_id: str) -> None:
    proc, child_pid = _start_waiting(sink, agent, run_id)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert json.loads(out.strip().splitlines()[-1]) == {"run_id": run_id, "exit_code": -signum, "outcome": "cancelled"}
    assert _gone(child_pid)
    spans = spans_of(sink, run_id)
    run = spans["invoke_agent agent"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("cancelled", -signum)
    # the child's steps were flushed before it died
    assert {"execute_tool lookup", "execute_tool notify"} <= set(spans)


def test_missing_command_is_a_one_line_error() -> None:
    for extra in ([], ["--"]):
        done = subprocess.run(
            [sys.executable, "-m", "tracetape.cli", "run", *extra],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and "missing command" in done.stderr


def test_command_not_found(sink: OtlpSink) -> None:
    done = subprocess.run(
        wrapper_cmd(sink, "--run-id", "run-notfound", "--", "tracetape-no-such-command"),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 127
    assert "command not found" in done.stderr
    assert last_json(done.stdout) == {"run_id": "run-notfound", "exit_code": 127, "outcome": "failed"}


def test_unreachable_collector_warns_once_and_the_agent_still_runs(agent: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        port = closed.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "tracetape.cli", "run", "--endpoint", f"http://tt:hunter2@127.0.0.1:{port}",
             "--", sys.executable, str(agent), "3"],
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
    finally:
        closed.close()
    assert done.returncode == 3
    assert "agent done" in done.stdout
    assert done.stderr.count("collector unreachable") == 1, done.stderr
    assert "hunter2" not in done.stderr and f"***@127.0.0.1:{port}" in done.stderr  # credentials never printed
    assert elapsed < 10


def test_invalid_id_is_rejected(sink: OtlpSink, agent: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "run", "--tenant", "a b", "--", sys.executable, str(agent)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "invalid tenant" in done.stderr
    assert "agent done" not in done.stdout


@pytest.mark.parametrize("via", ["option", "environment"])
def test_unparseable_endpoint_is_a_one_line_error_without_credentials(agent: Path, via: str) -> None:
    endpoint = "http://tt-user:hunter2-secret@[::1"  # an unbalanced IPv6 literal: urlsplit raises ValueError
    args = ["--endpoint", endpoint] if via == "option" else []
    env = clean_env() if via == "option" else clean_env(TRACETAPE_ENDPOINT=endpoint)
    done = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "run", *args, "--", sys.executable, str(agent)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr and done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "tracetape run: invalid TRACETAPE_ENDPOINT 'http://***@[::1': use an http(s) URL such as http://127.0.0.1:4318"]
    assert "agent done" not in done.stdout
    # the same message as any other bad endpoint, credentials masked there too
    other = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "run", "--endpoint", "ftp://tt-user:hunter2-secret@h", "--", "true"],
        env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2
    assert other.stderr.strip() == ("tracetape run: invalid TRACETAPE_ENDPOINT 'ftp://***@h': use an http(s) URL such as "
                                    "http://127.0.0.1:4318")


def test_unparseable_endpoint_under_opentelemetry_instrument_only_turns_recording_off(agent: Path) -> None:
    done = subprocess.run(
        [OTEL_INSTRUMENT, sys.executable, str(agent)],
        env=clean_env(TRACETAPE_ENDPOINT="http://tt-user:hunter2-secret@[::1"),
        cwd=agent.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "agent done" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
    assert "tracetape: invalid TRACETAPE_ENDPOINT 'http://***@[::1'" in done.stderr
    assert "recording is off" in done.stderr


# --- opentelemetry-instrument, no wrapper: the process owns its run ---------------------------------------
def run_instrumented(sink: OtlpSink, agent: Path, mode: str, run_id: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OTEL_INSTRUMENT, sys.executable, str(agent), mode],
        env=clean_env(TRACETAPE_ENDPOINT=sink.endpoint, TRACETAPE_RUN_ID=run_id, **env),
        cwd=agent.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_opentelemetry_instrument_loads_the_recorder(sink: OtlpSink, agent: Path) -> None:
    done = run_instrumented(
        sink, agent, "0", "run-otel-1", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="openai,anthropic"
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    sink.wait_for(lambda spans: len([s for s in spans if s.get(contract.RUN_ID) == "run-otel-1"]) >= 4)
    spans = spans_of(sink, "run-otel-1")
    run = spans["invoke_agent agent"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("completed", 0)
    assert spans["tracetape.run.start"].get(contract.SPAN_KIND) == "run_start"
    assert spans["execute_tool lookup"].parent_span_id == run.span_id
    assert spans["execute_tool lookup"].trace_id == run.trace_id


def test_disabling_the_entry_point_by_its_own_name(sink: OtlpSink, agent: Path) -> None:
    done = run_instrumented(
        sink, agent, "0", "run-otel-off", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="tracetape_recorder"
    )
    assert done.returncode == 0 and "agent done" in done.stdout
    time.sleep(0.3)
    assert sink.by_run("run-otel-off") == []


@pytest.mark.parametrize(
    ("mode", "expected_status", "outcome", "exit_code"),
    [("4", 4, "failed", 4), ("raise", 1, "failed", 1), ("shutdown", 0, "completed", 0)],
)
def test_in_process_run_outcome(
    sink: OtlpSink, agent: Path, mode: str, expected_status: int, outcome: str, exit_code: int
) -> None:
    run_id = f"run-inproc-{mode}"
    done = run_instrumented(sink, agent, mode, run_id)
    assert done.returncode == expected_status
    run = spans_of(sink, run_id)["invoke_agent agent"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == (outcome, exit_code)


def _interruptible() -> None:
    """In the agent's process before exec: SIGINT at its default, so that Python raises KeyboardInterrupt.
    A test run started in the background by a shell without job control has SIGINT ignored, and an ignored
    signal stays ignored across exec (the agent would sleep through it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_in_process_signal_flushes_and_dies_by_the_signal(sink: OtlpSink, agent: Path, signum: int) -> None:
    run_id = f"run-inproc-sig{int(signum)}"
    proc = subprocess.Popen(
        [OTEL_INSTRUMENT, sys.executable, str(agent), "wait"],
        env=clean_env(TRACETAPE_ENDPOINT=sink.endpoint, TRACETAPE_RUN_ID=run_id),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )
    assert proc.stdout is not None
    while not proc.stdout.readline().startswith("ready"):
        assert proc.poll() is None
    proc.send_signal(signum)
    proc.communicate(timeout=30)
    assert proc.returncode == -signum  # SIGTERM re-raised by tracetape's handler; SIGINT by Python itself
    spans = spans_of(sink, run_id)
    run = spans["invoke_agent agent"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("cancelled", -signum)
    assert "execute_tool lookup" in spans


APP_WITH_OWN_PROVIDER = """
import asyncio
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

memory = InMemorySpanExporter()
app_provider = TracerProvider()
app_provider.add_span_processor(SimpleSpanProcessor(memory))
trace.set_tracer_provider(app_provider)

from tracetape.instrumentation.instrumentor import TracetapeInstrumentor
TracetapeInstrumentor().instrument()
TracetapeInstrumentor().instrument()  # idempotent
import tracetape

@tracetape.tool
def echo(x):
    return x

with trace.get_tracer("app").start_as_current_span("app work"):
    echo(1)
print(json.dumps([[s.name, s.attributes.get("tracetape.run.id")] for s in memory.get_finished_spans()]))
"""


def test_application_provider_keeps_its_spans_and_never_gets_step_payloads(sink: OtlpSink, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP_WITH_OWN_PROVIDER)
    done = subprocess.run(
        [sys.executable, str(script)],
        env=clean_env(TRACETAPE_ENDPOINT=sink.endpoint, TRACETAPE_RUN_ID="run-appprovider"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # the application's exporter saw its own span, stamped with the run, and not tracetape's step
    assert json.loads(done.stdout) == [["app work", "run-appprovider"]]
    sink.wait_for(lambda spans: {"app work", "execute_tool echo"} <= {s.name for s in spans})
    spans = spans_of(sink, "run-appprovider")
    app_span, step = spans["app work"], spans["execute_tool echo"]
    assert step.parent_span_id == app_span.span_id
    assert app_span.parent_span_id == spans["invoke_agent app"].span_id


def test_wrapper_under_opentelemetry_instrument_makes_one_run(sink: OtlpSink, agent: Path) -> None:
    done = subprocess.run(
        [OTEL_INSTRUMENT, *wrapper_cmd(sink, "--run-id", "run-one", "--", sys.executable, str(agent))],
        env=clean_env(TRACETAPE_ENDPOINT=sink.endpoint),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    spans = sink.wait_for(run_ended("run-one"))
    runs = {s.get(contract.RUN_ID) for s in spans if s.get(contract.SPAN_KIND) == "run"}
    assert runs == {"run-one"}


def test_tracetape_script_and_disabled_recording(sink: OtlpSink, agent: Path) -> None:
    script = str(Path(sys.executable).with_name("tracetape"))
    done = subprocess.run(
        [script, "run", "--endpoint", sink.endpoint, "--run-id", "run-disabled", "--", sys.executable, str(agent), "5"],
        env=clean_env(TRACETAPE_DISABLED="1"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 5 and "agent done" in done.stdout
    time.sleep(0.3)
    assert sink.by_run("run-disabled") == []


FORKING_AGENT = """
import multiprocessing as mp, os, signal, sys, time
import tracetape

def work(x):
    return x * 2

@tracetape.tool
def in_forked_child():
    return 1

if __name__ == "__main__":
    # leaving the `with` calls Pool.terminate(): SIGTERM to each (forked) worker
    with mp.get_context("fork").Pool(2) as pool:
        print(pool.map(work, range(4)), flush=True)
    pid = os.fork()
    if pid == 0:  # a plain forked child that records a step and exits normally (atexit runs)
        in_forked_child()
        sys.exit(0)
    print("exiting child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    print("terminated child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    time.sleep(0.5)  # the children's exports, if any, reach the sink before the parent's
    print("agent done", flush=True)
"""


def test_in_process_forked_children_never_end_the_parents_run(sink: OtlpSink, tmp_path: Path) -> None:
    script = tmp_path / "forker.py"
    script.write_text(FORKING_AGENT)
    run_id = "run-inproc-fork"
    done = run_instrumented(sink, script, "0", run_id)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # the children behave as they would without tracetape: the exiting one 0, the terminated one by SIGTERM
    assert done.stdout.splitlines() == [
        "[0, 2, 4, 6]", "exiting child 0", f"terminated child {-int(signal.SIGTERM)}", "agent done"
    ]
    sink.wait_for(run_ended(run_id))
    time.sleep(0.5)
    runs = [s for s in sink.by_run(run_id) if s.get(contract.SPAN_KIND) == "run"]
    # one run span, ended once, by the parent (the collector keeps the first copy of a span id)
    assert [(s.get(contract.RUN_OUTCOME), s.get(contract.RUN_EXIT_CODE)) for s in runs] == [("completed", 0)]
    # the forked child's own step is still recorded, under the run
    step = next(s for s in sink.by_run(run_id) if s.name == "execute_tool in_forked_child")
    assert step.parent_span_id == runs[0].span_id


# --- signals beyond INT/TERM/HUP, isolated interpreters, a stdout reader that goes away ---------------------
SIGNALLED_CHILD = """
import signal, sys, time
def stop(signum, frame):
    print(f"child got {signal.Signals(signum).name}", flush=True)
    sys.exit(7)
signal.signal(signal.SIGWINCH, lambda *a: print("child got SIGWINCH", flush=True))
for name in ("SIGUSR1", "SIGUSR2", "SIGQUIT"):
    signal.signal(getattr(signal, name), stop)
print("ready", flush=True)
time.sleep(30)
print("child timed out", flush=True)
"""


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2", "SIGQUIT"])
def test_other_signals_reach_the_child_and_its_status_is_the_wrappers(
    sink: OtlpSink, tmp_path: Path, name: str
) -> None:
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED_CHILD)
    run_id = f"run-{name.lower()}"
    proc = subprocess.Popen(
        wrapper_cmd(sink, "--run-id", run_id, "--", sys.executable, str(script)),
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # not the terminal's foreground group: the wrapper is the one to pass it on
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGWINCH)  # ignored by default: passed on, and the wrapper keeps running
        time.sleep(0.3)
        proc.send_signal(getattr(signal, name))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, err
    assert out.splitlines()[:2] == ["child got SIGWINCH", f"child got {name}"]
    assert last_json(out) == {"run_id": run_id, "exit_code": 7, "outcome": "failed"}
    run = spans_of(sink, run_id)["invoke_agent signalled"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("failed", 7)


def test_a_child_killed_by_a_forwarded_sigquit_gives_the_wrapper_its_status(sink: OtlpSink, agent: Path) -> None:
    proc, child_pid = _start_waiting(sink, agent, "run-sigquit-default")
    proc.send_signal(signal.SIGQUIT)  # the child's default action: die (core dump where enabled)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGQUIT, err
    assert last_json(out) == {"run_id": "run-sigquit-default", "exit_code": -int(signal.SIGQUIT), "outcome": "failed"}
    assert _gone(child_pid)


ISOLATION_AGENT = "import sys\nprint('agent done', flush=True)\nsys.exit(3)\n"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["-I"], "-I"),
        (["-E"], "-E"),
        (["-S"], "-S"),
        (["-u", "-IE"], "-I"),  # combined
        (["-X", "dev", "-W", "ignore", "-sE"], "-E"),  # after options that take a value
        (["-u", "-W", "ignore"], None),  # nothing that keeps the recorder out
    ],
)
def test_python_options_that_keep_the_recorder_out_make_a_recording_failure(
    tmp_path: Path, flags: list[str], named: str | None
) -> None:
    from tests.support.collector import collector_config, http_url, running_collector
    from tests.support.collector import run as run_async

    script = tmp_path / "iso.py"
    script.write_text(ISOLATION_AGENT)
    run_id = "run-iso" + "".join(flags).replace("-", "_").replace(" ", "")

    async def scenario() -> tuple[subprocess.CompletedProcess[str], object]:
        async with running_collector(collector_config(tmp_path / "db")) as svc:
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "tracetape.cli", "run", "--endpoint", http_url(svc), "--run-id", run_id,
                 "--", sys.executable, *flags, str(script)],
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                record = svc.store.run("default", "default", run_id)
                if record is not None and record.status != "running":
                    return done, record
                await asyncio.sleep(0.05)
            raise AssertionError(f"the run did not end in the store: {done.stderr}")

    done, record = run_async(scenario())
    assert done.returncode == 3 and done.stdout == "agent done\n"  # the command runs as asked
    assert record.status == "failed" and record.exit_code == 3
    if named is None:
        assert done.stderr == ""
        assert (record.replayable, record.reason) == (True, "ok")
        return
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"tracetape run: python {named}") and "cannot record" in line
    assert (record.replayable, record.reason) == (False, "recording_failure")


def test_json_to_a_reader_that_has_gone_keeps_the_childs_status(sink: OtlpSink, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -1` after its line: nobody reads the wrapper's stdout any more
    try:
        done = subprocess.run(
            wrapper_cmd(sink, "--run-id", "run-json-epipe", "--", sys.executable, "-c", "raise SystemExit(3)"),
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 3, done.stderr
    assert done.stderr == ""
    run = spans_of(sink, "run-json-epipe")["invoke_agent python"]
    assert (run.get(contract.RUN_OUTCOME), run.get(contract.RUN_EXIT_CODE)) == ("failed", 3)
