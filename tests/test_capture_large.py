"""Large request bodies (from `steps.CAPTURE_ELSEWHERE_FROM` on) are redacted, parsed and hashed on tracetape's
capture thread while the request goes out. The recorded spans must be what they would be had the caller
captured them: the same body, `ENVELOPE_HASH`, model and span name on every attempt, retries grouped into one
step, secrets masked before hashing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from tests.support.fixtures import Recorder, recorder, standin  # noqa: F401
from tests.support.standin import Standin
from tracetape.instrumentation import contract, redaction, steps

KEY = "sk-test-0123456789abcdefghijKLMNOP"
BIG = "lorem ipsum dolor sit amet " * (steps.CAPTURE_ELSEWHERE_FROM // 27 + 100)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def client(standin: Standin, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=standin.openai_base_url, api_key=KEY, **kw)


def expected_hash(body: bytes, path: str = "/v1/chat/completions") -> str:
    return contract.envelope_hash(contract.http_envelope("POST", path, "", [], redaction.redact_body(body)))


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_body_gets_the_hash_the_caller_would_have_computed(
    recorder: Recorder, standin: Standin, stream: bool
) -> None:
    prompt = f"{stream} " + BIG + " my key sk-proj-ABCDEFGHIJKLMNOPQRSTUV end"
    response = client(standin).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": prompt}], stream=stream
    )
    if stream:
        for _ in response:  # type: ignore[union-attr]
            pass
    (step,) = recorder.wait_steps(1)
    ex = standin.last()
    assert len(ex.body) >= steps.CAPTURE_ELSEWHERE_FROM
    a = attrs(step)
    assert a[contract.ENVELOPE_HASH] == expected_hash(ex.body)
    assert a[contract.REQUEST_BODY] == redaction.redact_body(ex.body) and b"ABCDEFGHIJ" not in a[contract.REQUEST_BODY]
    assert step.name == "chat gpt-test" and a[contract.GEN_AI_REQUEST_MODEL] == "gpt-test"
    assert contract.RECORDING_ERROR not in a


def test_retries_of_a_large_body_are_one_step(recorder: Recorder, standin: Standin,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = steps._capture_and_remember

    def slow(request: steps._Request, group: tuple[str, int, int]) -> steps._Captured:
        time.sleep(0.2)  # a slow capture thread: the retry still joins the first attempt's step
        return real(request, group)

    monkeypatch.setattr(steps, "_capture_and_remember", slow)
    for n in range(3):
        client(standin, max_retries=2).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"{n} {BIG}"}],
            extra_headers={"x-standin-fault": "500-once"},
        )
    spans = recorder.wait_steps(6)
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_hash.setdefault(attrs(span)[contract.ENVELOPE_HASH], []).append(attrs(span))
    assert len(by_hash) == 3
    for attempts in by_hash.values():
        first, second = sorted(attempts, key=lambda a: a[contract.STEP_ATTEMPT])
        assert (first[contract.STEP_ATTEMPT], second[contract.STEP_ATTEMPT]) == (0, 1)
        assert first[contract.STEP_ID] == second[contract.STEP_ID]
        assert first[contract.STEP_STARTED_NS] == second[contract.STEP_STARTED_NS]
        assert (first[contract.RESPONSE_STATUS], second[contract.RESPONSE_STATUS]) == (500, 200)


def test_same_large_envelope_same_hash_as_a_small_threshold(recorder: Recorder, standin: Standin,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    body = [{"role": "user", "content": BIG}]
    client(standin).chat.completions.create(model="gpt-test", messages=body)  # on the capture thread
    monkeypatch.setattr(steps, "CAPTURE_ELSEWHERE_FROM", 1 << 40)
    client(standin).chat.completions.create(model="gpt-test", messages=body)  # by the caller
    first, second = recorder.wait_steps(2)
    assert attrs(first)[contract.STEP_ID] != attrs(second)[contract.STEP_ID]
    assert first.name == second.name == "chat gpt-test"
    same = (contract.ENVELOPE_HASH, contract.REQUEST_BODY, contract.GEN_AI_REQUEST_MODEL, contract.GEN_AI_PROVIDER_NAME,
            contract.GEN_AI_OPERATION_NAME, contract.REQUEST_HEADERS, contract.STEP_KIND)
    assert [attrs(first)[k] for k in same] == [attrs(second)[k] for k in same]


def test_the_attempt_waits_for_its_hash_before_the_span_ends(recorder: Recorder, standin: Standin,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow capture thread delays the end of the span, never the body's and hash's presence on it."""
    release, finishing = threading.Event(), threading.Event()
    real_capture, real_attributes = steps._capture_and_remember, steps.HttpAttempt._capture_attributes

    def slow(request: steps._Request, group: tuple[str, int, int]) -> steps._Captured:
        release.wait(10)
        return real_capture(request, group)

    def finish_reached(self: steps.HttpAttempt, attrs: dict[str, Any]) -> None:
        finishing.set()
        real_attributes(self, attrs)

    monkeypatch.setattr(steps, "_capture_and_remember", slow)
    monkeypatch.setattr(steps.HttpAttempt, "_capture_attributes", finish_reached)
    done = threading.Thread(target=lambda: client(standin).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "slow " + BIG}]))
    done.start()
    assert finishing.wait(10)  # the response is read and the attempt is finishing...
    assert recorder.steps() == []  # ...but its span waits for its capture
    release.set()
    done.join(10)
    (step,) = recorder.wait_steps(1)
    assert attrs(step)[contract.ENVELOPE_HASH] == expected_hash(standin.last().body)
    assert attrs(step)[contract.REQUEST_BODY] == redaction.redact_body(standin.last().body)


