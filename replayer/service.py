"""`tracetape replayer`: the replayer service, as a command and as an in-process object.

`ReplayerService(...)`: `await start()` binds (port 0 = any free port; `.port`/`.url` tell which), `await
stop()` ends every open session (their replay runs are ended and flushed), closes the upstream client and stops
the worker processes for huge bodies (`replayer/heavy.py`).
Give it `store=` to share a Store already open in this process (the collector's, in `tracetape up`: LMDB
forbids opening one environment twice in a process); otherwise it opens `data` read-only on first use, so it
may start before the collector has written anything. `collector=None` (or `record=False`) disables the
replayer's own recording of replays; `exporter=` sends those spans elsewhere (tests).
`ReplayerThread` runs a service on its own event loop in a daemon thread (for `tracetape replay -- CMD`).
`authenticator=` (`tracetape replayer --api-keys FILE`, or the collector config's `tracetape_auth` in
`tracetape up`) turns API keys on: see `replayer/app.py` for what they guard. Without keys it binds
127.0.0.1 by default and a bind beyond loopback is logged as a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace.export import SpanExporter

from tracetape.collector.auth import Authenticator, authenticator_from_file
from tracetape.collector.http_receiver import quiet_client_protocol_errors
from tracetape.collector.service import stop_on_signals
from tracetape.collector.store import Store
from tracetape.errors import CliError
from tracetape.replayer.app import DEFAULT_CLIENT_MAX_SIZE, end_session, make_app
from tracetape.replayer.errors import ApiError
from tracetape.replayer.forward import new_client
from tracetape.replayer.payloads import DEFAULT_MAX_BYTES as DEFAULT_PAYLOAD_CACHE
from tracetape.replayer.payloads import PayloadCache
from tracetape.replayer.profiles import Profile, build_profiles
from tracetape.replayer.recorder import ReplayRecorder
from tracetape.replayer.runref import default_data_dir
from tracetape.replayer.session import DEFAULT_MAX_SESSIONS, SessionManager
from tracetape.replayer.state import ReplayerState

log = logging.getLogger("tracetape.replayer")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4380
DEFAULT_COLLECTOR = "http://127.0.0.1:4318"


DEFAULT_SESSION_IDLE_S = 3600.0
"""A session no request has used for an hour was abandoned by its client (a killed `tracetape replay`)."""
SHUTDOWN_S = 5.0
"""On stop, how long requests being answered may take to finish before their connections are cut."""


class ReplayerService:
    def __init__(
        self,
        *,
        data: str | os.PathLike[str] | None = None,
        store: Store | None = None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        profiles: dict[str, Profile] | None = None,
        collector: str | None = DEFAULT_COLLECTOR,
        exporter: SpanExporter | None = None,
        record: bool = True,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_sessions_per_tenant: int | None = None,
        client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
        authenticator: Authenticator | None = None,
        payload_cache_bytes: int = DEFAULT_PAYLOAD_CACHE,
        session_idle_s: float = DEFAULT_SESSION_IDLE_S,
    ) -> None:
        self.data = os.fspath(data) if data is not None else default_data_dir()
        self._shared_store = store
        self.host = host
        self.port = port
        self.client_max_size = client_max_size
        recorder = None
        if record and (exporter is not None or collector):
            recorder = ReplayRecorder(collector, exporter)
        self.state = ReplayerState(
            open_store=self._open_store, profiles=profiles or build_profiles(),
            sessions=SessionManager(max_sessions, max_sessions_per_tenant), recorder=recorder,
            authenticator=authenticator,
            payloads=PayloadCache(payload_cache_bytes))
        self._runner: web.AppRunner | None = None
        self.session_idle_s = session_idle_s
        self._expiry: asyncio.Task[None] | None = None

    async def _expire_idle_sessions(self) -> None:
        """End the sessions idle for `session_idle_s` (abandoned by their clients), as a DELETE would."""
        every = min(60.0, max(self.session_idle_s / 4, 0.05))
        while True:
            await asyncio.sleep(every)
            for session in self.state.sessions.idle(self.session_idle_s):
                try:
                    self.state.sessions.remove(session.id)
                except ApiError:  # deleted meanwhile
                    continue
                log.info("replay session %s idle for %.0fs: ended", session.id, self.session_idle_s)
                await end_session(self.state, session, cancelled=True)

    def _open_store(self) -> Store:
        if self._shared_store is not None:
            return self._shared_store
        return Store(self.data, readonly=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        from tracetape.collector.service import is_loopback

        if self.state.authenticator is None and not is_loopback(self.host):
            log.warning("the replayer listens on %s without API keys: anyone who can reach it can replay every "
                        "recorded run (give --api-keys FILE)", self.host)
        self.state.client = new_client()
        app = make_app(self.state, client_max_size=self.client_max_size)
        # auto_decompress off: aiohttp would inflate request bodies before any limit applies (a gzip bomb);
        # the handlers decode them with a cap (errors.decoded_body)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False,
                                     shutdown_timeout=SHUTDOWN_S)
        quiet_client_protocol_errors()
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            raise CliError(f"cannot listen on {self.host}:{self.port}: {err.strerror or err}") from err
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        if self.session_idle_s > 0:
            self._expiry = asyncio.get_running_loop().create_task(self._expire_idle_sessions())

    async def stop(self) -> None:
        """Stop serving: no new connection, requests being answered get `SHUTDOWN_S` to finish (then are cut),
        and only then do the open sessions' replay runs end, as cancelled (their clients never finished)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for session in self.state.sessions.all():
            try:
                self.state.sessions.remove(session.id)
            except Exception:
                pass
            if session.recorder is not None:
                session.recorder.close(cancelled=True)
        if self.state.client is not None:
            await self.state.client.close()
            self.state.client = None
        await asyncio.get_running_loop().run_in_executor(None, self.state.heavy.shutdown)
        if self.state.recorder is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.state.recorder.shutdown)
            self.state.recorder = None
        if self._shared_store is None and self.state._store is not None:
            self.state._store.close()
            self.state._store = None


