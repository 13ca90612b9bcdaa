"""Issue 5, item 4 (the replay proxy part): hostile input to the replayer, over a real socket, against a
`tracetape replayer` subprocess (so a crash is a dead process and memory is its VmRSS).

- Hypothesis fuzzes the proxy (`* /s/{sid}/{profile}/{tail}`: random methods, session ids, profiles, tails with
  percent-encoding and dot segments, queries, headers, bodies: random bytes, mutated recorded bodies, random
  JSON, invalid UTF-8), the sessions API (absurd values for every field, unknown fields, non-objects) and the
  tools endpoint. Property: never a 5xx for a client's mistake, and the service keeps answering (health, and
  a known-good request served byte-exact) afterwards.
- Targeted: 100,000-deep JSON nesting on each endpoint, bodies just over the limits (proxy 64 MiB, API
  64 KiB, with Content-Length and chunked), a body just under the proxy limit (time and VmRSS), the event loop
  staying responsive while one is processed.
- Malformed SSE: a recorded run whose streamed responses are malformed SSE (no terminator, invalid JSON and
  UTF-8, NUL bytes, CR-only lines, a 1 MiB line, chunk boundaries inside a multi-byte character, chunk_ends
  past the end) built with `ingest.prepare` + `Store.apply`, replays byte-exact; `show`, `diff`, `replay RUN`
  and `export` take it.

`TRACETAPE_FUZZ_PROXY_EXAMPLES` scales the hypothesis runs up for a soak.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.replay_support import recording
from tests.support.reliability import rss_kb
from tests.support.spans import Agent, chat_request
from tests.support.standin import Standin
from tracetape.collector import ingest
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c

EXAMPLES = int(os.environ.get("TRACETAPE_FUZZ_PROXY_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROXY_LIMIT = 64 << 20
API_LIMIT = 64 << 10
STATS: dict[str, Counter[Any]] = {}


def _tally(name: str, status: int) -> None:
    STATS.setdefault(name, Counter())[status] += 1


# --- the malformed SSE run ------------------------------------------------------------------------------------

MALFORMED_SSE: list[tuple[str, bytes, list[int], str]] = [
    # (what, body, chunk_ends, end_reason)
    ("no blank-line terminator", b'data: {"choices": [{"delta": {"content": "a"}}]}\ndata: {"choi', [20, 40, 55],
     "exhausted"),
    ("invalid JSON events", b"data: {not json\n\ndata: [1,2\n\nevent: x\ndata:\n\n: comment only\n\ndata: [DONE]\n\n",
     [16, 30, 60], "exhausted"),
    ("invalid UTF-8 and NUL", b"data: \xff\xfe\x00\x01{\"a\":1}\n\ndata: \xc3\n\n\x00\x00\n\n", [8, 9, 20, 27],
     "exhausted"),
    ("CR-only and mixed line ends", b"event: message_start\rdata: {\"type\":\"message_start\"}\r\r"
     b"data: {\"x\":1}\r\n\r\ndata: {\"y\":2}\n\r\n", [22, 50, 70], "exhausted"),
    ("a 1 MiB line", b"data: " + b"A" * (1 << 20) + b"\n\n", [4096, 1 << 19], "exhausted"),
    ("chunk inside a multi-byte character", "data: {\"t\": \"h\u00e9llo \u6f22\u5b57 \U0001f600\"}\n\n".encode(),
     [16, 17, 24, 25, 30], "exhausted"),
    ("chunk_ends past the end and backwards", b"data: {}\n\ndata: {}\n\n", [5, 3, 1000, 2000], "exhausted"),
    ("empty streamed body", b"", [], "exhausted"),
    ("broken mid-event", b"data: {\"choices\": [{\"delta\": {\"content\": \"par", [10, 30], "error"),
    ("closed early", b"data: {\"a\": 1}\n\ndata: {\"a\"", [16, 24], "closed"),
]


def _sse_spans(run_id: str) -> Any:
    agent = Agent(run_id=run_id, tenant="default", scope="default")
    for i, (what, body, ends, reason) in enumerate(MALFORMED_SSE):
        started = 1_700_000_000_000_000_000 + (i + 1) * 1_000_000
        request = chat_request(f"malformed sse {i}: {what}")
        attrs = {
            **agent.base, c.SPAN_KIND: c.SPAN_KIND_STEP, c.STEP_ID: f"{i + 1:016x}", c.STEP_STARTED_NS: started,
            c.STEP_INDEX: i, c.STEP_KIND: c.STEP_KIND_MODEL, c.STEP_ATTEMPT: 0,
            c.ENVELOPE_HASH: c.envelope_hash(c.http_envelope("POST", "/v1/chat/completions", "", [], request)),
            c.ENVELOPE_PROFILE: c.CANON_PROFILE, c.REQUEST_METHOD: "POST",
            c.REQUEST_URL: "https://api.openai.com/v1/chat/completions",
            c.REQUEST_HEADERS: c.encode_headers([("content-type", "application/json")]),
            c.REQUEST_BODY: request, c.RESPONSE_STATUS: 200, c.RESPONSE_BODY: body,
            c.RESPONSE_HEADERS: c.encode_headers([("content-type", "text/event-stream; charset=utf-8"),
                                                  ("x-case", str(i))]),
            c.RESPONSE_CONTENT_ENCODING: "", c.RESPONSE_STREAMED: True, c.RESPONSE_CHUNK_ENDS: ends,
            c.RESPONSE_CHUNK_TIMES_US: [100 * (k + 1) for k in range(len(ends))],
            c.RESPONSE_BYTES_READ: len(body), c.STREAM_END_REASON: reason,
            c.GEN_AI_OPERATION_NAME: "chat", c.GEN_AI_PROVIDER_NAME: "openai", c.GEN_AI_REQUEST_MODEL: "gpt-test",
        }
        agent.tracer.start_span("chat gpt-test", attributes=attrs, start_time=started).end(end_time=started + 500_000)
    agent.run_span()
    return agent.request()


# --- the replayer subprocess ----------------------------------------------------------------------------------


@dataclass
class Replayer:
    proc: subprocess.Popen[str]
    url: str
    port: int
    log: Path
    data: Path
    run_requests: list[tuple[str, bytes, dict[str, str]]]
    """(path under the profile, exact request body, its semantic headers) of each recorded request"""
    run_responses: list[bytes]
    rss: list[tuple[str, int]] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)


def send(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def api(port: int, method: str, path: str, obj: Any = None) -> tuple[int, Any]:
    status, _, body = send(port, method, path, json.dumps(obj).encode() if obj is not None else None,
                           {"content-type": "application/json"})
    return status, json.loads(body or b"null")


def new_session(r: Replayer, run_id: str = "fuzz-run", **options: Any) -> str:
    status, body = api(r.port, "POST", "/v1/replay/sessions", {"run_id": run_id, **options})
    assert status == 201, body
    return body["session_id"]


@pytest.fixture(scope="module")
def replayer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replayer]:
    tmp = tmp_path_factory.mktemp("proxy-fuzz")
    data = tmp / "data"
    store = Store(data)
    with Standin() as standin:
        with recording(store, "fuzz-run"):
            oa = openai.OpenAI(base_url=standin.openai_base_url, api_key="sk-test-fuzzKEY0123456789abcdef", max_retries=0)
            oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
            s = oa.chat.completions.create(model="gpt-4o-mini", stream=True,
                                           messages=[{"role": "user", "content": "stream please"}])
            "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
            an = anthropic.Anthropic(base_url=standin.anthropic_base_url, api_key="sk-ant-test-fuzzKEY0123456789",
                                     max_retries=0)
            an.messages.create(model="claude-sonnet-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
            with an.messages.stream(model="claude-sonnet-5", max_tokens=20,
                                    messages=[{"role": "user", "content": "stream"}]) as stream:
                stream.get_final_text()
        exchanges = list(standin.exchanges)
    batch = ingest.prepare(_sse_spans("sse-run"), store)
    assert batch.rejected == 0, batch.errors
    store.apply([batch])
    store.close()
    log = tmp / "replayer.stderr"
    fh = open(log, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracetape.cli", "replayer", "--data", str(data), "--port", "0", "--no-record",
         "--upstream", "openai=http://127.0.0.1:9/v1", "--upstream", "anthropic=http://127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=fh, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert m, log.read_text()
        semantic = ("content-type", "anthropic-version", "anthropic-beta", "openai-beta")
        paths = [("openai/chat/completions" if e.path.endswith("/chat/completions") else "anthropic/v1/messages", e.body,
                  {k: v for k, v in e.headers if k.lower() in semantic}) for e in exchanges]
        r = Replayer(proc=proc, url=m.group(1), port=int(m.group(2)), log=log, data=data, run_requests=paths,
                     run_responses=[e.response_body for e in exchanges])
        r.rss.append(("start", r.rss_kb()))
        yield r
    finally:
        rss_end = rss_kb(proc.pid)
        alive = proc.poll() is None
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        fh.close()
        print(f"\nreplay proxy fuzz: alive at the end {alive}; VmRSS {r.rss + [('end', rss_end)]}; statuses "
              + "; ".join(f"{k}: {dict(v)}" for k, v in STATS.items()))


def known_good(r: Replayer) -> None:
    """A fresh session answers each recorded request byte-exact, and health is 200 — the service is fine."""
    assert r.alive(), r.log.read_text()[-3000:]
    status, health = api(r.port, "GET", "/v1/replay/health")
    assert status == 200 and health["status"] == "ok"
    sid = new_session(r)
    try:
        for (path, body, headers), expected in zip(r.run_requests, r.run_responses):
            status, _, got = send(r.port, "POST", f"/s/{sid}/{path}", body, headers)
            assert status == 200 and got == expected, (path, status, got[:200])
    finally:
        api(r.port, "DELETE", f"/v1/replay/sessions/{sid}")


def test_known_good_at_the_start(replayer: Replayer) -> None:
    known_good(replayer)


# --- strategies -----------------------------------------------------------------------------------------------

_TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te", "trailer"}
header_names = st.one_of(
    st.sampled_from(["content-type", "content-encoding", "authorization", "x-api-key", "anthropic-version",
                     "anthropic-beta", "openai-beta", "x-stainless-retry-count", "accept-encoding", "user-agent",
                     "cookie", "range", "if-none-match"]),
    st.text(_TOKEN, min_size=1, max_size=20),
).filter(lambda n: n.lower() not in _FRAMING)
header_values = st.one_of(
    st.sampled_from(["gzip", "br", "zstd", "deflate, gzip", "application/json", "text/plain; charset=utf-16",
                     "multipart/form-data; boundary=x", "2023-06-01", "-1", "99999999999999999999", ""]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=200),
)
headers_st = st.dictionaries(header_names, header_values, max_size=8)
segments = st.one_of(st.sampled_from(["", ".", "..", "%2e%2e", "%2F", "%00", "%ff", "v1", "chat", "completions",
                                      "messages", "_tool", "s", "%", "%zz", ";x=1", "~"]),
                     st.text(max_size=20).map(lambda s: urllib.parse.quote(s, safe="")))
tails = st.lists(segments, max_size=6).map("/".join)
queries = st.one_of(st.just(""), st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=5).map(
    lambda kv: urllib.parse.urlencode(kv)), st.sampled_from(["a", "=", "&&&", "a=%zz", "a=%ff%fe", "beta=true"]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
              st.text(max_size=30)),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)


@st.composite
def bodies(draw: st.DrawFn, recorded: list[bytes]) -> bytes:
    kind = draw(st.sampled_from(["empty", "binary", "json", "mutated", "bad-utf8", "recorded", "numbers"]))
    if kind == "empty":
        return b""
    if kind == "binary":
        return draw(st.binary(max_size=4000))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "numbers":
        return draw(st.sampled_from([b"1e999999", b"-0", b"NaN", b"Infinity", b"1" * 5000, b'{"a": 1e400}',
                                     b'"\\ud800"', b'{"a": "\\udfff\\ud800"}', b"\xef\xbb\xbf{}", b'{"a":1,"a":2}']))
    base = draw(st.sampled_from(recorded))
    if kind == "recorded":
        return base
    data = bytearray(base)
    if kind == "bad-utf8":
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80"]))
        return bytes(data)
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 2))
        if op == 0:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            del data[pos]
        else:
            data.insert(pos, draw(st.integers(0, 255)))
    return bytes(data)


# --- the fuzz properties --------------------------------------------------------------------------------------


def _check(r: Replayer, what: str, status: int, headers: dict[str, str], body: bytes, request: Any) -> None:
    _tally(what, status)
    assert status < 500, f"{what}: {status} {body[:300]!r} for {request!r}"
    if body and status >= 400 and not (status == 400 and headers.get("content-type", "").startswith("text/plain")):
        assert isinstance(json.loads(body), dict)  # every error tracetape answers is JSON (aiohttp's parser: text)


@pytest.fixture(scope="module")
def fuzz_session(replayer: Replayer) -> str:
    return new_session(replayer, on_exhausted="repeat_last")


METHODS = st.one_of(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
                    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10))


@FUZZ
@given(data=st.data())
def test_the_proxy_never_answers_5xx_to_hostile_requests(replayer: Replayer, fuzz_session: str, data: st.DataObject) -> None:
    r = replayer
    recorded = [b for _, b, _ in r.run_requests]
    if data.draw(st.integers(0, 4), "exact recorded request") == 0:
        # a recorded request plus hostile non-semantic headers: served from the tape, byte-exact, whatever they say
        i = data.draw(st.integers(0, len(r.run_requests) - 1), "which")
        path, body, semantic = r.run_requests[i]
        extra = {k: v for k, v in data.draw(headers_st, "extra headers").items()
                 if k.lower() not in ("content-type", "content-encoding", "anthropic-version", "anthropic-beta",
                                      "openai-beta")}
        status, answer_headers, answer = send(r.port, "POST", f"/s/{fuzz_session}/{path}", body, {**extra, **semantic})
        _tally("proxy (recorded request, hostile headers)", status)
        assert status == 200 and answer == r.run_responses[i], (status, extra, answer[:200])
        return
    method = data.draw(st.one_of(st.just("POST"), METHODS), "method")
    valid = data.draw(st.integers(0, 9), "valid") < 8  # mostly a live session and a real profile: reach the matcher
    sid = fuzz_session if valid else data.draw(st.one_of(st.text(_TOKEN, min_size=1, max_size=40),
                                                           st.sampled_from(["%00", "..", "%2F"])), "sid")
    profile = data.draw(st.sampled_from(["openai", "anthropic"]) if valid else st.one_of(
        st.sampled_from(["_tool", "", "OPENAI", "%6fpenai"]), st.text(_TOKEN, min_size=1, max_size=10)), "profile")
    tail = data.draw(st.one_of(st.sampled_from(["chat/completions", "v1/messages", "v1/chat/completions"]), tails), "tail")
    query = data.draw(queries, "query")
    headers = data.draw(headers_st, "headers")
    body = data.draw(bodies(recorded), "body")
    path = f"/s/{sid}/{profile}/{tail}" + (f"?{query}" if query else "")
    request = (method, path, headers, body[:200])
    try:
        status, answer_headers, answer = send(r.port, method, path, body if method != "HEAD" else None, headers)
    except (ConnectionError, http.client.HTTPException, socket.timeout) as err:
        assert r.alive(), r.log.read_text()[-3000:]
        if "HEAD" == method:
            return
        raise AssertionError(f"connection failed ({err!r}) for {request!r}") from err
    _check(r, "proxy", status, answer_headers, answer if method != "HEAD" else b"", request)


absurd = st.one_of(json_values, st.floats(), st.text(min_size=1000, max_size=5000), st.integers(-(2**200), 2**200),
                   st.lists(st.text(max_size=200), min_size=100, max_size=500),
                   st.sampled_from([None, True, False, -1, 0, 2**63, 1e308, -1e308, 1e-320, "", "fuzz-run", "sse-run",
                                    "exact", "step", "live", "repeat_last", "*", ["*"], "a" * 129, "a/b", "../x",
                                    "\x00", "\ud800x", {}, [], 1001, 1000.0, 4, 3.5]))
SESSION_FIELDS = ["run_id", "mode", "until_step", "pace", "force", "tenant", "scope", "on_exhausted",
                  "allow_mutations", "record", "replay_run_id"]
plausible = {"run_id": st.sampled_from(["fuzz-run", "sse-run", "nope"]), "mode": st.sampled_from(["exact", "step", "live"]),
             "until_step": st.integers(0, 12), "pace": st.floats(0, 2), "force": st.booleans(), "tenant": st.just("default"),
             "scope": st.just("default"), "on_exhausted": st.sampled_from(["error", "repeat_last"]),
             "allow_mutations": st.lists(st.text(max_size=8), max_size=3), "record": st.booleans(),
             "replay_run_id": st.text("abc123-_.", min_size=1, max_size=20)}


@st.composite
def session_bodies(draw: st.DrawFn) -> Any:
    """Mostly a valid-looking body with one to three fields absurd, sometimes anything at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(absurd)
    if kind == 1:
        return draw(st.dictionaries(st.text(max_size=20), absurd, max_size=4))
    body = {"run_id": "fuzz-run"}
    for name in draw(st.lists(st.sampled_from(SESSION_FIELDS), max_size=4, unique=True)):
        body[name] = draw(plausible[name])
    for name in draw(st.lists(st.sampled_from(SESSION_FIELDS), min_size=kind % 2, max_size=3, unique=True)):
        body[name] = draw(absurd)
    return body


