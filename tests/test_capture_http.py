"""HTTP capture with the real openai/anthropic SDKs, httpx2, requests and aiohttp against the stand-in.

Every test goes over a real socket to `tests.support.standin` and compares what the span recorded with what
the stand-in received and sent, byte for byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import inspect
import json
import os
import random
import re
import threading
from typing import Any

import aiohttp
import aiohttp.web
import anthropic
import httpx2
import openai
import pytest
import requests
import urllib3.response
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.fixtures import Recorder, other_standin, recorder, standin  # noqa: F401
from tests.support.standin import Exchange, Standin, answer_pieces
from tracetape.instrumentation import contract, httpx_hook, redaction, requests_hook, runtime, steps

OPENAI_KEY = "sk-test-0123456789abcdefghijKLMNOP"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdefghijKLMN"
MODEL = "gpt-test"
CLAUDE = "claude-test"


# --- helpers ------------------------------------------------------------------------------------------------


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def oai(standin: Standin, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=standin.openai_base_url, api_key=OPENAI_KEY, **kw)


def aoai(standin: Standin, **kw: Any) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=standin.openai_base_url, api_key=OPENAI_KEY, **kw)


def ant(standin: Standin, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=standin.anthropic_base_url, api_key=ANTHROPIC_KEY, **kw)


def aant(standin: Standin, **kw: Any) -> anthropic.AsyncAnthropic:
    kw.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=standin.anthropic_base_url, api_key=ANTHROPIC_KEY, **kw)


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def expected_hash(ex: Exchange) -> str:
    """The envelope hash computed independently from what the stand-in received."""
    env = contract.http_envelope(ex.method, ex.path, ex.query, ex.headers, redaction.redact_body(ex.body))
    return contract.envelope_hash(env)


def assert_step(
    span: ReadableSpan,
    ex: Exchange,
    *,
    standin: Standin,
    kind: str,
    provider: str | None,
    model: str | None,
    end: str,
    attempt: int = 0,
    added_below: tuple[str, ...] = (),
) -> None:
    """Every request- and response-side attribute of one attempt, against the stand-in's exchange.

    `added_below`: request headers that a layer under the hook adds (http.client adds `host` for requests).
    """
    a = attrs(span)
    assert span.kind is SpanKind.CLIENT
    assert a[contract.RUN_ID] == "run-capture-test"
    assert a[contract.TENANT] == "tenant-test"
    assert a[contract.SCOPE] == "scope-test"
    assert a[contract.SPAN_KIND] == contract.SPAN_KIND_STEP
    assert re.fullmatch(r"[0-9a-f]{16}", a[contract.STEP_ID])
    assert isinstance(a[contract.STEP_STARTED_NS], int) and a[contract.STEP_STARTED_NS] > 0
    assert isinstance(a[contract.STEP_INDEX], int)
    assert a[contract.STEP_KIND] == kind
    assert a[contract.STEP_ATTEMPT] == attempt
    assert a[contract.ENVELOPE_PROFILE] == contract.CANON_PROFILE
    assert a[contract.ENVELOPE_HASH] == expected_hash(ex)
    assert a[contract.REQUEST_METHOD] == ex.method
    assert a[contract.REQUEST_URL] == f"{standin.url}{ex.path}" + (f"?{ex.query}" if ex.query else "")
    assert a[contract.REQUEST_BODY] == redaction.redact_body(ex.body)
    sent_headers = dict(contract.decode_headers(a[contract.REQUEST_HEADERS]))
    for name, value in ex.headers:
        if name.lower() not in redaction.SECRET_HEADERS and name.lower() not in added_below:
            assert sent_headers[name.lower()] == value
    if provider is None:
        assert contract.GEN_AI_PROVIDER_NAME not in a
    else:
        assert a[contract.GEN_AI_PROVIDER_NAME] == provider
    if kind == contract.STEP_KIND_MODEL:
        assert a[contract.GEN_AI_OPERATION_NAME] == "chat"
    else:
        assert contract.GEN_AI_OPERATION_NAME not in a
    if model is not None:
        assert a[contract.GEN_AI_REQUEST_MODEL] == model
    assert a[contract.RESPONSE_STATUS] == ex.status
    received = dict(contract.decode_headers(a[contract.RESPONSE_HEADERS]))
    for name, value in ex.response_headers:
        if name.lower() not in redaction.SECRET_HEADERS:
            assert received[name.lower()] == value
    assert a[contract.STREAM_END_REASON] == end
    body = a[contract.RESPONSE_BODY]
    assert isinstance(body, bytes)
    assert a[contract.RESPONSE_BYTES_READ] == len(body)
    if end == contract.END_EXHAUSTED:
        assert body == ex.response_body
    else:
        assert ex.response_body.startswith(body)


def all_values(spans: list[ReadableSpan]) -> list[str | bytes]:
    out: list[str | bytes] = []
    for s in spans:
        out.append(s.name)
        for value in attrs(s).values():
            if isinstance(value, (str, bytes)):
                out.append(value)
            elif isinstance(value, (tuple, list)):
                out.extend(v for v in value if isinstance(v, (str, bytes)))
        for ev in s.events:
            out.extend(str(v) for v in (ev.attributes or {}).values())
        if s.status.description:
            out.append(s.status.description)
    return out


def assert_no_credentials(spans: list[ReadableSpan]) -> None:
    for value in all_values(spans):
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        assert OPENAI_KEY not in text
        assert ANTHROPIC_KEY not in text
        assert OPENAI_KEY[8:] not in text and ANTHROPIC_KEY[8:] not in text
        assert "standin-cookie-secret" not in text
    for s in spans:
        a = attrs(s)
        for key in (contract.REQUEST_HEADERS, contract.RESPONSE_HEADERS):
            if key in a:
                names = {n for n, _ in contract.decode_headers(a[key])}
                assert not names & redaction.SECRET_HEADERS


# --- openai -------------------------------------------------------------------------------------------------


def test_openai_sync_non_stream_is_recorded_byte_exact(recorder: Recorder, standin: Standin) -> None:
    result = oai(standin).chat.completions.create(model=MODEL, messages=chat("hello sync"))
    assert result.choices[0].message.content == "".join(answer_pieces("hello sync", 4))
    (span,) = recorder.steps()
    ex = standin.last()
    assert span.name == f"chat {MODEL}"
    assert_step(span, ex, standin=standin, kind="model", provider="openai", model=MODEL, end="exhausted")
    assert attrs(span)[contract.RESPONSE_STREAMED] is False
    assert attrs(span)[contract.RESPONSE_CONTENT_ENCODING] == ""
    assert contract.RESPONSE_CHUNK_ENDS not in attrs(span)
    assert span.status.status_code is StatusCode.UNSET
    assert_no_credentials(recorder.spans())


def test_openai_async_non_stream_is_recorded_byte_exact(recorder: Recorder, standin: Standin) -> None:
    async def main() -> str:
        async with aoai(standin) as client:
            r = await client.chat.completions.create(model=MODEL, messages=chat("hello async"))
            return r.choices[0].message.content or ""

    assert asyncio.run(main()) == "".join(answer_pieces("hello async", 4))
    (span,) = recorder.steps()
    assert_step(span, standin.last(), standin=standin, kind="model", provider="openai", model=MODEL, end="exhausted")
    assert_no_credentials(recorder.spans())


def test_openai_sync_stream_records_every_chunk(recorder: Recorder, standin: Standin) -> None:
    stream = oai(standin).chat.completions.create(
        model=MODEL, messages=chat("stream sync"), stream=True, stream_options={"include_usage": True}
    )
    parts = [c.choices[0].delta.content for c in stream if c.choices]
    assert "".join(p or "" for p in parts) == "".join(answer_pieces("stream sync", 4))
    (span,) = recorder.steps()
    ex = standin.last()
    a = attrs(span)
    # openai stops reading at `data: [DONE]` and closes the response without reading the end of the body:
    # every byte was read, but the stream ended by a close.
    assert_step(span, ex, standin=standin, kind="model", provider="openai", model=MODEL, end="closed")
    assert a[contract.RESPONSE_BODY] == ex.response_body
    assert a[contract.RESPONSE_STREAMED] is True
    ends, times = list(a[contract.RESPONSE_CHUNK_ENDS]), list(a[contract.RESPONSE_CHUNK_TIMES_US])
    assert ends[-1] == len(ex.response_body) and ends == sorted(set(ends)) and len(times) == len(ends)
    assert times == sorted(times) and times[0] >= 0
    assert_no_credentials(recorder.spans())


def test_openai_async_stream_is_exhausted(recorder: Recorder, standin: Standin) -> None:
    async def main() -> list[str]:
        async with aoai(standin) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=chat("stream async"), stream=True)
            return [c.choices[0].delta.content or "" async for c in stream]

    assert "".join(asyncio.run(main())) == "".join(answer_pieces("stream async", 4))
    (span,) = recorder.steps()
    # The async SDK drains the rest of an HTTP/1.1 body after [DONE], so the body is read to its end.
    assert_step(span, standin.last(), standin=standin, kind="model", provider="openai", model=MODEL, end="exhausted")


def test_openai_with_raw_response_and_streaming_response(recorder: Recorder, standin: Standin) -> None:
    client = oai(standin)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=chat("raw"))
    assert raw.http_request.url.path == "/v1/chat/completions"
    assert raw.parse().choices[0].message.content == "".join(answer_pieces("raw", 4))
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=chat("streaming raw"), stream=True
    ) as resp:
        lines = list(resp.iter_lines())
    assert [line for line in lines if line][-1] == "data: [DONE]"
    first, second = recorder.steps()
    exchanges = standin.wait(2)
    assert_step(first, exchanges[0], standin=standin, kind="model", provider="openai", model=MODEL, end="exhausted")
    assert_step(second, exchanges[1], standin=standin, kind="model", provider="openai", model=MODEL, end="exhausted")
    assert first.attributes[contract.STEP_ID] != second.attributes[contract.STEP_ID]
    assert second.attributes[contract.STEP_INDEX] == first.attributes[contract.STEP_INDEX] + 1


def test_openai_responses_api_stream(recorder: Recorder, standin: Standin) -> None:
    client = oai(standin)
    with client.responses.stream(model=MODEL, input="responses api") as stream:
        final = stream.get_final_response()
    assert final.output_text == "".join(answer_pieces("responses api", 4))
    (span,) = recorder.steps()
    ex = standin.last()
    assert ex.path == "/v1/responses"
    assert span.attributes[contract.RESPONSE_BODY] == ex.response_body
    assert span.attributes[contract.STEP_KIND] == "model"


# --- anthropic ----------------------------------------------------------------------------------------------


def test_anthropic_sync_non_stream_and_stream(recorder: Recorder, standin: Standin) -> None:
    client = ant(standin)
    msg = client.messages.create(model=CLAUDE, max_tokens=64, messages=chat("claude sync"))
    assert msg.content[0].text == "".join(answer_pieces("claude sync", 4))
    stream = client.messages.create(model=CLAUDE, max_tokens=64, messages=chat("claude raw stream"), stream=True)
    kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    first, second = recorder.steps()
    exchanges = standin.wait(2)
    assert first.name == f"chat {CLAUDE}"
    assert_step(first, exchanges[0], standin=standin, kind="model", provider="anthropic", model=CLAUDE, end="exhausted")
    assert_step(second, exchanges[1], standin=standin, kind="model", provider="anthropic", model=CLAUDE, end="exhausted")
    sse = second.attributes[contract.RESPONSE_BODY].decode()
    assert [m for m in re.findall(r"^event: (\w+)$", sse, re.M)] == [
        "message_start", "content_block_start", "ping",
        "content_block_delta", "content_block_delta", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert len(second.attributes[contract.RESPONSE_CHUNK_ENDS]) >= 2
    assert_no_credentials(recorder.spans())


def test_anthropic_messages_stream_helper_sync_and_async(recorder: Recorder, standin: Standin) -> None:
    with ant(standin).messages.stream(model=CLAUDE, max_tokens=64, messages=chat("helper sync")) as s:
        text = "".join(s.text_stream)
    assert text == "".join(answer_pieces("helper sync", 4))

    async def main() -> str:
        async with aant(standin) as client:
            async with client.messages.stream(model=CLAUDE, max_tokens=64, messages=chat("helper async")) as s:
                return "".join([t async for t in s.text_stream])

    assert asyncio.run(main()) == "".join(answer_pieces("helper async", 4))
    spans = recorder.steps()
    exchanges = standin.wait(2)
    assert len(spans) == 2
    for span, ex in zip(spans, exchanges):
        assert_step(span, ex, standin=standin, kind="model", provider="anthropic", model=CLAUDE, end="exhausted")
    assert_no_credentials(recorder.spans())


def test_anthropic_async_non_stream_with_raw_response(recorder: Recorder, standin: Standin) -> None:
    async def main() -> str:
        async with aant(standin) as client:
            raw = await client.messages.with_raw_response.create(
                model=CLAUDE, max_tokens=64, messages=chat("claude async raw")
            )
            return (await raw.parse()).content[0].text

    assert asyncio.run(main()) == "".join(answer_pieces("claude async raw", 4))
    (span,) = recorder.steps()
    assert_step(span, standin.last(), standin=standin, kind="model", provider="anthropic", model=CLAUDE, end="exhausted")


def test_anthropic_own_call_span_gets_no_duplicate_chat_span(recorder: Recorder, standin: Standin) -> None:
    client = ant(standin, open_telemetry={"tracer_provider": recorder.provider})
    with client.messages.stream(model=CLAUDE, max_tokens=64, messages=chat("nested")) as s:
        s.get_final_message()
    (step,) = recorder.steps()
    sdk_spans = [s for s in recorder.spans() if s.instrumentation_scope.name == steps.ANTHROPIC_SCOPE_PREFIX]
    assert len(sdk_spans) == 1
    assert step.name == "POST /v1/messages"
    assert step.parent is not None and step.parent.span_id == sdk_spans[0].context.span_id
    assert [s.name for s in recorder.spans()].count(f"chat {CLAUDE}") == 0
    assert_step(step, standin.last(), standin=standin, kind="model", provider="anthropic", model=CLAUDE, end="exhausted")


# --- retries and envelope hashes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_retry_after_429_is_one_step_with_two_attempts(recorder: Recorder, standin: Standin, sdk: str) -> None:
    headers = {"x-standin-fault": "429-once"}
    if sdk == "openai":
        oai(standin, max_retries=2).chat.completions.create(
            model=MODEL, messages=chat(f"retry {sdk}"), extra_headers=headers
        )
    else:
        ant(standin, max_retries=2).messages.create(
            model=CLAUDE, max_tokens=8, messages=chat(f"retry {sdk}"), extra_headers=headers
        )
    first, second = recorder.steps()
    ex0, ex1 = standin.wait(2)
    assert (ex0.status, ex1.status) == (429, 200)
    assert ex0.body == ex1.body
    a0, a1 = attrs(first), attrs(second)
    assert a0[contract.STEP_ID] == a1[contract.STEP_ID]
    assert a0[contract.STEP_STARTED_NS] == a1[contract.STEP_STARTED_NS]
    assert a0[contract.STEP_INDEX] == a1[contract.STEP_INDEX]
    assert (a0[contract.STEP_ATTEMPT], a1[contract.STEP_ATTEMPT]) == (0, 1)
    assert a0[contract.ENVELOPE_HASH] == a1[contract.ENVELOPE_HASH] == expected_hash(ex0)
    assert a0[contract.RESPONSE_STATUS] == 429 and a0[contract.ERROR_TYPE] == "429"
    assert first.status.status_code is StatusCode.ERROR
    assert a1[contract.RESPONSE_STATUS] == 200 and contract.ERROR_TYPE not in a1
    assert a1[contract.RESPONSE_BODY] == ex1.response_body
    assert first.start_time < second.start_time


def test_identical_calls_share_a_hash_and_one_char_changes_it(recorder: Recorder, standin: Standin) -> None:
    client = oai(standin)
    for prompt in ("same prompt", "same prompt", "same prompT"):
        client.chat.completions.create(model=MODEL, messages=chat(prompt))
    a, b, c = (attrs(s) for s in recorder.steps())
    assert a[contract.ENVELOPE_HASH] == b[contract.ENVELOPE_HASH] != c[contract.ENVELOPE_HASH]
    assert a[contract.STEP_ID] != b[contract.STEP_ID]  # two steps, not a retry
    assert (a[contract.STEP_ATTEMPT], b[contract.STEP_ATTEMPT]) == (0, 0)


def test_json_key_order_and_whitespace_do_not_change_the_hash(recorder: Recorder, standin: Standin) -> None:
    one = b'{"model":"gpt-test","messages":[{"role":"user","content":"order"}],"temperature":0}'
    two = b'{ "temperature": 0,\n  "messages": [{"content": "order", "role": "user"}], "model": "gpt-test" }'
    headers = {"content-type": "application/json", "user-agent": "OpenAI/Python raw"}
    with httpx2.Client() as client:
        for body in (one, two):
            r = client.post(f"{standin.openai_base_url}/chat/completions", content=body, headers=headers)
            assert r.status_code == 200
    s1, s2 = recorder.steps()
    e1, e2 = standin.wait(2)
    assert (e1.body, e2.body) == (one, two)
    assert s1.attributes[contract.REQUEST_BODY] == one and s2.attributes[contract.REQUEST_BODY] == two
    assert s1.attributes[contract.ENVELOPE_HASH] == s2.attributes[contract.ENVELOPE_HASH]
    assert s1.attributes[contract.STEP_KIND] == "model"  # detected from the user agent and the path


def test_semantic_header_is_part_of_the_hash(recorder: Recorder, standin: Standin) -> None:
    client = ant(standin)
    client.messages.create(model=CLAUDE, max_tokens=8, messages=chat("beta"))
    client.messages.create(
        model=CLAUDE, max_tokens=8, messages=chat("beta"), extra_headers={"anthropic-beta": "some-beta"}
    )
    a, b = recorder.steps()
    assert a.attributes[contract.ENVELOPE_HASH] != b.attributes[contract.ENVELOPE_HASH]
    ex = standin.wait(2)
    assert a.attributes[contract.ENVELOPE_HASH] == expected_hash(ex[0])
    assert b.attributes[contract.ENVELOPE_HASH] == expected_hash(ex[1])


# --- credentials and redaction -----------------------------------------------------------------------------------


def test_credentials_never_reach_a_span(recorder: Recorder, standin: Standin) -> None:
    pasted = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    oai(standin).chat.completions.create(model=MODEL, messages=chat(f"my key is {pasted}"))
    ant(standin).messages.create(model=CLAUDE, max_tokens=8, messages=chat("anthropic key check"))
    ex_openai, ex_anthropic = standin.wait(2)
    assert ex_openai.header("authorization") == f"Bearer {OPENAI_KEY}"  # it was really sent...
    assert ANTHROPIC_KEY in (ex_anthropic.header("x-api-key") or ex_anthropic.header("authorization") or "")
    assert pasted.encode() in ex_openai.body
    spans = recorder.spans()
    assert_no_credentials(spans)  # ...and never recorded
    body = spans[0].attributes[contract.REQUEST_BODY]
    assert pasted.encode() not in body and b"sk-p" + b"*" * (len(pasted) - 4) in body
    assert len(body) == len(ex_openai.body)
    # the hash is of the redacted body, so a replayer that redacts first finds it
    assert spans[0].attributes[contract.ENVELOPE_HASH] == expected_hash(ex_openai)
    assert "set-cookie" in {n for n, _ in ex_openai.response_headers}


# --- encodings, errors, no-recording --------------------------------------------------------------------------------


def test_gzip_response_is_recorded_raw_with_its_encoding(recorder: Recorder, standin: Standin) -> None:
    gz = {"x-standin-gzip": "1"}
    client = oai(standin)
    r = client.chat.completions.create(model=MODEL, messages=chat("zipped"), extra_headers=gz)
    assert r.choices[0].message.content == "".join(answer_pieces("zipped", 4))
    stream = client.chat.completions.create(model=MODEL, messages=chat("zipped stream"), stream=True, extra_headers=gz)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "".join(answer_pieces("zipped stream", 4))
    plain, streamed = recorder.steps()
    ex_plain, ex_stream = standin.wait(2)
    for span, ex in ((plain, ex_plain), (streamed, ex_stream)):
        a = attrs(span)
        assert a[contract.RESPONSE_CONTENT_ENCODING] == "gzip"
        assert a[contract.RESPONSE_BODY] == ex.response_body  # compressed wire bytes, as sent
        assert a[contract.RESPONSE_BODY][:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(plain.attributes[contract.RESPONSE_BODY]))["object"] == "chat.completion"
    assert b"data: [DONE]" in gzip.decompress(streamed.attributes[contract.RESPONSE_BODY])


def test_server_error_is_recorded_with_status_and_error_type(recorder: Recorder, standin: Standin) -> None:
    with pytest.raises(openai.InternalServerError):
        oai(standin).chat.completions.create(
            model=MODEL, messages=chat("boom"), extra_headers={"x-standin-fault": "500"}
        )
    (span,) = recorder.steps()
    ex = standin.last()
    a = attrs(span)
    assert a[contract.RESPONSE_STATUS] == 500 == ex.status
    assert a[contract.ERROR_TYPE] == "500"
    assert span.status.status_code is StatusCode.ERROR
    assert ex.response_body.startswith(a[contract.RESPONSE_BODY])


def test_transport_failure_before_a_response_is_an_error_attempt(recorder: Recorder) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=OPENAI_KEY, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=chat("refused"))
    (span,) = recorder.steps()
    a = attrs(span)
    assert a[contract.STREAM_END_REASON] == contract.END_ERROR
    assert a[contract.ERROR_TYPE] == "httpx2.ConnectError"
    assert contract.RESPONSE_STATUS not in a
    assert a[contract.RESPONSE_BYTES_READ] == 0
    assert span.status.status_code is StatusCode.ERROR
    assert a[contract.REQUEST_BODY] == json.dumps(
        {"model": MODEL, "messages": chat("refused")}, separators=(",", ":")
    ).encode()


def test_nothing_is_recorded_without_an_active_run_or_when_suppressed(recorder: Recorder, standin: Standin) -> None:
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    client = oai(standin)
    with suppress_instrumentation():
        client.chat.completions.create(model=MODEL, messages=chat("suppressed"))
    runtime.deactivate()
    try:
        client.chat.completions.create(model=MODEL, messages=chat("inactive"))
        requests.post(f"{standin.url}/echo", data=b"x")
    finally:
        runtime.activate(recorder.context, recorder.provider.get_tracer("tracetape"))
    assert standin.wait(3) and recorder.steps() == []


def test_a_failing_recorder_never_breaks_the_call(recorder: Recorder, standin: Standin) -> None:
    class BrokenTracer:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("tracer is broken")

    runtime.activate(recorder.context, BrokenTracer())  # type: ignore[arg-type]
    try:
        r = oai(standin).chat.completions.create(model=MODEL, messages=chat("still works"))
    finally:
        runtime.activate(recorder.context, recorder.provider.get_tracer("tracetape"))
    assert r.choices[0].message.content == "".join(answer_pieces("still works", 4))
    assert recorder.steps() == []


def test_instrument_is_idempotent_and_uninstrument_restores(recorder: Recorder, standin: Standin) -> None:
    patched = httpx2.HTTPTransport.handle_request
    httpx_hook.instrument()
    assert httpx2.HTTPTransport.handle_request is patched
    httpx_hook.uninstrument()
    try:
        assert not hasattr(httpx2.HTTPTransport.handle_request, "__tracetape_original__")
        oai(standin).chat.completions.create(model=MODEL, messages=chat("uninstrumented"))
        assert recorder.steps() == []
    finally:
        httpx_hook.instrument()
    oai(standin).chat.completions.create(model=MODEL, messages=chat("instrumented again"))
    assert len(recorder.steps()) == 1


def test_legacy_httpx_client_is_recorded(recorder: Recorder, standin: Standin) -> None:
    import httpx

    with httpx.Client() as client:
        r = client.post(f"{standin.url}/echo?b=2&a=1", json={"legacy": True}, headers={"x-api-key": "secret-value"})
    assert r.status_code == 200
    (span,) = recorder.steps()
    ex = standin.last()
    assert_step(span, ex, standin=standin, kind="http", provider=None, model=None, end="exhausted")
    assert span.name == "POST /echo"
    assert "secret-value" not in span.attributes[contract.REQUEST_HEADERS]


def test_concurrent_threads_each_get_their_own_step(recorder: Recorder, standin: Standin) -> None:
    client = oai(standin)
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            client.chat.completions.create(model=MODEL, messages=chat(f"thread {i}"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spans = recorder.steps()
    assert len(spans) == 8
    assert len({s.attributes[contract.STEP_ID] for s in spans}) == 8
    assert sorted(s.attributes[contract.STEP_INDEX] for s in spans) == list(range(8))
    by_body = {ex.body: ex for ex in standin.wait(8)}
    for s in spans:
        ex = by_body[s.attributes[contract.REQUEST_BODY]]
        assert s.attributes[contract.RESPONSE_BODY] == ex.response_body


# --- requests and aiohttp: configured hosts only --------------------------------------------------------------------


def test_requests_is_recorded_for_configured_hosts_only(
    recorder: Recorder, standin: Standin, other_standin: Standin
) -> None:
    r = requests.post(f"{standin.url}/echo?q=1", json={"tool": "lookup"}, headers={"Authorization": "Bearer tok-123"})
    assert r.status_code == 200
    with requests.post(
        f"{standin.url}/v1/chat/completions",
        json={"model": MODEL, "messages": chat("via requests"), "stream": True},
        stream=True,
    ) as resp:
        streamed = b"".join(resp.iter_content(chunk_size=None))
    other_standin.reset()
    assert requests.get(f"{other_standin.url}/echo").status_code == 200
    assert other_standin.count == 1
    plain, stream = recorder.steps()
    ex_plain, ex_stream = standin.wait(2)
    below = ("host",)
    assert_step(plain, ex_plain, standin=standin, kind="http", provider=None, model=None, end="exhausted", added_below=below)
    assert_step(stream, ex_stream, standin=standin, kind="http", provider=None, model=None, end="exhausted", added_below=below)
    assert plain.name == "POST /echo"
    assert streamed == ex_stream.response_body
    assert attrs(stream)[contract.RESPONSE_STREAMED] is True
    assert "tok-123" not in attrs(plain)[contract.REQUEST_HEADERS]


def test_requests_gzip_and_partial_reads(recorder: Recorder, standin: Standin) -> None:
    r = requests.post(f"{standin.url}/echo", data="plain text body", headers={"x-standin-gzip": "1"})
    assert r.json()["path"] == "/echo"
    with requests.post(
        f"{standin.url}/v1/chat/completions",
        json={"model": MODEL, "messages": chat("partial"), "stream": True},
        stream=True,
    ) as resp:
        first = next(resp.iter_content(chunk_size=16))
    zipped, partial = recorder.steps()
    ex_zip, ex_partial = standin.wait(2)
    assert zipped.attributes[contract.RESPONSE_CONTENT_ENCODING] == "gzip"
    assert zipped.attributes[contract.RESPONSE_BODY] == ex_zip.response_body
    assert zipped.attributes[contract.REQUEST_BODY] == b"plain text body"
    assert partial.attributes[contract.STREAM_END_REASON] == contract.END_CLOSED
    assert partial.attributes[contract.RESPONSE_BODY] == first == ex_partial.response_body[:16]


class _Urllib3Before22Response(urllib3.response.HTTPResponse):
    """urllib3 2.0.x/2.1.x's response as the hook sees it: `_raw_read(self, amt=None)`, no `read1` keyword."""

    def _raw_read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
        return super()._raw_read(amt)


