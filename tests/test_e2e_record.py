"""The record path end to end, as a user runs it: `tracetape run -- python examples/agent.py` (real openai,
anthropic and mcp packages, unmodified script) → OTLP → `tracetape collector` subprocess → LMDB, forwarded
to a Jaeger stand-in. Compared byte for byte with what the stand-in provider received and sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.jaeger_sink import attributes
from tests.support.stack import ANTHROPIC_KEY, OPENAI_KEY, RecordingStack, recording_stack
from tracetape.collector.records import StepRecord
from tracetape.instrumentation import contract as c

MODEL_CALLS = 7  # openai: sync, sync stream, async, async stream; anthropic: create, stream=True, messages.stream()
TOOL_CALLS = 3  # lookup_fact, save_note (decorated), add (MCP)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingStack]:
    with recording_stack(tmp_path_factory.mktemp("e2e")) as s:
        yield s


@pytest.fixture(scope="module")
def first_run(stack: RecordingStack) -> tuple[str, list[StepRecord], subprocess.CompletedProcess[str], list]:
    stack.standin.reset()
    done = stack.record("e2e-first")
    assert done.returncode == 0, done.stderr
    exchanges = list(stack.standin.exchanges)
    stack.wait_run("e2e-first")
    store = stack.store()
    try:
        steps = store.steps("default", "default", "e2e-first")
    finally:
        store.close()
    return "e2e-first", steps, done, exchanges


def _blob(stack: RecordingStack, ref) -> bytes:
    store = stack.store()
    try:
        data = store.blob("default", "default", ref.digest)
    finally:
        store.close()
    assert data is not None
    return data


def test_one_run_with_byte_exact_payloads(stack: RecordingStack, first_run) -> None:
    run_id, steps, done, exchanges = first_run
    kinds = [s.kind for s in steps]
    assert kinds.count("model") == MODEL_CALLS and kinds.count("tool") == TOOL_CALLS, [s.name for s in steps]
    assert len(steps) == MODEL_CALLS + TOOL_CALLS  # no HTTP steps for the MCP transport's own traffic
    model_steps = [s for s in steps if s.kind == "model"]
    assert len(exchanges) == MODEL_CALLS
    for step, ex in zip(model_steps, exchanges):
        (attempt,) = step.attempts
        assert attempt.method == ex.method and attempt.url.endswith(ex.path)
        assert _blob(stack, attempt.request_body) == ex.body
        assert _blob(stack, attempt.response_body) == ex.response_body
        assert attempt.status == ex.status and attempt.end_reason in ("exhausted", "closed")
        assert step.provider in ("openai", "anthropic") and step.request_model
        assert attempt.response_model
        if b'"usage"' in ex.response_body and b'"input_tokens"' + b":" in ex.response_body.replace(b" ", b"") \
                or b'"prompt_tokens"' in ex.response_body:
            assert attempt.input_tokens is not None and attempt.output_tokens is not None
    streamed = [s for s in model_steps if s.attempts[0].streamed]
    assert len(streamed) == 4 and all(len(s.attempts[0].chunk_ends) > 1 for s in streamed)
    tools = {s.tool_name: s for s in steps if s.kind == "tool"}
    assert set(tools) == {"lookup_fact", "save_note", "add"}
    assert tools["save_note"].mutating and not tools["lookup_fact"].mutating
    output = json.loads(done.stdout)
    result = json.loads(_blob(stack, tools["lookup_fact"].attempts[0].tool_result))
    assert result == output["tool.lookup_fact"]
    assert json.loads(_blob(stack, tools["add"].attempts[0].tool_arguments)) == {"a": 20, "b": 22}
    run = stack.wait_run(run_id)
    assert (run.status, run.replayable, run.reason, run.exit_code) == ("completed", True, "ok", 0)
    assert run.command[-1].endswith("agent.py")


def _hashes(stack: RecordingStack, run_id: str, **env: str) -> list[str]:
    done = stack.record(run_id, **env)
    assert done.returncode == 0, done.stderr
    stack.wait_run(run_id)
    store = stack.store()
    try:
        return [s.envelope_hash for s in store.steps("default", "default", run_id)]
    finally:
        store.close()


def test_envelope_hashes_are_stable_and_local(stack: RecordingStack, first_run) -> None:
    _, steps, _, _ = first_run
    first = [s.envelope_hash for s in steps]
    assert _hashes(stack, "e2e-again") == first
    changed = _hashes(stack, "e2e-changed", AGENT_ANTHROPIC_MODEL="claude-opus-5")
    # the model name is in the three anthropic requests only: exactly those three hashes change
    assert sum(a != b for a, b in zip(first, changed)) == 3
    topic = _hashes(stack, "e2e-topic", AGENT_TOPIC="the tidez")
    assert sum(a != b for a, b in zip(first, topic)) == len(first) - 1  # every prompt and the tool args; MCP add not


def test_secrets_never_reach_the_store_or_the_forwarded_spans(stack: RecordingStack, first_run) -> None:
    secrets = [OPENAI_KEY.encode(), ANTHROPIC_KEY.encode(), OPENAI_KEY[8:].encode(), ANTHROPIC_KEY[12:].encode()]
    ex = first_run[3]
    assert any(OPENAI_KEY in v for e in ex for _, v in e.headers)  # the keys really were sent
    store = stack.store()
    try:
        values = list(store.dump())
    finally:
        store.close()
    assert len(values) > 20
    for table, key, value in values:
        for secret in secrets:
            assert secret not in key and secret not in value, f"secret in {table}"
    deadline = time.monotonic() + 20
    while stack.sink.span_count() < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    forwarded = [span.SerializeToString() + rs.resource.SerializeToString() for rs, span in stack.sink.spans()]
    assert forwarded
    for blob in forwarded:
        for secret in secrets:
            assert secret not in blob


def test_forwarded_copies_are_slim_and_keep_genai(stack: RecordingStack, first_run) -> None:
    run_id, steps, _, _ = first_run
    store = stack.store()
    try:
        stored = len(store.spans("default", "default", run_id))
    finally:
        store.close()
    want = stored - 1  # everything but the zero-length run-start marker
    deadline = time.monotonic() + 30
    mine = []
    while time.monotonic() < deadline:
        mine = [(rs, s) for rs, s in stack.sink.spans() if attributes(s).get(c.RUN_ID) == run_id]
        if len(mine) >= want:
            break
        time.sleep(0.2)
    assert len(mine) == want
    (run_span,) = [attributes(s) for _, s in mine if attributes(s).get(c.SPAN_KIND) == c.SPAN_KIND_RUN]
    assert run_span[c.RUN_LINEAGE_DEPTH] == 0  # an original recording says so (a replay: the original's + 1)
    models = [attributes(s) for _, s in mine if attributes(s).get(c.STEP_KIND) == "model"]
    assert len(models) == MODEL_CALLS
    for a in models:
        assert a[c.GEN_AI_OPERATION_NAME] == "chat" and a[c.GEN_AI_PROVIDER_NAME] in ("openai", "anthropic")
        assert a[c.GEN_AI_REQUEST_MODEL] and a[c.GEN_AI_RESPONSE_MODEL]
        assert c.REQUEST_BODY not in a and c.RESPONSE_BODY not in a
        assert len(a[c.REQUEST_BODY + c.PAYLOAD_REF_SUFFIX]) == 64
        preview = a[c.RESPONSE_BODY + c.PAYLOAD_PREVIEW_SUFFIX]
        assert 0 < len(preview.encode()) <= stack.slim_cap
    # every call reports usage but the async OpenAI stream, which asks for none (no stream_options)
    assert sum(c.GEN_AI_USAGE_INPUT_TOKENS in a for a in models) == MODEL_CALLS - 1
    for _, s in mine:
        for kv in s.attributes:
            assert kv.value.ByteSize() <= stack.slim_cap + 64


def test_killed_agent_leaves_an_incomplete_run(stack: RecordingStack, tmp_path: Path) -> None:
    pid_file = tmp_path / "agent.pid"
    proc = stack.start_record("e2e-killed", AGENT_PID_FILE=str(pid_file), AGENT_HANG_S="60")
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    stack.wait_run("e2e-killed", ended=False, steps=1)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert proc.wait(30) == 128 + signal.SIGKILL
    run = stack.wait_run("e2e-killed")
    assert (run.status, run.replayable, run.reason, run.exit_code) == ("failed", False, "execution_incomplete", -9)
    shown = subprocess.run([sys.executable, "-m", "tracetape.cli", "show", "e2e-killed", "--data", str(stack.data)],
                           capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "incomplete" in shown.stdout and "no (execution_incomplete)" in shown.stdout
    clean = subprocess.run([sys.executable, "-m", "tracetape.cli", "show", "e2e-first", "--data", str(stack.data),
                            "--json"], capture_output=True, text=True, timeout=30)
    summary = json.loads(clean.stdout)["run"]
    assert (summary["status"], summary["replayable"]) == ("completed", True)