class ReplayerThread:
    """A `ReplayerService` on its own event loop in a daemon thread: `start()` returns once it listens."""

    def __init__(self, **kwargs: Any) -> None:
        self.service = ReplayerService(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tracetape-replayer", daemon=True)

    @property
    def url(self) -> str:
        return self.service.url

    def start(self) -> ReplayerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.service.stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="the store directory (default $TRACETAPE_DATA or .tracetape/data)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--collector", default=os.environ.get("TRACETAPE_ENDPOINT") or DEFAULT_COLLECTOR,
                        help="OTLP/HTTP collector the replayer records replays to (default %(default)s)")
    parser.add_argument("--no-record", action="store_true", help="do not record replays as new runs")
    parser.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                        help="an upstream profile: real base URL for live calls (repeatable)")
    parser.add_argument("--profiles", default=None, metavar="FILE", help="profiles file (JSON or YAML)")
    parser.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS)
    parser.add_argument("--max-sessions-per-tenant", type=int, default=None, metavar="N",
                        help="sessions one API key's tenant may hold (default: a quarter of --max-sessions)")
    parser.add_argument("--session-idle-s", type=float, default=DEFAULT_SESSION_IDLE_S, metavar="SECONDS",
                        help="end a session no request has used for this long, its replay run as cancelled "
                             "(default %(default)g; 0: never)")
    parser.add_argument("--payload-cache-mib", type=int, default=DEFAULT_PAYLOAD_CACHE >> 20, metavar="MIB",
                        help="memory for recently served payloads, decompressed (default %(default)s; 0: none)")
    parser.add_argument("--api-keys", default=None, metavar="FILE",
                        help="require API keys: a YAML/JSON file {keys: [{sha256, tenant, scopes}]} (sha256 of "
                             "each key: printf %%s KEY | sha256sum)")


def service_from_args(args: argparse.Namespace, store: Store | None = None) -> ReplayerService:
    if not 0 <= args.port <= 65535:
        raise CliError(f"invalid port {args.port}")
    api_keys = getattr(args, "api_keys", None)
    authenticator = authenticator_from_file(api_keys) if api_keys else None  # KeysError is a CliError
    return ReplayerService(
        data=args.data, store=store, host=args.host, port=args.port,
        profiles=build_profiles(args.upstream, args.profiles), collector=args.collector,
        record=not args.no_record, max_sessions=args.max_sessions, authenticator=authenticator,
        max_sessions_per_tenant=getattr(args, "max_sessions_per_tenant", None),
        session_idle_s=max(0.0, getattr(args, "session_idle_s", DEFAULT_SESSION_IDLE_S)),
        payload_cache_bytes=max(0, getattr(args, "payload_cache_mib", DEFAULT_PAYLOAD_CACHE >> 20)) << 20)


async def serve_forever(services: list[Any]) -> None:
    """Start `services` (in order), wait for SIGINT/SIGTERM, stop them (in reverse order)."""
    stop = stop_on_signals()
    started = []
    try:
        for s in services:
            await s.start()
            started.append(s)
        await stop.wait()
    finally:
        for s in reversed(started):
            await s.stop()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = service_from_args(args)

    async def main() -> None:
        await service.start()
        keys = "; API keys required" if service.state.authenticator is not None else ""
        print(f"tracetape replayer listening on {service.url} (store {service.data}, profiles "
              f"{', '.join(f'{p.name}={p.upstream}' for p in service.state.profiles.values())}){keys}", flush=True)
        try:
            await serve_forever([])
        finally:
            await service.stop()

    asyncio.run(main())
    return 0
