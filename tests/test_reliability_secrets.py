"""Issue 5, item 5: secrets. The default redaction, verified on everything tracetape writes or says.

One agent is recorded through the real stack (`tracetape run` → OTLP → `tracetape collector` subprocess with
`service.telemetry.logs.level: debug` → LMDB, forwarded to a Jaeger stand-in) with credentials everywhere an
agent puts them: `OPENAI_API_KEY` / `ANTHROPIC_API_KEY` (sent as `Authorization` / `x-api-key`), a prompt that
pastes a key (plain and streamed, both providers), a decorated tool whose argument is a key, a tool whose
result carries a bearer token and a GitHub token, a tool that raises with a key in its message, a 401 whose
body and headers echo the rejected key, a model that repeats a pasted key back (plain, and gzip-compressed
as real providers answer), and a plain HTTP call with a key in its query string. Then a `tracetape replayer`
subprocess (logging at INFO, recording replays back into the collector) is sent hits, misses and exhausted
requests carrying keys in their bodies, `Authorization`, `x-api-key`, query and path.

Each surface is one test: every LMDB value (`Store.dump()`), the payloads decoded (a compressed body scanned
as bytes proves nothing), every forwarded span, every export format, the collector's / replayer's / wrapper's
logs, the CLI outputs (`show --json`, `runs --json`, `replay RUN`, `diff`), and the replayer's error bodies.
Each key is checked in full and as a distinctive 14-character piece of its secret part (a mask keeps only
the first four characters), also inside base64 strings and gzip/zlib/zstd streams found in what is scanned.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
import zstandard

from tests.support.stack import _SinkThread, stop_process
from tests.support.standin import Standin
from tracetape.collector import genai
from tracetape.collector.store import Store

# --- the secrets ------------------------------------------------------------------------------------------

KEYS: dict[str, str] = {
    "openai_env": "sk-test-OAIenvKEY7Qx2Lp9Vb4Nm6Rt8Wz1",  # OPENAI_API_KEY → Authorization: Bearer
    "anthropic_env": "sk-ant-test-ANTenvKEY3Hj5Kd7Fg9Sa2Qw4",  # ANTHROPIC_API_KEY → x-api-key
    "prompt": "sk-test-PROMPTpasted5Yu8Io1Pa3Sd6Fg",  # pasted into prompts
    "tool_arg": "sk-test-TOOLargKEY2Zx4Cv6Bn8Mq0Wer",  # a tool's argument
    "tool_exc": "sk-test-TOOLexcKEY9Lk7Jh5Gf3Ds1Aqq",  # in a tool's exception message
    "bearer": "eyJhbGciOiJIUzI1NiJ9.TOKENbearer4Qw8Er2Ty",  # "Bearer …" in a tool's result
    "github": "ghp_GITHUBtok3n9Az8Sx7Dc6Fv5Gb4Hn3Jm2Kl1Qq",  # a GitHub token in a tool's result
    "rejected": "sk-test-REJECTEDkey4Rt6Yu8Io0Pl2Kmm",  # sent to a server that answers 401 echoing it
    "echo_plain": "sk-test-ECHOplainKEY6Tg8Yh0Uj2Ik4Ol",  # the model repeats it back (identity body)
    "url_query": "sk-test-URLqueryKEY5Bg7Nh9Mj1Ki3Lo",  # ?api_key= of a plain HTTP call
    "named_header": "9a8b7c6d5e4f30211203f4e5d6c7b8a9bb",  # its X-RapidAPI-Key header: no known shape, by name
    "proxy_auth": "sk-test-PROXYauthKEY1Wd3Fr5Gt7Hy9Ju",  # Authorization / x-api-key sent to the replayer
    "proxy_body": "sk-test-PROXYbodyKEY2Es4Dr6Ft8Gy0Hu",  # in the body of a request that misses
    "proxy_query": "sk-test-PROXYqueryKEY3Rd5Tf7Yg9Uh1J",  # in the query of a request that misses
    "proxy_named_query": "0f1e2d3c4b5a69788796a5b4c3d2e1f0aa",  # ?access_token= of it: no known shape, by name
}
ECHO_GZIP_KEY = "sk-test-ECHOgzipKEY1Qa3Ws5Ed7Rf9Tgg"  # the model repeats it back in a gzip-compressed body
ARGV_KEY = "sk-test-ARGVcmdKEY8Uj6Hy4Gt2Fr0Dee"  # on the agent's command line
PATH_KEY = "sk-test-PROXYpathKEY4Ty6Ui8Op0As2Df"  # in the path of a request that misses


def _needles(secret: str) -> list[bytes]:
    """The whole secret and a distinctive 14-character piece of it (past the kept first four characters)."""
    start = 8 if len(secret) > 30 else 5
    return [secret.encode(), secret[start:start + 14].encode()]


# --- finding secrets in what tracetape wrote ----------------------------------------------------------------

_B64 = re.compile(rb"[A-Za-z0-9+/_\-]{20,}={0,2}")
_MAGIC = {b"\x1f\x8b\x08": "gzip", b"\x78\x9c": "zlib", b"\x78\x01": "zlib", b"\x78\xda": "zlib",
          b"\x28\xb5\x2f\xfd": "zstd"}


def _inflate(data: bytes) -> Iterator[bytes]:
    """Whatever decompresses from each gzip/zlib/zstd header found in `data` (partial output kept)."""
    for magic, kind in _MAGIC.items():
        start = data.find(magic)
        tries = 0
        while start >= 0 and tries < 50:
            tries += 1
            try:
                if kind == "zstd":
                    out = zstandard.ZstdDecompressor().decompressobj().decompress(data[start:])
                else:
                    d = zlib.decompressobj(wbits=47 if kind == "gzip" else 15)
                    out = d.decompress(data[start:], 64 << 20)
                if out:
                    yield out
            except Exception:
                pass
            start = data.find(magic, start + 1)


def views(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """`data`, plus what base64 strings and compressed streams inside it decode to (two levels deep)."""
    yield data
    if depth >= 2:
        return
    for inner in _inflate(data):
        yield from views(inner, depth + 1)
    for m in _B64.finditer(data):
        token = m.group(0)
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(token + b"=" * (-len(token) % 4))
            except Exception:
                continue
            if raw:
                yield from views(raw, depth + 1)


def leaks(data: bytes | str, secrets: dict[str, str]) -> set[str]:
    """Names of the secrets found in `data` (or in anything decoded from it)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    found: set[str] = set()
    for view in views(data):
        for name, secret in secrets.items():
            if name not in found and any(n in view for n in _needles(secret)):
                found.add(name)
    return found


