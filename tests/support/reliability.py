"""Helpers for the reliability tests (issue 5): a collector subprocess that can be SIGKILLed, numbered
OTLP batches, a steady sender that retries what was not acknowledged, and a full read of a store.

Everything talks to the collector the way an agent does: OTLP/HTTP protobuf over a real socket.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from tests.support.spans import Agent, chat_request
from tracetape.collector.store import Store

PB = {"Content-Type": "application/x-protobuf"}


# --- the collector as a subprocess ------------------------------------------------------------------------


def write_config(
    tmp: Path,
    data: Path,
    *,
    map_size: str | int | None = None,
    max_pending: str | int | None = None,
    max_body: str | int | None = None,
    forward_url: str | None = None,
    name: str = "otel-config.yaml",
    grpc: bool = False,
) -> Path:
    """An `otel-config.yaml` with OTLP/HTTP (and with `grpc`, OTLP/gRPC) on 127.0.0.1:0 and the store in
    `data`; returns its path."""
    http: dict[str, Any] = {"endpoint": "127.0.0.1:0"}
    if max_body is not None:
        http["max_request_body_size"] = max_body
    store: dict[str, Any] = {"path": str(data)}
    if map_size is not None:
        store["map_size"] = map_size
    if max_pending is not None:
        store["max_pending_bytes"] = max_pending
    doc: dict[str, Any] = {
        "receivers": {"otlp": {"protocols": {"http": http, **({"grpc": {"endpoint": "127.0.0.1:0"}} if grpc else {})}}},
        "exporters": {"tracetape": store},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}},
                    "telemetry": {"logs": {"level": "warn"}}},
    }
    if forward_url is not None:
        doc["processors"] = {"tracetape_slim": {"max_attribute_bytes": 16384}}
        doc["exporters"]["otlphttp/jaeger"] = {
            "endpoint": forward_url,
            "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": 0},
        }
        doc["service"]["pipelines"]["traces/jaeger"] = {
            "receivers": ["otlp"], "processors": ["tracetape_slim"], "exporters": ["otlphttp/jaeger"],
        }
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


class CollectorProcess:
    """`tracetape collector --config FILE --json` as a subprocess that can be killed at any moment."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.grpc_endpoint: str | None = None
        self.stderr_path = config_path.with_suffix(".stderr.log")

    def spawn(self) -> None:
        """Start the process without waiting for it to listen."""
        self.url = None
        self._stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in wait_dead
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracetape.cli", "collector", "--config", str(self.config_path), "--json"],
            stdout=subprocess.PIPE, stderr=self._stderr,
        )

    def wait_ready(self, timeout: float = 30.0) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        box: list[bytes] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"collector did not start: {self.stderr_path.read_text()[-2000:]}")
        info = json.loads(box[0])
        self.url = info["http"][0]
        self.grpc_endpoint = info["grpc"][0] if info.get("grpc") else None
        return self.url

    def start(self) -> str:
        self.spawn()
        return self.wait_ready()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.wait_dead()

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM (a clean stop); its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        code = self.proc.wait()
        self.wait_dead()
        return code

    def wait_dead(self) -> None:
        if self.proc is not None:
            self.proc.wait(30)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()
        self.url = None

    def rss_kb(self) -> int:
        """VmRSS of the collector and of its ingest worker processes together, in KiB."""
        return sum(rss_kb(p) for p in [self.pid, *descendants(self.pid)])


def descendants(pid: int) -> list[int]:
    """The live child processes of `pid`, and theirs (children started by any of a process's threads)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids: list[int] = []
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        except OSError:  # gone meanwhile
            pass
        found += kids
        todo += kids
    return found


def survivors(pids: list[int], within_s: float = 20.0) -> dict[int, str]:
    """Those of `pids` still running (not zombies) after up to `within_s`, with their command lines."""
    deadline = time.monotonic() + within_s
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {p: _cmdline(p) for p in pids if _running(p)}


def _running(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def stat_fields(pid: int) -> list[str] | None:
    """The fields of `/proc/PID/stat` after the command name (state first, utime and stime at 11 and 12);
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One POST with http.client (no retries, no pooling)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body=body, headers=headers or PB)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --- numbered batches ---------------------------------------------------------------------------------------


def numbered_batch(n: int, steps: int = 3) -> tuple[bytes, set[bytes]]:
    """Batch `n`: run `rel-n` with `steps` model steps and its run span, made by the real SDK.

    Returns the serialized request (resent byte for byte, as an exporter does) and its span ids.
    """
    agent = Agent(run_id=f"rel-{n}")
    for i in range(1, steps + 1):
        agent.model_step(i, body=chat_request(f"batch {n} question {i}"))
    agent.run_span()
    request = agent.request()
    agent.shutdown()
    ids = {span.span_id for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans}
    return request.SerializeToString(), ids


# --- reading a store completely -----------------------------------------------------------------------------