@FUZZ
@given(body=session_bodies())
def test_the_sessions_api_never_answers_5xx_to_absurd_bodies(replayer: Replayer, body: Any) -> None:
    r = replayer
    try:
        raw = json.dumps(body).encode()
    except (UnicodeEncodeError, ValueError):
        raw = repr(body).encode("utf-8", "surrogatepass")
    if len(raw) > API_LIMIT:
        raw = raw[:API_LIMIT]
    status, answer_headers, answer = send(r.port, "POST", "/v1/replay/sessions", raw, {"content-type": "application/json"})
    _check(r, "sessions", status, answer_headers, answer, body if len(repr(body)) < 300 else repr(body)[:300])
    assert status in (201, 400, 404, 409, 413), (status, answer[:300])
    if status == 201:
        sid = json.loads(answer)["session_id"]
        st_get, _ = api(r.port, "GET", f"/v1/replay/sessions/{sid}")
        st_del, _ = api(r.port, "DELETE", f"/v1/replay/sessions/{sid}")
        assert (st_get, st_del) == (200, 200)


@st.composite
def tool_bodies(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(absurd)
    body: dict[str, Any] = {"name": draw(st.one_of(st.text(max_size=30), absurd) if kind < 3 else st.text(max_size=30)),
                            "envelope_hash": draw(st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64),
                                                            st.just("0" * 64)) if kind != 1 else absurd)}
    for name in draw(st.lists(st.sampled_from(["mutating", "allowed", "extra"]), max_size=3, unique=True)):
        body[name] = draw(st.one_of(st.booleans(), absurd))
    return body


