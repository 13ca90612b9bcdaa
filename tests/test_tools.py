"""`@tracetape.tool` and `tracetape.tool_call`: one tool step per call, recorded through tracetape's provider."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import tracetape
from tracetape.instrumentation import contract, provider, runtime
from tracetape.instrumentation.config import RecorderConfig
from tracetape.instrumentation.tools import tool_request

RUN_ID = "run-tools-test"
SECRET = "sk-proj-" + "A1b2C3d4E5f6G7h8J9k0"

Spans = Callable[[], list[ReadableSpan]]


@pytest.fixture
def spans() -> Iterator[Spans]:
    """Recording on, into an in-memory exporter behind tracetape's own provider; call to flush and read."""
    memory = InMemorySpanExporter()
    config = RecorderConfig(run_id=RUN_ID, tenant="t1", scope="s1")
    recorder = provider.build_recorder(config, service_name="tests", exporter=memory)
    runtime.activate(config.run_context(), recorder.tracer)

    def read() -> list[ReadableSpan]:
        recorder.flush()
        return list(memory.get_finished_spans())

    try:
        yield read
    finally:
        runtime.deactivate()
        recorder.shutdown()


def _only(spans: Spans) -> ReadableSpan:
    found = spans()
    assert len(found) == 1, [s.name for s in found]
    return found[0]


def _args(span: ReadableSpan) -> object:
    return json.loads(span.attributes[contract.TOOL_ARGUMENTS])


@tracetape.tool
def add(a: int, b: int = 2) -> int:
    return a + b


def test_decorator_records_one_tool_step(spans: Spans) -> None:
    assert add(1) == 3
    span = _only(spans)
    attrs = span.attributes
    assert span.name == "execute_tool add"
    assert attrs[contract.GEN_AI_OPERATION_NAME] == "execute_tool"
    assert attrs[contract.GEN_AI_TOOL_NAME] == "add"
    assert attrs[contract.SPAN_KIND] == contract.SPAN_KIND_STEP
    assert attrs[contract.STEP_KIND] == contract.STEP_KIND_TOOL
    assert attrs[contract.STEP_ATTEMPT] == 0
    assert len(attrs[contract.STEP_ID]) == 16 and int(attrs[contract.STEP_ID], 16) >= 0
    assert attrs[contract.STEP_STARTED_NS] == span.start_time
    assert attrs[contract.TOOL_SOURCE] == "decorator"
    assert attrs[contract.TOOL_MUTATING] is False
    assert attrs[contract.RUN_ID] == RUN_ID and attrs[contract.TENANT] == "t1" and attrs[contract.SCOPE] == "s1"
    assert attrs[contract.TOOL_ARGUMENTS] == b'{"a":1,"b":2}'
    assert attrs[contract.TOOL_RESULT] == b"3"
    assert attrs[contract.ENVELOPE_PROFILE] == contract.CANON_PROFILE
    expected = contract.envelope_hash(contract.tool_envelope("add", {"a": 1, "b": 2}))
    assert attrs[contract.ENVELOPE_HASH] == expected
    assert contract.GEN_AI_TOOL_CALL_ID not in attrs
    assert span.status.status_code is StatusCode.UNSET


def test_arguments_are_bound_by_name_so_call_style_does_not_change_the_hash(spans: Spans) -> None:
    add(1)
    add(1, 2)
    add(b=2, a=1)
    hashes = {s.attributes[contract.ENVELOPE_HASH] for s in spans()}
    assert len(hashes) == 1
    add(1, 3)
    assert len({s.attributes[contract.ENVELOPE_HASH] for s in spans()}) == 2


def test_steps_get_fresh_ids_and_increasing_indexes(spans: Spans) -> None:
    for i in range(3):
        add(i)
    found = sorted(spans(), key=lambda s: s.attributes[contract.STEP_INDEX])
    assert len({s.attributes[contract.STEP_ID] for s in found}) == 3
    indexes = [s.attributes[contract.STEP_INDEX] for s in found]
    assert indexes == sorted(indexes) and len(set(indexes)) == 3


def test_async_decorator_with_name_mutating_and_varargs(spans: Spans) -> None:
    @tracetape.tool(name="write_file", mutating=True)
    async def write(path: str, *chunks: str, mode: str = "w", **options: object) -> dict[str, object]:
        await asyncio.sleep(0)
        return {"path": path, "size": sum(len(c) for c in chunks)}

    result = asyncio.run(write("/tmp/x", "ab", "c", encoding="utf-8"))
    assert result == {"path": "/tmp/x", "size": 3}
    span = _only(spans)
    assert span.name == "execute_tool write_file"
    assert span.attributes[contract.TOOL_MUTATING] is True
    assert _args(span) == {"path": "/tmp/x", "chunks": ["ab", "c"], "mode": "w", "encoding": "utf-8"}
    assert json.loads(span.attributes[contract.TOOL_RESULT]) == {"path": "/tmp/x", "size": 3}