class _UnknownSignatureResponse(urllib3.response.HTTPResponse):
    """A response class whose `_raw_read` signature the hook does not know (a wrapper taking anything)."""

    def _raw_read(self, *args: Any, **kwargs: Any) -> bytes:
        return super()._raw_read(*args, **kwargs)


def test_requests_with_urllib3_before_2_2_tees_without_read1(
    recorder: Recorder, standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """urllib3 2.0.x/2.1.x (allowed by requests) have `_raw_read(amt)` without `read1`: the hook must call it so.

    Emulated rather than installed: installing urllib3 2.1 (and a matching requests) inside the test needs the
    network and is slow, and a second urllib3 cannot be imported next to the installed one in this process. The
    subclass below has exactly the 2.0/2.1 signature and delegates to the real `_raw_read`, which 2.2+ only
    extended with `read1`; everything else (requests, urllib3's `read`/`stream`, the socket, the stand-in) is
    real. It is put in at the one place urllib3 builds responses (`connection.getresponse` imports
    `urllib3.response.HTTPResponse` at call time); the test checks that the agent really got it.
    """
    monkeypatch.setattr(urllib3.response, "HTTPResponse", _Urllib3Before22Response)
    plain = requests.post(f"{standin.url}/echo", data=b"urllib3 2.1")  # requests reads it: read(amt) to EOF
    zipped = requests.post(f"{standin.url}/echo", data=b"gz", headers={"x-standin-gzip": "1"})
    with requests.get(f"{standin.url}/echo?whole=1", stream=True) as resp:
        assert isinstance(resp.raw, _Urllib3Before22Response)
        assert isinstance(resp.raw, requests_hook._TeedResponseAmtOnly)
        whole = resp.raw.read()  # _raw_read(None): the whole body in one read
    with requests.post(
        f"{standin.url}/v1/chat/completions",
        json={"model": MODEL, "messages": chat("before 2.2"), "stream": True},
        stream=True,
    ) as resp:
        first = next(resp.iter_content(chunk_size=16))  # closed before its end
    for r in (plain, zipped):
        assert isinstance(r.raw, _Urllib3Before22Response)
        assert isinstance(r.raw, requests_hook._TeedResponseAmtOnly)
    ex_plain, ex_zip, ex_whole, ex_partial = standin.wait(4)
    s_plain, s_zip, s_whole, s_partial = recorder.wait_steps(4)
    # what the agent got is exactly what the stand-in sent
    assert plain.content == ex_plain.response_body and plain.json()["path"] == "/echo"
    assert zipped.content == gzip.decompress(ex_zip.response_body)
    assert whole == ex_whole.response_body
    assert first == ex_partial.response_body[:16]
    # and what was recorded is exactly what was read from the wire
    below = ("host",)
    for span, ex in ((s_plain, ex_plain), (s_zip, ex_zip), (s_whole, ex_whole)):
        assert contract.RECORDING_ERROR not in attrs(span)
        assert_step(span, ex, standin=standin, kind="http", provider=None, model=None, end="exhausted", added_below=below)
    assert s_zip.attributes[contract.RESPONSE_CONTENT_ENCODING] == "gzip"
    assert contract.RECORDING_ERROR not in attrs(s_partial)
    assert s_partial.attributes[contract.STREAM_END_REASON] == contract.END_CLOSED
    assert s_partial.attributes[contract.RESPONSE_BODY] == first


def test_requests_with_urllib3_read1_tees_read1(recorder: Recorder, standin: Standin) -> None:
    """The installed urllib3 (2.2+ has `read1`): the hook keeps passing `read1` through, and `read1()` is teed."""
    if "read1" not in inspect.signature(urllib3.response.HTTPResponse._raw_read).parameters:
        pytest.skip("installed urllib3 has no read1")
    with requests.get(f"{standin.url}/echo?read1=1", stream=True) as resp:
        assert isinstance(resp.raw, requests_hook._TeedResponse)
        assert not isinstance(resp.raw, requests_hook._TeedResponseAmtOnly)
        pieces = []
        while piece := resp.raw.read1(7):
            pieces.append(piece)
    (span,) = recorder.wait_steps(1)
    ex = standin.last()
    assert b"".join(pieces) == ex.response_body
    assert contract.RECORDING_ERROR not in attrs(span)
    assert_step(span, ex, standin=standin, kind="http", provider=None, model=None, end="exhausted", added_below=("host",))


def test_requests_with_unknown_read_signatures_is_not_teed_and_says_why(
    recorder: Recorder, standin: Standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `_raw_read` the hook cannot reproduce exactly: the response is left alone, as for urllib3 1.26."""
    monkeypatch.setattr(urllib3.response, "HTTPResponse", _UnknownSignatureResponse)
    r = requests.post(f"{standin.url}/echo", data=b"unknown")
    assert type(r.raw) is _UnknownSignatureResponse
    ex = standin.last()
    assert r.content == ex.response_body
    (span,) = recorder.wait_steps(1)
    assert "response body not captured: unsupported" in attrs(span)[contract.RECORDING_ERROR]
    assert span.attributes[contract.STREAM_END_REASON] == contract.END_CLOSED
    assert span.attributes[contract.RESPONSE_STATUS] == 200


def test_requests_bytes_header_names_and_values_are_recorded_as_latin1(recorder: Recorder, standin: Standin) -> None:
    """requests sends bytes header names/values as is (http.client encodes str ones as latin-1)."""
    r = requests.post(
        f"{standin.url}/echo",
        data=b"x",
        headers={"X-Trace": b"abc", b"X-Bytes-Name": "plain", "X-Latin": b"caf\xe9"},
    )
    assert r.status_code == 200
    (span,) = recorder.wait_steps(1)
    ex = standin.last()
    a = attrs(span)
    assert contract.RECORDING_ERROR not in a
    sent = dict(contract.decode_headers(a[contract.REQUEST_HEADERS]))
    assert sent["x-trace"] == "abc"
    assert sent["x-bytes-name"] == "plain"
    assert sent["x-latin"] == "caf\xe9"  # b"caf\xe9" decoded as latin-1
    assert a[contract.REQUEST_BODY] == b"x"
    assert a[contract.RESPONSE_BODY] == ex.response_body == r.content
    assert a[contract.STREAM_END_REASON] == contract.END_EXHAUSTED


def test_aiohttp_is_recorded_for_configured_hosts_only(
    recorder: Recorder, standin: Standin, other_standin: Standin
) -> None:
    async def main() -> tuple[bytes, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{standin.url}/echo?x=1", json={"a": 1}, headers={"x-api-key": "k-1"}) as r:
                plain = await r.read()
            async with session.post(
                f"{standin.url}/v1/chat/completions",
                json={"model": MODEL, "messages": chat("via aiohttp"), "stream": True},
            ) as r:
                lines = [line async for line in r.content]
            async with session.get(f"{other_standin.url}/echo") as r:
                await r.read()
            return plain, b"".join(lines)

    other_standin.reset()
    plain, streamed = asyncio.run(main())
    assert other_standin.count == 1
    first, second = recorder.steps()
    ex_plain, ex_stream = standin.wait(2)
    assert plain == ex_plain.response_body and streamed == ex_stream.response_body
    assert_step(first, ex_plain, standin=standin, kind="http", provider=None, model=None, end="exhausted")
    assert_step(second, ex_stream, standin=standin, kind="http", provider=None, model=None, end="exhausted")
    assert "k-1" not in first.attributes[contract.REQUEST_HEADERS]


def test_aiohttp_gzip_is_recorded_decoded_as_the_application_reads_it(recorder: Recorder, standin: Standin) -> None:
    async def main() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{standin.url}/echo", data=b"zip me", headers={"x-standin-gzip": "1"}) as r:
                return await r.read()

    body = asyncio.run(main())
    (span,) = recorder.steps()
    ex = standin.last()
    assert gzip.decompress(ex.response_body) == body == span.attributes[contract.RESPONSE_BODY]
    assert span.attributes[contract.RESPONSE_CONTENT_ENCODING] == ""
    headers = dict(contract.decode_headers(span.attributes[contract.RESPONSE_HEADERS]))
    assert headers["content-encoding"] == "gzip"
    assert span.attributes[contract.REQUEST_BODY] == b"zip me"


class _CodingServer:
    """A real aiohttp server (own thread) for the aiohttp hook's encoding tests.

    - `GET /gz?ce=CODING&secret=0|1`: a gzip-compressed JSON body sent with `content-encoding: CODING`, echoing
      `AIOHTTP_SECRET` when `secret=1`;
    - `GET /hop?...`: a 302 to `/gz?...` (the same query);
    - `POST /upload`: answers the `content-encoding` it received and the body once aiohttp's server inflated it.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @staticmethod
    def body(secret: bool) -> bytes:
        return json.dumps({"echo": AIOHTTP_SECRET if secret else "nothing secret"}).encode()

    async def _gz(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        q = request.query
        wire = gzip.compress(self.body(q.get("secret") == "1"), mtime=0)
        return aiohttp.web.Response(
            body=wire, headers={"content-encoding": q.get("ce", "gzip"), "content-type": "application/json"}
        )

    async def _hop(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        raise aiohttp.web.HTTPFound(f"/gz?{request.query_string}")

    async def _upload(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        received = await request.read()
        return aiohttp.web.json_response(
            {"content_encoding": request.headers.get("content-encoding"), "body": received.decode()}
        )

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = aiohttp.web.Application()
        app.router.add_get("/gz", self._gz)
        app.router.add_get("/hop", self._hop)
        app.router.add_post("/upload", self._upload)
        self._runner = aiohttp.web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.hostport}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


AIOHTTP_SECRET = "sk-" + "Q" * 40


@pytest.fixture(scope="module")
def coding_server() -> Any:
    server = _CodingServer()
    yield server
    server.stop()


def _record_host_too(recorder: Recorder, hostport: str) -> None:
    """Record plain aiohttp traffic to `hostport` as well (the recorder's own teardown deactivates the run)."""
    context = dataclasses.replace(recorder.context, http_hosts=recorder.context.http_hosts | {hostport})
    runtime.activate(context, recorder.provider.get_tracer("tracetape"))


def _inflated(body: bytes, encoding: str) -> bytes:
    """`body` decoded per a recorded `tracetape.response.content_encoding`."""
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    assert encoding == "", f"unexpected recorded encoding {encoding!r}"
    return body


def _assert_consistent(span: ReadableSpan, read: bytes, secret: bool) -> None:
    """The recorded (bytes, encoding) pair decodes to what the agent read (its secret masked), never to a secret."""
    a = attrs(span)
    body, encoding = a[contract.RESPONSE_BODY], a[contract.RESPONSE_CONTENT_ENCODING]
    assert contract.RECORDING_ERROR not in a
    plain_read = gzip.decompress(read) if read[:2] == b"\x1f\x8b" else read
    assert json.loads(plain_read)["echo"] == (AIOHTTP_SECRET if secret else "nothing secret")
    decoded = _inflated(body, encoding)  # raises when the bytes are not in the recorded encoding
    assert decoded == redaction.redact_body(plain_read)
    if secret:
        assert AIOHTTP_SECRET[8:].encode() not in decoded and AIOHTTP_SECRET[8:].encode() not in body
        assert encoding == "" and b"sk-Q***" in body  # stored decoded, the secret masked
    else:
        assert body == read  # exactly the bytes the agent read, labelled with their encoding
        assert encoding == ("" if read is plain_read else "gzip")


@pytest.mark.parametrize("secret", [False, True], ids=["no-secret", "secret"])
def test_aiohttp_per_request_auto_decompress_decides_the_recorded_encoding(
    recorder: Recorder, coding_server: _CodingServer, secret: bool
) -> None:
    """aiohttp >= 3.10 takes `auto_decompress=` per request; the recorded encoding follows the one that applied."""
    _record_host_too(recorder, coding_server.hostport)
    q = f"ce=gzip&secret={int(secret)}"

    async def main() -> list[bytes]:
        reads = []
        async with aiohttp.ClientSession() as session:  # the session decompresses ...
            async with session.get(f"{coding_server.url}/gz?{q}", auto_decompress=False) as r:  # ... not this one
                reads.append(await r.read())
            async with session.get(f"{coding_server.url}/hop?{q}", auto_decompress=False) as r:  # nor its hops
                reads.append(await r.read())
            async with session.get(f"{coding_server.url}/gz?{q}") as r:  # the session's setting
                reads.append(await r.read())
        async with aiohttp.ClientSession(auto_decompress=False) as session:  # the session does not ...
            async with session.get(f"{coding_server.url}/gz?{q}", auto_decompress=True) as r:  # ... this one does
                reads.append(await r.read())
            async with session.get(f"{coding_server.url}/gz?{q}") as r:  # the session's setting
                reads.append(await r.read())
        return reads

    reads = asyncio.run(main())
    assert [r[:2] == b"\x1f\x8b" for r in reads] == [True, True, False, False, True]
    spans = [s for s in recorder.wait_steps(6) if attrs(s)[contract.REQUEST_URL].startswith(coding_server.url)]
    hop = spans.pop(1)
    assert attrs(hop)[contract.RESPONSE_STATUS] == 302
    assert len(spans) == len(reads) == 5
    for span, read in zip(spans, reads):
        _assert_consistent(span, read, secret)


@pytest.mark.parametrize("secret", [False, True], ids=["no-secret", "secret"])
def test_aiohttp_x_gzip_is_not_decoded_by_aiohttp_and_is_recorded_compressed(
    recorder: Recorder, coding_server: _CodingServer, secret: bool
) -> None:
    """aiohttp decodes gzip, deflate, br and zstd only: an `x-gzip` body reaches the agent still compressed."""
    _record_host_too(recorder, coding_server.hostport)

    async def main() -> list[bytes]:
        reads = []
        for auto in (True, False):
            async with aiohttp.ClientSession(auto_decompress=auto) as session:
                async with session.get(f"{coding_server.url}/gz?ce=x-gzip&secret={int(secret)}") as r:
                    reads.append(await r.read())
        return reads

    reads = asyncio.run(main())
    assert all(r[:2] == b"\x1f\x8b" for r in reads)
    spans = recorder.wait_steps(2)
    assert len(spans) == 2
    for span, read in zip(spans, reads):
        a = attrs(span)
        if not secret:
            assert a[contract.RESPONSE_CONTENT_ENCODING] == "x-gzip" and a[contract.RESPONSE_BODY] == read
        body, encoding = a[contract.RESPONSE_BODY], a[contract.RESPONSE_CONTENT_ENCODING]
        assert contract.RECORDING_ERROR not in a
        assert _inflated(body, encoding) == redaction.redact_body(gzip.decompress(read))
        if secret:
            assert AIOHTTP_SECRET[8:].encode() not in _inflated(body, encoding)


def test_aiohttp_unknown_auto_decompress_is_a_recording_error(
    recorder: Recorder, coding_server: _CodingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the hook cannot see which `auto_decompress` applied, it says so instead of trusting a guess."""
    from aiohttp.client_proto import ResponseHandler

    from tracetape.instrumentation.patching import ORIGINAL

    _record_host_too(recorder, coding_server.hostport)
    monkeypatch.setattr(ResponseHandler, "set_response_params", getattr(ResponseHandler.set_response_params, ORIGINAL))

    async def main() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{coding_server.url}/gz?ce=gzip&secret=1") as r:
                return await r.read()

    read = asyncio.run(main())
    (span,) = recorder.wait_steps(1)
    a = attrs(span)
    assert "response body encoding not known" in a[contract.RECORDING_ERROR]
    assert a[contract.RESPONSE_CONTENT_ENCODING] == ""  # the session's setting, assumed (and right here)
    assert _inflated(a[contract.RESPONSE_BODY], "") == redaction.redact_body(read)


def test_aiohttp_compressed_request_body_is_not_recorded_as_the_uncompressed_payload(
    recorder: Recorder, coding_server: _CodingServer
) -> None:
    """`compress=`: aiohttp deflates the body inside its writer; the payload handed to it is not what was sent."""
    _record_host_too(recorder, coding_server.hostport)
    payload = b'{"q": "hello"}' * 8

    async def main() -> list[Any]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{coding_server.url}/upload", data=payload, compress="deflate") as r:
                zipped = await r.json()
            async with session.post(f"{coding_server.url}/upload", data=payload, compress=True) as r:
                default = await r.json()
            async with session.post(f"{coding_server.url}/upload", data=payload) as r:
                plain = await r.json()
        return [zipped, default, plain]

    answers = asyncio.run(main())
    assert [a["content_encoding"] for a in answers] == ["deflate", "deflate", None]  # really sent deflated
    assert all(a["body"] == payload.decode() for a in answers)
    zipped, default, plain = recorder.wait_steps(3)
    for span in (zipped, default):
        a = attrs(span)
        assert a[contract.REQUEST_BODY] == b""  # not the uncompressed payload, which was never on the wire
        assert a[contract.RECORDING_ERROR] == "request body not captured: compressed by aiohttp (deflate)"
        assert dict(contract.decode_headers(a[contract.REQUEST_HEADERS]))["content-encoding"] == "deflate"
        assert a[contract.RESPONSE_STATUS] == 200
    assert contract.RECORDING_ERROR not in attrs(plain)
    assert attrs(plain)[contract.REQUEST_BODY] == payload


def test_httpx2_records_sdk_traffic_on_any_host_and_other_traffic_on_configured_hosts_only(
    recorder: Recorder, standin: Standin, other_standin: Standin
) -> None:
    other_standin.reset()
    with httpx2.Client() as client:
        client.post(f"{other_standin.url}/mcp", json={"jsonrpc": "2.0"})  # e.g. an MCP transport: not recorded
        client.post(f"{standin.url}/echo", content=b"configured host")  # in http_hosts: recorded
    sdk = openai.OpenAI(base_url=other_standin.openai_base_url, api_key=OPENAI_KEY, max_retries=0)
    sdk.chat.completions.create(model=MODEL, messages=chat("any host"))  # SDK traffic: recorded anywhere
    assert other_standin.count == 2
    plain, model = recorder.steps()
    assert plain.attributes[contract.REQUEST_BODY] == b"configured host"
    assert plain.attributes[contract.STEP_KIND] == "http"
    assert model.attributes[contract.STEP_KIND] == "model"
    assert model.attributes[contract.REQUEST_URL].startswith(other_standin.url)


def test_ids_ignore_the_global_random_seed_and_differ_in_a_forked_child() -> None:
    """Agents seed `random` for reproducible runs; two processes seeded alike must still get distinct step ids
    and span ids (the collector would take a repeated span id for a retry), and so must a forked child and its
    parent."""
    from tracetape.instrumentation import ids

    def draw() -> list[str]:
        gen = ids.OwnIdGenerator()
        return [ids.new_step_id(), f"{gen.generate_span_id():016x}", f"{gen.generate_trace_id():032x}"]

    state = random.getstate()
    try:
        random.seed(42)
        first = draw()
        random.seed(42)
        second = draw()
    finally:
        random.setstate(state)
    assert set(first).isdisjoint(second)
    assert re.fullmatch("[0-9a-f]{16}", first[0]) and re.fullmatch("[0-9a-f]{32}", first[2])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then out without running any of the parent's cleanup
        os.write(write_end, " ".join(draw()).encode())
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 256).decode().split()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 3 and set(child).isdisjoint(draw())


def test_the_recorders_spans_ignore_the_global_random_seed() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tracetape.instrumentation.config import RecorderConfig
    from tracetape.instrumentation.provider import build_recorder

    exporter = InMemorySpanExporter()
    rec = build_recorder(RecorderConfig(run_id="run-seeded", endpoint="http://127.0.0.1:9"),
                         service_name="seeded", exporter=exporter)
    state = random.getstate()
    try:
        contexts = []
        for _ in range(2):
            random.seed(7)
            with rec.tracer.start_as_current_span("episode") as span:
                contexts.append(span.get_span_context())
    finally:
        random.setstate(state)
        rec.provider.close()
    assert contexts[0].span_id != contexts[1].span_id and contexts[0].trace_id != contexts[1].trace_id