@FUZZ
@given(body=tool_bodies())
def test_the_tools_endpoint_never_answers_5xx_to_absurd_bodies(replayer: Replayer, fuzz_session: str, body: Any) -> None:
    r = replayer
    try:
        raw = json.dumps(body).encode()
    except (UnicodeEncodeError, ValueError):
        raw = repr(body).encode("utf-8", "surrogatepass")
    status, answer_headers, answer = send(r.port, "POST", f"/s/{fuzz_session}/_tool", raw, {"content-type": "application/json"})
    _check(r, "tools", status, answer_headers, answer, repr(body)[:300])
    assert status in (200, 400, 409, 413), (status, answer[:300])


def test_known_good_after_the_fuzzing(replayer: Replayer) -> None:
    replayer.rss.append(("after fuzz", replayer.rss_kb()))
    known_good(replayer)
    assert replayer.rss_kb() - replayer.rss[0][1] < 150 * 1024, replayer.rss


# --- targeted: deep nesting, limits, size -------------------------------------------------------------------------

DEEP = {"[": b"[" * 100_000, "{\"a\":": b'{"a":' * 100_000, "valid 5,000 deep": b"[" * 5000 + b"]" * 5000}


@pytest.mark.parametrize("shape", list(DEEP))
def test_deeply_nested_json_to_the_proxy_is_a_miss_not_a_500(replayer: Replayer, fuzz_session: str, shape: str) -> None:
    """Fails today (bug R1): `contract.canonical_body` lets msgspec's RecursionError escape → 500."""
    status, _, answer = send(replayer.port, "POST", f"/s/{fuzz_session}/openai/chat/completions", DEEP[shape],
                             {"content-type": "application/json"})
    _tally("deep proxy", status)
    assert status == 409 and json.loads(answer)["error"] == "replay_miss", (status, answer[:300])
    assert replayer.alive()


