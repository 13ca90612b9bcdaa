"""Collector ingest (issue item 3) and the collector's peak RSS under that load (item 6).

For each case (4 KB / 100 KB payloads, unique / repeated): OTLP/HTTP protobuf requests built with the real
SDK + `encode_spans` are POSTed by a few concurrent aiohttp senders to a real collector process (a
`CollectorService` behind `tracetape collector`), each answered only after its LMDB commit. In the same run,
the same request bytes go through (a) protobuf decoding alone and (b) raw batched LMDB puts (plain `lmdb`,
temp dir on the same disk, one durable transaction per request, every span's encoded bytes put once).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import lmdb
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.collector_proc import CollectorProcess
from bench.common import Ctx, row
from bench.spans import make_batches

NAME = "ingest"
SENDERS = 4
WORKERS = 2
"""The collector is also measured with this many ingest worker processes (its default is threads)."""
TARGET = 0.5


def cases(quick: bool) -> list[tuple[str, int, int, int, bool]]:
    # (name, payload bytes, spans per request, requests, unique)
    f = 1 if quick else 4
    return [
        ("4KB unique", 4096, 512, 10 * f, True),
        ("100KB unique", 100_000, 80, 8 * f, True),
        ("4KB repeated", 4096, 512, 10 * f, False),
        ("100KB repeated", 100_000, 80, 8 * f, False),
    ]


def decode_rate(bodies: list[bytes]) -> float:
    """Seconds to parse every body (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for b in bodies:
            ExportTraceServiceRequest.FromString(b)
        best = min(best, time.perf_counter() - t)
    return best


def lmdb_rate(bodies: list[bytes], workdir: Path) -> float:
    """Seconds to put every span's encoded bytes, one durable transaction per request (best of 2)."""
    per_request: list[list[tuple[bytes, bytes]]] = []
    for b in bodies:
        req = ExportTraceServiceRequest.FromString(b)
        items = []
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    items.append((bytes(s.trace_id) + bytes(s.span_id), s.SerializeToString()))
        per_request.append(items)
    best = float("inf")
    for i in range(2):
        path = workdir / f"raw-lmdb-{i}"
        env = lmdb.open(str(path), map_size=8 << 30, sync=True, metasync=True, readahead=False)
        try:
            t = time.perf_counter()
            for items in per_request:
                with env.begin(write=True) as txn:
                    for k, v in items:
                        txn.put(k, v)
            best = min(best, time.perf_counter() - t)
        finally:
            env.close()
            shutil.rmtree(path, ignore_errors=True)
    return best


async def send_all(url: str, bodies: list[bytes], senders: int) -> tuple[float, list[int]]:
    statuses: list[int] = []
    queue = list(reversed(bodies))
    headers = {"Content-Type": "application/x-protobuf"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=senders)) as session:
        async def sender() -> None:
            while queue:
                body = queue.pop()
                while True:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status == 503:
                            await asyncio.sleep(0.05)
                            continue
                        statuses.append(resp.status)
                        break

        t = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)))
        return time.perf_counter() - t, statuses


def _collector_rate(
    ctx: Ctx, label: str, bodies: list[bytes], warm: list[bytes], spans: int, ingest_processes: int | None
) -> tuple[float, float, int | None, int | None, int, list[int]]:
    """One collector process fed `bodies` by `SENDERS` senders: (spans/s, CPU s per span of the collector and
    its workers, peak RSS KiB, idle RSS KiB, store bytes on disk, non-200 statuses)."""
    work = ctx.workdir / label
    with CollectorProcess(work, ingest_processes=ingest_processes) as col:
        asyncio.run(send_all(col.url, warm, 1))
        cpu0 = col.cpu_seconds()
        t_coll, statuses = asyncio.run(send_all(col.url, bodies, SENDERS))
        cpu_per_span = (col.cpu_seconds() - cpu0) / spans
        peak, idle = col.peak_kib(), col.rss_idle_kib
    du = sum(p.stat().st_size for p in (work / "data").glob("*.mdb"))
    shutil.rmtree(work, ignore_errors=True)
    return spans / t_coll, cpu_per_span, peak, idle, du, [s for s in statuses if s != 200]


