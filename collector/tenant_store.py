"""Read access to ONE tenant's data, enforced where the LMDB keys are built.

Contract
--------
`TenantStore(store, tenant, scopes=None)` offers the store's reads with the tenant fixed: `runs`,
`find_run`, `run`, `steps`, `step`, `blob`, `envelope_occurrence`, `envelope_count`, `spans`. It builds
every key itself from its own tenant (`collector/keys.py`: every key starts `tenant \\0 scope \\0`) and
checks, before each read, that the key or scan prefix starts with `tenant \\0` and with an allowed scope;
it never takes a tenant argument and never reads through the store's unrestricted methods (`find_run` without
a scope asks `Store.find_run` for its own tenant only, and keeps what lies there). So whatever a
caller passes, nothing of another tenant (or of a scope the key is not given) can be read: such reads
return None / empty, exactly as for data that does not exist. An invalid id (one that could not be in a
key, e.g. holding `\\0`) reads as absent too.

With API keys configured, the replayer reads only through the TenantStore of the key's principal; without
keys it uses one for the tenant of the run being replayed, so the code path is the same.
"""

from __future__ import annotations

from tracetape.collector import keys, records
from tracetape.collector.records import RunRecord, StepRecord
from tracetape.collector.store import Store, decompress_blob


class TenantStore:
    """`store` seen as one tenant (see module doc). Thread-safe as the Store is; holds no transaction."""

    def __init__(self, store: Store, tenant: str, scopes: frozenset[str] | None = None) -> None:
        self._store = store
        self.tenant = keys.check_id(tenant, "tenant")
        self.scopes = None if scopes is None else frozenset(keys.check_id(s, "scope") for s in scopes)
        self._root = self.tenant.encode() + keys.SEP
        self._prefixes: dict[str, bytes] = {}  # allowed, valid scope -> `tenant \0 scope \0`, checked once

    # --- guards -------------------------------------------------------------------------------------------

    def _scope_prefix(self, scope: str) -> bytes | None:
        """`tenant \\0 scope \\0` for an allowed, valid scope (checked once per scope), else None."""
        prefix = self._prefixes.get(scope)
        if prefix is not None:
            return prefix
        if self.scopes is not None and scope not in self.scopes:
            return None
        try:
            keys.check_id(scope, "scope")
        except keys.InvalidId:
            return None
        prefix = self._prefixes[scope] = self._own(keys.tenant_prefix(self.tenant, scope), scope)
        return prefix

    def _scope_ok(self, scope: str) -> bool:
        return self._scope_prefix(scope) is not None

    def _ids_ok(self, scope: str, *ids: str) -> bool:
        if not self._scope_ok(scope):
            return False
        for value in ids:
            try:
                keys.check_id(value, "id")
            except keys.InvalidId:
                return False
        return True

    def _own(self, key: bytes, scope: str | None) -> bytes:
        """`key` itself, after checking it lies in this tenant's (allowed scope's) part of the key space."""
        inside = key.startswith(self._root) and (
            scope is None or key.startswith(keys.tenant_prefix(self.tenant, scope)))
        if not inside:
            raise AssertionError("TenantStore built a key outside its tenant")  # a bug here, never data
        return key

    def _get(self, table: str, key: bytes, scope: str) -> bytes | None:
        return self._store.get(table, self._own(key, scope))

    def _scan(self, table: str, prefix: bytes, scope: str | None, **kw: object) -> list[tuple[bytes, bytes]]:
        return self._store.scan(table, self._own(prefix, scope), **kw)  # type: ignore[arg-type]

    # --- reads --------------------------------------------------------------------------------------------

    def runs(self, scope: str | None = None) -> list[RunRecord]:
        """This tenant's runs (in `scope`, or every allowed scope), newest first."""
        if scope is not None and not self._scope_ok(scope):
            return []
        prefix = self._root if scope is None else keys.tenant_prefix(self.tenant, scope)
        out = [records.decode_run(v) for _, v in self._scan("runs", prefix, scope)]
        out = [r for r in out if self._scope_ok(r.scope)]
        out.sort(key=lambda r: r.started_ns, reverse=True)
        return out

    def find_run(self, run_id: str, scope: str | None = None) -> list[RunRecord]:
        """This tenant's runs with this id (one per allowed scope at most). Without a scope: one point read per
        scope of the tenant (`Store.find_run`'s seek under `tenant \\0`), not a scan of the tenant's runs."""
        if scope is not None:
            found = self.run(scope, run_id)
            return [found] if found is not None else []
        try:
            keys.check_id(run_id, "id")
        except keys.InvalidId:
            return []
        self._own(self._root, None)
        out = [r for r in self._store.find_run(run_id, self.tenant)
               if r.tenant == self.tenant and r.run_id == run_id and self._scope_ok(r.scope)]
        out.sort(key=lambda r: r.started_ns, reverse=True)  # as `runs()` orders them
        return out

    def run(self, scope: str, run_id: str) -> RunRecord | None:
        if not self._ids_ok(scope, run_id):
            return None
        raw = self._get("runs", keys.run_key(self.tenant, scope, run_id), scope)
        return None if raw is None else records.decode_run(raw)

    def steps(self, scope: str, run_id: str) -> list[StepRecord]:
        """A run's steps in issue order (index = position)."""
        if not self._ids_ok(scope, run_id):
            return []
        pairs = self._scan("steps", keys.step_prefix(self.tenant, scope, run_id), scope)
        return [records.decode_step(v) for _, v in pairs]

    def step(self, scope: str, run_id: str, started_ns: int, step_id: str) -> StepRecord | None:
        if not self._ids_ok(scope, run_id):
            return None
        try:
            key = keys.step_key(self.tenant, scope, run_id, started_ns, step_id)
        except (ValueError, OverflowError, TypeError):  # not a hex step id / not a u64 start
            return None
        raw = self._get("steps", key, scope)
        return None if raw is None else records.decode_step(raw)

    def blob(self, scope: str, digest: bytes) -> bytes | None:
        """A payload's raw bytes, or None when this tenant's scope does not hold it. The key is the scope's
        checked prefix + the 32-byte digest (`keys.blob_key`), so it lies in that scope by construction."""
        prefix = self._scope_prefix(scope)
        if prefix is None or len(digest) != 32:
            return None
        stored = self._store.get("blobs", prefix + digest)
        return None if stored is None else decompress_blob(stored)

    def envelope_occurrence(
        self, scope: str, envelope_hash: str, run_id: str, ordinal: int
    ) -> tuple[int, str, int] | None:
        """The `ordinal`-th (0-based) recorded attempt of this envelope in this run."""
        prefix = self._envelope_prefix(scope, envelope_hash, run_id)
        if prefix is None or ordinal < 0:
            return None
        pairs = self._scan("envelopes", prefix, scope, values=False, limit=ordinal + 1)
        if len(pairs) <= ordinal:
            return None
        return keys.split_envelope_suffix(pairs[ordinal][0][len(prefix):])

    def envelope_count(self, scope: str, envelope_hash: str, run_id: str) -> int:
        prefix = self._envelope_prefix(scope, envelope_hash, run_id)
        return 0 if prefix is None else len(self._scan("envelopes", prefix, scope, values=False))

    def spans(self, scope: str, run_id: str) -> list[bytes]:
        """A run's stored spans (ResourceSpans protobuf each)."""
        if not self._ids_ok(scope, run_id):
            return []
        return [v for _, v in self._scan("spans", keys.span_prefix(self.tenant, scope, run_id), scope)]

    def _envelope_prefix(self, scope: str, envelope_hash: str, run_id: str) -> bytes | None:
        if not self._ids_ok(scope, run_id):
            return None
        try:
            digest = bytes.fromhex(envelope_hash)
        except (ValueError, TypeError):
            return None
        if len(digest) != 32:
            return None
        return keys.envelope_prefix(self.tenant, scope, envelope_hash, run_id)
