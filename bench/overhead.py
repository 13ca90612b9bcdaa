"""Instrumentation overhead per call (issue item 4): the openai SDK against the stand-in provider (its own
process, a real socket on 127.0.0.1), uninstrumented vs tracetape (recorder activated in-process with the real
BatchSpanProcessor + OTLP/HTTP exporter to a running collector process) vs opentelemetry-instrumentation-openai-v2
(content capture on). Each variant is a long-lived subprocess; calls are interleaved in small blocks, round
robin across variants, so drift hits every variant alike. Added ms = median(variant) - median(none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.collector_proc import CollectorProcess
from bench.common import DEPS, ROOT, Ctx, median, pct, row

NAME = "overhead"


class Worker:
    def __init__(self, variant: str, base_url: str, collector: str) -> None:
        env = dict(os.environ)
        if variant == "openai_v2":
            env["PYTHONPATH"] = os.pathsep.join([str(DEPS / "openai_v2"), str(ROOT)])
            env["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = "true"
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.overhead_worker", variant, base_url, collector],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"overhead worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def run(ctx: Ctx) -> list[dict[str, Any]]:
    variants = ["none", "tracetape"]
    if (DEPS / "openai_v2").is_dir():
        variants.append("openai_v2")
    else:
        ctx.note(f"opentelemetry-instrumentation-openai-v2 not found in {DEPS / 'openai_v2'}: "
                 "pip install --target it there (see docs/benchmarks.md)")
    rounds = 10 if ctx.quick else 30
    blocks = {"1KB:plain": 20, "1KB:stream": 20, "1MB:plain": 2, "1MB:stream": 2}
    standin = subprocess.Popen([sys.executable, "-m", "tests.support.standin", "--port", "0"], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    rows: list[dict[str, Any]] = []
    workers: dict[str, Worker] = {}
    try:
        assert standin.stdout is not None
        port = int(standin.stdout.readline().split()[-1])
        base = f"http://127.0.0.1:{port}/v1"
        with CollectorProcess(ctx.workdir / "overhead-collector") as col:
            for v in variants:
                workers[v] = Worker(v, base, col.url)
            for case in blocks:  # warm-up
                for v in variants:
                    workers[v].ask(f"{case} 3")
                    workers[v].ask("flush")
            times: dict[tuple[str, str], list[float]] = {(v, c): [] for v in variants for c in blocks}
            # 1 KB and 1 MB in separate phases, and every variant's exporter flushed (untimed) after each
            # block, so one case's background export/ingest work never lands in another case's timings.
            for size in ("1KB", "1MB"):
                for r in range(rounds):
                    for case, n in blocks.items():
                        if not case.startswith(size):
                            continue
                        order = variants if r % 2 == 0 else list(reversed(variants))
                        for v in order:
                            times[(v, case)] += workers[v].ask(f"{case} {n}")["times"]
                            workers[v].ask("flush")
            flushed = {v: workers[v].ask("flush") for v in variants}
        if "openai_v2" in flushed:
            seen = flushed["openai_v2"]
            ctx.note(f"openai-v2 saw {seen.get('spans_seen')} spans and emitted {seen.get('log_records')} content "
                     f"log records for {sum(len(times[('openai_v2', c)]) for c in blocks) + 3 * len(blocks)} calls")
        for case in blocks:
            base_med = median(times[("none", case)])
            for v in variants:
                med = median(times[(v, case)])
                added = (med - base_med) * 1000
                target, met = "", None
                if v == "tracetape" and case.startswith("1KB"):
                    target, met = "<= 0.2 ms added", added <= 0.2
                if v == "tracetape" and case.startswith("1MB") and "openai_v2" in variants:
                    ov2 = (median(times[("openai_v2", case)]) - base_med) * 1000
                    target, met = "< openai-v2 added", added < ov2
                rows.append(row(NAME, f"{case} {v}", "median per call", med * 1000, "ms",
                                ratio=med / base_med, ratio_of="uninstrumented", calls=len(times[(v, case)]),
                                p90_ms=pct(times[(v, case)], 90) * 1000))
                if v != "none":
                    rows.append(row(NAME, f"{case} {v}", "added per call", added, "ms", target=target, met=met))
                print(f"[overhead] {case:11s} {v:10s} median {med * 1000:7.3f} ms  added {added:+.3f} ms", flush=True)
    finally:
        for w in workers.values():
            w.close()
        standin.terminate()
        standin.wait(10)
    return rows