def run(ctx: Ctx) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ci, (name, payload, per_batch, n, unique) in enumerate(cases(ctx.quick)):
        print(f"[ingest] {name}: building {n} requests of {per_batch} spans", flush=True)
        bodies = make_batches(payload, per_batch, n, unique=unique, run_id=f"ingest-{ci}")
        warm = make_batches(payload, per_batch, 1, unique=True, run_id=f"warm-{ci}")
        spans = per_batch * n
        mb = sum(len(b) for b in bodies) / 1e6
        t_decode = decode_rate(bodies)
        t_lmdb = lmdb_rate(bodies, ctx.workdir)
        rate_c, cpu_per_span, peak, idle, du, bad = _collector_rate(ctx, f"collector-{ci}", bodies, warm, spans, None)
        rate_w, cpu_per_span_w, peak_w, _, _, bad_w = _collector_rate(
            ctx, f"workers-{ci}", bodies, warm, spans, WORKERS)
        for label, statuses in (("", bad), (f" ({WORKERS} ingest processes)", bad_w)):
            if statuses:
                ctx.note(f"ingest {name}{label}: {len(statuses)} non-200 answers {sorted(set(statuses))}")
        rate_l, rate_d = spans / t_lmdb, spans / t_decode
        t_coll = spans / rate_c
        ratio = rate_c / rate_l
        rows += [
            row(NAME, name, "collector spans/s", rate_c, "spans/s", ratio=ratio, ratio_of="raw LMDB puts",
                target=">= 0.5x raw LMDB", met=ratio >= TARGET, mb_s=mb / t_coll, spans=spans, request_mb=mb / n),
            row(NAME, name, "collector MB/s", mb / t_coll, "MB/s", ratio=rate_c / rate_d, ratio_of="protobuf decode"),
            row(NAME, name, "collector CPU per span", cpu_per_span * 1e6, "us",
                ratio=cpu_per_span * rate_l, ratio_of="raw LMDB time per span"),
            row(NAME, name, f"collector, ingest_processes {WORKERS}", rate_w, "spans/s", ratio=rate_w / rate_l,
                ratio_of="raw LMDB puts", cpu_us_per_span=cpu_per_span_w * 1e6, peak_rss_mib=(peak_w or 0) / 1024),
            row(NAME, name, "raw LMDB puts", rate_l, "spans/s", mb_s=mb / t_lmdb),
            row(NAME, name, "raw LMDB MB/s", mb / t_lmdb, "MB/s"),
            row(NAME, name, "protobuf decode", rate_d, "spans/s", mb_s=mb / t_decode),
            row(NAME, name, "protobuf decode MB/s", mb / t_decode, "MB/s"),
            row("memory", f"collector, ingest {name}", "peak RSS (VmHWM)", (peak or 0) / 1024, "MiB",
                ratio=(peak or 0) / (idle or 1), ratio_of="idle RSS", idle_mib=(idle or 0) / 1024),
            row(NAME, name, "store files after", du / 1e6, "MB", ratio=du / 1e6 / mb, ratio_of="request MB"),
        ]
        print(f"  collector with ingest_processes {WORKERS}: {rate_w:,.0f} spans/s, {cpu_per_span_w * 1e6:.0f} us CPU "
              f"per span, peak RSS {(peak_w or 0) / 1024:.0f} MiB", flush=True)
        print(f"  collector {rate_c:,.0f} spans/s ({mb / t_coll:.1f} MB/s, {cpu_per_span * 1e6:.0f} us CPU per span "
              f"in the collector and its workers); raw LMDB {rate_l:,.0f}; decode "
              f"{rate_d:,.0f}; ratio {ratio:.2f}; peak RSS {(peak or 0) / 1024:.0f} MiB", flush=True)
    return rows