@pytest.mark.parametrize("shape", list(DEEP))
def test_deeply_nested_json_to_the_tools_endpoint_is_a_400(replayer: Replayer, fuzz_session: str, shape: str) -> None:
    """Bug R2 (fixed): `proxy.handle_tool` caught ValueError, not RecursionError → 500. The endpoint now reads
    at most the API's 64 KiB, so the 100,000-deep bodies are 413; a 5,000-deep one that fits is 400."""
    status, _, answer = send(replayer.port, "POST", f"/s/{fuzz_session}/_tool", DEEP[shape],
                             {"content-type": "application/json"})
    _tally("deep tools", status)
    assert status in (400, 413), (status, answer[:300])
    fits = (b"[" * 5000) if shape == "[" else (b'{"a":' * 5000)
    status, _, answer = send(replayer.port, "POST", f"/s/{fuzz_session}/_tool", fits,
                             {"content-type": "application/json"})
    assert status == 400, (status, answer[:300])


def test_deeply_nested_json_to_the_sessions_api_is_a_400(replayer: Replayer) -> None:
    """Fails today (bug R3): `app.create_session` catches ValueError, not RecursionError → 500 (the 100,000-deep
    bodies are over the 64 KiB API limit: 413; a 5,000-deep one fits)."""
    for shape, body in DEEP.items():
        status, _, answer = send(replayer.port, "POST", "/v1/replay/sessions", body, {"content-type": "application/json"})
        _tally("deep sessions", status)
        assert status in (400, 413), (shape, status, answer[:300])