@dataclass
class StoreContents:
    span_ids: Counter[bytes] = field(default_factory=Counter)  # span id -> how many stored spans carry it
    runs: dict[str, Any] = field(default_factory=dict)
    entries: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def batches(self) -> set[int]:
        return {int(r.removeprefix("rel-")) for r in self.runs if r.startswith("rel-")}


def read_everything(path: Path, *, readonly: bool = False, steps_per_run: int | None = None) -> StoreContents:
    """Open the store (`Store(path)`), read every table and check what one store must hold together.

    AssertionError on any inconsistency: a run whose counters disagree with its spans/steps, an attempt (span)
    stored twice, or another step than one attempt each (the workloads here) unless spans claiming one attempt
    number were kept as a recording error, a payload referenced but missing, a blob that does not decompress.
    """
    store = Store(path, readonly=readonly)
    try:
        out = StoreContents(stats=store.stats())
        for _table, _key, _value in store.dump():  # every entry, every blob decompressed
            out.entries += 1
        for run in store.runs():
            out.runs[run.run_id] = run
            spans = store.spans(run.tenant, run.scope, run.run_id)
            for raw in spans:
                for ss in ResourceSpans.FromString(raw).scope_spans:
                    for span in ss.spans:
                        out.span_ids[span.span_id] += 1
            assert run.span_count == len(spans), f"{run.run_id}: span_count {run.span_count} != {len(spans)} spans"
            steps = store.steps(run.tenant, run.scope, run.run_id)
            assert run.step_count == len(steps), f"{run.run_id}: step_count {run.step_count} != {len(steps)}"
            if steps_per_run is not None:
                assert len(steps) <= steps_per_run, run.run_id
            for step in steps:
                attempts = [a.attempt for a in step.attempts]
                spans_of = [a.span_id for a in step.attempts]
                assert len(spans_of) == len(set(spans_of)), f"{run.run_id}: an attempt stored twice"
                if len(attempts) != 1:  # only spans claiming one attempt number (kept, as a recording error)
                    assert len(set(attempts)) == 1 and run.recording_errors > 0, f"{run.run_id}: attempts {attempts}"
                for a in step.attempts:
                    for ref in a.payload_refs():
                        assert store.blob(run.tenant, run.scope, ref.digest) is not None, f"{run.run_id}: blob missing"
        return out
    finally:
        store.close()


# --- a steady sender that retries what was not acknowledged -------------------------------------------------


class SteadySender:
    """Threads sending numbered batches to whatever `url` is current, as OTLP exporters would.

    A batch counts as acknowledged only on a 200. Anything else (connection refused or reset, timeout,
    503) puts it back to be retried, byte for byte. `stop_new()` stops numbering new batches; `drain()`
    waits until everything sent was acknowledged.
    """

    def __init__(self, threads: int = 3, steps: int = 3, pause: float = 0.0) -> None:
        self.url: str | None = None
        self.steps = steps
        self.pause = pause
        self.lock = threading.Lock()
        self.bodies: dict[int, tuple[bytes, set[bytes]]] = {}
        self.acked: set[int] = set()
        self.retry: list[int] = []
        self.next = 0
        self.new = True
        self.running = True
        self.outcomes: Counter[str] = Counter()
        self.posts = 0
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def start(self) -> SteadySender:
        for t in self._threads:
            t.start()
        return self

    def _take(self) -> int | None:
        with self.lock:
            if self.retry:
                return self.retry.pop(0)
            if not self.new:
                return None
            n = self.next
            self.next += 1
        self.bodies[n] = numbered_batch(n, self.steps)
        return n

    def _loop(self) -> None:
        while self.running:
            url = self.url
            if url is None:
                time.sleep(0.01)
                continue
            n = self._take()
            if n is None:
                time.sleep(0.01)
                continue
            body, _ = self.bodies[n]
            try:
                status, _, _ = post(url, body, timeout=10)
                outcome = str(status)
            except (OSError, http.client.HTTPException) as err:
                status, outcome = 0, type(err).__name__
            with self.lock:
                self.posts += 1
                self.outcomes[outcome] += 1
                if status == 200:
                    self.acked.add(n)
                else:
                    self.retry.append(n)
            if status != 200:
                time.sleep(0.02 + random.random() * 0.03)
            elif self.pause:
                time.sleep(self.pause)

    def acked_snapshot(self) -> set[int]:
        with self.lock:
            return set(self.acked)

    def stop_new(self) -> None:
        with self.lock:
            self.new = False

    def sent(self) -> set[int]:
        with self.lock:
            return set(self.bodies)

    def drain(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.retry and self.acked >= set(self.bodies) and len(self.bodies) == self.next:
                    return
            time.sleep(0.05)
        raise AssertionError(f"not everything was acknowledged in {timeout}s: "
                             f"{len(set(self.bodies) - self.acked)} batches left")

    def stop(self) -> None:
        self.running = False
        for t in self._threads:
            t.join(15)

    def span_ids(self, batches: set[int]) -> set[bytes]:
        return {sid for n in batches for sid in self.bodies[n][1]}
