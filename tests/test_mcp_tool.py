"""MCP tool calls recorded with no code change: a real MCP server over streamable HTTP on 127.0.0.1, called
through `mcp.ClientSession.call_tool` (and `mcp.Client`) while `mcp_hook` is instrumented."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit
from collections.abc import Callable, Iterator

import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.mcp_server import serve_mcp
from tracetape.instrumentation import contract, mcp_hook, provider, runtime
from tracetape.instrumentation.config import RecorderConfig

RUN_ID = "run-mcp-test"
SECRET = "sk-ant-" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt"

Spans = Callable[[], list[ReadableSpan]]
SERVER_CALLS: list[str] = []


@pytest.fixture(scope="module")
def mcp_url() -> Iterator[str]:
    """The test tools' streamable HTTP endpoint, served by uvicorn in a thread on 127.0.0.1."""
    with serve_mcp() as url:
        yield url


@pytest.fixture
def spans() -> Iterator[Spans]:
    memory = InMemorySpanExporter()
    config = RecorderConfig(run_id=RUN_ID)
    recorder = provider.build_recorder(config, service_name="tests", exporter=memory)
    runtime.activate(config.run_context(), recorder.tracer)
    mcp_hook.instrument()

    def read() -> list[ReadableSpan]:
        recorder.flush()
        return [s for s in memory.get_finished_spans() if s.attributes.get(contract.SPAN_KIND) == "step"]

    try:
        yield read
    finally:
        mcp_hook.uninstrument()
        runtime.deactivate()
        recorder.shutdown()


async def _with_session(url: str, body: Callable[[ClientSession], object]) -> object:
    async with streamable_http_client(url) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await body(session)  # type: ignore[misc]


def test_call_tool_is_recorded_as_a_tool_step(mcp_url: str, spans: Spans) -> None:
    async def body(session: ClientSession) -> object:
        await session.list_tools()
        added = await session.call_tool("add", {"a": 2, "b": 3})
        stored = await session.call_tool("store", {"key": "k", "value": SECRET})
        failed = await session.call_tool("explode", {"reason": "no fuel"})
        return added, stored, failed

    added, stored, failed = asyncio.run(_with_session(mcp_url, body))  # type: ignore[misc]
    assert added.structured_content == {"result": 5}
    assert failed.is_error is True

    by_name = {s.attributes[contract.GEN_AI_TOOL_NAME]: s for s in spans()}
    assert set(by_name) == {"add", "store", "explode"}
    add = by_name["add"]
    attrs = add.attributes
    assert add.name == "execute_tool add"
    assert attrs[contract.TOOL_SOURCE] == "mcp"
    assert attrs[contract.RUN_ID] == RUN_ID
    assert attrs[contract.GEN_AI_OPERATION_NAME] == "execute_tool"
    assert attrs[contract.SPAN_KIND] == contract.SPAN_KIND_STEP
    assert attrs[contract.TOOL_ARGUMENTS] == b'{"a":2,"b":3}'
    assert attrs[contract.ENVELOPE_HASH] == contract.envelope_hash(
        contract.tool_envelope("add", {"a": 2, "b": 3})
    )
    result = json.loads(attrs[contract.TOOL_RESULT])
    assert result["structuredContent"] == {"result": 5}
    assert result["isError"] is False
    assert result["content"] == [{"type": "text", "text": "5"}]
    # readOnlyHint from the listing: not mutating; tools without it may modify their environment
    assert attrs[contract.TOOL_MUTATING] is False
    assert by_name["store"].attributes[contract.TOOL_MUTATING] is True

    stored_args = by_name["store"].attributes[contract.TOOL_ARGUMENTS]
    assert SECRET.encode() not in stored_args and b"sk-a" in stored_args

    explode = json.loads(by_name["explode"].attributes[contract.TOOL_RESULT])
    assert explode["isError"] is True
    assert contract.ERROR_TYPE not in by_name["explode"].attributes  # a tool error is a result