def test_a_failed_capture_is_a_recording_error_not_a_failed_call(recorder: Recorder, standin: Standin,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(request: steps._Request, group: tuple[str, int, int]) -> steps._Captured:
        raise RuntimeError("hashing failed")

    monkeypatch.setattr(steps, "_capture_and_remember", broken)
    answer = client(standin).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": BIG}])
    assert answer.choices
    (step,) = recorder.wait_steps(1)
    a = attrs(step)
    assert contract.ENVELOPE_HASH not in a and contract.REQUEST_BODY not in a
    assert "hashing failed" in a[contract.RECORDING_ERROR]


def test_small_bodies_are_captured_by_the_caller(recorder: Recorder, standin: Standin,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    submitted: list[Future[steps._Captured] | None] = []
    real = steps._capturer.submit
    monkeypatch.setattr(steps._capturer, "submit", lambda *a: submitted.append(real(*a)) or submitted[-1])
    client(standin).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "small"}])
    (step,) = recorder.wait_steps(1)
    assert submitted == [] and attrs(step)[contract.ENVELOPE_HASH] == expected_hash(standin.last().body)


def test_an_attempt_ending_on_the_capture_thread_does_not_wait_for_it(recorder: Recorder, standin: Standin) -> None:
    """An attempt can end on the capture thread (a dropped stream collected by a garbage collection that runs
    there) while its own capture waits in that thread's queue: it ends without body and hash, saying why,
    instead of waiting for itself forever."""
    client(standin).chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "warm " + BIG}])
    gate, closed = threading.Event(), threading.Event()
    streams: list[Any] = []

    def on_the_capture_thread() -> None:
        gate.wait(10)
        streams[0].response.close()  # ends the attempt here, its hash queued behind this very task
        closed.set()

    running = steps._capturer._pool.submit(on_the_capture_thread)  # type: ignore[union-attr]
    streams.append(client(standin).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "dropped " + BIG}], stream=True))
    gate.set()
    running.result(10)
    assert closed.is_set()
    spans = recorder.wait_steps(2)
    dropped = attrs(spans[-1])
    assert dropped[contract.STREAM_END_REASON] == contract.END_CLOSED
    assert contract.ENVELOPE_HASH not in dropped and "not captured yet" in dropped[contract.RECORDING_ERROR]
    steps._capturer.wait()  # its hash still reaches `_recent` for a retry
