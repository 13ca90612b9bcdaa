"""Tools in replay: answered from the tape through `instrumentation.tool_replay`, bodies never run, mutating
tools suppressed unless allowed. Recorded with the real `@tracetape.tool` decorator."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace

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


def test_recorded_exceptions_keep_their_class_and_message() -> None:
    """`str(KeyError('Rome'))` is `'Rome'`, quotes and all: the rebuilt exception says the same, with the same
    args; builtin `BaseException`s (not only `Exception`s) come back as themselves."""
    err = tool_replay.rebuild_exception("KeyError", str(KeyError("Rome")))
    assert type(err) is KeyError and err.args == ("Rome",) and str(err) == "'Rome'"
    assert str(tool_replay.rebuild_exception("ValueError", "bad x 3")) == "bad x 3"
    assert type(tool_replay.rebuild_exception("KeyboardInterrupt", "")) is KeyboardInterrupt
    assert type(tool_replay.rebuild_exception("SystemExit", "2")) is SystemExit


@tracetape.tool
async def slow(q: str) -> str:
    calls.append(f"slow {q}")
    await asyncio.sleep(5)
    return q


def test_a_cancelled_tool_replays_as_the_cancellation_it_was(store: Store) -> None:
    """Recorded: the agent's own timeout cancelled the tool (`CancelledError` on the step) and the agent carried
    on. Replayed: the tool does not run, the call waits as it did, and the same timeout cancels it again, so the
    agent carries on the same way (it used to get the recorded CancelledError at once, and crash)."""

    async def agent() -> str:
        try:
            return await asyncio.wait_for(slow("x"), 0.2)
        except asyncio.TimeoutError:
            return "timed out, carrying on"

    with recording(store, "run-cancel"):
        assert asyncio.run(agent()) == "timed out, carrying on"
    step = store.steps("default", "default", "run-cancel")[0]
    assert step.attempts[0].error_type == tool_replay.CANCELLED
    calls.clear()
    with Standin() as standin:
        replayer = start_replayer(store, standin)
        try:
            session = open_session(replayer, "run-cancel")
            runtime.activate(_ctx(session), trace.get_tracer("replay-test"))
            try:
                assert asyncio.run(agent()) == "timed out, carrying on"
            finally:
                runtime.deactivate()
            assert calls == []
            _, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}")
            assert report["counts"]["tools_answered"] == 1 and report["unused_steps"] == []
        finally:
            replayer.stop()


def test_tool_coverage_counts_as_http_coverage_does(store: Store) -> None:
    """A tool called once more than recorded is `exhausted` (not a miss); a tool that matched the tape and ran
    live (step mode past `until_step`, an allowed mutation) counts its recorded step as used."""
    with recording(store, "run-cov"):
        lookup("Paris")
        send_email("a@example.com")
    h = lambda name, args: tool_request(name, args)[1]  # noqa: E731
    with Standin() as standin:
        replayer = start_replayer(store, standin)
        try:
            exact = open_session(replayer, "run-cov")
            assert tool_replay.answer_tool(_ctx(exact), "lookup", h("lookup", {"city": "Paris"}), False) is not None
            with pytest.raises(tool_replay.ToolReplayMiss):
                tool_replay.answer_tool(_ctx(exact), "lookup", h("lookup", {"city": "Paris"}), False)
            _, report = api(f"{replayer.url}/v1/replay/sessions/{exact['session_id']}")
            assert (report["counts"].get("exhausted"), report["counts"].get("misses", 0)) == (1, 0)

            live = open_session(replayer, "run-cov", mode="step", until_step=0)
            ctx = _ctx(live, frozenset({"send_email"}))
            assert tool_replay.answer_tool(ctx, "lookup", h("lookup", {"city": "Paris"}), False) is None
            assert tool_replay.answer_tool(ctx, "send_email", h("send_email", {"to": "a@example.com"}), True) is None
            _, report = api(f"{replayer.url}/v1/replay/sessions/{live['session_id']}")
            assert report["counts"]["tools_live"] == 2 and report["unused_steps"] == []
        finally:
            replayer.stop()
