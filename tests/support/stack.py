"""The whole record path, as a user runs it, for end-to-end tests.

`RecordingStack` starts, all on 127.0.0.1: the stand-in provider server (thread), a real MCP server
(thread), a Jaeger stand-in OTLP sink (thread with its own loop), and the collector as a real subprocess
(`tracetape collector --json`, config written in the OpenTelemetry Collector's shape). `record(...)` runs a
command under `tracetape run` exactly as a user would, and `wait_run(...)` waits until the run has ended
in the store (read-only, beside the running collector).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.jaeger_sink import JaegerSink
from tests.support.mcp_server import serve_mcp
from tests.support.standin import Standin
from tracetape.collector.records import RunRecord
from tracetape.collector.store import Store

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "examples" / "agent.py"
OPENAI_KEY = "sk-test-OPENAIKEY0123456789abcdefghij"
ANTHROPIC_KEY = "sk-ant-test-ANTHROPICKEY0123456789abcd"


class _SinkThread:
    """A JaegerSink served from its own event loop in a daemon thread."""

    def __init__(self, max_attribute_bytes: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.sink = JaegerSink(max_attribute_bytes=max_attribute_bytes)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> JaegerSink:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sink.start(), self.loop).result(10)
        return self.sink

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class RecordingStack:
    tmp: Path
    slim_cap: int = 16384
    standin: Standin = field(init=False)
    sink: JaegerSink = field(init=False)
    mcp_url: str = field(init=False)
    data: Path = field(init=False)
    endpoint: str = field(init=False)
    collector: subprocess.Popen[str] = field(init=False)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment an agent runs in: SDKs pointed at the stand-in, with (fake) keys set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACETAPE_", "OTEL_"))}
        env.update(
            OPENAI_BASE_URL=self.standin.openai_base_url,
            OPENAI_API_KEY=OPENAI_KEY,
            ANTHROPIC_BASE_URL=self.standin.anthropic_base_url,
            ANTHROPIC_API_KEY=ANTHROPIC_KEY,
            MCP_URL=self.mcp_url,
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def record(self, run_id: str, *cmd: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """`tracetape run --run-id RUN -- CMD` (default CMD: the example agent); waits for it to exit."""
        argv = [sys.executable, "-m", "tracetape.cli", "run", "--run-id", run_id, "--endpoint", self.endpoint,
                "--", *(cmd or (sys.executable, str(AGENT)))]
        return subprocess.run(argv, env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def start_record(self, run_id: str, **env: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "tracetape.cli", "run", "--run-id", run_id, "--endpoint", self.endpoint,
                "--", sys.executable, str(AGENT)]
        return subprocess.Popen(argv, env=self.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def store(self) -> Store:
        return Store(self.data, readonly=True)

    def wait_run(self, run_id: str, *, ended: bool = True, steps: int = 0, timeout: float = 30) -> RunRecord:
        """The run once it has ended (or has at least `steps` steps); AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        last: RunRecord | None = None
        while time.monotonic() < deadline:
            if (self.data / "data.mdb").exists():
                store = self.store()
                try:
                    found = store.find_run(run_id)
                finally:
                    store.close()
                if found:
                    last = found[0]
                    if (not ended or last.status != "running") and last.step_count >= steps:
                        return last
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} did not get there in {timeout}s: {last}")


def _collector_config(data: Path, sink_url: str, slim_cap: int) -> dict[str, Any]:
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"},
                                             "http": {"endpoint": "127.0.0.1:0"}}}},
        "processors": {"tracetape_slim": {"max_attribute_bytes": slim_cap}},
        "exporters": {
            "tracetape": {"path": str(data)},
            "otlphttp/jaeger": {"endpoint": sink_url, "retry_on_failure": {"initial_interval": "100ms",
                                                                           "max_interval": "500ms"}},
        },
        "service": {"pipelines": {
            "traces": {"receivers": ["otlp"], "exporters": ["tracetape"]},
            "traces/jaeger": {"receivers": ["otlp"], "processors": ["tracetape_slim"],
                              "exporters": ["otlphttp/jaeger"]},
        }},
    }


def start_collector(config_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`tracetape collector --config FILE --json` as a subprocess; its parsed start-up line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracetape.cli", "collector", "--config", str(config_path), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"collector did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


@contextmanager
def recording_stack(tmp: Path, slim_cap: int = 16384) -> Iterator[RecordingStack]:
    stack = RecordingStack(tmp=tmp, slim_cap=slim_cap)
    with ExitStack() as exits:
        stack.standin = Standin().start()
        exits.callback(stack.standin.stop)
        stack.mcp_url = exits.enter_context(serve_mcp())
        sink_thread = _SinkThread(max_attribute_bytes=64 * 1024)
        stack.sink = sink_thread.start()
        exits.callback(sink_thread.stop)
        stack.data = tmp / "data"
        config_path = tmp / "otel-config.yaml"
        config_path.write_text(yaml.safe_dump(_collector_config(stack.data, stack.sink.http_url, slim_cap)))
        stack.collector, info = start_collector(config_path)
        exits.callback(stop_process, stack.collector)
        stack.endpoint = info["http"][0].removesuffix("/v1/traces")
        yield stack


def stop_process(proc: subprocess.Popen[Any], grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; no-op for an ended process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