SCANNED: dict[str, tuple[int, int]] = {}
"""where → (items scanned, bytes scanned), printed at the end of the module."""


def assert_no_leak(where: str, blobs: Iterable[tuple[str, bytes | str]], secrets: dict[str, str] = KEYS) -> int:
    """Scan `(label, data)` pairs; fail naming every secret found and where. Returns how many were scanned."""
    problems: dict[str, set[str]] = {}
    n = size = 0
    for label, data in blobs:
        n += 1
        size += len(data)
        for name in leaks(data, secrets):
            problems.setdefault(name, set()).add(label)
    assert n > 0, f"{where}: nothing to scan"
    items, total = SCANNED.get(where, (0, 0))
    SCANNED[where] = (items + n, total + size)
    assert not problems, f"{where}: secrets found: " + "; ".join(
        f"{name} in {sorted(labels)[:6]}" for name, labels in sorted(problems.items()))
    return n


# --- a second upstream: answers 401 echoing the key, or repeats the last message back -----------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        auth = self.headers.get("authorization", "")
        key = auth.split(" ", 1)[1] if " " in auth else auth
        payload = json.loads(body or b"{}")
        headers = {"content-type": "application/json", "x-request-id": "req_echo"}
        if key == KEYS["rejected"]:  # what an API gateway answers for a bad key, key and all
            status = 401
            out = json.dumps({"error": {"message": f"Incorrect API key provided: {key}.", "code": "invalid_api_key",
                                        "type": "invalid_request_error", "param": None}}).encode()
            headers["www-authenticate"] = f'Bearer realm="echo", error="invalid_token", error_description="{key}"'
            headers["x-rejected-key"] = key
        else:
            status = 200
            last = (payload.get("messages") or [{}])[-1].get("content", "")
            out = json.dumps({"id": "chatcmpl-echo", "object": "chat.completion", "created": 1_700_000_000,
                              "model": payload.get("model", "echo"),
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": f"You said: {last}"}}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}).encode()
            if self.headers.get("x-echo-gzip") == "1":
                out = gzip.compress(out, mtime=0)
                headers["content-encoding"] = "gzip"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


# --- the agent ------------------------------------------------------------------------------------------------

AGENT = r'''
import json, os, sys
import httpx, openai, anthropic
import tracetape

K = json.loads(os.environ["SECRET_KEYS"])
ECHO = os.environ["ECHO_URL"]
STANDIN = os.environ["STANDIN_URL"]
V = os.environ.get("AGENT_VARIANT", "1")


@tracetape.tool
def lookup_account(api_key: str, user: str) -> dict:
    return {"user": user, "auth": "Bearer " + K["bearer"], "github": K["github"], "variant": V}


@tracetape.tool(mutating=True)
def call_billing(endpoint: str) -> str:
    raise PermissionError(f"{endpoint} rejected the key {K['tool_exc']}")


out = {}
oa = openai.OpenAI(max_retries=0)
r = oa.chat.completions.create(model="gpt-4o-mini", messages=[
    {"role": "user", "content": f"({V}) my key is {K['prompt']}, is it valid?"}])
out["openai"] = r.choices[0].message.content
s = oa.chat.completions.create(model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
                               messages=[{"role": "user", "content": f"({V}) stream about {K['prompt']}"}])
out["openai_stream"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
an = anthropic.Anthropic(max_retries=0)
m = an.messages.create(model="claude-sonnet-5", max_tokens=50, messages=[
    {"role": "user", "content": f"({V}) anthropic, key {K['prompt']}"}])
out["anthropic"] = m.content[0].text
with an.messages.stream(model="claude-sonnet-5", max_tokens=50, messages=[
        {"role": "user", "content": f"({V}) stream, key {K['prompt']}"}]) as st:
    out["anthropic_stream"] = st.get_final_text()
out["lookup"] = lookup_account(K["tool_arg"], "alice")["user"]
try:
    call_billing("billing")
except PermissionError as err:
    out["billing"] = type(err).__name__
bad = openai.OpenAI(base_url=ECHO + "/v1", api_key=K["rejected"], max_retries=0)
try:
    bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
except openai.AuthenticationError as err:
    out["rejected"] = err.status_code
httpx.get(f"{STANDIN}/raw/lookup", params={"api_key": K["url_query"], "v": V},
          headers={"X-RapidAPI-Key": K["named_header"]}).raise_for_status()
echo = openai.OpenAI(base_url=ECHO + "/v1", max_retries=0)
e = echo.chat.completions.create(model="gpt-4o-mini", messages=[
    {"role": "user", "content": f"({V}) repeat after me: {K['echo_plain']}"}])
out["echo_plain"] = len(e.choices[0].message.content)
# last model call: the model repeats a pasted key back, compressed as real providers answer
e = echo.chat.completions.create(model="gpt-4o-mini", extra_headers={"x-echo-gzip": "1"}, messages=[
    {"role": "user", "content": f"({V}) repeat after me: {os.environ['ECHO_GZIP_KEY']}"}])
out["echo_gzip"] = len(e.choices[0].message.content)
print(json.dumps(out, sort_keys=True))
'''


# --- the world: record, replay, export, ask the CLI -------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    data: Path
    endpoint: str
    standin: Standin
    sink: Any
    collector: subprocess.Popen[bytes]
    collector_log: Path
    replayer_log: Path
    replayer_url: str = ""
    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    proxy_answers: list[tuple[str, int, bytes]] = field(default_factory=list)
    """(label, status, raw response head + body) of every request sent to the replayer."""
    replay_run_id: str = ""


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracetape.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _wait_run(data: Path, run_id: str, timeout: float = 30, **match: Any) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if (data / "data.mdb").exists():
            store = Store(data, readonly=True)
            try:
                found = store.find_run(run_id)
            finally:
                store.close()
            if found:
                last = found[0]
                if last.status != "running" and all(getattr(last, k) == v for k, v in match.items()):
                    return last
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end in {timeout}s: {last}")


def _raw_request(url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One request with http.client; (status, the whole response as text: status line, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = f"{resp.status} {resp.reason}\n".encode() + b"".join(
            f"{k}: {v}\n".encode() for k, v in resp.getheaders()) + b"\n" + resp.read()
        return resp.status, raw
    finally:
        conn.close()


def _replayer_traffic(world: World) -> None:
    """Hits, misses and exhausted requests against the replayer, carrying keys everywhere a client puts them."""
    url = world.replayer_url
    req = urllib.request.Request(f"{url}/v1/replay/sessions", method="POST", headers={"content-type": "application/json"},
                                 data=json.dumps({"run_id": "sec-1"}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        session = json.loads(resp.read())
    sid = session["session_id"]
    world.replay_run_id = session["replay_run_id"]
    first = world.standin.exchanges[0]  # the agent's first OpenAI request, as sent (key in prompt, Authorization)
    assert first.path == "/v1/chat/completions" and KEYS["prompt"].encode() in first.body
    sent = {k: v for k, v in first.headers if k.lower() not in ("host", "content-length", "transfer-encoding")}
    creds = {"Authorization": f"Bearer {KEYS['proxy_auth']}", "x-api-key": KEYS["proxy_auth"],
             "api-key": KEYS["proxy_auth"], "openai-api-key": KEYS["proxy_auth"]}
    base = f"/s/{sid}/openai"
    cases: list[tuple[str, str, str, bytes, dict[str, str]]] = [
        ("hit", "POST", f"{base}/chat/completions", first.body, {**sent, **creds}),
        ("exhausted", "POST", f"{base}/chat/completions", first.body, {**sent, **creds}),
    ]
    other = json.loads(first.body)
    other["messages"][0]["content"] = f"changed, my key is {KEYS['proxy_body']} and {KEYS['prompt']}"
    changed = json.dumps(other).encode()
    cases += [
        ("miss-body", "POST", f"{base}/chat/completions", changed, {**sent, **creds}),
        ("miss-query", "POST", f"{base}/chat/completions?api_key={KEYS['proxy_query']}&key={KEYS['proxy_query']}"
         f"&access_token={KEYS['proxy_named_query']}",
         first.body, {**sent, **creds}),
        ("miss-new-route", "POST", f"{base}/embeddings", changed, {**sent, **creds}),
        ("miss-not-json", "POST", f"{base}/chat/completions",
         b"not json " + KEYS["proxy_body"].encode() + b" " + KEYS["prompt"].encode(), creds),
        ("miss-anthropic", "POST", f"/s/{sid}/anthropic/v1/messages",
         json.dumps({"model": "claude-sonnet-5", "max_tokens": 5, "messages": [
             {"role": "user", "content": f"key {KEYS['proxy_body']}"}]}).encode(),
         {"content-type": "application/json", "anthropic-version": "2023-06-01", **creds}),
        ("tool-miss", "POST", f"/s/{sid}/_tool",
         json.dumps({"name": "lookup_account", "envelope_hash": "0" * 64, "mutating": False}).encode(),
         {"content-type": "application/json", **creds}),
    ]
    for label, method, path, body, headers in cases:
        status, raw = _raw_request(url, method, path, body, headers)
        world.proxy_answers.append((label, status, raw))
    statuses = {label: status for label, status, _ in world.proxy_answers}
    assert statuses["hit"] == 200 and statuses["exhausted"] == 409, statuses
    assert all(statuses[k] == 409 for k in statuses if k.startswith(("miss", "tool"))), statuses
    for label, path in (("report", f"/v1/replay/sessions/{sid}"), ("list", "/v1/replay/sessions")):
        status, raw = _raw_request(url, "GET", path, b"", creds)
        world.proxy_answers.append((label, status, raw))
    status, raw = _raw_request(url, "DELETE", f"/v1/replay/sessions/{sid}", b"", creds)
    world.proxy_answers.append(("final-report", status, raw))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("secrets")
    data = tmp / "data"
    with ExitStack() as exits:
        standin = Standin().start()
        exits.callback(standin.stop)
        echo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        exits.callback(echo.shutdown)
        sink_thread = _SinkThread(max_attribute_bytes=64 * 1024)
        sink = sink_thread.start()
        exits.callback(sink_thread.stop)
        config = {
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"},
                                                 "http": {"endpoint": "127.0.0.1:0"}}}},
            "processors": {"tracetape_slim": {"max_attribute_bytes": 16384}},
            "exporters": {"tracetape": {"path": str(data)},
                          "otlphttp/jaeger": {"endpoint": sink.http_url,
                                              "retry_on_failure": {"initial_interval": "100ms", "max_interval": "500ms"}}},
            "service": {"telemetry": {"logs": {"level": "debug"}}, "pipelines": {
                "traces": {"receivers": ["otlp"], "exporters": ["tracetape"]},
                "traces/jaeger": {"receivers": ["otlp"], "processors": ["tracetape_slim"],
                                  "exporters": ["otlphttp/jaeger"]}}},
        }
        (tmp / "otel-config.yaml").write_text(yaml.safe_dump(config))
        collector_log = tmp / "collector.stderr"
        log_fh = exits.enter_context(open(collector_log, "wb"))
        collector = subprocess.Popen([sys.executable, "-m", "tracetape.cli", "collector", "--config",
                                      str(tmp / "otel-config.yaml"), "--json"], stdout=subprocess.PIPE, stderr=log_fh)
        exits.callback(stop_process, collector)
        assert collector.stdout is not None
        line = collector.stdout.readline()
        assert line, collector_log.read_text()
        endpoint = json.loads(line)["http"][0].removesuffix("/v1/traces")
        world = World(tmp=tmp, data=data, endpoint=endpoint, standin=standin, sink=sink, collector=collector,
                      collector_log=collector_log, replayer_log=tmp / "replayer.stderr")
        (tmp / "agent.py").write_text(AGENT)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACETAPE_", "OTEL_", "ANTHROPIC_", "OPENAI_"))}
        env.update(OPENAI_BASE_URL=standin.openai_base_url, OPENAI_API_KEY=KEYS["openai_env"],
                   ANTHROPIC_BASE_URL=standin.anthropic_base_url, ANTHROPIC_API_KEY=KEYS["anthropic_env"],
                   SECRET_KEYS=json.dumps(KEYS), ECHO_GZIP_KEY=ECHO_GZIP_KEY,
                   ECHO_URL=f"http://127.0.0.1:{echo.server_address[1]}", STANDIN_URL=standin.url,
                   TRACETAPE_HTTP_HOSTS=standin.hostport, PYTHONUNBUFFERED="1")
        for run_id, variant in (("sec-1", "1"), ("sec-2", "2")):
            done = subprocess.run([sys.executable, "-m", "tracetape.cli", "run", "--run-id", run_id, "--endpoint",
                                   endpoint, "--", sys.executable, str(tmp / "agent.py")],
                                  env={**env, "AGENT_VARIANT": variant}, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            world.runs[run_id] = done
            _wait_run(data, run_id)
        # a key on the agent's own command line (`--api-key sk-…`), in a run of its own
        done = subprocess.run([sys.executable, "-m", "tracetape.cli", "run", "--run-id", "sec-argv", "--endpoint",
                               endpoint, "--", sys.executable, "-c", "pass", "--api-key", ARGV_KEY],
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        world.runs["sec-argv"] = done
        _wait_run(data, "sec-argv")

        rep_fh = exits.enter_context(open(world.replayer_log, "wb"))
        replayer = subprocess.Popen(
            [sys.executable, "-m", "tracetape.cli", "replayer", "--data", str(data), "--port", "0",
             "--collector", endpoint, "--upstream", f"openai={standin.openai_base_url}",
             "--upstream", f"anthropic={standin.anthropic_base_url}"],
            stdout=subprocess.PIPE, stderr=rep_fh, text=True)
        exits.callback(stop_process, replayer)
        assert replayer.stdout is not None
        line = replayer.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, world.replayer_log.read_text()
        world.replayer_url = match.group(1)
        before = standin.count
        _replayer_traffic(world)
        assert standin.count == before  # exact mode: nothing went upstream
        _wait_run(data, world.replay_run_id)
        stop_process(replayer)  # flushes; its log is complete
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the forwarder caught up with everything stored
            store = Store(data, readonly=True)
            try:
                stored = sum(1 for table, _, _ in store.dump() if table == "spans")
            finally:
                store.close()
            if sink.span_count() >= stored - 4:  # minus the zero-length run-start markers (not forwarded)
                break
            time.sleep(0.2)
        yield world
        print("\nsecrets scanned (items, bytes): " + "; ".join(f"{k}: {v}" for k, v in SCANNED.items()))


MAIN = dict(KEYS)
"""Keys every surface must hide (the compressed echo, the command-line key and the path key have tests of their
own, so that each known leak fails one test, not all of them)."""


def _store_values(world: World) -> list[tuple[str, bytes]]:
    store = Store(world.data, readonly=True)
    try:
        return [(f"{table}:{key[:40].hex()}", key + b"\0" + value) for table, key, value in store.dump()]
    finally:
        store.close()


# --- the recording really carried the secrets ---------------------------------------------------------------


def test_the_secrets_really_were_sent(world: World) -> None:
    ex = world.standin.exchanges
    sent = b"".join(e.body + json.dumps(e.headers).encode() + e.query.encode() for e in ex)
    for name in ("openai_env", "anthropic_env", "prompt", "url_query", "named_header"):
        assert KEYS[name].encode() in sent, name
    assert json.loads(world.runs["sec-1"].stdout)["rejected"] == 401
    store = Store(world.data, readonly=True)
    try:
        steps = store.steps("default", "default", "sec-1")
    finally:
        store.close()
    kinds = [s.kind for s in steps]
    assert kinds.count("model") == 7 and kinds.count("tool") == 2 and kinds.count("http") == 1, kinds
    assert any(a.status == 401 for s in steps for a in s.attempts)
    # the gzip answer that echoes a key was stored decoded (identity) with the key masked; its headers say gzip
    assert any(a.content_encoding == "" and ("content-encoding", "gzip") in a.response_headers
               for s in steps for a in s.attempts)
    assert any(a.error_type and "PermissionError" in a.error_type for s in steps for a in s.attempts)
    dump = b"".join(v for _, v in _store_values(world))
    for masked in (b"sk-t" + b"*" * 20, b"Bear" + b"*" * 20, b"ghp_" + b"*" * 20):
        assert masked in dump, masked  # redaction ran (masks kept the length): the scans below are not vacuous


def test_the_scanner_finds_keys_inside_encodings() -> None:
    key = KEYS["prompt"]
    masked = key[:4] + "*" * (len(key) - 4)
    assert leaks(f"x{key}y", KEYS) == {"prompt"}
    assert leaks(key[8:30], KEYS) == {"prompt"}  # a piece is enough
    assert leaks(masked, KEYS) == set()
    packed = base64.b64encode(b"prefix" + gzip.compress(f'{{"k": "{key}"}}'.encode()))
    assert leaks(b'{"data": "' + packed + b'"}', KEYS) == {"prompt"}
    assert leaks(b"\x00" + zstandard.ZstdCompressor().compress(key.encode()), KEYS) == {"prompt"}


# --- the store -----------------------------------------------------------------------------------------------------


def test_no_secret_in_any_lmdb_value(world: World) -> None:
    n = assert_no_leak("LMDB (Store.dump)", _store_values(world), MAIN)
    assert n > 50


def test_no_secret_in_compressed_response_bodies(world: World) -> None:
    """A response body is stored as on the wire: gzip from real providers. Decoded, it must be redacted too.

    Fails today (bug S1): redaction skips a body with a content encoding, so a key the model repeats back
    is stored (compressed), forwarded decoded in `tracetape.response.body.preview`, and printed by
    `tracetape replay RUN` and `tracetape diff`.
    """
    store = Store(world.data, readonly=True)
    try:
        bodies = []
        for run_id in ("sec-1", "sec-2"):
            for i, step in enumerate(store.steps("default", "default", run_id)):
                for a in step.attempts:
                    if a.response_body is not None:
                        raw = store.blob("default", "default", a.response_body.digest) or b""
                        bodies.append((f"{run_id} step {i} ({a.content_encoding or 'identity'})",
                                       genai.decode_content(raw, a.content_encoding)))
    finally:
        store.close()
    assert_no_leak("decoded response bodies", bodies, {**MAIN, "echo_gzip": ECHO_GZIP_KEY})


def test_no_secret_on_the_agent_command_line_is_stored(world: World) -> None:
    """Fails today (bug S2): `tracetape.run.command` is the argv as given, unredacted."""
    assert_no_leak("run sec-argv (store)", _store_values(world), {"argv": ARGV_KEY})


# --- forwarded spans -------------------------------------------------------------------------------------------


def _forwarded(world: World) -> list[tuple[str, bytes]]:
    """Each forwarded span with its resource, labelled by its name."""
    return [(s.name, s.SerializeToString() + rs.resource.SerializeToString()) for rs, s in world.sink.spans()]


def test_no_secret_in_forwarded_spans(world: World) -> None:
    spans = _forwarded(world)
    assert len(spans) > 20
    assert_no_leak("forwarded spans (Jaeger sink)", spans, MAIN)


def test_no_secret_in_forwarded_previews_of_compressed_bodies(world: World) -> None:
    """Fails today (bug S1): the slim copy previews a gzip body decoded, the key in clear."""
    spans = _forwarded(world)
    assert_no_leak("forwarded spans (Jaeger sink)", spans, {"echo_gzip": ECHO_GZIP_KEY, "argv": ARGV_KEY})


# --- exports ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "otlp-json", "jaeger"])
def test_no_secret_in_exports(world: World, fmt: str) -> None:
    outputs = []
    for run_id in ("sec-1", world.replay_run_id):
        done = _cli("export", run_id, "--format", fmt, "--data", str(world.data))
        assert done.returncode == 0, done.stderr
        assert len(done.stdout) > 1000
        outputs.append((f"{run_id} {fmt}", done.stdout + done.stderr))
    assert_no_leak(f"export --format {fmt}", outputs, MAIN)


# --- logs -------------------------------------------------------------------------------------------------------------


def test_no_secret_in_logs(world: World) -> None:
    collector_log = world.collector_log.read_bytes()
    assert b"DEBUG" in collector_log  # the collector really logged at debug level
    logs = [("collector (debug)", collector_log), ("replayer", world.replayer_log.read_bytes())]
    logs += [(f"tracetape run {r} stderr", p.stderr) for r, p in world.runs.items()]
    assert_no_leak("logs", logs, MAIN)


# --- CLI outputs ------------------------------------------------------------------------------------------------


def test_no_secret_in_cli_outputs(world: World) -> None:
    d = ["--data", str(world.data)]
    calls = [("show", "sec-1", "--json", *d), ("show", "sec-1", *d), ("show", world.replay_run_id, "--json", *d),
             ("runs", "--json", *d), ("diff", "sec-1", "sec-2", *d), ("diff", "sec-1", "sec-2", "--json", *d),
             ("diff", "sec-1", world.replay_run_id, "--json", *d)]
    outputs = []
    for argv in calls:
        done = _cli(*argv)
        assert done.returncode in (0, 1), (argv, done.stderr)
        outputs.append((" ".join(argv[:3]), done.stdout + done.stderr))
    assert_no_leak("CLI outputs", outputs, MAIN)


def test_cli_does_not_print_a_key_from_a_compressed_body(world: World) -> None:
    """`tracetape replay RUN` (no command) prints the last model answer, here the model repeating a key back
    in a gzip body; `tracetape diff` prints the decoded bodies of steps that differ. Fails today (bug S1)."""
    d = ["--data", str(world.data)]
    outputs = []
    for argv in (("replay", "sec-1", *d), ("replay", "sec-1", "--json", *d), ("diff", "sec-1", "sec-2", *d),
                 ("diff", "sec-1", "sec-2", "--json", *d)):
        done = _cli(*argv)
        assert done.returncode in (0, 1), (argv, done.stderr)
        outputs.append((" ".join(a for a in argv if a != str(world.data) and a != "--data"), done.stdout + done.stderr))
    assert_no_leak("CLI outputs", outputs, {"echo_gzip": ECHO_GZIP_KEY})


# --- replayer answers ---------------------------------------------------------------------------------------------


def test_no_secret_in_replayer_answers(world: World) -> None:
    misses = [(label, raw) for label, status, raw in world.proxy_answers if status == 409]
    assert len(misses) >= 6
    for label, raw in misses:
        body = json.loads(raw.split(b"\n\n", 1)[1])
        assert body["error"] in ("replay_miss", "replay_exhausted"), (label, body)
    assert any(json.loads(raw.split(b"\n\n", 1)[1]).get("diff") for _, raw in misses)  # diagnostics were given
    answers = [(label, raw) for label, _, raw in world.proxy_answers]
    assert_no_leak("replayer answers (status line, headers, body)", answers, MAIN)


def test_no_secret_in_the_path_echoed_by_a_miss(world: World) -> None:
    """A key in the request path (a mis-built base URL). Fails today (bug S3): the 409's `received.path` and its
    `$path` diff echo the path unredacted."""
    status, raw = _path_miss(world)
    assert status == 409
    assert_no_leak("409 for a path carrying a key", [("path miss", raw)], {"path": PATH_KEY})


def _path_miss(world: World) -> tuple[int, bytes]:
    # a fresh session on the (stopped) replayer is not possible: start one in this process instead
    from tests.replay_support import start_replayer

    store = Store(world.data, readonly=True)
    replayer = start_replayer(store, world.standin)
    try:
        req = urllib.request.Request(f"{replayer.url}/v1/replay/sessions", method="POST",
                                     data=json.dumps({"run_id": "sec-1", "record": False}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            sid = json.loads(resp.read())["session_id"]
        first = world.standin.exchanges[0]
        return _raw_request(replayer.url, "POST", f"/s/{sid}/openai/keys/{PATH_KEY}/chat/completions", first.body,
                            {"content-type": "application/json"})
    finally:
        replayer.stop()
        store.close()
