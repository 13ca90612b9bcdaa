"""What the replayer's handlers share: the store, the sessions, the profiles, the upstream client, the recorder."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from tracetape.collector.auth import Authenticator
from tracetape.collector.store import Store, StoreError
from tracetape.replayer.errors import ApiError
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
            raise ApiError(404, "unknown_profile", f"no upstream profile {name!r}",
                           profiles=sorted(self.profiles))
        return p