def test_exception_is_recorded_and_reraised_unchanged(spans: Spans) -> None:
    class QuotaError(RuntimeError):
        pass

    boom = QuotaError(f"quota exceeded for key {SECRET}")

    @tracetape.tool
    def fetch(url: str) -> str:
        raise boom

    with pytest.raises(QuotaError) as info:
        fetch("https://example.test")
    assert info.value is boom
    span = _only(spans)
    assert span.attributes[contract.ERROR_TYPE].endswith("QuotaError")
    message = span.attributes[contract.ERROR_MESSAGE]
    assert message.startswith("quota exceeded for key sk-p") and SECRET not in message
    assert len(message) == len(str(boom))
    assert contract.TOOL_RESULT not in span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert SECRET not in (span.status.description or "")
    assert not span.events  # an exception event would carry the unredacted message


def test_async_exception_and_cancellation_are_recorded(spans: Spans) -> None:
    @tracetape.tool
    async def slow() -> None:
        await asyncio.sleep(10)

    @tracetape.tool
    async def bad(x: int) -> int:
        raise ValueError(f"bad {x}")

    async def main() -> None:
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ValueError, match="bad 7"):
            await bad(7)

    asyncio.run(main())
    by_name = {s.name: s for s in spans()}
    assert by_name["execute_tool slow"].attributes[contract.ERROR_TYPE] == "asyncio.exceptions.CancelledError"
    assert by_name["execute_tool bad"].attributes[contract.ERROR_TYPE] == "ValueError"
    assert by_name["execute_tool bad"].attributes[contract.ERROR_MESSAGE] == "bad 7"


def test_secrets_in_arguments_and_result_are_redacted_before_hashing(spans: Spans) -> None:
    @tracetape.tool
    def login(user: str, api_key: str) -> dict[str, str]:
        return {"token": SECRET, "user": user}

    login("ana", api_key=SECRET)
    span = _only(spans)
    raw_args = span.attributes[contract.TOOL_ARGUMENTS]
    raw_result = span.attributes[contract.TOOL_RESULT]
    assert SECRET.encode() not in raw_args and SECRET.encode() not in raw_result
    masked = _args(span)["api_key"]
    assert masked.startswith("sk-p") and set(masked[4:]) == {"*"} and len(masked) == len(SECRET)
    assert span.attributes[contract.ENVELOPE_HASH] == contract.envelope_hash(
        contract.tool_envelope("login", {"api_key": masked, "user": "ana"})
    )
    assert tool_request("login", {"user": "ana", "api_key": SECRET}) == (
        raw_args,
        span.attributes[contract.ENVELOPE_HASH],
    )


def test_call_id_from_keyword_is_recorded_and_left_out_of_the_envelope(spans: Spans) -> None:
    @tracetape.tool
    def lookup(city: str, tool_call_id: str | None = None) -> str:
        return city.upper()

    lookup("paris", tool_call_id="call_1")
    lookup("paris", tool_call_id="call_2")
    first, second = sorted(spans(), key=lambda s: s.attributes[contract.STEP_INDEX])
    assert first.attributes[contract.GEN_AI_TOOL_CALL_ID] == "call_1"
    assert second.attributes[contract.GEN_AI_TOOL_CALL_ID] == "call_2"
    assert _args(first) == {"city": "paris"}
    assert first.attributes[contract.ENVELOPE_HASH] == second.attributes[contract.ENVELOPE_HASH]


def test_methods_leave_self_out_and_exclude_drops_named_parameters(spans: Spans) -> None:
    class Weather:
        def __init__(self) -> None:
            self.calls = 0

        @tracetape.tool(exclude=("client",))
        def forecast(self, city: str, client: object = None) -> str:
            self.calls += 1
            return f"sunny in {city}"

    w = Weather()
    assert w.forecast("Oslo", client=object()) == "sunny in Oslo"
    assert w.calls == 1
    assert _args(_only(spans)) == {"city": "Oslo"}


