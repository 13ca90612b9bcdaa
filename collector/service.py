"""`tracetape collector`: OTLP receivers → LMDB store, and the store's outbox → OTLP backends.

Contract
--------
- `CollectorService(config)`: `await start()` opens the store, starts the writer, the forwarder and every
  receiver of the storing pipelines (raising `CliError` when a port is taken or the store cannot be
  opened, with nothing left running); `addresses` then holds the bound addresses (port 0 = any free
  port). `await stop()` stops accepting, lets in-flight requests finish (their writes commit and they
  are answered), stops the forwarder, then closes the store. Usable in-process (`tracetape up`, tests).
- `serve(config, ready=..., stop_event=...)` runs a service until `stop_event` is set (or the task is
  cancelled), calling `ready(service)` once it listens.
- `run(args)` is the CLI: loads `--config` (default ./otel-config.yaml if present, else built-in
  defaults), applies `--data`/`--host`/`--http-port`/`--grpc-port`, prints one line with the addresses
  (a JSON object with `--json`), and stops cleanly on SIGINT/SIGTERM with exit status 0.
Binds 127.0.0.1 unless told otherwise. With the `tracetape_auth` extension enabled every receiver requires
an API key (`collector/auth.py`); without it, a receiver bound beyond loopback is logged as a warning,
since then anyone who can reach the port can write spans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from tracetape.collector import config as cfg
from tracetape.collector.receiving import ReceiverStats
from tracetape.errors import CliError

log = logging.getLogger("tracetape.collector")

DEFAULT_CONFIG_FILE = "otel-config.yaml"
STOP_GRACE = 10.0


class CollectorService:
    """One collector: store, writer, receivers and forwarder, started and stopped together."""

    def __init__(self, config: cfg.CollectorConfig) -> None:
        self.config = config
        self.store: Any = None
        self.writer: Any = None
        self.forwarder: Any = None
        self.stats = ReceiverStats()
        self.addresses: dict[str, list[str]] = {"http": [], "grpc": []}
        self._http_runners: list[Any] = []
        self._grpc_servers: list[Any] = []
        self._started = False

    async def start(self) -> None:
        """Start everything; on failure stop what was started and raise `CliError`."""
        if self._started:
            return
        self._started = True
        try:
            await self._start_storage()
            await self._start_receivers()
        except BaseException:
            await self.stop()
            raise

    async def _start_storage(self) -> None:
        from tracetape.collector.forwarder import Forwarder
        from tracetape.collector.store import DEFAULT_MAP_SIZE, Store, StoreError
        from tracetape.collector.writer import StoreWriter

        conf = self.config.store
        try:
            self.store = await asyncio.to_thread(
                Store, conf.path, map_size=min(DEFAULT_MAP_SIZE, conf.map_size), max_map_size=conf.map_size
            )
        except (StoreError, OSError, ValueError) as err:  # ValueError: a NUL in a path the config did not check
            raise CliError(f"cannot open the store at {conf.path!r}: {err}") from None
        self.writer = StoreWriter(self.store, max_pending_bytes=conf.max_pending_bytes,
                                  prepare_processes=conf.ingest_processes,
                                  outbox=bool(self.config.forward_routes))
        await self.writer.start()
        self.forwarder = Forwarder(self.store, self.config.forward_routes)
        await self.forwarder.start()

    async def _start_receivers(self) -> None:
        from tracetape.collector.grpc_receiver import start_grpc_server
        from tracetape.collector.http_receiver import TRACES_PATH, create_app, start_http_server

        on_stored = self.forwarder.notify if self.config.forward_routes else None
        authenticator = self.config.authenticator
        for receiver in self.config.storing_receivers:
            for proto in (receiver.http, receiver.grpc):
                if proto is not None and authenticator is None and not is_loopback(proto.host):
                    log.warning("receivers.%s listens on %s without API keys: anyone who can reach it can "
                                "write spans (configure the tracetape_auth extension)", receiver.id, proto.endpoint)
            if receiver.http is not None:
                http = receiver.http
                app = create_app(self.writer, max_request_body_size=http.max_request_body_size,
                                 stats=self.stats, on_stored=on_stored, health=self.health,
                                 authenticator=authenticator)
                try:
                    runner, port = await start_http_server(app, http.host, http.port)
                except OSError as err:
                    raise CliError(f"receivers.{receiver.id}: cannot listen on {http.endpoint} (OTLP/HTTP): "
                                   f"{err.strerror or err}") from None
                self._http_runners.append(runner)
                self.addresses["http"].append(f"http://{cfg.join_endpoint(http.host or '0.0.0.0', port)}{TRACES_PATH}")
            if receiver.grpc is not None:
                grpc_conf = receiver.grpc
                try:
                    server, port = await start_grpc_server(
                        self.writer, host=grpc_conf.host, port=grpc_conf.port,
                        max_recv_msg_size=grpc_conf.max_recv_msg_size, stats=self.stats, on_stored=on_stored,
                        authenticator=authenticator,
                    )
                except OSError as err:
                    raise CliError(f"receivers.{receiver.id}: cannot listen on {grpc_conf.endpoint} (OTLP/gRPC): "
                                   f"{err.strerror or err}") from None
                self._grpc_servers.append(server)
                self.addresses["grpc"].append(cfg.join_endpoint(grpc_conf.host or "0.0.0.0", port))

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, finish in-flight requests and writes, stop forwarding, close the store."""
        grpc_stops = [server.stop(grace) for server in self._grpc_servers]
        http_stops = [runner.cleanup() for runner in self._http_runners]
        await asyncio.gather(*grpc_stops, *http_stops, return_exceptions=True)
        self._grpc_servers.clear()
        self._http_runners.clear()
        if self.forwarder is not None:
            await self.forwarder.stop()
            self.forwarder = None
        if self.writer is not None:
            await self.writer.close()
            self.writer = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._started = False

    def health(self) -> dict[str, Any]:
        """Store, writer and forwarding state for `/healthz` and `/metrics`."""
        out: dict[str, Any] = {}
        if self.store is not None:
            try:
                stats = self.store.stats()
            except Exception as err:  # noqa: BLE001 - reported, not raised
                stats = {"error": type(err).__name__}
            out["store"] = {"path": self.config.store.path, **stats}
        if self.writer is not None:
            out["writer"] = {**self.writer.stats, "pending_bytes": self.writer.pending_bytes}
        if self.forwarder is not None:
            out["forwarding"] = self.forwarder.snapshot()
        return out

    def describe(self) -> dict[str, Any]:
        """What `run` prints: addresses, store path and forwarding targets."""
        return {
            "http": self.addresses["http"],
            "grpc": self.addresses["grpc"],
            "store": self.config.store.path,
            "forwarding": [{"exporter": r.exporter.id, "endpoint": r.exporter.url} for r in self.config.forward_routes],
            "config": self.config.source,
            "auth": "api_keys" if self.config.auth is not None else "none",
            "pid": os.getpid(),
        }