@pytest.mark.parametrize("value", [b"\xff\xfe", b"2023-06-01\xe9", b"\xc3("])
def test_a_semantic_header_that_is_not_utf8_is_a_4xx_not_a_500(replayer: Replayer, fuzz_session: str,
                                                              value: bytes) -> None:
    """Fails today (bug R6): aiohttp decodes header bytes with surrogateescape; `anthropic-version` (a semantic
    header, part of the envelope) then carries lone surrogates and `contract.envelope_hash` raises
    UnicodeEncodeError → 500."""
    path, body, _ = replayer.run_requests[2]
    conn = http.client.HTTPConnection("127.0.0.1", replayer.port, timeout=30)
    try:
        conn.putrequest("POST", f"/s/{fuzz_session}/{path}")
        conn.putheader("content-type", "application/json")
        conn.putheader("anthropic-version", value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        status, answer = resp.status, resp.read()
    finally:
        conn.close()
    _tally("non-UTF-8 semantic header", status)
    assert status < 500, (status, answer[:300])


@pytest.mark.parametrize("encoding, body", [("gzip", b"\x00\x00"), ("gzip", b"not gzip at all"),
                                            ("deflate", b"\xff" * 10)])
@pytest.mark.parametrize("where", ["proxy", "tools", "sessions"])
def test_a_body_that_does_not_decode_as_its_content_encoding_is_a_400(replayer: Replayer, fuzz_session: str,
                                                                      where: str, encoding: str, body: bytes) -> None:
    """Fails today (bug R7): aiohttp raises `RequestPayloadError` while reading the body; `app.json_errors`
    re-raises it, so aiohttp answers its own text 500 ("Server got itself in trouble") and logs a traceback."""
    path = {"proxy": f"/s/{fuzz_session}/openai/chat/completions", "tools": f"/s/{fuzz_session}/_tool",
            "sessions": "/v1/replay/sessions"}[where]
    status, headers, answer = send(replayer.port, "POST", path, body,
                                   {"content-type": "application/json", "content-encoding": encoding})
    _tally("undecodable content-encoding", status)
    assert status == 400 and headers.get("content-type", "").startswith("application/json"), (status, answer[:200])


def test_bodies_just_over_the_limits_are_413(replayer: Replayer, fuzz_session: str) -> None:
    r = replayer
    before = r.rss_kb()
    status, _, answer = send(r.port, "POST", f"/s/{fuzz_session}/openai/chat/completions", b"x" * (PROXY_LIMIT + 1),
                             {"content-type": "application/json"})
    assert status == 413 and json.loads(answer)["error"] == "request_too_large"
    status, _, answer = send(r.port, "POST", "/v1/replay/sessions", b" " * (API_LIMIT + 1),
                             {"content-type": "application/json"})
    assert status == 413
    status, _, answer = send(r.port, "POST", f"/s/{fuzz_session}/_tool", b" " * (PROXY_LIMIT + 1),
                             {"content-type": "application/json"})
    assert status == 413
    r.rss.append(("after 64 MiB+1 bodies", r.rss_kb()))
    assert r.rss_kb() - before < 200 * 1024
    known_good(r)


def _chunked(port: int, path: str, body: bytes, piece: int = 16 << 10) -> tuple[int, bytes]:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=iter([body[i:i + piece] for i in range(0, len(body), piece)]),
                     headers={"content-type": "application/json", "transfer-encoding": "chunked"},
                     encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_api_body_limit_also_holds_for_a_chunked_body(replayer: Replayer) -> None:
    """Fails today (bug R4): `create_session` checks `MAX_API_BODY` against Content-Length only; a chunked body
    is read up to the 64 MiB `client_max_size` and parsed."""
    doc = json.dumps({"run_id": "fuzz-run", "allow_mutations": ["t" * 64] * 40_000}).encode()  # ~2.7 MB
    assert len(doc) > 40 * API_LIMIT
    status, answer = _chunked(replayer.port, "/v1/replay/sessions", doc)
    _tally("chunked sessions", status)
    if status == 201:
        api(replayer.port, "DELETE", f"/v1/replay/sessions/{json.loads(answer)['session_id']}")
    assert status == 413, (status, answer[:200])


def test_a_body_just_under_the_proxy_limit_is_answered_and_memory_comes_back(replayer: Replayer,
                                                                             fuzz_session: str) -> None:
    r = replayer
    big = b"[" + b"0," * ((PROXY_LIMIT - 16) // 2) + b"0]"
    assert len(big) < PROXY_LIMIT
    (status, _, answer), before, peak, took = _peak_rss_during(r, lambda: send(
        r.port, "POST", f"/s/{fuzz_session}/openai/chat/completions", big, {"content-type": "application/json"},
        timeout=120))
    r.rss.append((f"64 MiB JSON body: before / peak ({took:.1f} s)", (before, peak)))  # type: ignore[arg-type]
    r.rss.append(("64 MiB JSON body: after", r.rss_kb()))
    assert status == 409 and json.loads(answer)["error"] == "replay_miss"
    assert peak - before < 1024 * 1024, r.rss  # under 1 GiB for one 64 MiB request
    known_good(r)


def test_the_replayer_keeps_answering_while_a_big_body_is_processed(replayer: Replayer, fuzz_session: str) -> None:
    """Bug R5: a miss was canonicalised, hashed and diffed on the event loop (then in a thread, which holds the
    GIL just the same); a 32 MiB JSON array held every other session (and health) for seconds. The work now runs
    in a worker process: the big request still gets its full answer (the 409 with the envelope hash the
    contract gives), and health answers all along."""
    r = replayer
    big = b"[" + b"0," * (16 << 20) + b"0]"
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(send(
        r.port, "POST", f"/s/{fuzz_session}/openai/chat/completions", big, {"content-type": "application/json"},
        timeout=120)))
    worker.start()
    time.sleep(0.3)  # the upload is on its way
    slowest = 0.0
    checks = 0
    while worker.is_alive():
        t0 = time.monotonic()
        status, _ = api(r.port, "GET", "/v1/replay/health")
        slowest = max(slowest, time.monotonic() - t0)
        checks += 1
        assert status == 200
        time.sleep(0.05)
    worker.join()
    r.rss.append((f"health latency during a 32 MiB miss: {slowest:.2f} s over {checks} checks", r.rss_kb()))
    assert box and box[0][0] == 409
    answer = json.loads(box[0][2])
    expected_hash = c.envelope_hash(c.http_envelope("POST", "/v1/chat/completions", "", [], big))
    assert answer["error"] == "replay_miss" and answer["received_envelope_hash"] == expected_hash
    assert answer["expected_step"] is not None and answer["diff"], answer  # diagnostics were computed too
    assert checks >= 2, "the big request was answered before health was asked: nothing was measured"
    assert slowest < 1.0, f"health took {slowest:.2f} s while one client's big request was processed"


def _peak_rss_during(r: Replayer, fn: Any) -> tuple[Any, int, int, float]:
    """(fn's result, VmRSS before, peak VmRSS while it ran, seconds) of the replayer process."""
    before = r.rss_kb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], r.rss_kb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        result = fn()
        time.sleep(0.3)  # what happens after the answer (draining the rest of the body) counts too
    finally:
        done.set()
        sampler.join()
    return result, before, peak[0], time.monotonic() - t0