def test_context_manager_sync_and_async(spans: Spans) -> None:
    with tracetape.tool_call("search", {"q": "otel", "k": 3}, call_id="call_9") as call:
        call.set_result({"hits": ["a", "b"]})
    assert call.result == {"hits": ["a", "b"]}

    async def main() -> None:
        async with tracetape.tool_call("delete", {"id": 4}, mutating=True) as c:
            await asyncio.sleep(0)
            c.set_result(True)

    asyncio.run(main())
    by_name = {s.name: s for s in spans()}
    search = by_name["execute_tool search"].attributes
    assert search[contract.TOOL_SOURCE] == "context"
    assert search[contract.GEN_AI_TOOL_CALL_ID] == "call_9"
    assert search[contract.TOOL_ARGUMENTS] == b'{"k":3,"q":"otel"}'
    assert search[contract.TOOL_RESULT] == b'{"hits":["a","b"]}'
    assert search[contract.ENVELOPE_HASH] == contract.envelope_hash(
        contract.tool_envelope("search", {"q": "otel", "k": 3})
    )
    delete = by_name["execute_tool delete"].attributes
    assert delete[contract.TOOL_MUTATING] is True and delete[contract.TOOL_RESULT] == b"true"


def test_context_manager_records_exception_and_missing_result(spans: Spans) -> None:
    with pytest.raises(KeyError):
        with tracetape.tool_call("kv_get", {"key": "x"}):
            raise KeyError("x")
    with tracetape.tool_call("noop"):
        pass
    by_name = {s.name: s for s in spans()}
    assert by_name["execute_tool kv_get"].attributes[contract.ERROR_TYPE] == "KeyError"
    assert by_name["execute_tool noop"].attributes[contract.TOOL_RESULT] == b"null"
    assert json.loads(by_name["execute_tool noop"].attributes[contract.TOOL_ARGUMENTS]) == {}


def test_tool_span_is_current_while_the_tool_runs(spans: Spans) -> None:
    @tracetape.tool
    def outer() -> str:
        with runtime.tracer().start_as_current_span("inner work"):
            return "ok"

    outer()
    by_name = {s.name: s for s in spans()}
    tool_span, inner = by_name["execute_tool outer"], by_name["inner work"]
    assert inner.parent is not None and inner.parent.span_id == tool_span.context.span_id
    assert trace.get_current_span().get_span_context().is_valid is False


def test_nothing_is_recorded_when_not_active_or_suppressed(spans: Spans) -> None:
    with suppress_instrumentation():
        assert add(5) == 7
        with tracetape.tool_call("t", {"a": 1}) as call:
            call.set_result(1)
        assert call.recording is False
    assert spans() == []
    runtime.deactivate()
    assert add(1, b=1) == 2
    assert asyncio.run(_async_double(4)) == 8
    assert spans() == []


@tracetape.tool
async def _async_double(x: int) -> int:
    return 2 * x


def test_generator_functions_are_refused() -> None:
    with pytest.raises(TypeError, match="generator"):

        @tracetape.tool
        def gen() -> Iterator[int]:
            yield 1


def test_unserialisable_arguments_do_not_break_the_tool(spans: Spans) -> None:
    @tracetape.tool
    def takes(obj: object) -> str:
        return "fine"

    loop: list[object] = []
    loop.append(loop)  # a self-referencing list cannot be encoded
    assert takes(loop) == "fine"
    span = _only(spans)
    assert span.attributes[contract.RECORDING_ERROR].startswith("arguments:")
    assert span.attributes[contract.TOOL_RESULT] == b'"fine"'


def test_a_tool_called_from_a_bare_thread_is_parented_under_the_run(spans: Spans) -> None:
    import threading

    run_span = runtime.tracer().start_span("invoke_agent test")
    runtime.tracer().default_parent = trace.set_span_in_context(run_span)  # type: ignore[attr-defined]
    try:
        thread = threading.Thread(target=add, args=(5,))
        thread.start()
        thread.join()
    finally:
        runtime.tracer().default_parent = None  # type: ignore[attr-defined]
        run_span.end()
    tool_span = next(s for s in spans() if s.name == "execute_tool add")
    assert tool_span.parent is not None and tool_span.parent.span_id == run_span.get_span_context().span_id
    assert tool_span.context.trace_id == run_span.get_span_context().trace_id


