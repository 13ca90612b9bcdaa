"""The replayer over real sockets: real openai/anthropic SDKs, the stand-in provider (whose request counter
proves what reached an upstream), recordings made by the real instrumentation hooks."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.replay_support import API_KEY, api, open_session, recording, start_replayer, write_spans
from tests.replay_support import standin, store  # noqa: F401 - fixtures
from tests.support.spans import Agent, chat_request
from tests.support.standin import Standin
from tracetape.collector import ingest
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c


@pytest.fixture()
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture()
def replayer(store: Store, standin: Standin, spans: InMemorySpanExporter) -> Iterator[object]:
    r = start_replayer(store, standin, exporter=spans)
    yield r
    r.stop()


def _oai(base_url: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, **kw)


def _ant(base_url: str, **kw: object) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=API_KEY, **kw)


MSG = [{"role": "user", "content": "tell me a long story"}]


def _agent(oc: openai.OpenAI, ac: anthropic.Anthropic) -> list[object]:
    """A small agent: openai and anthropic, streaming (25 chunks) and not. Returns what the SDKs built."""
    out: list[object] = []
    out.append(oc.chat.completions.create(model="gpt-x", messages=MSG).model_dump())
    stream = oc.chat.completions.create(model="gpt-x", messages=MSG, stream=True,
                                        stream_options={"include_usage": True}, extra_headers={"x-standin-chunks": "25"})
    out.append([chunk.model_dump() for chunk in stream])
    out.append(ac.messages.create(model="claude-x", max_tokens=50, messages=MSG).model_dump())
    with ac.messages.stream(model="claude-x", max_tokens=50, messages=MSG,
                            extra_headers={"x-standin-chunks": "22"}) as s:
        events = [e.model_dump() for e in s]
        final = s.get_final_message().model_dump()
    out.append(events)
    out.append(final)
    return out


def test_exact_replay_rebuilds_identical_objects_with_zero_upstream_requests(
        store: Store, standin: Standin, replayer: object, spans: InMemorySpanExporter) -> None:
    with recording(store, "run-sdk"):
        recorded = _agent(_oai(standin.openai_base_url), _ant(standin.anthropic_base_url))
    stored = store.steps("default", "default", "run-sdk")
    assert len(stored) == 4 and len(stored[1].attempts[0].chunk_ends) >= 20
    wire = {i: ex.response_body for i, ex in enumerate(standin.wait(standin.count))}
    before = standin.count

    session = open_session(replayer, "run-sdk")
    replayed = _agent(_oai(session["base_urls"]["openai"]), _ant(session["base_urls"]["anthropic"]))
    assert replayed == recorded
    assert standin.count == before  # nothing reached the upstream
    status, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
    assert status == 200 and report["counts"]["tape"] == 4 and report["counts"]["misses"] == 0
    assert report["unused_steps"] == [] and report["counts"]["live"] == 0

    # The replayer recorded the replay as a new run whose attempts carry the exact wire bytes and boundaries.
    write_spans(store, list(spans.get_finished_spans()))
    run = store.run("default", "default", session["replay_run_id"])
    assert run is not None and (run.replay_of, run.replay_mode, run.lineage_depth) == ("run-sdk", "exact", 1)
    replay_steps = store.steps("default", "default", session["replay_run_id"])
    assert [s.envelope_hash for s in replay_steps] == [s.envelope_hash for s in stored]
    for orig, new in zip(stored, replay_steps):
        a, b = orig.attempts[0], new.attempts[0]
        assert store.blob("default", "default", b.response_body.digest) == store.blob(
            "default", "default", a.response_body.digest)
        assert b.chunk_ends == a.chunk_ends
    step_spans = [s for s in spans.get_finished_spans() if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]
    linked = {(lk.context.trace_id, lk.context.span_id) for s in step_spans for lk in s.links}
    assert linked == {(int.from_bytes(s.attempts[0].trace_id, "big"), int.from_bytes(s.attempts[0].span_id, "big"))
                      for s in stored}
    assert set(wire)  # the stand-in's own record of what it wrote exists (bytes compared in the curl test)


def test_curl_receives_the_bytes_the_sdk_received(store: Store, standin: Standin, replayer: object) -> None:
    body = json.dumps({"model": "gpt-x", "messages": MSG, "stream": True}).encode()
    with recording(store, "run-curl"):
        raw = _oai(standin.openai_base_url).chat.completions.with_raw_response.create(
            model="gpt-x", messages=MSG, stream=True, extra_headers={"x-standin-chunks": "21"})
        sdk_bytes = b"".join(raw.http_response.iter_bytes())
    upstream_bytes = standin.last().response_body
    assert sdk_bytes == upstream_bytes
    session = open_session(replayer, "run-curl")
    url = session["base_urls"]["openai"] + "/chat/completions"
    # the same request body the SDK sent (its JSON key order need not match: the envelope is canonical)
    sent = standin.last().body
    before = standin.count
    if shutil.which("curl"):
        got = subprocess.run(["curl", "-sS", "--fail-with-body", "-X", "POST", "-H", "content-type: application/json",
                              "--data-binary", "@-", url], input=sent, capture_output=True, timeout=30, check=True).stdout
    else:  # pragma: no cover - a raw socket client when curl is absent
        got = asyncio.run(_post_raw(url, sent))
    assert got == sdk_bytes and body  # byte for byte
    assert standin.count == before


async def _post_raw(url: str, body: bytes) -> bytes:
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(url, data=body) as r:
        return await r.read()


def test_changed_prompt_exact_409_then_step_mode(store: Store, standin: Standin, replayer: object) -> None:
    prompts = ["first question", "second question", "third question"]
    with recording(store, "run-3"):
        oc = _oai(standin.openai_base_url)
        recorded = [oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": p}]).model_dump()
                    for p in prompts]
    changed = ["first question", "second question, changed", "third question"]
    before = standin.count

    exact = open_session(replayer, "run-3")
    oc = _oai(exact["base_urls"]["openai"])
    assert oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": changed[0]}]).model_dump() == recorded[0]
    with pytest.raises(openai.APIStatusError) as err:
        oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": changed[1]}])
    miss = err.value.response.json()
    assert err.value.status_code == 409 and miss["error"] == "replay_miss" and miss["run"] == "run-3"
    assert miss["expected_step"]["index"] == 1
    assert miss["diff"][0]["path"] == "messages[0].content" and miss["diff"][0]["received"] == changed[1]
    assert standin.count == before  # exact mode never forwards, and the SDK did not retry the 409

    step = open_session(replayer, "run-3", mode="step", until_step=1)
    oc = _oai(step["base_urls"]["openai"])
    answers = [oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": p}]).model_dump()
               for p in changed]
    assert standin.count == before + 1  # only the changed step went live
    assert answers[0] == recorded[0] and answers[2] == recorded[2] and answers[1] != recorded[1]
    _, report = api(f"{replayer.url}/v1/replay/sessions/{step['session_id']}")
    assert report["counts"]["tape"] == 2 and report["counts"]["live"] == 1 and report["counts"]["divergences"] == 1
    assert [u["index"] for u in report["unused_steps"]] == [1]


def test_step_mode_sends_steps_from_until_step_live(store: Store, standin: Standin, replayer: object) -> None:
    with recording(store, "run-step"):
        oc = _oai(standin.openai_base_url)
        for p in ("a", "b", "c"):
            oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": p}])
    before = standin.count
    session = open_session(replayer, "run-step", mode="step", until_step=1)
    oc = _oai(session["base_urls"]["openai"])
    for p in ("a", "b", "c"):
        oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": p}])
    assert standin.count == before + 2
    _, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}")
    assert (report["counts"]["tape"], report["counts"]["live"], report["unused_steps"]) == (1, 2, [])


def test_recorded_errors_replay_so_sdk_retries_repeat(store: Store, standin: Standin, replayer: object) -> None:
    msgs = [{"role": "user", "content": "flaky"}]
    with recording(store, "run-err"):
        oc = _oai(standin.openai_base_url, max_retries=2)
        ok = oc.chat.completions.create(model="gpt-x", messages=msgs, extra_headers={"x-standin-fault": "429-once"})
        with pytest.raises(openai.APIConnectionError):
            list(_oai(standin.openai_base_url, max_retries=0).chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "broken"}], stream=True,
                extra_headers={"x-standin-fault": "break-after:2"}))
    steps = store.steps("default", "default", "run-err")
    assert [a.status for a in steps[0].attempts] == [429, 200]
    assert steps[1].attempts[0].end_reason == c.END_ERROR
    before = standin.count
    session = open_session(replayer, "run-err")
    oc = _oai(session["base_urls"]["openai"], max_retries=2)
    again = oc.chat.completions.create(model="gpt-x", messages=msgs, extra_headers={"x-standin-fault": "429-once"})
    assert again.model_dump() == ok.model_dump()
    got: list[object] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in _oai(session["base_urls"]["openai"], max_retries=0).chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": "broken"}], stream=True,
                extra_headers={"x-standin-fault": "break-after:2"}):
            got.append(chunk)
    assert len(got) == 2  # the same two chunks, then the same broken connection
    assert standin.count == before
    _, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}")
    assert report["counts"]["tape"] == 3 and report["unused_attempts"] == 0 and report["counts"]["aborted"] == 1


def test_pace_one_reproduces_recorded_timing(store: Store, standin: Standin, replayer: object) -> None:
    with recording(store, "run-pace"):
        stream = _oai(standin.openai_base_url).chat.completions.create(
            model="gpt-x", messages=MSG, stream=True, extra_headers={"x-standin-chunks": "24", "x-standin-delay-ms": "50"})
        chunks = [ch.model_dump() for ch in stream]
    attempt = store.steps("default", "default", "run-pace")[0].attempts[0]
    recorded_s = attempt.chunk_times_us[-1] / 1e6
    assert recorded_s >= 1.0
    session = open_session(replayer, "run-pace", pace=1)
    t0 = time.monotonic()
    stream = _oai(session["base_urls"]["openai"]).chat.completions.create(
        model="gpt-x", messages=MSG, stream=True, extra_headers={"x-standin-chunks": "24", "x-standin-delay-ms": "50"})
    replayed = [ch.model_dump() for ch in stream]
    elapsed = time.monotonic() - t0
    assert replayed == chunks
    assert 0.85 * recorded_s <= elapsed <= 1.15 * recorded_s, (elapsed, recorded_s)


def _fill_identical(store: Store, run_id: str) -> tuple[bytes, list[bytes], list[bytes], list[bytes]]:
    """8 identical requests with 8 different recorded answers, and 8 different requests."""
    agent = Agent(run_id=run_id, tenant="default", scope="default")
    same = chat_request("same question")
    same_answers = [json.dumps({"id": f"same-{i}"}).encode() for i in range(8)]
    diff_bodies = [chat_request(f"question {i}") for i in range(8)]
    diff_answers = [json.dumps({"id": f"diff-{i}"}).encode() for i in range(8)]
    order = list(range(16))
    random.Random(7).shuffle(order)
    for pos, k in enumerate(order):
        if k < 8:
            agent.model_step(pos, body=same, response=same_answers[k])
        else:
            agent.model_step(pos, body=diff_bodies[k - 8], response=diff_answers[k - 8])
    agent.run_span()
    batch = ingest.prepare(agent.request(), store)
    store.apply([batch])
    agent.shutdown()
    # the identical ones in recorded order
    same_in_order = [same_answers[k] for k in order if k < 8]
    return same, same_in_order, diff_bodies, diff_answers


async def _round(http: aiohttp.ClientSession, base: str, same: bytes, diff_bodies: list[bytes],
                 rng: random.Random) -> tuple[list[bytes], list[bytes]]:
    calls = [(None, same)] * 8 + list(enumerate(diff_bodies))
    rng.shuffle(calls)

    async def one(body: bytes) -> bytes:
        async with http.post(f"{base}/chat/completions", data=body,
                             headers={"content-type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            return await r.read()

    results = await asyncio.gather(*(one(b) for _, b in calls))
    same_got = [r for (i, _), r in zip(calls, results) if i is None]
    diff_got = [b"" for _ in diff_bodies]
    for (i, _), r in zip(calls, results):
        if i is not None:
            diff_got[i] = r
    return same_got, diff_got


def test_concurrent_identical_calls_retried_at_once_keep_every_attempt(
        store: Store, standin: Standin, replayer: object) -> None:
    """Two threads send the same call at once, both get a 429 and both SDK retries (attempt 1) succeed: the tape
    holds two steps of [429, 200], and an exact replay serves all four requests from it."""
    msgs = [{"role": "user", "content": "same call, twice at once"}]
    both_limited = threading.Barrier(2, timeout=10)

    def rate_limit_first_attempts(request: httpx2.Request) -> None:  # the stand-in's own 429-once is per body
        if request.headers.get("x-stainless-retry-count") == "0":
            request.headers["x-standin-fault"] = "429"

    def retry_once_both_are_limited(response: httpx2.Response) -> None:
        if response.status_code == 429:
            both_limited.wait()

    def concurrently(make_client: Callable[[], openai.OpenAI]) -> list[str]:
        answers: list[str] = []

        def call() -> None:
            answer = make_client().chat.completions.create(model="gpt-x", messages=msgs)
            answers.append(answer.choices[0].message.content)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return answers

    with recording(store, "run-twice"):
        hooks = {"request": [rate_limit_first_attempts], "response": [retry_once_both_are_limited]}
        recorded = concurrently(lambda: _oai(standin.openai_base_url, max_retries=2,
                                             http_client=openai.DefaultHttpxClient(event_hooks=hooks)))
    assert len(recorded) == 2
    assert [ex.status for ex in standin.wait(4)[-4:]] == [429, 429, 200, 200]
    stored = store.steps("default", "default", "run-twice")
    assert [[(a.attempt, a.status) for a in s.attempts] for s in stored] == [[(0, 429), (1, 200)]] * 2
    assert store.run("default", "default", "run-twice").recording_errors == 0

    before = standin.count
    session = open_session(replayer, "run-twice", record=False)
    replayed = concurrently(lambda: _oai(session["base_urls"]["openai"], max_retries=2))
    assert sorted(replayed) == sorted(recorded)
    assert standin.count == before
    _, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
    assert report["counts"]["tape"] == 4 and report["counts"]["exhausted"] == 0 and report["unused_attempts"] == 0


def test_concurrent_identical_and_different_calls_fifty_rounds(store: Store, replayer: object) -> None:
    same, same_answers, diff_bodies, diff_answers = _fill_identical(store, "run-conc")

    async def scenario() -> None:
        rng = random.Random(1)
        async with aiohttp.ClientSession() as http:
            for _ in range(50):
                s = open_session(replayer, "run-conc", record=False)
                same_got, diff_got = await _round(http, s["base_urls"]["openai"], same, diff_bodies, rng)
                assert sorted(same_got) == sorted(same_answers) and diff_got == diff_answers
                api(f"{replayer.url}/v1/replay/sessions/{s['session_id']}", "DELETE")
            # issued one after another, identical requests get their recordings in recorded order
            s = open_session(replayer, "run-conc", record=False)
            got = []
            for _ in range(8):
                async with http.post(s["base_urls"]["openai"] + "/chat/completions", data=same) as r:
                    got.append(await r.read())
            assert got == same_answers
            async with http.post(s["base_urls"]["openai"] + "/chat/completions", data=same) as r:
                assert r.status == 409 and (await r.json())["error"] == "replay_exhausted"

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_twenty_concurrent_sessions_do_not_interfere(store: Store, replayer: object) -> None:
    same, same_answers, diff_bodies, diff_answers = _fill_identical(store, "run-multi")

    async def scenario() -> None:
        sessions = [open_session(replayer, "run-multi", record=False) for _ in range(20)]
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*(
                _round(http, s["base_urls"]["openai"], same, diff_bodies, random.Random(i))
                for i, s in enumerate(sessions)))
        for same_got, diff_got in results:
            assert sorted(same_got) == sorted(same_answers) and diff_got == diff_answers
        for s in sessions:
            _, report = api(f"{replayer.url}/v1/replay/sessions/{s['session_id']}")
            assert report["counts"]["tape"] == 16 and report["unused_steps"] == [] and report["counts"]["misses"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_refusals_and_client_errors_are_json(store: Store, standin: Standin, replayer: object,
                                             spans: InMemorySpanExporter) -> None:
    with recording(store, "run-open", end=False):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    url = f"{replayer.url}/v1/replay/sessions"
    status, body = api(url, "POST", {"run_id": "run-open"})
    assert status == 409 and body["error"] == "not_replayable" and body["reason"] == "running"
    status, body = api(url, "POST", {"run_id": "run-open", "force": True})
    assert status == 201 and body["forced"] is True
    api(f"{url}/{body['session_id']}", "DELETE")
    write_spans(store, list(spans.get_finished_spans()))
    assert store.run("default", "default", body["replay_run_id"]).replay_forced is True
    for bad, code in [(b"{not json", 400), (b'{"run_id": "nope"}', 404), (b'{"run_id": "run-open", "mode": "x"}', 400)]:
        status, body = api(url, "POST", raw=bad)
        assert status == code and "error" in body
    assert api(f"{url}/0123")[0] == 404
    assert api(f"{replayer.url}/s/0123/openai/chat/completions", "POST", {})[0] == 404
    ok = open_session(replayer, "run-open", force=True)
    status, body = api(f"{replayer.url}/s/{ok['session_id']}/nosuch/x", "POST", {})
    assert status == 404 and body["error"] == "unknown_profile"
    assert api(f"{replayer.url}/nowhere")[0] == 404
    status, body = api(f"{replayer.url}/s/{ok['session_id']}/_tool", "POST", {"name": 1})
    assert status == 400


def test_routes_answer_json_whatever_the_path_or_method(store: Store, standin: Standin, replayer: object) -> None:
    """The proxy's own route (`/s/{sid}/{profile}[/{tail}]`, `POST /s/{sid}/_tool`) and what no route takes: every
    answer is JSON, 404 for a path nothing serves, 405 for a method a path does not take."""
    with recording(store, "run-r"):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    sid = open_session(replayer, "run-r")["session_id"]
    base = replayer.url
    for method, path, status, error in [
        ("PUT", "/v1/replay/health", 405, "method_not_allowed"),
        ("DELETE", "/v1/replay/sessions", 405, "method_not_allowed"),
        ("GET", "/nowhere/at/all", 404, "not_found"),
        ("POST", f"/s/{sid}", 404, "not_found"),
        ("POST", f"/s/{sid}/", 404, "not_found"),
        ("GET", f"/s/{sid}/_tool", 404, "unknown_profile"),  # not the tools endpoint: a profile named _tool
        ("POST", f"/s/{sid}/_tool/", 404, "unknown_profile"),
        ("POST", f"/s/{sid}/open%7Bai/chat/completions", 404, "not_found"),  # aiohttp's {name}: no braces
        ("POST", "/s/no-such-session/openai/chat/completions", 404, "session_not_found"),
    ]:
        got, body = api(base + path, method, {})
        assert (got, body.get("error")) == (status, error), (method, path, got, body)
    got, body = api(f"{base}/s/{sid}/_tool", "POST", {"name": "t", "envelope_hash": "0" * 64})
    assert got == 409 and body["error"] == "replay_miss"  # the tools endpoint
    got, _ = api(f"{base}/s/{sid}/openai/chat/completions", "POST", raw=chat_request("nothing recorded"))
    assert got == 409


def test_a_replay_records_a_new_run_of_its_own_and_a_refused_session_records_nothing(
        store: Store, standin: Standin, spans: InMemorySpanExporter) -> None:
    """`replay_run_id` may name neither a recorded run (the replay would be merged into it, the original
    itself included) nor a run another session records; a session refused for any reason leaves no run."""
    with recording(store, "run-own"):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    replayer = start_replayer(store, standin, exporter=spans, max_sessions=2)
    url = f"{replayer.url}/v1/replay/sessions"
    try:
        status, body = api(url, "POST", {"run_id": "run-own", "replay_run_id": "run-own"})
        assert (status, body["error"]) == (409, "replay_run_exists")
        nightly = open_session(replayer, "run-own", replay_run_id="nightly")
        status, body = api(url, "POST", {"run_id": "run-own", "replay_run_id": "nightly"})
        assert (status, body["error"]) == (409, "replay_run_in_use")
        other = open_session(replayer, "run-own")
        assert other["replay_run_id"].startswith("run-own-replay-")
        status, body = api(url, "POST", {"run_id": "run-own"})
        assert (status, body["error"]) == (503, "too_many_sessions")
        _oai(nightly["base_urls"]["openai"]).chat.completions.create(model="gpt-x", messages=MSG)
        for session in (nightly, other):
            assert api(f"{url}/{session['session_id']}", "DELETE")[0] == 200
        write_spans(store, list(spans.get_finished_spans()))
        status, body = api(url, "POST", {"run_id": "run-own", "replay_run_id": "nightly"})
        assert (status, body["error"]) == (409, "replay_run_exists")  # recorded now: never reused
    finally:
        replayer.stop()
    write_spans(store, list(spans.get_finished_spans()))
    replays = {r.run_id: r for r in store.runs("default", "default") if r.replay_of}
    assert set(replays) == {"nightly", other["replay_run_id"]}
    assert (replays["nightly"].step_count, replays["nightly"].status) == (1, c.OUTCOME_COMPLETED)
    original = store.run("default", "default", "run-own")
    assert (original.step_count, original.replay_of) == (1, "")


KEY_IN_PATH = "sk-proj-Abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"


def test_keys_in_paths_never_reach_span_names_or_answers(store: Store, standin: Standin, replayer: object,
                                                          spans: InMemorySpanExporter) -> None:
    """A key in a proxied path is masked in the recorded step's name (as in its URL and envelope), by the
    instrumentation and by the recording replayer; a key in the session or profile segment is not echoed."""
    with recording(store, "run-path"):
        _oai(standin.openai_base_url, max_retries=0).files.retrieve(KEY_IN_PATH)  # GET /v1/files/{id}
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    session = open_session(replayer, "run-path", mode="live")
    status, _ = api(f"{session['base_urls']['openai']}/files/{KEY_IN_PATH}", "GET")
    assert status < 500
    api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
    write_spans(store, list(spans.get_finished_spans()))
    names = [s.name for r in store.runs("default", "default") for s in store.steps("default", "default", r.run_id)]
    assert sum(n.startswith("GET /v1/files/sk-p*") for n in names) == 2, names  # recorded, then replayed live
    sid = session["session_id"]
    for method, path in (("POST", f"/s/{KEY_IN_PATH}/openai/chat/completions"), ("GET", f"/s/{sid}/{KEY_IN_PATH}/x"),
                         ("GET", f"/v1/replay/sessions/{KEY_IN_PATH}")):
        status, body = api(f"{replayer.url}{path}", method)
        assert status == 404 and KEY_IN_PATH[8:] not in json.dumps(body), (path, body)
    for _, key, value in store.dump():
        assert KEY_IN_PATH[8:].encode() not in key + value


def _raw_request(url: str, head: bytes, body: bytes, read_all: bool = True) -> tuple[bytes, socket.socket]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    data = conn.recv(65536)
    while read_all and (more := conn.recv(65536)):
        data += more
    return data, conn


def test_a_header_that_is_not_utf8_is_recorded_not_dropped(store: Store, standin: Standin, replayer: object,
                                                           spans: InMemorySpanExporter) -> None:
    """A request header whose bytes are not UTF-8 (aiohttp decodes it with surrogate escapes): the tape answers,
    and the recording replayer records the step with the invalid bytes replaced."""
    with recording(store, "run-latin"):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    attempt = store.steps("default", "default", "run-latin")[0].attempts[0]
    body = store.blob("default", "default", attempt.request_body.digest)
    semantic = "".join(f"{n}: {v}\r\n" for n, v in attempt.request_headers if n in c.SEMANTIC_HEADERS)
    session = open_session(replayer, "run-latin")
    head = (f"POST /s/{session['session_id']}/openai/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"{semantic}").encode() + b"x-user-note: caf\xe9\r\n"
    answer, conn = _raw_request(replayer.url, head, body)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
    steps = [s for s in spans.get_finished_spans() if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]
    assert len(steps) == 1
    assert ["x-user-note", "caf\ufffd"] in json.loads(steps[0].attributes[c.REQUEST_HEADERS])


def test_a_client_closing_a_live_stream_is_recorded_as_closed_not_as_an_upstream_error(
        store: Store, standin: Standin, replayer: object, spans: InMemorySpanExporter) -> None:
    with recording(store, "run-close"):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    session = open_session(replayer, "run-close", mode="live")
    body = json.dumps({"model": "gpt-x", "messages": MSG, "stream": True}).encode()
    head = (f"POST /s/{session['session_id']}/openai/chat/completions HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nx-standin-chunks: 30\r\nx-standin-delay-ms: 50\r\n").encode()
    first, conn = _raw_request(replayer.url, head, body, read_all=False)
    assert first.startswith(b"HTTP/1.1 200 ")
    time.sleep(0.2)
    conn.close()  # the agent stops reading
    for _ in range(100):
        status, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}")
        if report["counts"]["live"]:
            break
        time.sleep(0.05)
    api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
    (step,) = [s for s in spans.get_finished_spans() if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]
    assert step.attributes[c.STREAM_END_REASON] == c.END_CLOSED
    assert c.ERROR_TYPE not in step.attributes and step.status.is_ok


def _paced_stream(store: Store, standin: Standin, run_id: str) -> None:
    with recording(store, run_id):
        stream = _oai(standin.openai_base_url).chat.completions.create(
            model="gpt-x", messages=MSG, stream=True, extra_headers={"x-standin-chunks": "20", "x-standin-delay-ms": "50"})
        assert [chunk for chunk in stream]


def _stream_in_thread(session: dict[str, Any], out: dict[str, Any]) -> threading.Thread:
    def client() -> None:
        try:
            stream = _oai(session["base_urls"]["openai"], max_retries=0).chat.completions.create(
                model="gpt-x", messages=MSG, stream=True)
            out["chunks"] = len([chunk for chunk in stream])
        except Exception as err:  # noqa: BLE001 - reported to the test
            out["error"] = repr(err)

    thread = threading.Thread(target=client)
    thread.start()
    return thread


def test_a_deleted_session_records_its_answers_in_flight_before_its_run_ends(
        store: Store, standin: Standin, replayer: object, spans: InMemorySpanExporter) -> None:
    """DELETE while a paced stream of the session is being answered: the stream finishes, its step is recorded
    in the replay run, and only then does the run end (it used to end first, the step coming after it)."""
    _paced_stream(store, standin, "run-paced")
    session = open_session(replayer, "run-paced", pace=1)
    out: dict[str, Any] = {}
    thread = _stream_in_thread(session, out)
    time.sleep(0.3)  # the stream is under way
    status, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
    thread.join(30)
    assert status == 200 and report["counts"]["tape"] == 1 and out.get("chunks"), out
    finished = spans.get_finished_spans()
    (run,) = [s for s in finished if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_RUN]
    (step,) = [s for s in finished if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]
    assert step.end_time <= run.end_time and run.attributes[c.RUN_OUTCOME] == c.OUTCOME_COMPLETED


def test_stopping_the_replayer_ends_open_replays_as_cancelled_after_their_answers(
        store: Store, standin: Standin, spans: InMemorySpanExporter) -> None:
    """Shutdown stops accepting, lets requests being answered finish (bounded), then ends the open sessions'
    replay runs as cancelled: their clients never finished them."""
    _paced_stream(store, standin, "run-stop")
    replayer = start_replayer(store, standin, exporter=spans)
    session = open_session(replayer, "run-stop", pace=2)
    out: dict[str, Any] = {}
    thread = _stream_in_thread(session, out)
    time.sleep(0.3)
    replayer.stop()
    thread.join(30)
    finished = spans.get_finished_spans()
    (run,) = [s for s in finished if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_RUN]
    (step,) = [s for s in finished if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]
    assert step.end_time <= run.end_time and out.get("chunks"), out
    assert (run.attributes[c.RUN_OUTCOME], run.attributes[c.RUN_EXIT_CODE]) == (c.OUTCOME_CANCELLED, -15)


def test_an_abandoned_session_ends_after_the_idle_limit_and_an_active_one_does_not(
        store: Store, standin: Standin, spans: InMemorySpanExporter) -> None:
    """Sessions whose clients went away (a killed `tracetape replay`) would hold memory and `max_sessions` slots
    forever: one no request has named for `session_idle_s` is ended as a DELETE would, its run cancelled."""
    with recording(store, "run-idle"):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    replayer = start_replayer(store, standin, exporter=spans, session_idle_s=0.5, max_sessions=2)
    try:
        abandoned = open_session(replayer, "run-idle")
        active = open_session(replayer, "run-idle")
        url = f"{replayer.url}/v1/replay/sessions"
        for _ in range(20):  # 2 s: the active one is asked about every 0.1 s
            assert api(f"{url}/{active['session_id']}")[0] == 200
            time.sleep(0.1)
        assert api(f"{url}/{abandoned['session_id']}")[0] == 404
        assert open_session(replayer, "run-idle")["session_id"]  # its slot is free again
    finally:
        replayer.stop()
    runs = {s.attributes[c.RUN_ID]: s for s in spans.get_finished_spans()
            if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_RUN}
    assert runs[abandoned["replay_run_id"]].attributes[c.RUN_OUTCOME] == c.OUTCOME_CANCELLED


def test_replay_spans_wait_for_export_within_a_byte_budget_and_a_drop_marks_the_run(
        store: Store, standin: Standin) -> None:
    """A collector that does not keep up: recorded replay spans (bodies included) wait within the recorder's
    byte budget; past it a span is dropped, counted, and its replay run says so (a recording failure), where
    the SDK's count-bounded queue used to drop them silently."""
    import threading as _threading

    from opentelemetry.sdk.trace.export import SpanExportResult

    gate = _threading.Event()
    exported: list[object] = []

    class SlowCollector(InMemorySpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            gate.wait(30)
            exported.extend(spans)
            return SpanExportResult.SUCCESS

    big = "x" * 200_000
    with recording(store, "run-budget"):
        for i in range(6):
            _oai(standin.openai_base_url).chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": f"{i} {big}"}])
    replayer = start_replayer(store, standin, exporter=SlowCollector())
    recorder = replayer.service.state.recorder
    recorder.export_budget.max_bytes = 500_000  # about two steps' bodies
    try:
        session = open_session(replayer, "run-budget")
        for i in range(6):
            _oai(session["base_urls"]["openai"]).chat.completions.create(
                model="gpt-x", messages=[{"role": "user", "content": f"{i} {big}"}])
        assert recorder.failures >= 1  # dropped while the collector hung
        gate.set()
        status, report = api(f"{replayer.url}/v1/replay/sessions/{session['session_id']}", "DELETE")
        assert status == 200 and report["counts"]["tape"] == 6  # the replay itself was not affected
    finally:
        replayer.stop()
    steps = [s for s in exported if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_STEP]  # type: ignore[attr-defined]
    (run,) = [s for s in exported if s.attributes.get(c.SPAN_KIND) == c.SPAN_KIND_RUN]  # type: ignore[attr-defined]
    assert len(steps) + recorder.failures == 6 and len(steps) < 6  # each step exported or counted as dropped
    assert "dropped" in run.attributes[c.RECORDING_ERROR]  # type: ignore[attr-defined]


def test_request_bodies_are_admitted_before_they_are_read(store: Store, standin: Standin, replayer: object) -> None:
    """Bodies are reserved from the replayer's body budget by their declared length before being read: a
    request that does not fit while others hold it is a 503 `busy` with Retry-After, unread; memory for bodies
    is bounded per replayer, not per connection."""
    with recording(store, "run-bodies"):
        _oai(standin.openai_base_url).chat.completions.create(model="gpt-x", messages=MSG)
    replayer.service.state.bodies.max_bytes = 1 << 20  # type: ignore[attr-defined]
    session = open_session(replayer, "run-bodies")
    host, port = replayer.url.split("//")[1].split(":")  # type: ignore[attr-defined]
    path = f"/s/{session['session_id']}/openai/chat/completions"

    def head(length: int) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    slow = socket.create_connection((host, int(port)), timeout=30)
    slow.sendall(head(900_000) + b"{")  # declares 900 KB, sends one byte: its handler waits, holding 900 KB
    time.sleep(0.3)
    second = socket.create_connection((host, int(port)), timeout=30)
    second.sendall(head(900_000))  # the body would not fit: refused before a byte of it is read
    answer = second.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower() and b'"busy"' in answer
    second.close()
    slow.close()  # the first request goes away: its bytes are given back
    for _ in range(100):
        if replayer.service.state.bodies.held == 0:  # type: ignore[attr-defined]
            break
        time.sleep(0.05)
    status, _ = api(f"{replayer.url}{path}", "POST", {"model": "gpt-x", "messages": MSG})  # type: ignore[attr-defined]
    assert status in (200, 409)  # admitted again (a miss or a hit, not busy)
