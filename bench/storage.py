"""Storage (issue item 5): bytes on disk per recorded step against raw payload bytes, for 100 runs of the
same agent (identical steps, so payloads deduplicate). Spans go through `ingest.prepare` + `Store.apply`;
the figure is the used part of data.mdb: `env.info()['last_pgno'] * page size`."""

from __future__ import annotations

import shutil
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from bench.common import Ctx, row
from bench.spans import Agent, chat_body, chat_response, corpus
from tracetape.collector import ingest
from tracetape.collector.store import Store

NAME = "storage"
RUNS = 100
STEPS = 10


def used_bytes(store: Store) -> int:
    return store.env.info()["last_pgno"] * store.env.stat()["psize"]


def run(ctx: Ctx) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, size in (("4KB prompts", 4096), ("100KB prompts", 100_000)):
        text = corpus(size + STEPS * 997)
        bodies = [chat_body(text[i * 997:i * 997 + size - 100]) for i in range(STEPS)]
        responses = [chat_response(i) for i in range(STEPS)]
        path = ctx.workdir / f"storage-{size}"
        store = Store(path, map_size=1 << 30)
        raw = 0
        try:
            base = used_bytes(store)
            first_run = 0
            for r in range(RUNS):
                agent = Agent(f"run-{r:03d}")
                for i in range(STEPS):
                    agent.step(bodies[i], responses[i], step_id=f"{i:016x}", started_ns=1_700_000_000_000_000_000 + r * 10**9 + i)
                    raw += len(bodies[i]) + len(responses[i])
                batch = ingest.prepare(encode_spans(agent.take()), store)
                store.apply([batch])
                if r == 0:
                    first_run = used_bytes(store) - base
            used = used_bytes(store) - base
        finally:
            store.close()
            shutil.rmtree(path, ignore_errors=True)
        steps = RUNS * STEPS
        rows += [
            row(NAME, f"{label}, {RUNS} runs x {STEPS} steps", "on disk per step", used / steps, "bytes",
                ratio=used / raw, ratio_of="raw payload bytes", raw_per_step=raw / steps, used=used, raw=raw),
            row(NAME, f"{label}, first run only", "on disk per step", first_run / STEPS, "bytes",
                ratio=first_run / (raw / RUNS), ratio_of="raw payload bytes"),
            row(NAME, f"{label}, each later run", "on disk per step", (used - first_run) / (steps - STEPS), "bytes",
                ratio=(used - first_run) / (raw - raw / RUNS), ratio_of="raw payload bytes"),
        ]
        print(f"[storage] {label}: {used / steps:,.0f} B/step on disk vs {raw / steps:,.0f} B/step raw "
              f"({used / raw:.3f}x)", flush=True)
    return rows