# --- replay mode: answered by the replay session (a stand-in of its /_tool endpoint) ---------------------
def test_replay_answers_from_the_tape_without_running_the_tool(spans: Spans) -> None:
    from tests.support.tool_answers import ToolAnswers
    from tracetape.instrumentation import tool_replay

    ran: list[str] = []

    @tracetape.tool
    def lookup(city: str) -> dict[str, object]:
        ran.append("lookup")
        return {"live": True}

    @tracetape.tool
    async def explode(x: int) -> int:
        ran.append("explode")
        return x

    @tracetape.tool(mutating=True)
    def send(to: str) -> str:
        ran.append("send")
        return f"sent live to {to}"

    h = lambda name, args: tool_request(name, args)[1]  # noqa: E731
    table = {
        ("lookup", h("lookup", {"city": "Paris"})): {"action": "answer", "step": 0, "result": {"temp": 12}},
        ("explode", h("explode", {"x": 3})): {"action": "answer", "step": 1, "error_type": "ValueError",
                                               "error_message": "bad x 3"},
        ("send", h("send", {"to": "ops"})): {"action": "run"},
        ("search", h("search", {"q": "otel"})): {"action": "answer", "step": 3, "result": ["a"]},
    }
    with ToolAnswers(table) as answers:
        ctx = runtime.RunContext(run_id=RUN_ID, tenant="t1", scope="s1", mode=runtime.MODE_REPLAY,
                                 replay_url=answers.url, allow_mutations=frozenset({"send"}))
        runtime.activate(ctx, runtime.tracer())
        assert lookup("Paris") == {"temp": 12}
        with pytest.raises(ValueError, match="bad x 3"):
            asyncio.run(explode(3))
        assert send("ops") == "sent live to ops"
        with tracetape.tool_call("search", {"q": "otel"}) as call:
            assert call.replayed and call.result == ["a"]
        with pytest.raises(tool_replay.ToolReplayMiss):
            lookup("Rome")
        with pytest.raises(tool_replay.ToolReplayMiss):
            with tracetape.tool_call("search", {"q": "other"}):
                ran.append("body of a missed call")
    assert ran == ["send"]
    assert [r["path"] for r in answers.requests] == ["/s/test/_tool"] * 6
    assert answers.requests[2] == {"path": "/s/test/_tool", "name": "send", "envelope_hash": h("send", {"to": "ops"}),
                                   "mutating": True, "allowed": True}
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in sorted(spans(), key=lambda s: s.attributes[contract.STEP_INDEX]):
        by_name.setdefault(s.name, []).append(s)
    assert by_name["execute_tool lookup"][0].attributes[contract.TOOL_RESULT] == b'{"temp":12}'
    assert by_name["execute_tool lookup"][1].attributes[contract.ERROR_TYPE].endswith("ToolReplayMiss")
    assert by_name["execute_tool explode"][0].attributes[contract.ERROR_TYPE] == "ValueError"
    assert by_name["execute_tool send"][0].attributes[contract.TOOL_RESULT] == b'"sent live to ops"'
    assert by_name["execute_tool search"][0].attributes[contract.TOOL_RESULT] == b'["a"]'


def test_an_async_tool_behind_a_sync_wrapper_is_recorded_when_awaited(spans: Spans) -> None:
    """`@tool` over a callable that is not an async function yet returns an awaitable (a plain decorator around
    an async function, an object with `async def __call__`): the result recorded is the awaited one, the span
    covers the await (and is current meanwhile), and the step says a replay could not return an awaitable."""
    import functools

    def logged(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: object) -> object:
            return fn(*args)
        return wrapper

    @tracetape.tool
    @logged
    async def lookup(city: str) -> dict:
        with runtime.tracer().start_as_current_span("inner work"):
            await asyncio.sleep(0.01)
        return {"city": city}

    class Search:
        async def __call__(self, q: str) -> list:
            return [q]

    search = tracetape.tool(Search(), name="search")

    async def main() -> tuple[object, object]:
        return await lookup("Paris"), await search("x")

    assert asyncio.run(main()) == ({"city": "Paris"}, ["x"])
    by_name = {s.name: s for s in spans()}
    tool_span, inner = by_name["execute_tool lookup"], by_name["inner work"]
    assert json.loads(tool_span.attributes[contract.TOOL_RESULT]) == {"city": "Paris"}
    assert inner.parent is not None and inner.parent.span_id == tool_span.context.span_id
    assert json.loads(by_name["execute_tool search"].attributes[contract.TOOL_RESULT]) == ["x"]
    for name in ("execute_tool lookup", "execute_tool search"):
        assert "returned an awaitable" in by_name[name].attributes[contract.RECORDING_ERROR]


def test_an_exception_whose_str_fails_still_reaches_the_caller(spans: Spans) -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    @tracetape.tool
    def t(x: int) -> None:
        raise Odd(x)

    with pytest.raises(Odd):
        t(1)
    (step,) = spans()
    assert step.attributes[contract.ERROR_TYPE].endswith("Odd") and step.status.status_code is StatusCode.ERROR
