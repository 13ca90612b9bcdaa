"""The replay-side commands, run as real subprocesses on a store recorded through the real SDK hooks:
`replay` (no command, refusals, --verify-envelope, -- CMD), `diff`, `export`/`import`, `step`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.replay_support import API_KEY, recording
from tests.support.standin import Standin
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, data: Path, env: dict[str, str] | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TRACETAPE_ENDPOINT": "http://127.0.0.1:9", **(env or {})}
    argv = [sys.executable, "-m", "tracetape.cli", *args]
    if "--" not in args:
        argv += ["--data", str(data)] if args[0] not in ("import",) else []
    return subprocess.run(argv, capture_output=True, env=full_env, timeout=120, input=stdin, cwd=ROOT)


def _ask(oc: openai.OpenAI, prompts: list[str]) -> list[str]:
    return [oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": p}]).choices[0].message.content
            for p in prompts]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Standin, list[str]]]:
    data = tmp_path_factory.mktemp("cli") / "db"
    store = Store(data)
    with Standin() as standin:
        with recording(store, "run-a"):
            answers = _ask(openai.OpenAI(base_url=standin.openai_base_url, api_key=API_KEY), ["one", "two", "three"])
        with recording(store, "run-b"):
            _ask(openai.OpenAI(base_url=standin.openai_base_url, api_key=API_KEY), ["one", "TWO", "three"])
        with recording(store, "run-open", end=False):
            _ask(openai.OpenAI(base_url=standin.openai_base_url, api_key=API_KEY), ["one"])
        store.close()
        yield data, standin, answers


def test_replay_without_command_prints_the_recorded_final_output(recorded: tuple[Path, Standin, list[str]]) -> None:
    data, _, answers = recorded
    out = cli("replay", "run-a", "--json", data=data)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["from_replay"] is True and body["run_id"] == "run-a" and body["final_output"] == answers[-1]


def test_running_run_is_refused_unless_forced(recorded: tuple[Path, Standin, list[str]]) -> None:
    data = recorded[0]
    out = cli("replay", "run-open", data=data)
    assert out.returncode == 3 and b"running" in out.stderr
    out = cli("replay", "run-open", "--force", "--json", data=data)
    assert out.returncode == 0 and json.loads(out.stdout)["forced"] is True


def test_verify_envelope_detects_a_modified_envelope(recorded: tuple[Path, Standin, list[str]], tmp_path: Path) -> None:
    data = recorded[0]
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "two"}]}
    env = c.http_envelope("POST", "/v1/chat/completions", "", [], json.dumps(body).encode())
    good = tmp_path / "good.json"
    good.write_text(json.dumps(env))
    out = cli("replay", "run-a", "--verify-envelope", str(good), "--json", data=data)
    assert out.returncode == 0 and json.loads(out.stdout)["step"]["index"] == 1
    env["body"]["messages"][0]["content"] = "two!"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"envelope": env}))
    out = cli("replay", "run-a", "--verify-envelope", str(bad), "--json", data=data)
    verdict = json.loads(out.stdout)
    assert out.returncode == 1 and verdict["verified"] is False and verdict["closest_step"]["index"] == 1
    assert verdict["diff"][0]["path"] == "messages[0].content"


def test_diff_exit_codes_and_first_divergence(recorded: tuple[Path, Standin, list[str]]) -> None:
    data = recorded[0]
    assert cli("diff", "run-a", "run-a", data=data).returncode == 0
    out = cli("diff", "run-a", "run-b", "--json", data=data)
    assert out.returncode == 1, out.stderr
    result = json.loads(out.stdout)
    assert [s["status"] for s in result["steps"]] == ["same", "changed", "same"]
    assert result["first_divergence"]["a_index"] == 1
    changed = result["steps"][1]
    assert changed["request_diff"][0]["path"] == "messages[0].content"
    assert any(d["path"].startswith("body.choices[0].message.content") for d in changed["response_diff"])


def test_export_import_round_trip_is_byte_exact(recorded: tuple[Path, Standin, list[str]], tmp_path: Path) -> None:
    data = recorded[0]
    first = tmp_path / "a.jsonl"
    assert cli("export", "run-a", "--format", "jsonl", "-o", str(first), data=data).returncode == 0
    other = tmp_path / "other"
    out = cli("import", str(first), "--data", str(other), data=other)
    assert out.returncode == 0, out.stderr
    second = tmp_path / "b.jsonl"
    assert cli("export", "run-a", "--format", "jsonl", "-o", str(second), data=other).returncode == 0
    assert first.read_bytes() == second.read_bytes()
    assert cli("diff", "run-a", "run-a", data=other).returncode == 0
    otlp = tmp_path / "a.otlp.json"
    assert cli("export", "run-a", "--format", "otlp-json", "-o", str(otlp), data=data).returncode == 0
    third = tmp_path / "third"
    assert cli("import", str(otlp), "--data", str(third), data=third).returncode == 0
    store_a, store_c = Store(data, readonly=True), Store(third, readonly=True)
    try:
        sa, sc = store_a.steps("default", "default", "run-a"), store_c.steps("default", "default", "run-a")
        assert [s.envelope_hash for s in sa] == [s.envelope_hash for s in sc]
        for x, y in zip(sa, sc):
            assert store_a.blob("default", "default", x.attempts[0].response_body.digest) == store_c.blob(
                "default", "default", y.attempts[0].response_body.digest)
    finally:
        store_a.close()
        store_c.close()
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a store directory cannot be created under a file: one line, no traceback
    out = cli("import", str(first), "--data", str(blocked / "store"), data=blocked)
    assert out.returncode != 0 and b"Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
    assert b"cannot open the store" in out.stderr
    jaeger = tmp_path / "a.jaeger.json"
    assert cli("export", "run-a", "--format", "jaeger", "-o", str(jaeger), data=data).returncode == 0
    doc = json.loads(jaeger.read_text())
    span = doc["data"][0]["spans"][0]
    assert {"traceID", "spanID", "operationName", "references", "startTime", "duration", "tags", "logs",
            "processID"} <= set(span) and span["processID"] in doc["data"][0]["processes"]


def test_step_reissues_one_recorded_call(recorded: tuple[Path, Standin, list[str]]) -> None:
    data, standin, _ = recorded
    before = standin.count
    out = cli("step", "run-a", "1", "--base-url", standin.url, "--json", data=data,
              env={"OPENAI_API_KEY": "sk-test-live-key-0123456789abcdef"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["same"] is True and standin.count == before + 1
    assert standin.last().header("authorization") == "Bearer sk-test-live-key-0123456789abcdef"
    assert b"sk-test-live" not in out.stdout + out.stderr


def test_replay_runs_a_command_against_the_tape(recorded: tuple[Path, Standin, list[str]], tmp_path: Path) -> None:
    data, standin, answers = recorded
    agent = tmp_path / "agent.py"
    agent.write_text(textwrap.dedent("""
        import openai
        oc = openai.OpenAI(api_key="sk-test-abcdefghijklmnopqrstuvwxyz012345")
        for p in ["one", "two", "three"]:
            print(oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": p}]).choices[0].message.content)
    """))
    before = standin.count
    out = cli("replay", "run-a", "--data", str(data), "--json", "--", sys.executable, str(agent), data=data)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["report"]["counts"]["tape"] == 3 and result["report"]["counts"]["misses"] == 0
    assert [line for line in out.stderr.decode().splitlines() if line in answers] == answers
    assert standin.count == before
    # the README's form: `--` straight after RUN (argparse itself swallows that `--`), command options intact
    out = cli("replay", "run-a", "--", sys.executable, "-W", "ignore", str(agent), data=data,
              env={"TRACETAPE_DATA": str(data)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.decode().splitlines() if line in answers] == answers
    assert standin.count == before


# --- bad input: one line on stderr (or `{"error": ...}` on stdout with --json), the documented exit code ---

def _no_traceback(out: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in out.stderr + out.stdout, out.stderr.decode(errors="replace")[-3000:]


def _one_line_error(out: subprocess.CompletedProcess[bytes], code: int, *, as_json: bool = False) -> None:
    _no_traceback(out)
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    if as_json:
        assert "error" in json.loads(out.stdout), out.stdout
        assert len(out.stdout.splitlines()) == 1 and not out.stderr.strip(), out.stderr
    else:
        assert len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.parametrize("command", [
    ["runs"], ["runs", "--json"], ["show", "run-a"], ["show", "run-a", "--json"], ["diff", "run-a", "run-b"],
    ["diff", "run-a", "run-b", "--json"], ["export", "run-a"], ["export", "run-a", "--format", "jaeger"],
    ["replay", "run-a"], ["replay", "run-a", "--json"]])
@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_reader_closing_stdout_ends_the_command_quietly(recorded: tuple[Path, Standin, list[str]],
                                                           command: list[str], unbuffered: bool) -> None:
    """`tracetape show RUN | head -1`: status 141 (128 + SIGPIPE), nothing on stderr, whether the broken pipe
    shows while printing (unbuffered) or only at the final flush (a pipe is block-buffered by default)."""
    data = recorded[0]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({"PYTHONPATH": str(ROOT), "TRACETAPE_ENDPOINT": "http://127.0.0.1:9",
                **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})})
    read_end, write_end = os.pipe()
    os.close(read_end)  # what `| head -1` becomes once head has exited
    try:
        out = subprocess.run([sys.executable, "-m", "tracetape.cli", *command, "--data", str(data)], stdout=write_end,
                             stderr=subprocess.PIPE, env=env, timeout=120, cwd=ROOT)
    finally:
        os.close(write_end)
    assert out.returncode == 141 and out.stderr == b"", (out.returncode, out.stderr.decode(errors="replace"))


def _record_raw_run(store: Store, run_id: str, steps: list[tuple[str, dict[str, object]]]) -> None:
    """A completed run whose steps carry exactly the given attributes, through the collector's write path."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.replay_support import write_spans

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tracetape")
    base = {c.RUN_ID: run_id, c.TENANT: "default", c.SCOPE: "default"}
    run_span = tracer.start_span("invoke_agent agent", attributes={
        **base, c.SPAN_KIND: c.SPAN_KIND_RUN, c.RUN_COMMAND: ["python", "agent.py"], c.RUN_CANON_PROFILE: c.CANON_PROFILE})
    parent = trace.set_span_in_context(run_span)
    tracer.start_span("tracetape.run.start", context=parent, attributes={**base, c.SPAN_KIND: c.SPAN_KIND_RUN_START}).end()
    for i, (name, attrs) in enumerate(steps):
        tracer.start_span(name, context=parent, attributes={
            **base, c.SPAN_KIND: c.SPAN_KIND_STEP, c.STEP_ID: f"{run_id}-{i}".encode().hex()[:16].ljust(16, "0"),
            c.ENVELOPE_HASH: "ab" * 32, **attrs}).end()
    run_span.set_attributes({c.RUN_OUTCOME: c.OUTCOME_COMPLETED, c.RUN_EXIT_CODE: 0})
    run_span.end()
    write_spans(store, list(exporter.get_finished_spans()))
    provider.shutdown()


@pytest.fixture(scope="module")
def hostile(recorded: tuple[Path, Standin, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the collector accepts whose payloads are unusual: a 100,000-deep JSON answer (`deep`, `deep2`), tool
    arguments and result that are not JSON (`badtool`), a recorded URL `urlsplit` rejects (`badurl`)."""
    standin = recorded[1]
    data = tmp_path_factory.mktemp("hostile") / "db"
    store = Store(data)
    try:
        for run_id, leaf in (("deep", b"1"), ("deep2", b"2")):
            _record_raw_run(store, run_id, [("chat gpt-x", {
                c.STEP_KIND: c.STEP_KIND_MODEL, c.REQUEST_METHOD: "POST",
                c.REQUEST_URL: f"{standin.openai_base_url}/chat/completions", c.REQUEST_BODY: b'{"model":"gpt-x"}',
                c.RESPONSE_STATUS: 200, c.RESPONSE_BODY: b"[" * 100_000 + leaf + b"]" * 100_000})])
        _record_raw_run(store, "badtool", [("execute_tool lookup", {
            c.STEP_KIND: c.STEP_KIND_TOOL, c.GEN_AI_TOOL_NAME: "lookup", c.TOOL_ARGUMENTS: b"{not json",
            c.TOOL_RESULT: b"not json either"})])
        _record_raw_run(store, "badurl", [("GET x", {
            c.STEP_KIND: c.STEP_KIND_HTTP, c.REQUEST_METHOD: "GET", c.REQUEST_URL: "http://[::1/v1/x",
            c.RESPONSE_STATUS: 200, c.RESPONSE_BODY: b"{}"})])
    finally:
        store.close()
    return data


def test_unusual_recorded_payloads_do_not_break_diff_replay_and_step(
        recorded: tuple[Path, Standin, list[str]], hostile: Path, tmp_path: Path) -> None:
    standin = recorded[1]
    for run_id in ("deep", "badtool", "badurl"):
        for extra in ([], ["--json"]):
            out = cli("diff", run_id, run_id, *extra, data=hostile)
            _no_traceback(out)
            assert out.returncode == 0, out.stderr  # identical, not "divergent"
            if extra:
                assert json.loads(out.stdout)["result"] == "identical"
    out = cli("diff", "deep", "deep2", "--json", data=hostile)
    _no_traceback(out)
    assert out.returncode == 1 and json.loads(out.stdout)["result"] == "divergent"
    out = cli("replay", "deep", "--json", data=hostile)
    _no_traceback(out)
    assert out.returncode == 0 and json.loads(out.stdout)["final_output"] == ""
    out = cli("step", "deep", "0", "--base-url", standin.url, "--json", data=hostile)
    _no_traceback(out)
    assert out.returncode == 1 and json.loads(out.stdout)["same"] is False  # the live answer differs
    envelope = tmp_path / "envelope.json"
    envelope.write_text(json.dumps(c.http_envelope("GET", "/v1/y", "", [], b"")))
    for run_id in ("badtool", "badurl"):
        out = cli("replay", run_id, "--verify-envelope", str(envelope), "--json", data=hostile)
        _no_traceback(out)
        assert out.returncode == 1 and json.loads(out.stdout)["verified"] is False
    out = cli("replay", "badurl", "--json", "--data", str(hostile), "--", sys.executable, "-c", "pass",
              data=hostile)  # a replay session opens on it (its exact index, its miss diagnostics)
    _no_traceback(out)
    assert out.returncode == 0, out.stderr


def test_recorded_request_envelope_takes_an_unparsable_url_whole_as_the_path() -> None:
    from tracetape.replayer.envelopes import recorded_request_envelope

    parsed = recorded_request_envelope("post", "http://h:1/v1/x?b=2&a=1", [], b'{"k": 1}')
    assert parsed == c.http_envelope("post", "/v1/x", "b=2&a=1", [], b'{"k": 1}')
    assert recorded_request_envelope("GET", "http://[::1/v1/x", [], b"")["path"] == c.http_envelope(
        "GET", "http://[::1/v1/x", "", [], b"")["path"]


class _ShortAnswer:
    """An upstream that promises 100 bytes, sends 5 and hangs up."""

    def __enter__(self) -> str:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")
        except OSError:
            return

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_bad_urls_and_options_of_step_and_replay_are_errors_not_divergences(
        recorded: tuple[Path, Standin, list[str]]) -> None:
    data = recorded[0]
    _one_line_error(cli("step", "run-a", "1", "--base-url", "http://[x", data=data), 2)
    _one_line_error(cli("step", "run-a", "1", "--base-url", "http://127.0.0.1:abc", "--json", data=data), 2, as_json=True)
    _one_line_error(cli("step", "run-a", "1", "--base-url", "http://127.0.0.1:9", "--timeout", "-1", data=data), 2)
    _one_line_error(cli("step", "run-a", "1", "--timeout", "0", "--json", data=data), 2, as_json=True)
    with _ShortAnswer() as url:
        _one_line_error(cli("step", "run-a", "1", "--base-url", url, "--json", data=data), 2, as_json=True)
        _one_line_error(cli("step", "run-a", "1", "--base-url", url, data=data), 2)
    replay = ("replay", "run-a", "--data", str(data))
    _one_line_error(cli(*replay, "--replayer", "notaurl", "--", "true", data=data), 2)
    _one_line_error(cli(*replay, "--replayer", "http://127.0.0.1:abc", "--json", "--", "true", data=data), 2,
                    as_json=True)
    _one_line_error(cli(*replay, "--upstream", "openai=http://[x", "--", "true", data=data), 2)
    _one_line_error(cli(*replay, "--upstream", "openai=http://h:abc", "--json", "--", "true", data=data), 2,
                    as_json=True)


_GENTLE_AGENT = """
import signal, sys, time
def on_int(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(1.0)  # a clean shutdown that takes a while
    open(sys.argv[1], "w").write("clean shutdown done")
    sys.exit(5)
signal.signal(signal.SIGINT, on_int)
print("agent ready", flush=True)
time.sleep(60)
"""

# started in a new session, it opens the pty (making it its controlling terminal), then becomes `tracetape ...`
_ON_A_TERMINAL = "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); [os.dup2(fd, n) for n in (0, 1, 2)]; " \
                 "os.execv(sys.argv[2], sys.argv[2:])"


def test_ctrl_c_at_a_terminal_lets_the_replayed_command_shut_down(
        recorded: tuple[Path, Standin, list[str]], tmp_path: Path) -> None:
    """Ctrl-C during `tracetape replay RUN -- CMD` (the terminal signals the whole foreground process group):
    the `tracetape run` wrapper is waited for, not killed, so CMD's cleanup finishes, and the exit status is
    CMD's."""
    import select
    import time

    data = recorded[0]
    agent, marker = tmp_path / "agent.py", tmp_path / "marker"
    agent.write_text(_GENTLE_AGENT)
    master, slave = os.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRACETAPE_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.Popen([sys.executable, "-c", _ON_A_TERMINAL, os.ttyname(slave), sys.executable, "-m",
                             "tracetape.cli", "replay", "run-a", "--data", str(data), "--", sys.executable, str(agent),
                             str(marker)], env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    output = b""  # (`slave` stays open here until the end: reading `master` fails while no one has it open)

    def pump(until: float, stop: bytes | None = None) -> None:
        nonlocal output
        while time.monotonic() < until and not (stop and stop in output):
            if select.select([master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's last process went away
                    return
                if not chunk:
                    return
                output += chunk

    try:
        pump(time.monotonic() + 60, b"agent ready")
        assert b"agent ready" in output, output.decode(errors="replace")
        os.write(master, b"\x03")  # Ctrl-C
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            pump(time.monotonic() + 0.1)
        code = proc.wait(timeout=1)
        assert marker.exists(), output.decode(errors="replace")  # CMD's cleanup ran to its end first
        pump(time.monotonic() + 0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    text = output.decode(errors="replace")
    assert code == 5 and "exit 5" in text and "Traceback" not in text, (code, text[-3000:])
