"""Issue 3, acceptance 1, end to end: record the example agent (openai + anthropic, streaming and not, a
decorated tool, a mutating tool, an MCP tool) through a real collector, then `tracetape replay RUN --
python examples/agent.py` in exact mode: the same output, zero requests to the provider, zero tool bodies
run, the replay run linked to the original, and `tracetape diff` of the two exiting 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from tests.support import mcp_server
from tests.support.stack import AGENT, RecordingStack, recording_stack
from tracetape.collector.ingest import value_of
from tracetape.instrumentation import contract


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingStack]:
    with recording_stack(tmp_path_factory.mktemp("replay-e2e")) as s:
        yield s


def attrs_of(span: object) -> dict[str, object]:
    return {kv.key: value_of(kv.value) for kv in span.attributes}  # type: ignore[attr-defined]


def store_steps_of(stack: RecordingStack, run_id: str) -> list:
    store = stack.store()
    try:
        return store.steps("default", "default", run_id)
    finally:
        store.close()


def test_exact_replay_of_a_recorded_agent(stack: RecordingStack, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    recorded = stack.record("rec-1", AGENT_NOTES=str(notes))
    assert recorded.returncode == 0, recorded.stderr
    original = stack.wait_run("rec-1")
    assert original.replayable and notes.read_text().count("\n") == 1

    upstream_before = stack.standin.count
    mcp_before = sum(mcp_server.calls.values())
    replay = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "replay", "rec-1", "--data", str(stack.data), "--json",
         "--", sys.executable, str(AGENT)],
        env=stack.env(AGENT_NOTES=str(notes), TRACETAPE_ENDPOINT=stack.endpoint),
        capture_output=True, text=True, timeout=180,
    )
    assert replay.returncode == 0, replay.stderr + replay.stdout
    assert stack.standin.count == upstream_before  # nothing reached the provider
    assert sum(mcp_server.calls.values()) == mcp_before  # the MCP tool did not run
    assert notes.read_text().count("\n") == 1  # the mutating tool did not run
    # with --json, stdout is the report alone; the agent's own output goes to stderr
    agent_output = next(json.loads(line) for line in replay.stderr.splitlines() if line.startswith('{"anthropic'))
    assert agent_output == json.loads(recorded.stdout)
    report = json.loads(replay.stdout)
    replay_run_id = report["replay_run_id"]
    assert report["replay_of"] == "rec-1" and replay_run_id != "rec-1" and report["exit_code"] == 0

    replayed = stack.wait_run(replay_run_id)
    assert (replayed.replay_of, replayed.replay_mode, replayed.lineage_depth) == ("rec-1", "exact", 1)
    assert replayed.status == "completed" and replayed.step_count == original.step_count

    # every replayed model attempt links to the recorded attempt it was served from
    store = stack.store()
    try:
        originals = {(a.trace_id, a.span_id) for st in store.steps("default", "default", "rec-1")
                     if st.kind == "model" for a in st.attempts}
        replay_spans = [ResourceSpans.FromString(b).scope_spans[0].spans[0]
                        for b in store.spans("default", "default", replay_run_id)]
        replayed_models = [st for st in store.steps("default", "default", replay_run_id) if st.kind == "model"]
    finally:
        store.close()
    linked = {(bytes(link.trace_id), bytes(link.span_id)) for span in replay_spans for link in span.links}
    tool_originals = {(a.trace_id, a.span_id) for st in store_steps_of(stack, "rec-1") if st.kind == "tool"
                      for a in st.attempts}
    assert len(replayed_models) == len(originals) and linked == originals | tool_originals
    # the trace shows which tools were answered from the tape, and the mutation that did not happen
    tool_spans = {attrs_of(s)[contract.GEN_AI_TOOL_NAME]: s for s in replay_spans
                  if contract.GEN_AI_TOOL_NAME in attrs_of(s)}
    assert set(tool_spans) == {"lookup_fact", "save_note", "add"}
    assert all(attrs_of(s)[contract.TOOL_REPLAYED] for s in tool_spans.values())
    assert attrs_of(tool_spans["save_note"])[contract.TOOL_MUTATION_SUPPRESSED] is True
    assert [e.name for e in tool_spans["save_note"].events] == [contract.EVENT_MUTATION_SUPPRESSED]
    assert contract.TOOL_MUTATION_SUPPRESSED not in attrs_of(tool_spans["lookup_fact"])
    assert all(not any(n == contract.REPLAYED_FROM_HEADER for n, _ in a.response_headers)
               for st in replayed_models for a in st.attempts)

    diff = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "diff", "rec-1", replay_run_id, "--data", str(stack.data)],
        capture_output=True, text=True, timeout=60,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr
