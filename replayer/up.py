"""`tracetape up [--config otel-config.yaml] [--data DIR] [--port P] [--upstream NAME=URL ...]`: the collector
and the replayer in one process, sharing one Store (LMDB allows one environment per path per process). The
replayer records the replays it serves to this collector's own OTLP/HTTP receiver. Stops on SIGINT/SIGTERM.
With the collector config's `tracetape_auth` extension enabled, the replayer requires the same API keys.
Prints the collector's start line, then `tracetape replayer: listening on URL`; with `--json`, stdout gets one
JSON line only: the collector's start object with `"replayer": URL` added (the text line goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from tracetape.collector import service as collector_service
from tracetape.collector.config import CollectorConfig
from tracetape.replayer.profiles import build_profiles
from tracetape.replayer.service import DEFAULT_HOST, DEFAULT_PORT, ReplayerService


def add_arguments(parser: argparse.ArgumentParser) -> None:
    collector_service.add_arguments(parser)
    parser.add_argument("--replayer-host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"replayer port (default {DEFAULT_PORT})")
    parser.add_argument("--upstream", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--profiles", default=None, metavar="FILE")


async def _main(args: argparse.Namespace, config: CollectorConfig) -> int:
    stop = collector_service.stop_on_signals()
    collector = collector_service.CollectorService(config)
    await collector.start()
    replayer = None
    try:
        http = collector.addresses["http"]
        endpoint = http[0].rsplit("/v1/traces", 1)[0].replace("0.0.0.0", "127.0.0.1") if http else None
        replayer = ReplayerService(store=collector.store, host=args.replayer_host, port=args.port,
                                   profiles=build_profiles(args.upstream, args.profiles), collector=endpoint,
                                   authenticator=config.authenticator)
        await replayer.start()
        if getattr(args, "json", False):  # stdout: one JSON line, the replayer's URL included
            print(json.dumps({**collector.describe(), "replayer": replayer.url}), flush=True)
            print(f"tracetape replayer: listening on {replayer.url}", file=sys.stderr, flush=True)
        else:
            print(collector_service.start_line(collector), flush=True)
            print(f"tracetape replayer: listening on {replayer.url}", flush=True)
        await stop.wait()
    finally:
        if replayer is not None:
            await replayer.stop()
        await collector.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    config = collector_service.load_config(args)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args, config))
