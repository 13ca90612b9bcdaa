"""Recently served payloads, decompressed, shared by the sessions of one replayer and bounded in bytes.

Contract:
- `PayloadCache(max_bytes, max_item)` keeps payloads of at most `max_item` bytes, `max_bytes` in all, least
  recently used first out; `max_bytes` 0 keeps nothing. Used from the replayer's event loop only (no lock).
- Keys are the store's blob keys (`tenant \\0 scope \\0 digest`, `collector/keys.py`). Payloads are
  content-addressed, so an entry never goes stale; an entry is added only after the session's `TenantStore`
  read it under that key (its tenant and scope checks passed), so a hit returns exactly what that read would.
Why: a stored payload is zstd-compressed from 256 bytes on; decompressing a 2 KB JSON response costs ≈3–6 µs
and a 14 KB SSE body ≈15 µs per request, as much as the rest of the lookup. Replaying a run again (another
session, a repeated request) serves it from here.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_MAX_ITEM = 1 << 20


class PayloadCache:
    """LRU of decompressed payloads by blob key (see module doc)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_item: int = DEFAULT_MAX_ITEM) -> None:
        self.max_bytes = max(0, max_bytes)
        self.max_item = min(max_item, self.max_bytes)
        self.size = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: bytes, data: bytes) -> None:
        """Keep `data` under `key` when it fits (`max_item`), dropping the least recently used beyond `max_bytes`."""
        if len(data) > self.max_item or key in self._items:
            return
        self._items[key] = data
        self.size += len(data)
        while self.size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)
