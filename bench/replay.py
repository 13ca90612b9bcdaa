"""The replayer (issue items 1, 2 and the replayer half of 6): exact-mode throughput and latency against the
physical limit and the peers, lookup cost as the store grows, and the replayer's peak RSS.

Tape. One process records, through the real openai SDK with tracetape's instrumentation (`tests/replay_support.
recording`: httpx2 transport hook, OTel SDK, OTLP encoding, `ingest.prepare` + `Store.apply`), against the
stand-in provider: run `bench-plain`, K distinct non-streaming calls (≈5 KB JSON request, 1,934 B response);
run `bench-sse`, K distinct streaming calls (50 SSE chunks on the wire, ≈14 KB); run `bench-lookup`, 20 distinct
non-streaming calls. The exact request bytes the SDK sent (the stand-in keeps them) are what every load
generator sends, to every server.

1. Throughput / latency. Servers, each its own process on 127.0.0.1, the load generator is wrk (1 thread, so
   one core for wrk and one for the server) with a Lua script cycling through the K recorded bodies:
   - bare: `bench.replay_peers bare`, an aiohttp handler that reads the body and answers the recorded bytes
     (one write, or the 50 recorded SSE chunks one write each): the physical limit;
   - tracetape: `tracetape replayer --no-record` on the recorded store, one exact-mode session per case with
     `on_exhausted: "repeat_last"` (the K distinct bodies cycle, so after the first pass every request matches
     its envelope's last occurrence: same lookup path, no error responses); at max load also with
     `--payload-cache-mib 0` (every response read from LMDB and decompressed, as on a first pass: the cycling
     load otherwise finds each response in the replayer's payload cache after its first use);
   - mitmproxy 11.0.2: `mitmdump --mode reverse:... --server-replay FLOWS` with `server_replay_reuse` (the same
     repeat policy) and `server_replay_extra=kill` (a miss fails, never forwarded); FLOWS recorded with
     `mitmdump -w` in front of the stand-in.
   Max load: 16 connections, closed loop. Moderate load: 50 % of the bare server's max rate for that case,
   offered by wrk connections that each wait 10 ms (`delay()`) before every request (connections calibrated on
   the bare server); every server gets the same connections. Also 50 % of tracetape's own max (bare and
   tracetape only): its latency when it is not saturated. Measurements interleave the servers, in rounds;
   medians over rounds. Each run also reads the server's CPU time (utime + stime) per request, which drifts
   less than req/s on a shared machine. VCR.py 8.2.1 has no server: its row is a single-client in-process loop
   (httpx, body matched, repeats allowed) over the same K recordings, reported beside, not in the ratio.
2. Lookup scaling. Stores of 1k, 10k, 100k (and 1M in full mode) recorded steps: a copy of the `bench-lookup`
   seed plus synthetic filler runs (100 steps each, unique ≈4 KB request and ≈1.6 KB response payloads, the
   seed's stored span) written straight through `Store.apply` in 5,000-span transactions. One replayer per
   store, all running; single-client wrk (1 connection) replaying the 20-step run, interleaved across stores.
   Session creation (`POST /v1/replay/sessions`) timed as the documented API takes it (`run_id` only) and with
   `tenant` + `scope`. Peers at 1k and 10k recordings: mitmproxy (flows files) with single-client wrk; VCR.py
   in-process; the 20 replayed recordings are spread evenly through the fillers.
3. Memory: VmHWM of the replayer (and of the other servers) after the load.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import DEPS, ROOT, Ctx, median, proc_status_kib, row, vm_hwm_kib

NAME = "replay"
MITMDUMP = DEPS / "mitm-venv" / "bin" / "mitmdump"
MITM_PY = DEPS / "mitm-venv" / "bin" / "python"
VCR_DIR = DEPS / "vcr"
CHAT_PATH = "/v1/chat/completions"
LOOKUP_STEPS = 20
MAX_CONNS = 16
DELAY_MS = 10
TARGET_RATIO = 0.7
TARGET_P99_MS = 2.0
TARGET_FLAT = 1.5
TENANT = SCOPE = "default"
UNCACHED = "tracetape, no payload cache"
"""The replayer with `--payload-cache-mib 0`: every response read from the store and decompressed, as on a
first pass through a tape (the cycling load otherwise serves each response from the cache after its first use)."""

LUA = r"""
local reqs = {}
local i = 0
local d = 0
init = function(args)
  for line in io.lines(args[1]) do
    reqs[#reqs + 1] = wrk.format("POST", args[2], {["Content-Type"] = "application/json"}, line)
  end
  d = tonumber(args[3]) or 0
  if d > 0 then
    delay = function() return d end
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
done = function(s, latency, requests)
  local e = s.errors
  io.write(string.format('JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%f}\n', s.requests, s.duration, s.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass
class Params:
    tape: int  # K: distinct recorded requests per throughput case
    seconds: int  # per wrk measurement
    rounds: int
    moderate_rounds: int
    sizes: tuple[int, ...]
    lookup_seconds: int
    lookup_rounds: int
    peer_rounds: int
    peer_sizes: tuple[int, ...] = (1000, 10_000)
    vcr_min: dict[int, int] = field(default_factory=dict)


def params(quick: bool) -> Params:
    if quick:
        return Params(tape=200, seconds=2, rounds=2, moderate_rounds=1, sizes=(1000, 10_000, 100_000),
                      lookup_seconds=2, lookup_rounds=2, peer_rounds=1, vcr_min={1000: 20, 10_000: 5})
    return Params(tape=1000, seconds=10, rounds=3, moderate_rounds=2, sizes=(1000, 10_000, 100_000, 1_000_000),
                  lookup_seconds=5, lookup_rounds=3, peer_rounds=3, vcr_min={1000: 50, 10_000: 15})


# --------------------------------------------------------------------------------------------------
# processes


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess; `stop()` returns its VmHWM (KiB) read just before it ends, and keeps its anonymous and
    file-backed resident MiB of that moment in `rss_at_stop`, as row fields (file-backed: code, libraries and, in
    a replayer, LMDB's mapped pages, which VmHWM counts too)."""

    def __init__(self, name: str, cmd: list[str], log: Path, *, env: dict[str, str] | None = None,
                 port: int | None = None, first_line: bool = False) -> None:
        self.name = name
        t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True, start_new_session=True)
        self.line = ""
        if first_line:
            assert self.proc.stdout is not None
            self.line = self.proc.stdout.readline()
            if not self.line:
                raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
        if port is not None:
            _wait_port(port, self.proc)
        self.start_s = time.perf_counter() - t
        self.port = port
        self.rss_start_kib = self.rss_kib()
        self.rss_at_stop: dict[str, float] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int | None:
        return proc_status_kib(self.pid, "VmRSS")

    def stop(self) -> int | None:
        hwm = vm_hwm_kib(self.pid)
        self.rss_at_stop = {f"{field.lower()}_mib_at_end": (proc_status_kib(self.pid, field) or 0) / 1024
                            for field in ("RssAnon", "RssFile")}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return hwm


def start_replayer(data: Path, log: Path, collector: str | None = None, extra: tuple[str, ...] = ()) -> Proc:
    cmd = [sys.executable, "-m", "tracetape.cli", "replayer", "--data", str(data), "--port", "0", *extra]
    cmd += ["--collector", collector] if collector else ["--no-record"]
    p = Proc("tracetape", cmd, log, first_line=True)
    p.port = int(p.line.split("http://127.0.0.1:", 1)[1].split()[0])
    return p


def start_standin(log: Path) -> Proc:
    p = Proc("standin", [sys.executable, "-m", "tests.support.standin", "--port", "0"], log, first_line=True)
    p.port = int(p.line.split()[-1])
    return p


def start_mitm_replay(flows: Path, upstream_port: int, log: Path) -> Proc:
    port = _free_port()
    return Proc("mitmproxy", [str(MITMDUMP), "-q", "--listen-host", "127.0.0.1", "-p", str(port),
                              "--mode", f"reverse:http://127.0.0.1:{upstream_port}", "--server-replay", str(flows),
                              "--set", "server_replay_reuse=true", "--set", "server_replay_extra=kill"],
                log, port=port)


def api(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def open_session(port: int, run_id: str, **extra: Any) -> str:
    status, body = api(f"http://127.0.0.1:{port}/v1/replay/sessions", "POST",
                       {"run_id": run_id, "mode": "exact", "on_exhausted": "repeat_last", "record": False, **extra})
    if status != 201:
        raise RuntimeError(f"session for {run_id}: {status} {body}")
    return body["session_id"]


# --------------------------------------------------------------------------------------------------
# the load generator


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def wrk(ctx: Ctx, port: int, path: str, bodies: Path, *, conns: int, seconds: int, delay_ms: int = 0,
        pid: int | None = None) -> dict[str, Any]:
    """One wrk run (1 thread); with `pid`, also the server's CPU time per request (`cpu_us`)."""
    lua = ctx.workdir / "replay-bench.lua"
    if not lua.exists():
        lua.write_text(LUA)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s", str(lua),
           f"http://127.0.0.1:{port}", "--", str(bodies), path, str(delay_ms)]
    before = cpu_ticks(pid) if pid else 0
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    after = cpu_ticks(pid) if pid else 0
    lines = [x for x in proc.stdout.splitlines() if x.startswith("JSON ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    d = json.loads(lines[-1][5:])
    d["rps"] = d["requests"] / (d["duration_us"] / 1e6)
    d["errors"] = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    d["p50_ms"], d["p99_ms"] = d["p50_us"] / 1000, d["p99_us"] / 1000
    d["bytes_per_response"] = d["bytes"] / max(d["requests"], 1)
    d["cpu_us"] = (after - before) * _TICK_US / max(d["requests"], 1) if pid else None
    return d


# --------------------------------------------------------------------------------------------------
# the tape


@dataclass
class Tape:
    seed: Path  # store with bench-plain and bench-sse
    lookup_seed: Path  # store with bench-lookup only
    bodies: dict[str, list[bytes]]  # case -> the exact request bytes the SDK sent
    plain_response: bytes
    sse_chunks: list[bytes]
    record_s: float


def _message(case: str, i: int, text: str) -> str:
    directive = {"plain": "[[chunks=105]]", "sse": "[[chunks=47]]", "lookup": "[[chunks=105]]"}[case]
    off = (i * 7919) % (len(text) - 5000)
    return f"{case} #{i} {directive} " + text[off:off + 4780]


def record_tape(work: Path, k: int) -> Tape:
    import openai

    from bench.spans import corpus
    from tests.replay_support import API_KEY, recording
    from tests.support.standin import Standin
    from tracetape.collector.store import Store

    text = corpus(600_000, seed=3)
    seed, lookup_seed = work / "seed", work / "seed-lookup"
    bodies: dict[str, list[bytes]] = {}
    t = time.perf_counter()
    with Standin() as standin:
        oc = openai.OpenAI(base_url=standin.openai_base_url, api_key=API_KEY, max_retries=0)
        for path, cases in ((seed, ("plain", "sse")), (lookup_seed, ("lookup",))):
            store = Store(path, map_size=1 << 30)
            try:
                for case in cases:
                    n = LOOKUP_STEPS if case == "lookup" else k
                    first = len(standin.exchanges)
                    with recording(store, f"bench-{case}"):
                        for i in range(n):
                            messages = [{"role": "user", "content": _message(case, i, text)}]
                            if case == "sse":
                                for _ in oc.chat.completions.create(model="gpt-bench", messages=messages, stream=True):
                                    pass
                            else:
                                oc.chat.completions.create(model="gpt-bench", messages=messages)
                    exchanges = standin.wait(first + n)[first:first + n]
                    bodies[case] = [ex.body for ex in exchanges]
                    if case == "plain":
                        plain_response = exchanges[0].response_body
                    if case == "sse":
                        sse_chunks = list(exchanges[0].response_chunks)
            finally:
                store.close()
    return Tape(seed, lookup_seed, bodies, plain_response, sse_chunks, time.perf_counter() - t)


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    for b in bodies:
        if b"\n" in b:
            raise ValueError("a request body holds a newline: wrk's script reads one body per line")
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path


def write_bodies_jsonl(path: Path, bodies: list[bytes]) -> Path:
    path.write_text("".join(json.dumps({"path": CHAT_PATH, "body": base64.b64encode(b).decode()}) + "\n"
                            for b in bodies))
    return path


def record_mitm(flows: Path, standin_port: int, bodies: list[bytes]) -> Path:
    """A mitmproxy flows file of `bodies` POSTed through `mitmdump -w` in front of the stand-in."""
    import http.client

    work = flows.parent
    port = _free_port()
    p = Proc("mitmdump-record", [str(MITMDUMP), "-q", "--listen-host", "127.0.0.1", "-p", str(port), "--mode",
                                 f"reverse:http://127.0.0.1:{standin_port}", "-w", str(flows)],
             work / "mitm-record.log", port=port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for b in bodies:
            conn.request("POST", CHAT_PATH, body=b, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"recording through mitmdump got {resp.status}")
        conn.close()
    finally:
        p.stop()
    return flows


# --------------------------------------------------------------------------------------------------
# 1. throughput and latency


def throughput(ctx: Ctx, prm: Params, tape: Tape, work: Path, standin_port: int,
               mitm_flows: Path | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    files = {case: write_bodies(work / f"bodies-{case}.txt", tape.bodies[case]) for case in ("plain", "sse")}
    (work / "plain.bin").write_bytes(tape.plain_response)
    (work / "sse.json").write_text(json.dumps([base64.b64encode(c).decode() for c in tape.sse_chunks]))
    servers: dict[str, Proc] = {}
    paths: dict[tuple[str, str], str] = {}
    info: dict[str, Any] = {}
    try:
        bare_port = _free_port()
        servers["bare aiohttp"] = Proc("bare", [sys.executable, "-m", "bench.replay_peers", "bare", "--port",
                                               str(bare_port), "--plain", str(work / "plain.bin"), "--sse",
                                               str(work / "sse.json")], work / "bare.log", port=bare_port)
        servers["tracetape"] = start_replayer(tape.seed, work / "replayer.log")
        servers[UNCACHED] = start_replayer(tape.seed, work / "replayer-uncached.log", extra=("--payload-cache-mib", "0"))
        for case in ("plain", "sse"):
            paths[("bare aiohttp", case)] = f"/{case}/chat/completions"
            for name in ("tracetape", UNCACHED):
                sid = open_session(servers[name].port, f"bench-{case}")  # type: ignore[arg-type]
                paths[(name, case)] = f"/s/{sid}/openai/chat/completions"
        if mitm_flows is not None:
            servers["mitmproxy"] = start_mitm_replay(mitm_flows, standin_port, work / "mitm-replay.log")
            for case in ("plain", "sse"):
                paths[("mitmproxy", case)] = CHAT_PATH
        names = list(servers)
        paced = [n for n in names if n != UNCACHED]  # the uncached replayer: max load only
        for name in names:  # warm-up (and check every request matches)
            for case in ("plain", "sse"):
                w = wrk(ctx, servers[name].port, paths[(name, case)], files[case], conns=4, seconds=1)  # type: ignore[arg-type]
                if w["errors"]:
                    ctx.note(f"replay warm-up {name} {case}: {w['errors']} errors of {w['requests']}")
        results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}

        def measure(load: str, case: str, conns: int, delay: int, rounds: int, who: list[str]) -> None:
            for r in range(rounds):
                order = who[r % len(who):] + who[:r % len(who)]
                for name in order:
                    w = wrk(ctx, servers[name].port, paths[(name, case)], files[case],  # type: ignore[arg-type]
                            conns=conns, seconds=prm.seconds, delay_ms=delay, pid=servers[name].pid)
                    results.setdefault((load, case, name), []).append(w)
                    print(f"[replay] {load:9s} {case:5s} {name:13s} {w['rps']:8,.0f} req/s  p50 {w['p50_ms']:6.2f} ms"
                          f"  p99 {w['p99_ms']:6.2f} ms  cpu {w['cpu_us']:6.1f} us/req  errors {w['errors']}",
                          flush=True)

        def paced_conns(name: str, case: str, target: float) -> int:
            """Connections (each waiting DELAY_MS before every request) that offer `target` req/s to `name`."""
            conns = max(1, round(target * DELAY_MS / 1000))
            cal = wrk(ctx, servers[name].port, paths[(name, case)], files[case], conns=conns, seconds=2,  # type: ignore[arg-type]
                      delay_ms=DELAY_MS)
            return max(1, round(conns * target / max(cal["rps"], 1)))

        def med(load: str, case: str, name: str, key: str) -> float:
            return median([w[key] for w in results[(load, case, name)]])

        levels: dict[tuple[str, str], tuple[int, float]] = {}
        for case in ("plain", "sse"):
            measure("max", case, MAX_CONNS, 0, prm.rounds, names)
            # moderate: 50 % of the bare server's max (the definition), every server
            target = med("max", case, "bare aiohttp", "rps") / 2
            levels[("moderate", case)] = (paced_conns("bare aiohttp", case, target), target)
            measure("moderate", case, levels[("moderate", case)][0], DELAY_MS, prm.moderate_rounds, paced)
            # and 50 % of tracetape's own max (how it behaves when not saturated), bare alongside as the floor
            target = med("max", case, "tracetape", "rps") / 2
            levels[("half-own", case)] = (paced_conns("bare aiohttp", case, target), target)
            measure("half-own", case, levels[("half-own", case)][0], DELAY_MS, prm.moderate_rounds,
                    ["bare aiohttp", "tracetape"])

        for case in ("plain", "sse"):
            bare_rps = med("max", case, "bare aiohttp", "rps")
            bare_cpu = med("max", case, "bare aiohttp", "cpu_us")
            for name in names:
                ws = results[("max", case, name)]
                rps = med("max", case, name, "rps")
                ratio = rps / bare_rps
                is_tt = name == "tracetape"
                errors = sum(w["errors"] for w in ws)
                rows.append(row(NAME, f"{case} max load, {name}", "throughput", rps, "req/s", ratio=ratio,
                                ratio_of="bare aiohttp", target=">= 0.7x bare" if is_tt else "",
                                met=(ratio >= TARGET_RATIO) if is_tt else None, conns=MAX_CONNS, errors=errors,
                                p50_ms=med("max", case, name, "p50_ms"), p99_ms=med("max", case, name, "p99_ms"),
                                rounds=[w["rps"] for w in ws],
                                bytes_per_response=med("max", case, name, "bytes_per_response")))
                rows.append(row(NAME, f"{case} max load, {name}", "p50 / p99 latency", med("max", case, name, "p50_ms"),
                                "ms", p99_ms=med("max", case, name, "p99_ms")))
                cpu = med("max", case, name, "cpu_us")
                rows.append(row(NAME, f"{case} max load, {name}", "server CPU per request", cpu, "us",
                                ratio=cpu / bare_cpu, ratio_of="bare aiohttp"))
                if errors:
                    ctx.note(f"replay {case} max {name}: {errors} errors (non-2xx, read, timeout)")
            for level, who in (("moderate", paced), ("half-own", ["bare aiohttp", "tracetape"])):
                conns, target = levels[(level, case)]
                label = ("moderate = 50% of bare max" if level == "moderate" else "50% of tracetape max")
                bare_p99 = med(level, case, "bare aiohttp", "p99_ms")
                for name in who:
                    ws = results[(level, case, name)]
                    p99 = med(level, case, name, "p99_ms")
                    is_tt = name == "tracetape" and level == "moderate"
                    rows.append(row(NAME, f"{case} {label} ({target:,.0f} req/s offered), {name}", "p99 latency",
                                    p99, "ms", ratio=p99 / bare_p99, ratio_of="bare aiohttp p99",
                                    target="<= 2 ms" if is_tt else "", met=(p99 <= TARGET_P99_MS) if is_tt else None,
                                    p50_ms=med(level, case, name, "p50_ms"), achieved_rps=med(level, case, name, "rps"),
                                    conns=conns, delay_ms=DELAY_MS, errors=sum(w["errors"] for w in ws)))
            info[case] = {"bare": {"rps": bare_rps}, "levels": {k[0]: v for k, v in levels.items() if k[1] == case}}
    finally:
        for name, proc in servers.items():
            hwm = proc.stop()
            info.setdefault("hwm", {})[name] = hwm
            info.setdefault("rss_start", {})[name] = proc.rss_start_kib
            info.setdefault("rss_at_stop", {})[name] = proc.rss_at_stop
    for name, hwm in info["hwm"].items():
        start = info["rss_start"][name]
        at_stop = info["rss_at_stop"][name]
        ctx.note(f"{name} at the end of the replay load: anonymous {at_stop['rssanon_mib_at_end']:.1f} MiB, "
                 f"file-backed {at_stop['rssfile_mib_at_end']:.1f} MiB "
                 "(code and libraries; a replayer's mapped LMDB pages)")
        rows.append(row("memory", f"{name} after the replay load", "peak RSS (VmHWM)", (hwm or 0) / 1024, "MiB",
                        ratio=(hwm or 0) / (start or 1), ratio_of="RSS when ready", ready_mib=(start or 0) / 1024,
                        **at_stop))
    return rows, info


def vcr_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(VCR_DIR), str(ROOT)])
    return env


def vcr_replay(ctx: Ctx, cassette: Path, bodies: Path, url: str, seconds: float, minimum: int,
               stream: bool = False) -> dict[str, Any]:
    from bench.common import run_json_subprocess

    args = ["vcr-replay", "--cassette", str(cassette), "--bodies", str(bodies), "--url", url,
            "--seconds", str(seconds), "--min", str(minimum)] + (["--stream"] if stream else [])
    return run_json_subprocess("bench.replay_peers", args, env=vcr_env(), timeout=1800)


# --------------------------------------------------------------------------------------------------
# 2. lookup scaling


def _filler_template(seed: Path) -> tuple[Any, Any, bytes]:
    from tracetape.collector.store import Store

    store = Store(seed, readonly=True)
    try:
        steps = store.steps(TENANT, SCOPE, "bench-lookup")
        spans = store.spans(TENANT, SCOPE, "bench-lookup")
    finally:
        store.close()
    return steps[0], steps[0].attempts[0], max(spans, key=len)


def add_filler(path: Path, n_steps: int, template: tuple[Any, Any, bytes], *, per_run: int = 100,
               batch_spans: int = 5000) -> float:
    """Append `n_steps` synthetic recorded steps (runs of `per_run`) to the store at `path`; seconds taken."""
    import hashlib

    import msgspec

    from bench.spans import corpus
    from tracetape.collector import keys
    from tracetape.collector.records import PayloadRef
    from tracetape.collector.store import Batch, RunEvent, SpanWrite, StepWrite, Store, compress_blob
    from tracetape.instrumentation import contract as c

    tmpl_step, tmpl_attempt, tmpl_span = template
    text = corpus(1_200_000, seed=n_steps).encode()
    rng = random.Random(n_steps)
    t = time.perf_counter()
    store = Store(path, map_size=1 << 30, sync=False)
    try:
        batch = Batch()
        runs = math.ceil(n_steps / per_run)
        k = 0
        for j in range(runs):
            run_id = f"filler-{n_steps}-{j:07d}"
            trace = rng.randbytes(16)
            base_ns = 1_700_000_000_000_000_000 + j * 1_000_000_000
            in_run = min(per_run, n_steps - k)
            for i in range(in_run):
                k += 1
                off = rng.randrange(0, 1_100_000)
                req = (b'{"messages":[{"content":"F' + str(k).encode() + b" " + text[off:off + 4000] +
                       b'","role":"user"}],"model":"gpt-bench"}')
                off = rng.randrange(0, 1_100_000)
                resp = (b'{"id":"chatcmpl-f' + str(k).encode() + b'","object":"chat.completion","choices":[{"index":0,'
                        b'"message":{"role":"assistant","content":"' + text[off:off + 1500] + b'"},"finish_reason":'
                        b'"stop"}],"usage":{"prompt_tokens":1000,"completion_tokens":300}}')
                blobs = []
                refs = []
                for raw in (req, resp):
                    digest = hashlib.sha256(raw).digest()
                    blobs.append((keys.blob_key(TENANT, SCOPE, digest), compress_blob(raw)))
                    refs.append(PayloadRef(digest, len(raw)))
                started = base_ns + i * 10_000_000
                span_id = rng.randbytes(8)
                env = hashlib.sha256(req).hexdigest()
                attempt = msgspec.structs.replace(
                    tmpl_attempt, trace_id=trace, span_id=span_id, started_ns=started, ended_ns=started + 5_000_000,
                    envelope_hash=env, request_body=refs[0], response_body=refs[1], response_id=f"chatcmpl-f{k}",
                    bytes_read=len(resp))
                step = msgspec.structs.replace(tmpl_step, step_id=f"{k:016x}", started_ns=started,
                                               envelope_hash=env, attempts=[])
                event = None
                if i == 0:
                    event = RunEvent("start", started_ns=base_ns, trace_id=trace, service_name="bench-agent",
                                     agent_name="agent", command=["python", "agent.py"], canon_profile=c.CANON_PROFILE)
                elif i == in_run - 1:
                    event = RunEvent("end", ended_ns=started + 5_000_000, outcome=c.OUTCOME_COMPLETED, exit_code=0)
                batch.spans.append(SpanWrite(
                    tenant=TENANT, scope=SCOPE, run_id=run_id,
                    span_key=keys.span_key(TENANT, SCOPE, run_id, trace, span_id), stored_span=tmpl_span,
                    blobs=blobs, step=StepWrite(TENANT, SCOPE, run_id, step, attempt), run_event=event,
                    forward=False))
                if len(batch.spans) >= batch_spans:
                    store.apply([batch])
                    batch = Batch()
        if batch.spans:
            store.apply([batch])
        store.env.sync(True)
    finally:
        store.close()
    return time.perf_counter() - t


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.mdb"))


def lookup_scaling(ctx: Ctx, prm: Params, tape: Tape, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    template = _filler_template(tape.lookup_seed)
    bodies = write_bodies(work / "bodies-lookup.txt", tape.bodies["lookup"])
    stores: dict[int, Path] = {}
    for size in prm.sizes:
        path = work / f"lookup-{size}"
        path.mkdir()
        shutil.copy(tape.lookup_seed / "data.mdb", path / "data.mdb")
        secs = add_filler(path, size - LOOKUP_STEPS, template)
        stores[size] = path
        mb = store_bytes(path) / 1e6
        info[size] = {"build_s": secs, "store_mb": mb}
        rows.append(row(NAME, f"lookup store {size:,} steps", "build time", secs, "s", store_mb=mb,
                        steps_per_s=(size - LOOKUP_STEPS) / secs))
        print(f"[replay] built a {size:,}-step store in {secs:.1f}s ({mb:,.0f} MB)", flush=True)
    procs: dict[int, Proc] = {}
    try:
        for size, path in stores.items():
            procs[size] = start_replayer(path, work / f"replayer-lookup-{size}.log")
        created: dict[int, dict[str, list[float]]] = {}
        sids: dict[int, str] = {}
        for rep_round in range(5):
            for size, p in procs.items():
                for how, extra in (("run_id only", {}), ("with tenant+scope", {"tenant": TENANT, "scope": SCOPE})):
                    t = time.perf_counter()
                    sid = open_session(p.port, "bench-lookup", **extra)  # type: ignore[arg-type]
                    created.setdefault(size, {}).setdefault(how, []).append(time.perf_counter() - t)
                    if size in sids:
                        api(f"http://127.0.0.1:{p.port}/v1/replay/sessions/{sid}", "DELETE")
                    else:
                        sids[size] = sid
        lat: dict[int, list[dict[str, Any]]] = {}
        for size, p in procs.items():  # warm-up
            wrk(ctx, p.port, f"/s/{sids[size]}/openai/chat/completions", bodies, conns=1, seconds=1)  # type: ignore[arg-type]
        for r in range(prm.lookup_rounds):
            sizes = list(procs) if r % 2 == 0 else list(reversed(procs))
            for size in sizes:
                w = wrk(ctx, procs[size].port, f"/s/{sids[size]}/openai/chat/completions", bodies,  # type: ignore[arg-type]
                        conns=1, seconds=prm.lookup_seconds)
                lat.setdefault(size, []).append(w)
                print(f"[replay] lookup {size:>9,} steps: p50 {w['p50_ms']:.3f} ms  p99 {w['p99_ms']:.3f} ms  "
                      f"{w['rps']:,.0f} req/s  errors {w['errors']}", flush=True)
    finally:
        hwm = {size: p.stop() for size, p in procs.items()}
    smallest = min(prm.sizes)
    base50 = median([w["p50_ms"] for w in lat[smallest]])
    base99 = median([w["p99_ms"] for w in lat[smallest]])
    largest = max(prm.sizes)
    for size in prm.sizes:
        p50 = median([w["p50_ms"] for w in lat[size]])
        p99 = median([w["p99_ms"] for w in lat[size]])
        errors = sum(w["errors"] for w in lat[size])
        target, met = "", None
        if size == largest and size != smallest:
            target, met = "<= 1.5x the 1k store", p50 / base50 <= TARGET_FLAT
        elif size == 100_000:
            target, met = "<= 1.5x the 1k store (issue 3 item 7)", p50 / base50 <= TARGET_FLAT
        rows.append(row(NAME, f"lookup, tracetape, {size:,} steps", "p50 replay latency (1 client)", p50, "ms",
                        ratio=p50 / base50, ratio_of=f"{smallest:,} steps", target=target, met=met, p99_ms=p99,
                        p99_ratio=p99 / base99, errors=errors, rps=median([w["rps"] for w in lat[size]])))
        rows.append(row(NAME, f"lookup, tracetape, {size:,} steps", "p99 replay latency (1 client)", p99, "ms",
                        ratio=p99 / base99, ratio_of=f"{smallest:,} steps"))
        for how, times in created[size].items():
            rows.append(row(NAME, f"lookup, tracetape, {size:,} steps", f"session creation ({how})",
                            median(times) * 1000, "ms",
                            ratio=median(times) / median(created[smallest][how]), ratio_of=f"{smallest:,} steps",
                            all_ms=[x * 1000 for x in times]))
        rows.append(row("memory", f"tracetape replayer, {size:,}-step store after lookups", "peak RSS (VmHWM)",
                        (hwm[size] or 0) / 1024, "MiB", **procs[size].rss_at_stop))
        if errors:
            ctx.note(f"replay lookup {size}: {errors} errors")
    info["created"] = created
    return rows, info


def peer_lookup(ctx: Ctx, prm: Params, tape: Tape, work: Path, standin_port: int, mitm_recorded: Path | None,
                vcr_recorded: Path | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    bodies = work / "bodies-lookup.txt"
    jl = write_bodies_jsonl(work / "bodies-lookup.jsonl", tape.bodies["lookup"])
    from bench.common import run_json_subprocess

    base: dict[str, float] = {}
    for size in prm.peer_sizes:
        if mitm_recorded is not None:
            flows = work / f"flows-{size}.mitm"
            proc = subprocess.run([str(MITM_PY), "-m", "bench.replay_peers", "mitm-synth", "--src", str(mitm_recorded),
                                   "--out", str(flows), "--total", str(size), "--keep", str(LOOKUP_STEPS)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"mitm-synth failed: {proc.stderr[-2000:]}")
            p = start_mitm_replay(flows, standin_port, work / f"mitm-lookup-{size}.log")
            try:
                wrk(ctx, p.port, CHAT_PATH, bodies, conns=1, seconds=1)  # type: ignore[arg-type]
                ws = [wrk(ctx, p.port, CHAT_PATH, bodies, conns=1, seconds=prm.lookup_seconds)  # type: ignore[arg-type]
                      for _ in range(prm.peer_rounds)]
            finally:
                hwm = p.stop()
            p50 = median([w["p50_ms"] for w in ws])
            base.setdefault("mitm", p50)
            errors = sum(w["errors"] for w in ws)
            rows.append(row(NAME, f"lookup, mitmproxy, {size:,} flows", "p50 replay latency (1 client)", p50, "ms",
                            ratio=p50 / base["mitm"], ratio_of=f"{min(prm.peer_sizes):,} flows",
                            p99_ms=median([w["p99_ms"] for w in ws]), errors=errors, load_s=p.start_s,
                            peak_rss_mib=(hwm or 0) / 1024))
            print(f"[replay] lookup mitmproxy {size:,} flows: p50 {p50:.3f} ms (start/load {p.start_s:.1f}s)", flush=True)
            if errors:
                ctx.note(f"replay lookup mitmproxy {size}: {errors} errors")
        if vcr_recorded is not None:
            cassette = work / f"cassette-{size}.yaml"
            run_json_subprocess("bench.replay_peers", ["vcr-synth", "--src", str(vcr_recorded), "--out", str(cassette),
                                                       "--total", str(size), "--keep", str(LOOKUP_STEPS)],
                                env=vcr_env(), timeout=1800)
            v = vcr_replay(ctx, cassette, jl, f"http://127.0.0.1:{standin_port}", prm.lookup_seconds,
                           prm.vcr_min.get(size, 10))
            base.setdefault("vcr", v["p50_ms"])
            rows.append(row(NAME, f"lookup, VCR.py, {size:,} recordings", "p50 replay latency (in-process)",
                            v["p50_ms"], "ms", ratio=v["p50_ms"] / base["vcr"],
                            ratio_of=f"{min(prm.peer_sizes):,} recordings", p99_ms=v["p99_ms"], errors=v["errors"],
                            n=v["n"], cassette_load_s=v["load_s"]))
            print(f"[replay] lookup VCR.py {size:,} recordings: p50 {v['p50_ms']:.2f} ms (load {v['load_s']:.1f}s, "
                  f"{v['n']} requests, {v['errors']} errors)", flush=True)
            if v["errors"]:
                ctx.note(f"replay lookup VCR.py {size}: {v['errors']} errors")
    return rows


# --------------------------------------------------------------------------------------------------


def run(ctx: Ctx) -> list[dict[str, Any]]:
    prm = params(ctx.quick)
    work = ctx.workdir / "replay"
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    have_wrk = shutil.which("wrk") is not None
    if not have_wrk:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    have_mitm, have_vcr = MITMDUMP.exists(), (VCR_DIR / "vcr").is_dir()
    if not have_mitm:
        ctx.note(f"mitmproxy not found at {MITMDUMP}: its rows are skipped (see docs/benchmarks.md)")
    if not have_vcr:
        ctx.note(f"VCR.py not found in {VCR_DIR}: its rows are skipped (see docs/benchmarks.md)")
    t = time.perf_counter()
    tape = record_tape(work, prm.tape)
    print(f"[replay] recorded {prm.tape} plain + {prm.tape} SSE + {LOOKUP_STEPS} lookup calls through the SDK in "
          f"{tape.record_s:.1f}s; body {len(tape.bodies['plain'][0]):,} B, response {len(tape.plain_response):,} B, "
          f"SSE {len(tape.sse_chunks)} chunks / {sum(map(len, tape.sse_chunks)):,} B", flush=True)
    standin = start_standin(work / "standin.log")
    try:
        mitm_flows = mitm_lookup = vcr_cassettes = vcr_lookup = None
        if have_mitm:
            mitm_flows = record_mitm(work / "flows-tape.mitm", standin.port,  # type: ignore[arg-type]
                                     tape.bodies["plain"] + tape.bodies["sse"])
            mitm_lookup = record_mitm(work / "flows-lookup.mitm", standin.port, tape.bodies["lookup"])  # type: ignore[arg-type]
        if have_vcr:
            vcr_cassettes = {}
            for case in ("plain", "sse", "lookup"):
                cassette = work / f"cassette-{case}.yaml"
                jl = write_bodies_jsonl(work / f"bodies-{case}.jsonl", tape.bodies[case])
                from bench.common import run_json_subprocess

                run_json_subprocess("bench.replay_peers", ["vcr-record", "--cassette", str(cassette), "--bodies",
                                                           str(jl), "--url", f"http://127.0.0.1:{standin.port}"],
                                    env=vcr_env(), timeout=600)
                vcr_cassettes[case] = cassette
            vcr_lookup = vcr_cassettes["lookup"]
        print(f"[replay] peers' recordings ready ({time.perf_counter() - t:.0f}s)", flush=True)

        tp_rows, info = throughput(ctx, prm, tape, work, standin.port, mitm_flows)  # type: ignore[arg-type]
        rows += tp_rows
        if vcr_cassettes:
            for case in ("plain", "sse"):
                v = vcr_replay(ctx, vcr_cassettes[case], work / f"bodies-{case}.jsonl",
                               f"http://127.0.0.1:{standin.port}", prm.seconds, 20, stream=case == "sse")
                rps = 1000 / v["mean_ms"]
                rows.append(row(NAME, f"{case}, VCR.py 8.2.1 in-process (httpx, 1 client, {prm.tape} recordings)",
                                "throughput (1 / mean latency)", rps, "req/s",
                                ratio=rps / info[case]["bare"]["rps"], ratio_of="bare aiohttp max (not like for like)",
                                p50_ms=v["p50_ms"], p99_ms=v["p99_ms"], errors=v["errors"], n=v["n"]))
                rows.append(row(NAME, f"{case}, VCR.py 8.2.1 in-process (httpx, 1 client, {prm.tape} recordings)",
                                "p50 / p99 latency", v["p50_ms"], "ms", p99_ms=v["p99_ms"]))
                print(f"[replay] VCR.py {case}: p50 {v['p50_ms']:.2f} ms p99 {v['p99_ms']:.2f} ms ({v['n']} requests, "
                      f"{v['errors']} errors)", flush=True)
        lk_rows, _ = lookup_scaling(ctx, prm, tape, work)
        rows += lk_rows
        rows += peer_lookup(ctx, prm, tape, work, standin.port, mitm_lookup, vcr_lookup)  # type: ignore[arg-type]
    finally:
        standin.stop()
        for p in sorted(work.glob("lookup-*")):
            shutil.rmtree(p, ignore_errors=True)
    return rows
