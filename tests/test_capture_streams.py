"""The response-stream lifecycle: however reading ends, exactly one ended span with the right end reason and
exactly the bytes the application read (a prefix of what the stand-in sent).

Matrix, sync and async, raw httpx2 and the real SDKs: read to the end, break then close, break then drop the
iterator, close before reading, an exception in the application's loop, the server dropping the connection
mid-stream, the response dropped and garbage-collected, cancellation, and a close from another task.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from tests.support.fixtures import Recorder, recorder, standin  # noqa: F401
from tests.support.standin import Exchange, Standin, answer_pieces
from tracetape.instrumentation import contract
from tracetape.instrumentation.steps import start_http_attempt

KEY = "sk-test-0123456789abcdefghijKLMNOP"
MODEL = "gpt-test"


def one_step(recorder: Recorder) -> ReadableSpan:
    """The only step span (garbage is collected while waiting, so a dropped stream has ended)."""
    spans = recorder.wait_steps(1)
    if len(spans) == 1:  # a late second end would show up here
        gc.collect()
        spans = recorder.steps()
    assert len(spans) == 1, [s.attributes.get(contract.STREAM_END_REASON) for s in spans]
    return spans[0]


def check(span: ReadableSpan, ex: Exchange, end: str, read: bytes | None = None) -> bytes:
    """End reason, bytes read (a prefix of what was sent; equal to `read` when given), chunk bookkeeping."""
    a = dict(span.attributes or {})
    assert a[contract.STREAM_END_REASON] == end
    body = a[contract.RESPONSE_BODY]
    assert ex.response_body.startswith(body)
    if read is not None:
        assert body == read
    if end == contract.END_EXHAUSTED:
        assert body == ex.response_body
    assert a[contract.RESPONSE_BYTES_READ] == len(body)
    if a.get(contract.RESPONSE_STREAMED):
        ends = list(a[contract.RESPONSE_CHUNK_ENDS])
        times = list(a[contract.RESPONSE_CHUNK_TIMES_US])
        assert len(ends) == len(times)
        assert ends == sorted(ends) and (not ends or ends[-1] == len(body))
        assert times == sorted(times)
    return body


@contextlib.contextmanager
def open_stream(client: httpx2.Client, standin: Standin, prompt: str, **headers: str) -> Iterator[httpx2.Response]:
    """`client.stream(...)` of a streamed chat completion; closes the response on exit."""
    req = stream_request(client, standin, prompt, **headers)
    with client.stream(req.method, req.url, content=req.content, headers=req.headers) as r:
        yield r


def stream_request(client: httpx2.Client | httpx2.AsyncClient, standin: Standin, prompt: str, **headers: str) -> Any:
    return client.build_request(
        "POST",
        f"{standin.openai_base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True},
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


# --- raw httpx2, sync ----------------------------------------------------------------------------------------------


def test_sync_read_to_the_end_is_exhausted(recorder: Recorder, standin: Standin) -> None:
    with httpx2.Client() as client, client.stream("POST", f"{standin.url}/echo", headers={"x-standin-stream": "1",
                                                                                          "x-standin-chunks": "6"}) as r:
        read = b"".join(r.iter_raw())
    check(one_step(recorder), standin.last(), contract.END_EXHAUSTED, read)


def test_sync_break_then_close_is_closed_with_the_partial_bytes(recorder: Recorder, standin: Standin) -> None:
    with httpx2.Client() as client:
        with open_stream(client, standin, "break close", x_standin_delay_ms="5") as r:
            for chunk in r.iter_raw():
                first = chunk
                break
    check(one_step(recorder), standin.last(), contract.END_CLOSED, first)


def test_sync_break_then_drop_the_iterator_is_closed(recorder: Recorder, standin: Standin) -> None:
    client = httpx2.Client()
    r = client.send(stream_request(client, standin, "break gc", x_standin_delay_ms="5"), stream=True)
    it = r.iter_raw()
    first = next(it)
    del it  # httpx closes the response in the iterator's `finally`
    span = one_step(recorder)
    check(span, standin.last(), contract.END_CLOSED, first)
    assert r.is_closed
    client.close()


def test_sync_close_before_reading_is_closed_with_no_bytes(recorder: Recorder, standin: Standin) -> None:
    with httpx2.Client() as client:
        r = client.send(stream_request(client, standin, "close unread"), stream=True)
        r.close()
        r.close()
    check(one_step(recorder), standin.last(), contract.END_CLOSED, b"")


def test_sync_exception_in_the_application_loop_is_a_close_not_an_error(recorder: Recorder, standin: Standin) -> None:
    with httpx2.Client() as client, pytest.raises(ValueError):
        with open_stream(client, standin, "app raises") as r:
            for _ in r.iter_raw():
                raise ValueError("the application's own error")
    span = one_step(recorder)
    check(span, standin.last(), contract.END_CLOSED)
    assert contract.ERROR_TYPE not in span.attributes


def test_sync_connection_dropped_mid_stream_is_an_error_with_partial_bytes(recorder: Recorder, standin: Standin) -> None:
    received: list[bytes] = []
    with httpx2.Client() as client, pytest.raises(httpx2.RemoteProtocolError):
        with open_stream(client, standin, "server drops", x_standin_fault="break-after:2") as r:
            for chunk in r.iter_raw():
                received.append(chunk)
    ex = standin.last()
    assert len(ex.response_chunks) == 2 and not ex.completed
    span = one_step(recorder)
    body = check(span, ex, contract.END_ERROR, b"".join(received))
    assert body == ex.response_body  # every byte the server wrote before dropping the connection
    assert span.attributes[contract.ERROR_TYPE] == "httpx2.RemoteProtocolError"
    assert "incomplete chunked read" in span.attributes[contract.ERROR_MESSAGE]
    assert span.status.status_code is StatusCode.ERROR


def test_sync_response_dropped_and_collected_is_dropped(recorder: Recorder, standin: Standin) -> None:
    client = httpx2.Client()
    r = client.send(stream_request(client, standin, "dropped"), stream=True)
    assert recorder.steps() == []  # still open
    del r
    gc.collect()
    check(one_step(recorder), standin.last(), contract.END_DROPPED, b"")
    client.close()


def test_sync_partly_read_response_dropped_ends_once(recorder: Recorder, standin: Standin) -> None:
    client = httpx2.Client()
    r = client.send(stream_request(client, standin, "partly dropped", x_standin_delay_ms="5"), stream=True)
    it = r.iter_raw()
    first = next(it)
    del r, it
    gc.collect()
    # httpx closes the response when its read generator is finalized, so this is recorded as a close.
    check(one_step(recorder), standin.last(), contract.END_CLOSED, first)
    client.close()


def test_sync_non_streamed_body_cut_short_is_an_error(recorder: Recorder, standin: Standin) -> None:
    with httpx2.Client() as client, pytest.raises(httpx2.RemoteProtocolError):
        client.post(f"{standin.url}/echo", content=b"cut", headers={"x-standin-fault": "break-after:1"})
    span = one_step(recorder)
    check(span, standin.last(), contract.END_ERROR)
    assert span.attributes[contract.RESPONSE_BYTES_READ] > 0


def test_chunk_times_follow_the_server_pacing(recorder: Recorder, standin: Standin) -> None:
    with httpx2.Client() as client:
        with open_stream(client, standin, "paced", x_standin_delay_ms="40", x_standin_chunks="3") as r:
            chunks = list(r.iter_raw())
    span = one_step(recorder)
    check(span, standin.last(), contract.END_EXHAUSTED, b"".join(chunks))
    times = list(span.attributes[contract.RESPONSE_CHUNK_TIMES_US])
    ends = list(span.attributes[contract.RESPONSE_CHUNK_ENDS])
    assert len(ends) == len(chunks)  # one entry per chunk as read
    assert times[-1] - times[0] >= 4 * 40_000 * 0.7  # 6 events, each after a 40 ms pause
    assert times[-1] <= (span.end_time - span.start_time) // 1000 + 1000


# --- raw httpx2, async -----------------------------------------------------------------------------------------------


def test_async_read_to_the_end_is_exhausted(recorder: Recorder, standin: Standin) -> None:
    async def main() -> bytes:
        async with httpx2.AsyncClient() as client:
            async with client.stream("POST", f"{standin.url}/echo", headers={"x-standin-stream": "1"}) as r:
                return b"".join([c async for c in r.aiter_raw()])

    read = asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_EXHAUSTED, read)


def test_async_aread_is_exhausted(recorder: Recorder, standin: Standin) -> None:
    async def main() -> bytes:
        async with httpx2.AsyncClient() as client:
            r = await client.post(f"{standin.url}/echo", json={"x": 1})
            return r.content

    asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_EXHAUSTED)


def test_async_break_then_aclose_is_closed(recorder: Recorder, standin: Standin) -> None:
    async def main() -> bytes:
        async with httpx2.AsyncClient() as client:
            r = await client.send(stream_request(client, standin, "async break", x_standin_delay_ms="5"), stream=True)
            async for chunk in r.aiter_raw():
                break
            await r.aclose()
            await r.aclose()
            return chunk

    first = asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_CLOSED, first)


def test_async_aclose_before_reading_is_closed(recorder: Recorder, standin: Standin) -> None:
    async def main() -> None:
        async with httpx2.AsyncClient() as client:
            r = await client.send(stream_request(client, standin, "async unread"), stream=True)
            await r.aclose()

    asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_CLOSED, b"")


def test_async_break_then_drop_the_iterator_is_closed(recorder: Recorder, standin: Standin) -> None:
    async def main() -> bytes:
        async with httpx2.AsyncClient() as client:
            r = await client.send(stream_request(client, standin, "async gc", x_standin_delay_ms="5"), stream=True)
            it = r.aiter_raw()
            first = await it.__anext__()
            del it
            gc.collect()
            for _ in range(20):  # the event loop closes the abandoned async generator in a task of its own
                await asyncio.sleep(0.005)
                if recorder.steps():
                    break
            return first

    first = asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_CLOSED, first)


def test_async_connection_dropped_mid_stream_is_an_error(recorder: Recorder, standin: Standin) -> None:
    async def main() -> bytes:
        got: list[bytes] = []
        async with httpx2.AsyncClient() as client:
            with pytest.raises(httpx2.RemoteProtocolError):
                req = stream_request(client, standin, "async drop", x_standin_fault="break-after:3")
                async with client.stream(req.method, req.url, content=req.content, headers=req.headers) as r:
                    async for chunk in r.aiter_raw():
                        got.append(chunk)
        return b"".join(got)

    read = asyncio.run(main())
    span = one_step(recorder)
    ex = standin.last()
    assert check(span, ex, contract.END_ERROR, read) == ex.response_body
    assert span.attributes[contract.ERROR_TYPE] == "httpx2.RemoteProtocolError"


def test_async_response_dropped_and_collected_is_dropped(recorder: Recorder, standin: Standin) -> None:
    async def main() -> None:
        async with httpx2.AsyncClient() as client:
            r = await client.send(stream_request(client, standin, "async dropped"), stream=True)
            del r
            gc.collect()

    asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_DROPPED, b"")


def test_async_cancelled_reader_is_closed_not_error(recorder: Recorder, standin: Standin) -> None:
    first: list[bytes] = []

    async def reader(client: httpx2.AsyncClient) -> None:
        req = stream_request(client, standin, "cancelled", x_standin_delay_ms="50", x_standin_chunks="8")
        async with client.stream(req.method, req.url, content=req.content, headers=req.headers) as r:
            async for chunk in r.aiter_raw():
                first.append(chunk)

    async def main() -> None:
        async with httpx2.AsyncClient() as client:
            task = asyncio.create_task(reader(client))
            while not first:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    span = one_step(recorder)
    check(span, standin.last(), contract.END_CLOSED, b"".join(first))
    assert contract.ERROR_TYPE not in span.attributes


def test_async_stream_opened_in_one_task_and_closed_in_another(
    recorder: Recorder, standin: Standin, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> bytes:
        async with httpx2.AsyncClient() as client:
            async def opener() -> tuple[httpx2.Response, bytes]:
                r = await client.send(stream_request(client, standin, "two tasks", x_standin_delay_ms="5"), stream=True)
                it = r.aiter_raw()
                chunk = await it.__anext__()
                await it.aclose()
                return r, chunk

            r, chunk = await asyncio.create_task(opener())
            await asyncio.create_task(r.aclose())
            return chunk

    with caplog.at_level(logging.ERROR):
        first = asyncio.run(main())
    check(one_step(recorder), standin.last(), contract.END_CLOSED, first)
    assert not [rec for rec in caplog.records if "detach" in rec.getMessage().lower()]


# --- the SDKs ------------------------------------------------------------------------------------------------------------


def test_openai_sync_break_and_close(recorder: Recorder, standin: Standin) -> None:
    client = openai.OpenAI(base_url=standin.openai_base_url, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sdk break"}], stream=True,
        extra_headers={"x-standin-chunks": "20", "x-standin-delay-ms": "2"},
    )
    for _ in stream:
        break
    stream.close()
    body = check(one_step(recorder), standin.last(), contract.END_CLOSED)
    assert body.startswith(b"data: {")


def test_openai_sync_dropped_stream(recorder: Recorder, standin: Standin) -> None:
    client = openai.OpenAI(base_url=standin.openai_base_url, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "sdk drop"}], stream=True)
    del stream
    gc.collect()
    check(one_step(recorder), standin.last(), contract.END_DROPPED, b"")


def test_openai_sync_connection_dropped_mid_stream(recorder: Recorder, standin: Standin) -> None:
    client = openai.OpenAI(base_url=standin.openai_base_url, api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sdk break-after"}], stream=True,
        extra_headers={"x-standin-fault": "break-after:3"},
    )
    got = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 3  # the role chunk and two content chunks reached the application
    ex = standin.last()
    span = one_step(recorder)
    assert check(span, ex, contract.END_ERROR) == ex.response_body
    assert span.attributes[contract.ERROR_TYPE] == "httpx2.RemoteProtocolError"


def test_openai_async_break_close_and_drop(recorder: Recorder, standin: Standin) -> None:
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=standin.openai_base_url, api_key=KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "async sdk break"}], stream=True,
                extra_headers={"x-standin-chunks": "20", "x-standin-delay-ms": "2"},
            )
            async for _ in stream:
                break
            await stream.close()
            dropped = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "async sdk drop"}], stream=True
            )
            del dropped
            gc.collect()

    asyncio.run(main())
    closed, dropped = recorder.wait_steps(2)
    ex_closed, ex_dropped = standin.wait(2)
    check(closed, ex_closed, contract.END_CLOSED)
    check(dropped, ex_dropped, contract.END_DROPPED, b"")


def test_anthropic_stream_helper_left_early_is_closed(recorder: Recorder, standin: Standin) -> None:
    client = anthropic.Anthropic(base_url=standin.anthropic_base_url, api_key=KEY, max_retries=0)
    with client.messages.stream(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "leave early"}],
        extra_headers={"x-standin-chunks": "30", "x-standin-delay-ms": "2"},
    ) as s:
        for text in s.text_stream:
            assert text == answer_pieces("leave early", 30)[0]
            break
    body = check(one_step(recorder), standin.last(), contract.END_CLOSED)
    assert body.startswith(b"event: message_start\n")


def test_anthropic_async_stream_exhausted_and_error(recorder: Recorder, standin: Standin) -> None:
    async def main() -> None:
        async with anthropic.AsyncAnthropic(base_url=standin.anthropic_base_url, api_key=KEY, max_retries=0) as client:
            async with client.messages.stream(
                model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "async full"}]
            ) as s:
                await s.get_final_message()
            # (the async SDK lets the transport's exception through here, unlike the sync one)
            with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
                async with client.messages.stream(
                    model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "async cut"}],
                    extra_headers={"x-standin-fault": "break-after:4"},
                ) as s:
                    await s.get_final_message()

    asyncio.run(main())
    full, cut = recorder.wait_steps(2)
    ex_full, ex_cut = standin.wait(2)
    check(full, ex_full, contract.END_EXHAUSTED)
    assert check(cut, ex_cut, contract.END_ERROR) == ex_cut.response_body
    assert len(ex_cut.response_chunks) == 4


# --- the attempt itself ----------------------------------------------------------------------------------------------------


def test_finish_is_idempotent_across_threads(recorder: Recorder) -> None:
    attempt = start_http_attempt(method="POST", url="http://example.test/v1/x", headers=[], body=b"{}")
    assert attempt is not None
    attempt.response_started(200, [("content-type", "text/event-stream")], "")
    attempt.chunk(b"data: 1\n\n")
    reasons = [contract.END_EXHAUSTED, contract.END_CLOSED, contract.END_ERROR, contract.END_DROPPED] * 8
    barrier = threading.Barrier(len(reasons))

    def end(reason: str) -> None:
        barrier.wait()
        attempt.finish(reason, RuntimeError("late") if reason == contract.END_ERROR else None)

    threads = [threading.Thread(target=end, args=(r,)) for r in reasons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    attempt.finish(contract.END_CLOSED)
    (span,) = recorder.steps()
    assert span.attributes[contract.STREAM_END_REASON] in contract.END_REASONS
    assert span.attributes[contract.RESPONSE_BODY] == b"data: 1\n\n"
    assert list(span.attributes[contract.RESPONSE_CHUNK_ENDS]) == [9]


# --- requests and aiohttp ------------------------------------------------------------------------------------------------


def chat_json(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}


def test_requests_lifecycle(recorder: Recorder, standin: Standin) -> None:
    import requests

    url = f"{standin.openai_base_url}/chat/completions"
    with requests.post(url, json=chat_json("req full"), stream=True) as r:
        full = b"".join(r.iter_content(chunk_size=None))
    with requests.post(url, json=chat_json("req early"), stream=True, headers={"x-standin-delay-ms": "5"}) as r:
        early = next(r.iter_content(chunk_size=None))
    dropped = requests.post(url, json=chat_json("req dropped"), stream=True)
    del dropped
    gc.collect()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(url, json=chat_json("req cut"), headers={"x-standin-fault": "break-after:2"})
    spans = recorder.wait_steps(4)
    exchanges = standin.wait(4)
    assert len(spans) == 4
    check(spans[0], exchanges[0], contract.END_EXHAUSTED, full)
    check(spans[1], exchanges[1], contract.END_CLOSED, early)
    check(spans[2], exchanges[2], contract.END_DROPPED, b"")
    assert check(spans[3], exchanges[3], contract.END_ERROR) == exchanges[3].response_body
    assert spans[3].attributes[contract.ERROR_TYPE] == "urllib3.exceptions.ProtocolError"


def test_aiohttp_lifecycle(recorder: Recorder, standin: Standin) -> None:
    import aiohttp

    url = f"{standin.openai_base_url}/chat/completions"

    async def main() -> tuple[bytes, bytes, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=chat_json("aio chunks")) as r:
                full = b"".join([c async for c, _ in r.content.iter_chunks()])
            async with session.post(url, json=chat_json("aio early"), headers={"x-standin-delay-ms": "5"}) as r:
                async for early in r.content.iter_any():
                    break
            dropped = await session.post(url, json=chat_json("aio dropped"))
            del dropped
            gc.collect()
            got: list[bytes] = []
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.post(url, json=chat_json("aio cut"), headers={"x-standin-fault": "break-after:3"}) as r:
                    async for chunk in r.content.iter_any():
                        got.append(chunk)
            return full, early, b"".join(got)

    full, early, partial = asyncio.run(main())
    spans = recorder.wait_steps(4)
    exchanges = standin.wait(4)
    assert len(spans) == 4
    check(spans[0], exchanges[0], contract.END_EXHAUSTED, full)
    check(spans[1], exchanges[1], contract.END_CLOSED, early)
    check(spans[2], exchanges[2], contract.END_DROPPED, b"")
    assert check(spans[3], exchanges[3], contract.END_ERROR, partial) == exchanges[3].response_body
    assert spans[3].attributes[contract.ERROR_TYPE] == "aiohttp.client_exceptions.ClientPayloadError"


def test_a_request_body_whose_iterator_fails_raises_what_it_raises_unrecorded(
        recorder: Recorder, standin: Standin) -> None:
    """httpx sends a generator body as it iterates it; tracetape reads it first (to record it). When the
    generator raises, the caller gets that exception, as without tracetape, not httpx's `StreamConsumed`
    from a second iteration; the attempt is recorded as failed."""
    import httpx

    def body() -> Iterator[bytes]:
        yield b"part-1;"
        raise ValueError("disk read failed")

    async def abody() -> Any:
        yield b"part-1;"
        raise ValueError("disk read failed")

    with pytest.raises(ValueError, match="disk read failed"):
        httpx.post(f"{standin.url}/upload", content=body())

    async def send() -> None:
        async with httpx.AsyncClient() as client:
            await client.post(f"{standin.url}/upload", content=abody())

    with pytest.raises(ValueError, match="disk read failed"):
        asyncio.run(send())
    steps = recorder.steps()
    assert len(steps) == 2
    for step in steps:
        assert step.attributes[contract.STREAM_END_REASON] == contract.END_ERROR
        assert step.attributes[contract.ERROR_TYPE] == "ValueError"


def test_a_password_in_the_url_is_never_recorded(recorder: Recorder, standin: Standin) -> None:
    import httpx
    import requests

    url = f"http://alice:hunter2-supersecretpw@{standin.hostport}/echo"
    httpx.get(url)
    requests.get(url)
    steps = recorder.steps()
    assert len(steps) == 2
    for step in steps:
        assert step.attributes[contract.REQUEST_URL] == f"http://***@{standin.hostport}/echo"
        assert "hunter2" not in repr(dict(step.attributes))