@functools.lru_cache(maxsize=1)
def _bomb() -> bytes:
    """512 MiB of zeros, gzip: ~500 KiB."""
    comp = zlib.compressobj(9, wbits=31)
    zeros = b"\0" * (1 << 20)
    return b"".join(comp.compress(zeros) for _ in range(512)) + comp.flush()


@pytest.mark.parametrize("where", ["proxy", "tools", "sessions"])
def test_a_gzip_bomb_is_413_and_memory_stays_bounded(replayer: Replayer, fuzz_session: str, where: str) -> None:
    """Fails today (bug R8): aiohttp inflates request bodies in its parser, as they arrive, before any handler
    runs (and goes on inflating the rest of a refused body while it drains it): a 500 KiB gzip request costs the
    replayer ~250-450 MB of RSS and seconds of CPU, though it is answered 413."""
    r = replayer
    bomb = _bomb()
    path = {"proxy": f"/s/{fuzz_session}/openai/chat/completions", "tools": f"/s/{fuzz_session}/_tool",
            "sessions": "/v1/replay/sessions"}[where]
    (status, _, answer), before, peak, took = _peak_rss_during(r, lambda: send(
        r.port, "POST", path, bomb, {"content-type": "application/json", "content-encoding": "gzip"}))
    _tally("gzip bomb", status)
    r.rss.append((f"512 MiB gzip bomb ({len(bomb) >> 10} KiB) to {where}: before / peak ({took:.1f} s)",
                  (before, peak)))  # type: ignore[arg-type]
    assert status == 413, (path, status, answer[:200])
    known_good(r)
    assert peak - before < 150 * 1024, f"VmRSS +{(peak - before) >> 10} MiB for a {len(bomb) >> 10} KiB request"