async def serve(
    config: cfg.CollectorConfig,
    *,
    ready: Callable[[CollectorService], None] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Run a collector until `stop_event` is set (or this task is cancelled), then stop it cleanly."""
    service = CollectorService(config)
    await service.start()
    try:
        if ready is not None:
            ready(service)
        await (stop_event or asyncio.Event()).wait()
    finally:
        await asyncio.shield(service.stop())


# --- CLI ----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help=f"collector config (default: ./{DEFAULT_CONFIG_FILE} if present, else built-in defaults)")
    parser.add_argument("--data", metavar="DIR", help="store directory (overrides exporters.tracetape.path)")
    parser.add_argument("--host", help="address the receivers listen on (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, metavar="P", help="OTLP/HTTP port (0 = any free port)")
    parser.add_argument("--grpc-port", type=int, metavar="P", help="OTLP/gRPC port (0 = any free port)")
    parser.add_argument("--json", action="store_true", help="print the start-up line as JSON")


def load_config(args: argparse.Namespace) -> cfg.CollectorConfig:
    """The config the CLI arguments describe (file, then overrides)."""
    for name in ("http_port", "grpc_port"):
        port = getattr(args, name, None)
        if port is not None and not 0 <= port <= 65535:
            raise CliError(f"--{name.replace('_', '-')}: {port} is not a port number")
    path = getattr(args, "config", None)
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    config = cfg.load(path) if path is not None else cfg.default_config()
    return config.with_overrides(
        data=getattr(args, "data", None),
        host=getattr(args, "host", None),
        http_port=getattr(args, "http_port", None),
        grpc_port=getattr(args, "grpc_port", None),
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_main(config, as_json=bool(getattr(args, "json", False))))


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (call it inside the running loop); every tracetape service waits on one."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not supported
            pass
    return stop


async def _main(config: cfg.CollectorConfig, *, as_json: bool) -> int:
    stop = stop_on_signals()

    def ready(service: CollectorService) -> None:
        print(start_line(service, as_json), flush=True)

    await serve(config, ready=ready, stop_event=stop)
    log.info("collector stopped")
    return 0


def start_line(service: CollectorService, as_json: bool = False) -> str:
    """The one line printed on start: addresses, store, forwarding targets (JSON with `as_json`)."""
    info = service.describe()
    if as_json:
        return json.dumps(info)
    parts = [f"OTLP/HTTP {a}" for a in info["http"]] + [f"OTLP/gRPC {a}" for a in info["grpc"]]
    line = f"tracetape collector: listening on {', '.join(parts) or 'nothing'}; store {info['store']}"
    if info["auth"] == "api_keys":
        line += "; API keys required"
    if info["forwarding"]:
        line += "; forwarding to " + ", ".join(f"{f['exporter']} ({f['endpoint']})" for f in info["forwarding"])
    return line




def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to bind) is a loopback one; "" (every interface) is not."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
