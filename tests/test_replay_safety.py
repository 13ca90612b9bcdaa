"""Issue 5, item 7: replay safety as a property. For ANY recorded run, an exact replay opens zero upstream
connections and executes zero tool bodies.

Hypothesis writes agents: random sequences of OpenAI calls (sync or async, streaming or not, with or without
`include_usage`) and Anthropic calls (`create`, `stream=True`, `messages.stream()`), with random prompts
(unicode, empty, repeated so that identical requests recur), and decorated tool calls: some mutating, some
raising. Each agent is recorded through the real stack (`tracetape run` → collector subprocess → LMDB, the
stand-in provider answering), then replayed exactly as a user does: `tracetape replay RUN -- python AGENT.py`.

The guard is socket-level: every Python process of the replay (`tracetape replay`, its in-process replayer,
the `tracetape run` wrapper, the agent) imports a `sitecustomize` shim (tracetape's bootstrap runs the
`sitecustomize` it shadows) that installs an audit hook logging every `socket.connect` and
`socket.getaddrinfo` with the pid. The only addresses any of them may connect to are the replay session's
replayer and the collector's OTLP endpoint; the only names looked up are loopback. The same shim on the
recording proves the guard sees the upstream traffic when there is some. Every tool body writes a marker file
when it runs: recording writes one per call, the replay none. The replayed agent's output must equal the
recorded one, and the session report must show zero misses and zero live calls.

Cost: one example is two agent processes (the SDK imports dominate), ~7 s. `TRACETAPE_SAFETY_EXAMPLES` (default 5)
scales it up for a soak. A control replays one recorded run in `live` mode under the same guard and checks
that it does see the replayer's upstream connection and the tool body run (the guards are not vacuous).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from tests.support.standin import Standin
from tracetape.collector.store import Store

EXAMPLES = int(os.environ.get("TRACETAPE_SAFETY_EXAMPLES", "5"))
TRIED: dict[str, int] = {"examples": 0, "model_calls": 0, "tool_calls": 0, "tool_raises": 0, "mutating": 0,
                         "streamed": 0, "connects_recorded": 0, "connects_replayed": 0}

GUARD = r'''
"""Test shim: log every socket connect / name lookup of this process (audit hook), then stay out of the way."""
import json, os, sys

_LOG = os.environ.get("SAFETY_GUARD_LOG")
if _LOG:
    _pid = os.getpid()

    def _write(rec):
        rec["pid"] = _pid
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, default=repr) + "\n")

    _write({"event": "start", "argv": sys.argv[:3], "replay_url": os.environ.get("TRACETAPE_REPLAY_URL", ""),
            "openai_base_url": os.environ.get("OPENAI_BASE_URL", "")})

    def _hook(event, args):
        if event == "socket.connect":
            sock, address = args[0], args[1]
            _write({"event": "connect", "family": int(getattr(sock, "family", -1)),
                    "address": list(address) if isinstance(address, tuple) else repr(address)})
        elif event == "socket.getaddrinfo":
            _write({"event": "getaddrinfo", "host": repr(args[0]), "port": repr(args[1])})

    sys.addaudithook(_hook)
'''

AGENT_HEAD = r'''
import asyncio, json, os, sys, uuid
import tracetape

MARKERS = os.environ["SAFETY_MARKERS"]


def _mark(name):
    with open(os.path.join(MARKERS, f"{name}-{os.getpid()}-{uuid.uuid4().hex}"), "w") as fh:
        fh.write(name)


@tracetape.tool(mutating=False)
def lookup(key: str, n: int = 1) -> dict:
    _mark("lookup")
    return {"key": key, "n": n, "len": len(key) * n}


@tracetape.tool(mutating=True)
def save(text: str) -> str:
    _mark("save")
    return f"saved {len(text)}"


@tracetape.tool(mutating=False)
def flaky(x: int) -> int:
    _mark("flaky")
    raise ValueError(f"flaky refused {x}")


@tracetape.tool(mutating=True)
def charge(amount: int) -> str:
    _mark("charge")
    raise PermissionError(f"charge {amount} denied")


out = []


def tool(fn, *args):
    try:
        out.append(["ok", fn(*args)])
    except Exception as err:
        out.append(["err", type(err).__name__, str(err)])
'''

OPENAI_HEAD = r'''
import openai
oa = openai.OpenAI(max_retries=0)


async def _oa_async(prompt, stream, usage):
    client = openai.AsyncOpenAI(max_retries=0)
    try:
        extra = {"stream_options": {"include_usage": True}} if usage else {}
        if not stream:
            r = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
            return r.choices[0].message.content
        s = await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                 messages=[{"role": "user", "content": prompt}], **extra)
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
    finally:
        await client.close()
'''

ANTHROPIC_HEAD = r'''
import anthropic
an = anthropic.Anthropic(max_retries=0)
'''

AGENT_TAIL = r'''
with open(os.environ["AGENT_OUT"], "w", encoding="utf-8") as fh:
    json.dump(out, fh, sort_keys=True)
'''

TOOLS = {"lookup": (False, False), "save": (True, False), "flaky": (False, True), "charge": (True, True)}
"""name → (mutating, raises)"""


# --- programs -------------------------------------------------------------------------------------------------

prompts = st.one_of(
    st.sampled_from(["hello", "hello", "what is the tide?", ""]),  # repeats: the same request recurs
    st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="[]"), max_size=40),
)
openai_calls = st.tuples(st.just("openai"), st.sampled_from(["sync", "async"]), st.booleans(), st.booleans(), prompts)
anthropic_calls = st.tuples(st.just("anthropic"), st.sampled_from(["create", "stream_true", "messages_stream"]),
                            prompts)
tool_calls = st.one_of(
    st.tuples(st.just("tool"), st.just("lookup"), st.text(max_size=12), st.integers(0, 5)),
    st.tuples(st.just("tool"), st.just("save"), st.text(max_size=12)),
    st.tuples(st.just("tool"), st.just("flaky"), st.integers(-100, 100)),
    st.tuples(st.just("tool"), st.just("charge"), st.integers(0, 10_000)),
)
operations = st.integers(0, 9).flatmap(  # 40 % OpenAI, 30 % Anthropic, 30 % tools
    lambda k: openai_calls if k < 4 else anthropic_calls if k < 7 else tool_calls)
programs = st.lists(operations, min_size=2, max_size=8)


def agent_source(program: list[tuple[Any, ...]]) -> str:
    kinds = {op[0] for op in program}
    lines = [AGENT_HEAD]
    if "openai" in kinds:
        lines.append(OPENAI_HEAD)
    if "anthropic" in kinds:
        lines.append(ANTHROPIC_HEAD)
    for op in program:
        if op[0] == "openai":
            _, how, stream, usage, prompt = op
            if how == "async":
                lines.append(f"out.append(asyncio.run(_oa_async({prompt!r}, {stream!r}, {usage!r})))")
            elif not stream:
                lines.append(f"r = oa.chat.completions.create(model='gpt-4o-mini', "
                             f"messages=[{{'role': 'user', 'content': {prompt!r}}}])")
                lines.append("out.append(r.choices[0].message.content)")
            else:
                extra = ", stream_options={'include_usage': True}" if usage else ""
                lines.append(f"s = oa.chat.completions.create(model='gpt-4o-mini', stream=True{extra}, "
                             f"messages=[{{'role': 'user', 'content': {prompt!r}}}])")
                lines.append("out.append(''.join(c.choices[0].delta.content or '' for c in s if c.choices))")
        elif op[0] == "anthropic":
            _, how, prompt = op
            msgs = f"[{{'role': 'user', 'content': {prompt!r}}}]"
            if how == "create":
                lines.append(f"m = an.messages.create(model='claude-sonnet-5', max_tokens=64, messages={msgs})")
                lines.append("out.append(m.content[0].text)")
            elif how == "stream_true":
                lines.append(f"ev = an.messages.create(model='claude-sonnet-5', max_tokens=64, stream=True, "
                             f"messages={msgs})")
                lines.append("out.append(''.join(e.delta.text for e in ev if e.type == 'content_block_delta'))")
            else:
                lines.append(f"with an.messages.stream(model='claude-sonnet-5', max_tokens=64, messages={msgs}) as st:")
                lines.append("    out.append(st.get_final_text())")
        else:
            lines.append(f"tool({op[1]}, {', '.join(repr(a) for a in op[2:])})")
    lines.append(AGENT_TAIL)
    return "\n".join(lines)


# --- the stack ------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    tmp: Path
    data: Path
    endpoint: str
    standin: Standin
    guard_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TRACETAPE_", "OTEL_", "OPENAI_", "ANTHROPIC_")) and k != "PYTHONPATH"}
        env.update(OPENAI_BASE_URL=self.standin.openai_base_url, OPENAI_API_KEY="sk-test-safetyOPENAIkey0123456789",
                   ANTHROPIC_BASE_URL=self.standin.anthropic_base_url,
                   ANTHROPIC_API_KEY="sk-ant-test-safetyANTHROPICkey012345", PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(self.guard_dir))
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("safety")
    data = tmp / "data"
    config = {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:0"}}}},
        "exporters": {"tracetape": {"path": str(data)}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
    }
    (tmp / "otel-config.yaml").write_text(yaml.safe_dump(config))
    guard_dir = tmp / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    standin = Standin().start()
    log = open(tmp / "collector.stderr", "wb")  # noqa: SIM115
    collector = subprocess.Popen([sys.executable, "-m", "tracetape.cli", "collector", "--config",
                                  str(tmp / "otel-config.yaml"), "--json"], stdout=subprocess.PIPE, stderr=log)
    try:
        assert collector.stdout is not None
        line = collector.stdout.readline()
        assert line, (tmp / "collector.stderr").read_text()
        endpoint = json.loads(line)["http"][0].removesuffix("/v1/traces")
        yield Stack(tmp=tmp, data=data, endpoint=endpoint, standin=standin, guard_dir=guard_dir)
    finally:
        collector.terminate()
        collector.wait(20)
        log.close()
        standin.stop()
        print(f"\nreplay safety: {TRIED}")


def _wait_run(data: Path, run_id: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (data / "data.mdb").exists():
            store = Store(data, readonly=True)
            try:
                found = store.find_run(run_id)
            finally:
                store.close()
            if found and found[0].status != "running":
                return found[0]
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end")


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _inet(events: list[dict[str, Any]]) -> list[tuple[int, str, int]]:
    """(pid, host, port) of every AF_INET/AF_INET6 connect."""
    return [(e["pid"], e["address"][0], int(e["address"][1])) for e in events
            if e["event"] == "connect" and e["family"] in (2, 10) and isinstance(e["address"], list)]


def _markers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- the property ---------------------------------------------------------------------------------------------

SAFETY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                  phases=[Phase.explicit, Phase.generate],  # one example costs ~10 s: report, don't shrink
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SAFETY
@given(program=programs)
def test_exact_replay_of_any_recorded_run_is_offline_and_runs_no_tool_body(stack: Stack, program: list[Any]) -> None:
    n = TRIED["examples"] = TRIED["examples"] + 1
    source = agent_source(program)
    note(source)
    work = stack.tmp / f"ex{n}"
    markers = work / "markers"
    markers.mkdir(parents=True)
    agent = work / "agent.py"
    agent.write_text(source)
    run_id = f"safety-{n}"
    models = [op for op in program if op[0] in ("openai", "anthropic")]
    tools = [op for op in program if op[0] == "tool"]
    TRIED["model_calls"] += len(models)
    TRIED["tool_calls"] += len(tools)
    TRIED["tool_raises"] += sum(TOOLS[op[1]][1] for op in tools)
    TRIED["mutating"] += sum(TOOLS[op[1]][0] for op in tools)
    TRIED["streamed"] += sum(1 for op in models if (op[0] == "openai" and op[2]) or (op[0] == "anthropic" and op[1] != "create"))

    # record
    before = stack.standin.count
    rec_log = work / "record.guard.jsonl"
    recorded = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "run", "--run-id", run_id, "--endpoint", stack.endpoint, "--",
         sys.executable, str(agent)],
        env=stack.env(SAFETY_MARKERS=str(markers), AGENT_OUT=str(work / "recorded.json"),
                      SAFETY_GUARD_LOG=str(rec_log)),
        capture_output=True, text=True, timeout=120)
    assert recorded.returncode == 0, recorded.stderr
    original = _wait_run(stack.data, run_id)
    assert original.replayable, original
    assert stack.standin.count - before == len(models)
    rec_connects = _inet(_events(rec_log))
    TRIED["connects_recorded"] += len(rec_connects)
    if models:  # the guard sees upstream traffic when there is some
        assert any(port == stack.standin.port for _, _, port in rec_connects), rec_connects
    ran = _markers(markers)
    assert len(ran) == len(tools), ran  # every tool body ran once while recording
    for name in ran:
        (markers / name).unlink()

    # replay, exactly, as a user does
    before = stack.standin.count
    rep_log = work / "replay.guard.jsonl"
    replay = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "replay", run_id, "--data", str(stack.data), "--json", "--",
         sys.executable, str(agent)],
        env=stack.env(SAFETY_MARKERS=str(markers), AGENT_OUT=str(work / "replayed.json"),
                      SAFETY_GUARD_LOG=str(rep_log), TRACETAPE_ENDPOINT=stack.endpoint),
        capture_output=True, text=True, timeout=180)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    report = json.loads(replay.stdout)["report"]
    counts = report["counts"]
    assert counts["misses"] == 0 and counts["live"] == 0 and counts.get("exhausted", 0) == 0, counts

    # zero tool bodies
    assert _markers(markers) == [], "tool bodies ran during the exact replay"
    # zero upstream connections: socket level, every process of the replay
    events = _events(rep_log)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) >= 3, starts  # tracetape replay, the tracetape run wrapper, the agent
    replay_urls = {e["replay_url"] for e in starts if e["replay_url"]}
    assert len(replay_urls) == 1, starts
    replayer = urlsplit(replay_urls.pop())
    collector = urlsplit(stack.endpoint)
    allowed = {(replayer.hostname, replayer.port), (collector.hostname, collector.port)}
    connects = _inet(events)
    TRIED["connects_replayed"] += len(connects)
    assert connects, "the guard saw no connection at all"
    stray = [c for c in connects if (c[1], c[2]) not in allowed]
    assert not stray, f"connections other than the replayer {replayer.netloc} and the collector: {stray}"
    lookups = {e["host"] for e in events if e["event"] == "getaddrinfo"}
    assert lookups <= {"'127.0.0.1'", "'localhost'", "b'127.0.0.1'", "b'localhost'"}, lookups
    assert stack.standin.count == before
    if models:
        assert any((c[1], c[2]) == (replayer.hostname, replayer.port) for c in connects)

    # and it is the same run
    assert json.loads((work / "replayed.json").read_text()) == json.loads((work / "recorded.json").read_text())
    assert counts["tape"] == len(models) and counts["tools_answered"] == len(tools), counts


def test_the_guards_see_upstream_connections_and_tool_bodies_in_a_live_replay(stack: Stack) -> None:
    """Control: the same guards on a `--mode live` replay (everything forwarded, tools run) catch both."""
    work = stack.tmp / "control"
    markers = work / "markers"
    markers.mkdir(parents=True)
    agent = work / "agent.py"
    agent.write_text(agent_source([("openai", "sync", False, False, "control"), ("tool", "lookup", "k", 2)]))
    recorded = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "run", "--run-id", "safety-control", "--endpoint", stack.endpoint,
         "--", sys.executable, str(agent)],
        env=stack.env(SAFETY_MARKERS=str(markers), AGENT_OUT=str(work / "recorded.json")),
        capture_output=True, text=True, timeout=120)
    assert recorded.returncode == 0, recorded.stderr
    _wait_run(stack.data, "safety-control")
    for name in _markers(markers):
        (markers / name).unlink()
    log = work / "live.guard.jsonl"
    live = subprocess.run(
        [sys.executable, "-m", "tracetape.cli", "replay", "safety-control", "--data", str(stack.data), "--json",
         "--mode", "live", "--upstream", f"openai={stack.standin.openai_base_url}",
         "--upstream", f"anthropic={stack.standin.anthropic_base_url}", "--", sys.executable, str(agent)],
        env=stack.env(SAFETY_MARKERS=str(markers), AGENT_OUT=str(work / "live.json"), SAFETY_GUARD_LOG=str(log),
                      TRACETAPE_ENDPOINT=stack.endpoint),
        capture_output=True, text=True, timeout=180)
    assert live.returncode == 0, live.stdout + live.stderr
    connects = _inet(_events(log))
    assert any(port == stack.standin.port for _, _, port in connects), connects  # the replayer went upstream
    assert [m.split("-")[0] for m in _markers(markers)] == ["lookup"]  # the tool body ran
