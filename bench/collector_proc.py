"""A real collector process (`python -m tracetape.cli collector --config FILE --json`) on 127.0.0.1, with its
ingest worker processes (when configured) counted in its memory and CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, process_tree, tree_cpu_seconds, tree_status_kib


class CollectorProcess:
    def __init__(self, workdir: Path, *, max_pending: str = "256MiB", ingest_processes: int | None = None) -> None:
        """`ingest_processes` None: the collector's default (see collector/config.py)."""
        self.workdir = workdir
        self.data = workdir / "data"
        self.config = workdir / "collector.yaml"
        doc = {
            "receivers": {"otlp": {"protocols": {
                "grpc": {"endpoint": "127.0.0.1:0"},
                "http": {"endpoint": "127.0.0.1:0", "max_request_body_size": 64 * 1024 * 1024},
            }}},
            "exporters": {"tracetape": {"path": str(self.data), "map_size": "8GiB", "max_pending_bytes": max_pending,
                                        **({} if ingest_processes is None else {"ingest_processes": ingest_processes})}},
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(doc))
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.rss_idle_kib: int | None = None

    def __enter__(self) -> CollectorProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracetape.cli", "collector", "--config", str(self.config), "--json"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.workdir / "collector.log", "w"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"collector did not start: {(self.workdir / 'collector.log').read_text()[-2000:]}")
        self.url = json.loads(line)["http"][0].replace("0.0.0.0", "127.0.0.1")
        time.sleep(0.2)
        self.rss_idle_kib = self.rss_kib()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self) -> int | None:
        """Resident memory of the collector and its ingest workers together."""
        return tree_status_kib(self.pid, "VmRSS")

    def peak_kib(self) -> int | None:
        """Sum of the peak resident memory (VmHWM) of the collector and of each of its ingest workers."""
        return tree_status_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the collector and its ingest workers."""
        return tree_cpu_seconds(process_tree(self.pid))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