def test_mcp_client_call_tool_goes_through_the_session(mcp_url: str, spans: Spans) -> None:
    async def main() -> object:
        async with Client(mcp_url) as client:
            return await client.call_tool("add", {"a": 40, "b": 2})

    result = asyncio.run(main())
    assert result.structured_content == {"result": 42}  # type: ignore[attr-defined]
    (span,) = spans()
    assert json.loads(span.attributes[contract.TOOL_ARGUMENTS]) == {"a": 40, "b": 2}
    assert json.loads(span.attributes[contract.TOOL_RESULT])["structuredContent"] == {"result": 42}


def test_a_failing_call_is_recorded_and_reraised(mcp_url: str, spans: Spans) -> None:
    async def body(session: ClientSession) -> object:
        with pytest.raises(MCPError) as info:
            await session.call_tool("slow", {"seconds": 0.5}, read_timeout_seconds=0.1)
        await asyncio.sleep(0.6)  # let the server answer the abandoned call before the session closes
        return info.value

    error = asyncio.run(_with_session(mcp_url, body))
    (span,) = spans()
    assert span.attributes[contract.GEN_AI_TOOL_NAME] == "slow"
    assert span.attributes[contract.ERROR_TYPE] == "mcp.shared.exceptions.MCPError"
    assert span.attributes[contract.ERROR_MESSAGE] == str(error)
    assert contract.TOOL_RESULT not in span.attributes


def test_uninstrument_restores_the_session(mcp_url: str, spans: Spans) -> None:
    mcp_hook.uninstrument()

    async def body(session: ClientSession) -> object:
        return await session.call_tool("add", {"a": 1, "b": 1})

    result = asyncio.run(_with_session(mcp_url, body))
    assert result.structured_content == {"result": 2}  # type: ignore[attr-defined]
    assert spans() == []
    assert ClientSession.call_tool.__qualname__ == "ClientSession.call_tool"


def test_the_mcp_transport_traffic_is_not_recorded_as_http_steps(mcp_url: str, spans: Spans) -> None:
    """Even when the MCP server's host is one whose HTTP traffic is recorded, only the tool step is."""
    httpx_hook = pytest.importorskip("tracetape.instrumentation.httpx_hook")
    host = urlsplit(mcp_url).netloc
    runtime.activate(RecorderConfig(run_id=RUN_ID, http_hosts=frozenset({host})).run_context(), runtime.tracer())
    httpx_hook.instrument()
    try:

        async def body(session: ClientSession) -> object:
            await session.list_tools()
            return await session.call_tool("add", {"a": 1, "b": 2})

        result = asyncio.run(_with_session(mcp_url, body))
        with httpx2.Client() as plain:  # the same host, not through MCP: recorded
            assert plain.get(mcp_url.replace("/mcp", "/not-mcp")).status_code == 404
    finally:
        httpx_hook.uninstrument()
    assert result.structured_content == {"result": 3}  # type: ignore[attr-defined]
    steps = spans()
    assert sorted(s.attributes[contract.STEP_KIND] for s in steps) == ["http", "tool"], [s.name for s in steps]


def test_replay_returns_the_recorded_result_without_calling_the_server(mcp_url: str, spans: Spans) -> None:
    from tests.support.tool_answers import ToolAnswers
    from tracetape.instrumentation.tools import tool_request

    recorded = {"content": [{"type": "text", "text": "stored k (recorded)"}], "isError": False}
    table = {("store", tool_request("store", {"key": "k", "value": "v"})[1]): {"action": "answer", "result": recorded}}
    with ToolAnswers(table) as answers:
        ctx = runtime.RunContext(run_id=RUN_ID, tenant="default", scope="default", mode=runtime.MODE_REPLAY,
                                 replay_url=answers.url)
        runtime.activate(ctx, runtime.tracer())
        before = list(SERVER_CALLS)

        async def body(session: ClientSession) -> object:
            return await session.call_tool("store", {"key": "k", "value": "v"})

        result = asyncio.run(_with_session(mcp_url, body))
    assert SERVER_CALLS == before
    assert result.content[0].text == "stored k (recorded)"  # type: ignore[attr-defined]
    assert answers.requests[0]["mutating"] is True and answers.requests[0]["allowed"] is False
    (span,) = spans()
    assert json.loads(span.attributes[contract.TOOL_RESULT]) == recorded