# --- malformed SSE ------------------------------------------------------------------------------------------------


def _raw_exchange(port: int, path: str, body: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """POST over a raw socket, read to EOF; (status, headers, de-chunked body, complete: terminating chunk seen)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock.sendall(head + body)
        raw = b""
        while True:
            try:
                piece = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not piece:
                break
            raw += piece
    head_raw, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") != "chunked":
        return status, headers, rest, True
    out, pos, complete = b"", 0, False
    while True:
        end = rest.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(rest[pos:end].split(b";")[0], 16)
        if size == 0:
            complete = True
            break
        out += rest[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
        if pos > len(rest):
            break
    return status, headers, out, complete


def test_malformed_sse_replays_byte_exact(replayer: Replayer) -> None:
    r = replayer
    sid = new_session(r, "sse-run")
    try:
        for i, (what, body, _ends, reason) in enumerate(MALFORMED_SSE):
            request = chat_request(f"malformed sse {i}: {what}")
            status, headers, got, complete = _raw_exchange(r.port, f"/s/{sid}/openai/chat/completions", request)
            assert status == 200 and headers.get("x-case") == str(i), (what, status, headers)
            assert headers["content-type"].startswith("text/event-stream"), what
            assert got == body, (what, len(got), len(body))
            assert complete == (reason != "error"), (what, reason, complete)  # a broken stream breaks again
        _, report = api(r.port, "GET", f"/v1/replay/sessions/{sid}")
        assert report["counts"]["tape"] == len(MALFORMED_SSE) and report["counts"]["misses"] == 0, report["counts"]
    finally:
        api(r.port, "DELETE", f"/v1/replay/sessions/{sid}")
    assert r.alive()


def test_the_cli_takes_a_run_with_malformed_sse(replayer: Replayer) -> None:
    d = ["--data", str(replayer.data)]
    for argv in (["show", "sse-run", "--json"], ["diff", "sse-run", "sse-run", "--json"], ["replay", "sse-run", "--json"],
                 ["export", "sse-run", "--format", "jsonl"], ["export", "sse-run", "--format", "otlp-json"],
                 ["export", "sse-run", "--format", "jaeger"]):
        done = subprocess.run([sys.executable, "-m", "tracetape.cli", *argv, *d], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (argv, done.stderr[-2000:])


def test_the_replayer_log_has_no_traceback_but_for_known_bugs(replayer: Replayer) -> None:
    """Every traceback in the replayer's log is one of the bugs above (R1–R3 RecursionError, R6
    UnicodeEncodeError, R7 RequestPayloadError), or aiohttp's own parser refusing a malformed request line
    (400, logged at ERROR with a traceback by aiohttp: noise a client can provoke, as in the collector)."""
    log = replayer.log.read_text()
    blocks = re.split(r"\n(?=\d{4}-\d\d-\d\d )", log)
    known = ("RecursionError", "UnicodeEncodeError: 'utf-8' codec can't encode", "RequestPayloadError",
             "aiohttp.http_exceptions.Bad")
    others = [b for b in blocks if "Traceback" in b and not any(k in b for k in known)]
    assert not others, others[0][-2000:]
    assert replayer.alive()
