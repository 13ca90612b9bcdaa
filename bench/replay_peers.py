"""Helper processes for `bench/replay.py`: the physical-limit server and the peers' sides.

`python -m bench.replay_peers CMD ...`, each CMD in its own process, printing JSON on its last stdout line
(servers print `{"port": P}` first and serve until SIGTERM). Only the standard library is imported at the top,
because some commands run under another interpreter (mitmproxy's venv) or with a peer on PYTHONPATH:

- `bare --port P --plain FILE --sse FILE`: the physical limit. A bare aiohttp handler that reads the request
  body and answers the same bytes the replayer serves: `POST /plain/...` the recorded 2 KB JSON body in one
  `web.Response`; `POST /sse/...` the recorded SSE stream, one write per recorded chunk (FILE = JSON list of
  base64 chunks), through a `web.StreamResponse`, as `replayer/tape.py` does.
- `vcr-record --cassette FILE --bodies FILE --url URL`: record the bodies (JSON lines `{"path", "body"}`) with
  httpx through VCR.py (`record_mode="all"`) against the stand-in.
- `vcr-synth --src FILE --out FILE --total N --keep K`: a cassette of N interactions holding the first K
  recorded ones spread evenly (positions i*N/K) among N-K fillers (copies whose request body differs).
- `vcr-replay --cassette FILE --bodies FILE --url URL --seconds S [--min N] [--stream]`: replay in-process
  with httpx in a single-client loop (VCR.py `record_mode="none"`, body matched, repeats allowed); prints the
  per-request latencies' percentiles and the cassette load time. Needs VCR.py on PYTHONPATH.
- `mitm-synth --src FILE --out FILE --total N --keep K`: the same for a mitmproxy flows file (run with
  mitmproxy's interpreter).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time


def _pcts(values: list[float]) -> dict[str, float]:
    s = sorted(values)

    def p(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))] if s else float("nan")

    return {"n": len(s), "p50_ms": p(50) * 1000, "p99_ms": p(99) * 1000,
            "mean_ms": (sum(s) / len(s) * 1000) if s else float("nan")}


# --------------------------------------------------------------------------------------------------
# the physical limit


def cmd_bare(args: argparse.Namespace) -> int:
    import asyncio

    from aiohttp import web

    plain = open(args.plain, "rb").read()
    sse = [base64.b64decode(c) for c in json.load(open(args.sse))]

    async def handle_plain(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=plain, content_type="application/json")

    async def handle_sse(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for chunk in sse:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/plain/{tail:.*}", handle_plain)
        app.router.add_post("/sse/{tail:.*}", handle_sse)
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(json.dumps({"port": port}), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


# --------------------------------------------------------------------------------------------------
# VCR.py


def _read_bodies(path: str) -> list[tuple[str, bytes]]:
    out = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                out.append((d["path"], base64.b64decode(d["body"])))
    return out


HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench-0000000000000000000000000000"}


def cmd_vcr_record(args: argparse.Namespace) -> int:
    import httpx
    import vcr

    my_vcr = vcr.VCR(record_mode="all", match_on=["method", "scheme", "host", "port", "path", "query", "body"],
                     filter_headers=["authorization"])
    with my_vcr.use_cassette(args.cassette), httpx.Client(timeout=30) as client:
        for path, body in _read_bodies(args.bodies):
            r = client.post(args.url + path, content=body, headers=HEADERS)
            r.read()
            if r.status_code != 200:
                raise SystemExit(f"recording got {r.status_code}")
    print(json.dumps({"ok": True}))
    return 0


def _vary(body: str | bytes, n: int) -> str | bytes:
    """A distinct request body of the same shape: still valid JSON, the message text prefixed by a tag."""
    marker = '"content":"'
    tag = f"filler-{n:07d} "
    if isinstance(body, bytes):
        return body.replace(marker.encode(), (marker + tag).encode(), 1)
    return body.replace(marker, marker + tag, 1)


def cmd_vcr_synth(args: argparse.Namespace) -> int:
    import yaml

    try:
        from yaml import CDumper as Dumper
        from yaml import CSafeLoader as Loader
    except ImportError:  # pragma: no cover
        from yaml import Dumper, SafeLoader as Loader  # type: ignore[assignment]
    data = yaml.load(open(args.src).read(), Loader=Loader)
    recorded = data["interactions"][: args.keep]
    n, k = args.total, len(recorded)
    slots = {int(i * n / k): recorded[i] for i in range(k)}
    out = []
    filler_n = 0
    for pos in range(n):
        if pos in slots:
            out.append(slots[pos])
            continue
        src = recorded[filler_n % k]
        filler_n += 1
        req = dict(src["request"])
        req["body"] = _vary(req["body"], filler_n)
        out.append({"request": req, "response": src["response"]})
    data["interactions"] = out
    with open(args.out, "w") as fh:
        yaml.dump(data, fh, Dumper=Dumper)
    print(json.dumps({"interactions": len(out)}))
    return 0


def cmd_vcr_replay(args: argparse.Namespace) -> int:
    import httpx
    import vcr

    bodies = _read_bodies(args.bodies)
    my_vcr = vcr.VCR(record_mode="none", match_on=["method", "scheme", "host", "port", "path", "query", "body"])
    t = time.perf_counter()
    lat: list[float] = []
    errors = 0
    with my_vcr.use_cassette(args.cassette, allow_playback_repeats=True) as cassette, \
            httpx.Client(timeout=30) as client:
        load_s = time.perf_counter() - t
        recorded = len(cassette)
        deadline = time.perf_counter() + args.seconds
        i = 0
        while time.perf_counter() < deadline or len(lat) < args.min:
            path, body = bodies[i % len(bodies)]
            i += 1
            t0 = time.perf_counter()
            try:
                if args.stream:
                    with client.stream("POST", args.url + path, content=body, headers=HEADERS) as r:
                        for _ in r.iter_bytes():
                            pass
                else:
                    r = client.post(args.url + path, content=body, headers=HEADERS)
                    r.read()
                ok = r.status_code == 200
            except Exception:  # noqa: BLE001 - a miss raises CannotOverwriteExistingCassetteException
                ok = False
            lat.append(time.perf_counter() - t0)
            errors += not ok
    print(json.dumps({"load_s": load_s, "recorded": recorded, "errors": errors, **_pcts(lat)}))
    return 0


# --------------------------------------------------------------------------------------------------
# mitmproxy


def cmd_mitm_synth(args: argparse.Namespace) -> int:
    from mitmproxy import io as mio

    with open(args.src, "rb") as fh:
        recorded = [f for f in mio.FlowReader(fh).stream()][: args.keep]
    n, k = args.total, len(recorded)
    slots = {int(i * n / k): recorded[i] for i in range(k)}
    filler_n = 0
    with open(args.out, "wb") as fh:
        writer = mio.FlowWriter(fh)
        for pos in range(n):
            if pos in slots:
                writer.add(slots[pos])
                continue
            src = recorded[filler_n % k]
            filler_n += 1
            flow = src.copy()
            flow.request.content = _vary(src.request.content or b"", filler_n)
            writer.add(flow)
    print(json.dumps({"flows": n}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay_peers")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bare")
    b.add_argument("--port", type=int, default=0)
    b.add_argument("--plain", required=True)
    b.add_argument("--sse", required=True)
    r = sub.add_parser("vcr-record")
    r.add_argument("--cassette", required=True)
    r.add_argument("--bodies", required=True)
    r.add_argument("--url", required=True)
    for name in ("vcr-synth", "mitm-synth"):
        s = sub.add_parser(name)
        s.add_argument("--src", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--total", type=int, required=True)
        s.add_argument("--keep", type=int, required=True)
    v = sub.add_parser("vcr-replay")
    v.add_argument("--cassette", required=True)
    v.add_argument("--bodies", required=True)
    v.add_argument("--url", required=True)
    v.add_argument("--seconds", type=float, default=2.0)
    v.add_argument("--min", type=int, default=20)
    v.add_argument("--stream", action="store_true")
    args = p.parse_args(argv)
    return {"bare": cmd_bare, "vcr-record": cmd_vcr_record, "vcr-synth": cmd_vcr_synth,
            "vcr-replay": cmd_vcr_replay, "mitm-synth": cmd_mitm_synth}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
