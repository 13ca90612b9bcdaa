"""Tools in replay: answered from the tape through `instrumentation.tool_replay`, bodies never run, mutating
tools suppressed unless allowed. Recorded with the real `@tracetape.tool` decorator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tracetape
from tests.replay_support import api, open_session, recording, start_replayer
from tests.support.standin import Standin
from tracetape.collector.store import Store
from tracetape.instrumentation import runtime, tool_replay
from tracetape.instrumentation.tools import tool_request

calls: list[str] = []


@tracetape.tool
def lookup(city: str) -> dict[str, object]:
    calls.append(f"lookup {city}")
    return {"city": city, "temp": len(city)}


@tracetape.tool
def explode(x: int) -> int:
    calls.append("explode")
    raise ValueError(f"bad x {x}")


@tracetape.tool(mutating=True)
def send_email(to: str) -> str:
    calls.append(f"send {to}")
    return f"sent to {to}"


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    yield s
    s.close()


def _ctx(session: dict[str, object], allow: frozenset[str] = frozenset()) -> runtime.RunContext:
    return runtime.RunContext(run_id="replay", tenant="default", scope="default", mode=runtime.MODE_REPLAY,
                              replay_url=str(session["replay_base_url"]), allow_mutations=allow)


def test_tools_are_answered_from_the_tape_and_mutations_suppressed(store: Store) -> None:
    with recording(store, "run-tools"):
        lookup("Paris")
        with pytest.raises(ValueError):
            explode(3)
        send_email("a@example.com")
    calls.clear()
    with Standin() as standin:
        replayer = start_replayer(store, standin)
        try:
            session = open_session(replayer, "run-tools")
            ctx = _ctx(session)
            h = lambda name, args: tool_request(name, args)[1]  # noqa: E731
            answer = tool_replay.answer_tool(ctx, "lookup", h("lookup", {"city": "Paris"}), False)
            assert answer is not None and answer.value() == {"city": "Paris", "temp": 5}
            answer = tool_replay.answer_tool(ctx, "explode", h("explode", {"x": 3}), False)
            with pytest.raises(ValueError, match="bad x 3"):
                answer.value()
            answer = tool_replay.answer_tool(ctx, "send_email", h("send_email", {"to": "a@example.com"}), True)
            assert answer is not None and answer.suppressed_mutation and answer.value() == "sent to a@example.com"
            with pytest.raises(tool_replay.ToolReplayMiss):  # different arguments: exact mode never runs it
                tool_replay.answer_tool(ctx, "lookup", h("lookup", {"city": "Rome"}), False)
            assert calls == []  # no tool body ran
            _, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}")
            assert report["counts"]["suppressed_mutations"] == 1 and report["counts"]["tools_answered"] == 3
            assert report["suppressed_mutations"][0]["tool"] == "send_email"

            allowed = open_session(replayer, "run-tools")
            ctx = _ctx(allowed, frozenset({"send_email"}))
            assert tool_replay.answer_tool(ctx, "send_email", h("send_email", {"to": "a@example.com"}), True) is None
            with pytest.raises(tool_replay.ToolReplayMiss):  # a mutating call never recorded is refused
                tool_replay.answer_tool(_ctx(allowed), "send_email", h("send_email", {"to": "b@example.com"}), True)
        finally:
            replayer.stop()


def test_unreachable_replayer_fails_closed() -> None:
    ctx = runtime.RunContext(run_id="r", tenant="t", scope="s", mode=runtime.MODE_REPLAY,
                             replay_url="http://127.0.0.1:9/s/x")
    with pytest.raises(tool_replay.ToolReplayError):
        tool_replay.answer_tool(ctx, "lookup", "0" * 64, False)


def test_recorded_exceptions_are_rebuilt() -> None:
    assert isinstance(tool_replay.rebuild_exception("KeyError", "k"), KeyError)
    assert isinstance(tool_replay.rebuild_exception("json.decoder.JSONDecodeError", "m"), tool_replay.RecordedToolError)
    err = tool_replay.rebuild_exception("nowhere.Custom", "boom")
    assert isinstance(err, tool_replay.RecordedToolError) and err.error_type == "nowhere.Custom"
