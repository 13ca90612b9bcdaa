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
