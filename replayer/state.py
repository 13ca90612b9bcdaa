"""What the replayer's handlers share: the store, the sessions, the profiles, the upstream client, the recorder,
the payload cache, the worker pool for huge bodies."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from tracetape.collector.auth import Authenticator
from tracetape.collector.store import Store, StoreError
from tracetape.instrumentation import redaction
from tracetape.replayer.bodies import BodyBudget
from tracetape.replayer.errors import ApiError
from tracetape.replayer.heavy import HeavyPool
from tracetape.replayer.payloads import PayloadCache
from tracetape.replayer.profiles import Profile
from tracetape.replayer.recorder import ReplayRecorder
from tracetape.replayer.session import SessionManager


@dataclass
class ReplayerState:
    open_store: Callable[[], Store]
    """Returns the store (opened on first use, so the replayer may start before the collector wrote anything)."""
    profiles: dict[str, Profile]
    sessions: SessionManager = field(default_factory=SessionManager)
    client: aiohttp.ClientSession | None = None
    recorder: ReplayRecorder | None = None
    authenticator: Authenticator | None = None
    """API keys (`replayer/app.py` says what they guard); None: nothing is checked."""
    payloads: PayloadCache = field(default_factory=PayloadCache)
    """Decompressed payloads recently served, shared by the sessions (`replayer/payloads.py`)."""
    bodies: BodyBudget = field(default_factory=BodyBudget)
    """Request bodies held by the proxy, reserved before they are read (`replayer/bodies.py`)."""
    heavy: HeavyPool = field(default_factory=HeavyPool)
    """Worker processes for the CPU work on huge request bodies (`replayer/heavy.py`); shut down by the service."""
    _store: Store | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self) -> Store:
        """The store; 503 `store_unavailable` when there is none yet."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = self.open_store()
                except StoreError as err:
                    raise ApiError(503, "store_unavailable", str(err)) from err
            return self._store

    def profile(self, name: str) -> Profile:
        p = self.profiles.get(name)
        if p is None:
            raise ApiError(404, "unknown_profile", f"no upstream profile {redaction.redact_text(name)!r}",
                           profiles=sorted(self.profiles))
        return p
