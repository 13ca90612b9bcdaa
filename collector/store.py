"""The LMDB store: durable runs, steps, envelope index, content-addressed payloads, raw spans, outbox.

Contract:
- One writer: `apply` writes a list of prepared batches in ONE write transaction (group commit); a batch is
  acknowledged only after that commit returns. A span already stored (same tenant, scope, run, trace id,
  span id) is skipped with everything derived from it, so a re-sent batch never duplicates steps.
- Readers never block and never hold a transaction between calls. Other processes may open the same path
  (`readonly=True`) while the collector writes; when the writer has grown the map they adopt the new size.
- The map grows (doubling, up to `max_map_size`) instead of failing with MDB_MAP_FULL; only when it cannot
  grow any more, or the disk is full, does `apply` raise `StoreFull`, with the store intact (the failed
  transaction is aborted; LMDB's copy-on-write pages leave the last commit as it was).
- Key layout: `collector/keys.py`. Records: `collector/records.py`. Blobs: 1 codec byte + data.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb
import msgspec
import zstandard

from tracetape.collector import keys, records
from tracetape.collector.records import AttemptRecord, RunRecord, StepRecord

T = TypeVar("T")

DB_NAMES = ("runs", "steps", "envelopes", "blobs", "spans", "outbox", "meta")
SCHEMA_VERSION = b"1"
FORWARD_CURSOR = b"fwd:"  # meta key prefix: + a forwarding route's exporter id -> its outbox cursor (seq, 8 BE)

CODEC_RAW = 0
CODEC_ZSTD = 1
_MIN_COMPRESS = 256

DEFAULT_MAP_SIZE = 256 << 20
DEFAULT_MAX_MAP_SIZE = 1 << 40


MAX_ATTEMPTS_PER_STEP = 64
"""Attempts kept in one step record; more (spans claiming a step far past any SDK's retries) count as a
recording error instead of growing the record, which every later attempt of the step rewrites."""


class StoreError(Exception):
    """The store cannot be opened or used."""


class StoreFull(StoreError):
    """The map cannot grow any further (size cap reached or disk full). Nothing was written."""


_tls = threading.local()


def compress_blob(raw: bytes) -> bytes:
    """The stored form of a payload: 1 codec byte + (zstd-compressed or raw) bytes."""
    if len(raw) >= _MIN_COMPRESS:
        comp = getattr(_tls, "zc", None)
        if comp is None:
            comp = _tls.zc = zstandard.ZstdCompressor(level=3)
        packed = comp.compress(raw)
        if len(packed) < len(raw):
            return bytes((CODEC_ZSTD,)) + packed
    return bytes((CODEC_RAW,)) + raw


def decompress_blob(stored: bytes | memoryview) -> bytes:
    codec = stored[0]
    if codec == CODEC_RAW:
        return bytes(stored[1:])
    if codec == CODEC_ZSTD:
        dec = getattr(_tls, "zd", None)
        if dec is None:
            dec = _tls.zd = zstandard.ZstdDecompressor()
        return dec.decompress(bytes(stored[1:]))
    raise StoreError(f"unknown blob codec {codec}")


class StepWrite(msgspec.Struct):
    """One attempt to merge into its step (the step header fields come from the attempt's span)."""

    tenant: str
    scope: str
    run_id: str
    step: StepRecord  # header fields, `attempts` holding exactly the one attempt
    attempt: AttemptRecord


class RunEvent(msgspec.Struct):
    """What a run span or run-start span says about its run."""

    kind: str  # "start" | "end"
    started_ns: int = 0
    ended_ns: int = 0
    trace_id: bytes = b""
    service_name: str = ""
    agent_name: str = ""
    command: list[str] = []
    outcome: str = ""
    exit_code: int | None = None
    canon_profile: str = ""
    replay_of: str = ""
    replay_mode: str = ""
    replay_forced: bool = False
    lineage_depth: int = 0
    recording_error: str = ""  # the run could not be recorded (e.g. `python -I` kept the recorder out)


class SpanWrite(msgspec.Struct):
    """Everything one received span adds to the store."""

    tenant: str
    scope: str
    run_id: str
    span_key: bytes
    stored_span: bytes  # ResourceSpans protobuf, payloads replaced by refs
    blobs: list[tuple[bytes, bytes | None]] = []  # (blob key, stored form or None)
    step: StepWrite | None = None
    run_event: RunEvent | None = None
    forward: bool = True


class Batch(msgspec.Struct):
    """One OTLP request, prepared: the spans to write, and how many were rejected and why.

    A msgspec Struct, so that a batch prepared in an ingest worker process crosses to the writer as
    MessagePack (`encode_batch` / `decode_batch`), several times faster than pickle."""

    spans: list[SpanWrite] = []
    rejected: int = 0
    errors: list[str] = []


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(Batch)


def encode_batch(batch: Batch) -> bytes:
    return _batch_encoder.encode(batch)


def decode_batch(data: bytes) -> Batch:
    return _batch_decoder.decode(data)


@dataclass
class BatchResult:
    accepted: int = 0
    duplicates: int = 0


class Store:
    """An LMDB environment holding the tracetape databases. Thread-safe; one per process per path."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        max_map_size: int = DEFAULT_MAX_MAP_SIZE,
        readonly: bool = False,
        max_readers: int = 1024,
        sync: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self.max_map_size = max(max_map_size, map_size)
        if readonly and not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise StoreError(f"no tracetape store at {self.path}")
        if not readonly:
            os.makedirs(self.path, exist_ok=True)
        try:
            self.env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=len(DB_NAMES) + 2,
                max_readers=max_readers,
                readonly=readonly,
                sync=sync,
                metasync=sync,
                readahead=False,
                lock=True,
            )
        except lmdb.Error as err:
            raise StoreError(f"cannot open the store at {self.path}: {err}") from err
        # Readers left behind by killed processes hold pages and slots: clear them at open.
        self.env.reader_check()
        self._gate = threading.Condition()
        self._readers = 0
        self._resizing = False
        self._write_lock = threading.Lock()
        self._dbs: dict[str, lmdb._Database] = {}
        if readonly:
            for name in DB_NAMES:
                try:
                    self._dbs[name] = self.env.open_db(name.encode(), create=False)
                except (lmdb.NotFoundError, lmdb.IncompatibleError) as err:  # absent, or a plain key of that name
                    raise StoreError(f"{self.path} is not a tracetape store (no {name!r} table)") from err
        else:
            with self.env.begin(write=True) as txn:
                for name in DB_NAMES:
                    try:
                        self._dbs[name] = self.env.open_db(name.encode(), txn=txn, create=True)
                    except lmdb.IncompatibleError as err:  # another program's LMDB with a plain key of that name
                        raise StoreError(f"{self.path} is not a tracetape store ({name!r} is not a table)") from err
                meta = self._dbs["meta"]
                version = txn.get(b"schema", db=meta)
                if version is None:
                    txn.put(b"schema", SCHEMA_VERSION, db=meta)
                elif version != SCHEMA_VERSION:
                    raise StoreError(f"store schema {version!r} is not {SCHEMA_VERSION!r}")
        with self._read() as txn:
            self._outbox_seq = _last_outbox_seq(txn, self._dbs["outbox"])

    # ----------------------------------------------------------------------------------------------
    # transactions

    def _begin_read(self) -> lmdb.Transaction:
        """A read transaction; adopts the size another process grew the map to."""
        try:
            return self.env.begin(buffers=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(buffers=False)

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        if self.readonly:  # nothing in a read-only process resizes the map (no `_grow`): the gate is moot
            txn = self._begin_read()
            try:
                yield txn
            finally:
                txn.abort()
            return
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._readers += 1
        try:
            txn = self._begin_read()
            try:
                yield txn
            finally:
                txn.abort()
        finally:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()

    def _grow(self) -> None:
        current = self.env.info()["map_size"]
        if current >= self.max_map_size:
            raise StoreFull(f"the store is full: map size {current} bytes reached its cap")
        with self._gate:
            self._resizing = True
            while self._readers:
                self._gate.wait()
            try:
                self.env.set_mapsize(min(current * 2, self.max_map_size))
            except lmdb.Error as err:
                raise StoreFull(f"the store cannot grow: {err}") from err
            finally:
                self._resizing = False
                self._gate.notify_all()

    def _write(self, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run `body` in one write transaction, growing the map and retrying on MDB_MAP_FULL."""
        if self.readonly:
            raise StoreError("the store is open read-only")
        with self._write_lock:
            while True:
                try:
                    txn = self.env.begin(write=True)
                    try:
                        result = body(txn)
                    except BaseException:
                        txn.abort()
                        raise
                    try:
                        txn.commit()
                    except (lmdb.MapFullError, lmdb.MapResizedError):
                        raise
                    except (OSError, lmdb.Error) as err:  # a full disk: ENOSPC, or EIO from mdb_txn_commit
                        raise StoreFull(f"the store cannot write (disk full?): {err}") from err
                    return result
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)

    # ----------------------------------------------------------------------------------------------
    # writing

    def apply(self, batches: Sequence[Batch], *, outbox: bool = True) -> list[BatchResult]:
        """Write every batch in one transaction; per batch, how many spans were new and how many repeats.

        `outbox=False` (nothing is forwarded) writes no outbox entries, whatever the spans' `forward` says."""

        def body(txn: lmdb.Transaction) -> list[BatchResult]:
            if outbox:  # another process (an import, a second collector) may have queued entries since
                self._outbox_seq = max(self._outbox_seq, _last_outbox_seq(txn, self._dbs["outbox"]))
            runs: dict[bytes, RunRecord] = {}  # each touched run read and written once per commit
            results = [self._apply_batch(txn, b, runs, outbox) for b in batches]
            for key, run in runs.items():
                run.replayable, run.reason = records.verdict(run)
                txn.put(key, records.encode(run), db=self._dbs["runs"])
            return results

        return self._write(body)

    def _apply_batch(
        self, txn: lmdb.Transaction, batch: Batch, runs: dict[bytes, RunRecord], outbox: bool
    ) -> BatchResult:
        result = BatchResult()
        spans_db, blobs_db, outbox_db = self._dbs["spans"], self._dbs["blobs"], self._dbs["outbox"]
        for span in batch.spans:
            if not txn.put(span.span_key, span.stored_span, db=spans_db, overwrite=False):
                result.duplicates += 1
                continue
            result.accepted += 1
            for key, stored in span.blobs:
                if stored is not None:
                    txn.put(key, stored, db=blobs_db, overwrite=False)
            if span.run_id != keys.NO_RUN:
                run_key = keys.run_key(span.tenant, span.scope, span.run_id)
                run = runs.get(run_key)
                if run is None:
                    run = runs[run_key] = self._load_run(txn, span.tenant, span.scope, span.run_id)
                run.span_count += 1
                if span.step is not None:
                    self._merge_step(txn, span.step, run)
                if span.run_event is not None:
                    _apply_run_event(run, span.run_event)
            if outbox and span.forward:
                self._outbox_seq += 1
                txn.put(keys.outbox_key(self._outbox_seq), span.span_key, db=outbox_db)
        return result

    def _load_run(self, txn: lmdb.Transaction, tenant: str, scope: str, run_id: str) -> RunRecord:
        raw = txn.get(keys.run_key(tenant, scope, run_id), db=self._dbs["runs"])
        if raw is None:
            return RunRecord(run_id=run_id, tenant=tenant, scope=scope)
        return records.decode_run(raw)

    def _merge_step(self, txn: lmdb.Transaction, write: StepWrite, run: RunRecord) -> None:
        new = write.step
        key = keys.step_key(write.tenant, write.scope, write.run_id, new.started_ns, new.step_id)
        raw = txn.get(key, db=self._dbs["steps"])
        if raw is None:
            step = new
            step.attempts = [write.attempt]
            run.step_count += 1
            if not run.started_ns or new.started_ns < run.started_ns:
                run.started_ns = new.started_ns
        else:
            step = records.decode_step(raw)
            if len(step.attempts) >= MAX_ATTEMPTS_PER_STEP:  # far past any SDK's retries: a client that lost
                run.recording_errors += 1  # track (or a hostile one); the record stays bounded, the run says so
                return
            if write.attempt.attempt == 0:  # the first attempt's view of the call wins
                step.name, step.kind, step.envelope_hash = new.name, new.kind, new.envelope_hash
                step.request_model, step.provider = new.request_model, new.provider
            same = write.attempt.attempt, write.attempt.span_id
            if any(a.attempt == same[0] and a.span_id != same[1] for a in step.attempts):
                run.recording_errors += 1  # two spans claim one attempt: keep both, the tape lost track
            step.attempts = sorted(
                [a for a in step.attempts if (a.attempt, a.span_id) != same] + [write.attempt],
                key=lambda a: a.attempt,
            )
        if write.attempt.recording_error:
            run.recording_errors += 1
        txn.put(key, records.encode(step), db=self._dbs["steps"])
        if not write.attempt.envelope_hash:  # its recording failed before the request was hashed: no envelope
            return
        env_key = keys.envelope_key(
            write.tenant, write.scope, write.attempt.envelope_hash, write.run_id,
            new.started_ns, new.step_id, write.attempt.attempt,
        )
        txn.put(env_key, b"", db=self._dbs["envelopes"])

    def invalidate(self, tenant: str, scope: str, run_id: str, reason: str) -> RunRecord:
        """Mark a run not replayable (`manually_invalidated`) with a reason. KeyError if there is no such run."""

        def body(txn: lmdb.Transaction) -> RunRecord:
            key = keys.run_key(tenant, scope, run_id)
            raw = txn.get(key, db=self._dbs["runs"])
            if raw is None:
                raise KeyError(run_id)
            run = records.decode_run(raw)
            run.invalidated, run.invalidated_reason = True, reason
            run.replayable, run.reason = records.verdict(run)
            txn.put(key, records.encode(run), db=self._dbs["runs"])
            return run

        return self._write(body)

    # ----------------------------------------------------------------------------------------------
    # outbox (forwarding queue)

    def outbox_read(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` oldest outbox entries: (seq, stored span)."""
        out: list[tuple[int, bytes]] = []
        with self._read() as txn:
            spans = self._dbs["spans"]
            for key, span_key in txn.cursor(db=self._dbs["outbox"]):
                stored = txn.get(span_key, db=spans)
                if stored is not None:
                    out.append((keys.outbox_seq(key), stored))
                if len(out) >= limit:
                    break
        return out

    def outbox_ack(self, seqs: Sequence[int]) -> None:
        """Remove delivered (or permanently rejected) outbox entries."""

        def body(txn: lmdb.Transaction) -> None:
            for seq in seqs:
                txn.delete(keys.outbox_key(seq), db=self._dbs["outbox"])
            self._forget_cursors_if_empty(txn)

        self._write(body)

    # Each forwarding route's cursor: the last outbox seq it is done with (delivered or dropped), in `meta`
    # under FORWARD_CURSOR + route id (0 when absent). Invariant: no cursor is past the newest outbox entry,
    # and none is kept once the outbox is empty, since `apply` may then number new entries from 1 again.

    def outbox_read_after(self, route: str, limit: int) -> list[tuple[int, bytes | None]]:
        """Up to `limit` outbox entries after `route`'s cursor, oldest first: (seq, stored span), the span None
        when it is gone (the route passes over it)."""
        out: list[tuple[int, bytes | None]] = []
        with self._read() as txn:
            after = _cursor(txn, self._dbs["meta"], route)
            spans, cur = self._dbs["spans"], txn.cursor(db=self._dbs["outbox"])
            if limit > 0 and cur.set_range(keys.outbox_key(after + 1)):
                for key, span_key in cur:
                    out.append((keys.outbox_seq(key), txn.get(span_key, db=spans)))
                    if len(out) >= limit:
                        break
        return out

    def outbox_advance(self, route: str, seq: int, routes: Sequence[str]) -> int:
        """`route` is done with every outbox entry up to `seq`: store its cursor and, in the same write
        transaction, delete the entries every one of `routes` (the configured ones; other cursors are ignored)
        is done with. Returns how many entries were deleted."""

        def body(txn: lmdb.Transaction) -> int:
            meta, outbox = self._dbs["meta"], self._dbs["outbox"]
            if seq > _cursor(txn, meta, route):
                txn.put(FORWARD_CURSOR + route.encode(), keys.outbox_key(seq), db=meta)
            upto = min(_cursor(txn, meta, r) for r in {route, *routes})
            done = []
            cur = txn.cursor(db=outbox)
            if cur.first():
                for key in cur.iternext(keys=True, values=False):
                    if keys.outbox_seq(key) > upto:
                        break
                    done.append(key)
            for key in done:
                txn.delete(key, db=outbox)
            self._forget_cursors_if_empty(txn)
            return len(done)

        return self._write(body)

    def outbox_backlog(self, routes: Sequence[str]) -> dict[str, int]:
        """How many outbox entries each route has not done yet (after its cursor). One read transaction;
        counts by walking the shorter side of the cursor."""
        out: dict[str, int] = {}
        with self._read() as txn:
            outbox = self._dbs["outbox"]
            total = txn.stat(outbox)["entries"]
            cur = txn.cursor(db=outbox)
            first = keys.outbox_seq(cur.key()) if cur.first() else 0
            last = keys.outbox_seq(cur.key()) if cur.last() else 0
            for route in routes:
                at = _cursor(txn, self._dbs["meta"], route)
                if not total or at < first:
                    out[route] = total
                elif at >= last:
                    out[route] = 0
                elif last - at <= at - first:  # count the entries after the cursor
                    n = 0
                    if cur.set_range(keys.outbox_key(at + 1)):
                        n = sum(1 for _ in cur.iternext(keys=True, values=False))
                    out[route] = n
                else:  # count the entries up to the cursor
                    n = 0
                    if cur.first():
                        for key in cur.iternext(keys=True, values=False):
                            if keys.outbox_seq(key) > at:
                                break
                            n += 1
                    out[route] = total - n
        return out

    def _forget_cursors_if_empty(self, txn: lmdb.Transaction) -> None:
        if txn.stat(self._dbs["outbox"])["entries"]:
            return
        meta = self._dbs["meta"]
        cur = txn.cursor(db=meta)
        stale = []
        if cur.set_range(FORWARD_CURSOR):
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(FORWARD_CURSOR):
                    break
                stale.append(key)
        for key in stale:
            txn.delete(key, db=meta)

    def outbox_size(self) -> int:
        with self._read() as txn:
            return txn.stat(self._dbs["outbox"])["entries"]

    # ----------------------------------------------------------------------------------------------
    # reading

    def has_blob(self, tenant: str, scope: str, digest: bytes) -> bool:
        with self._read() as txn:
            return txn.get(keys.blob_key(tenant, scope, digest), db=self._dbs["blobs"]) is not None

    def missing_blobs(self, blob_keys: Sequence[bytes]) -> set[bytes]:
        """Which of these blob keys are not stored yet (one read transaction)."""
        with self._read() as txn:
            db = self._dbs["blobs"]
            return {k for k in blob_keys if txn.get(k, db=db) is None}

    def blob(self, tenant: str, scope: str, digest: bytes) -> bytes | None:
        """A payload's raw bytes, or None when it is not stored."""
        with self._read() as txn:
            stored = txn.get(keys.blob_key(tenant, scope, digest), db=self._dbs["blobs"])
        return None if stored is None else decompress_blob(stored)

    def run(self, tenant: str, scope: str, run_id: str) -> RunRecord | None:
        with self._read() as txn:
            raw = txn.get(keys.run_key(tenant, scope, run_id), db=self._dbs["runs"])
        return None if raw is None else records.decode_run(raw)

    def runs(self, tenant: str | None = None, scope: str | None = None) -> list[RunRecord]:
        """Runs, newest first; all tenants/scopes unless given."""
        prefix = b""
        if tenant is not None:
            prefix = keys.tenant_prefix(tenant, scope) if scope is not None else tenant.encode() + keys.SEP
        out: list[RunRecord] = []
        with self._read() as txn:
            cur = txn.cursor(db=self._dbs["runs"])
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    out.append(records.decode_run(value))
        out.sort(key=lambda r: r.started_ns, reverse=True)
        return out

    def find_run(self, run_id: str, tenant: str | None = None, scope: str | None = None) -> list[RunRecord]:
        """Runs with this id (in any tenant/scope unless given)."""
        if tenant is not None and scope is not None:
            found = self.run(tenant, scope, run_id)
            return [found] if found else []
        # One point read per (tenant, scope) present, jumping over each one's runs: O(tenant/scope pairs),
        # not O(runs) (ids never hold bytes below \x01, so `T \0 S \x01` sorts after every `T \0 S \0 run`).
        out: list[RunRecord] = []
        start = b"" if tenant is None else tenant.encode() + keys.SEP
        with self._read() as txn:
            db = self._dbs["runs"]
            cur = txn.cursor(db=db)
            ok = cur.set_range(start)
            while ok:
                key = cur.key()
                if not key.startswith(start):
                    break
                t, s, _ = key.split(keys.SEP, 2)
                raw = txn.get(t + keys.SEP + s + keys.SEP + run_id.encode(), db=db)
                if raw is not None:
                    out.append(records.decode_run(raw))
                ok = cur.set_range(t + keys.SEP + s + b"\x01")
        return out

    def steps(self, tenant: str, scope: str, run_id: str) -> list[StepRecord]:
        """A run's steps in issue order (index = position)."""
        with self._read() as txn:
            values = self._under(txn, "steps", keys.step_prefix(tenant, scope, run_id))
        return [records.decode_step(v) for v in values]

    def run_and_steps(self, tenant: str, scope: str, run_id: str) -> tuple[RunRecord | None, list[StepRecord]]:
        """A run's record and its steps as of one moment (one read transaction: a commit in between is seen
        whole or not at all, so the record's counts agree with the steps)."""
        with self._read() as txn:
            raw = txn.get(keys.run_key(tenant, scope, run_id), db=self._dbs["runs"])
            values = self._under(txn, "steps", keys.step_prefix(tenant, scope, run_id))
        return (None if raw is None else records.decode_run(raw)), [records.decode_step(v) for v in values]

    def run_and_spans(self, tenant: str, scope: str, run_id: str) -> tuple[RunRecord | None, list[bytes]]:
        """A run's record and its stored spans as of one moment (see `run_and_steps`)."""
        with self._read() as txn:
            raw = txn.get(keys.run_key(tenant, scope, run_id), db=self._dbs["runs"])
            spans = self._under(txn, "spans", keys.span_prefix(tenant, scope, run_id))
        return (None if raw is None else records.decode_run(raw)), spans

    def _under(self, txn: lmdb.Transaction, table: str, prefix: bytes) -> list[bytes]:
        """The values of `table` whose keys start with `prefix`, in key order."""
        out: list[bytes] = []
        cur = txn.cursor(db=self._dbs[table])
        if cur.set_range(prefix):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                out.append(value)
        return out

    def envelope_occurrence(
        self, tenant: str, scope: str, envelope_hash: str, run_id: str, ordinal: int
    ) -> tuple[int, str, int] | None:
        """The `ordinal`-th (0-based) recorded attempt of this envelope in this run: (started_ns, step_id, attempt)."""
        prefix = keys.envelope_prefix(tenant, scope, envelope_hash, run_id)
        with self._read() as txn:
            cur = txn.cursor(db=self._dbs["envelopes"])
            if not cur.set_range(prefix):
                return None
            for i, key in enumerate(cur.iternext(keys=True, values=False)):
                if not key.startswith(prefix):
                    return None
                if i == ordinal:
                    return keys.split_envelope_suffix(key[len(prefix):])
        return None

    def envelope_count(self, tenant: str, scope: str, envelope_hash: str, run_id: str) -> int:
        """How many recorded attempts of this run have this envelope."""
        prefix = keys.envelope_prefix(tenant, scope, envelope_hash, run_id)
        n = 0
        with self._read() as txn:
            cur = txn.cursor(db=self._dbs["envelopes"])
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    n += 1
        return n

    def step(self, tenant: str, scope: str, run_id: str, started_ns: int, step_id: str) -> StepRecord | None:
        with self._read() as txn:
            raw = txn.get(keys.step_key(tenant, scope, run_id, started_ns, step_id), db=self._dbs["steps"])
        return None if raw is None else records.decode_step(raw)

    def spans(self, tenant: str, scope: str, run_id: str) -> list[bytes]:
        """A run's stored spans (ResourceSpans protobuf each, payloads as refs)."""
        with self._read() as txn:
            return self._under(txn, "spans", keys.span_prefix(tenant, scope, run_id))

    def get(self, table: str, key: bytes) -> bytes | None:
        """The stored value under `key` in `table` (blobs in their stored form), or None."""
        if self.readonly:  # `_read` without its generator: the replayer's per-request blob read
            txn = self._begin_read()
            try:
                return txn.get(key, db=self._dbs[table])
            finally:
                txn.abort()
        with self._read() as txn:
            return txn.get(key, db=self._dbs[table])

    def scan(
        self, table: str, prefix: bytes, *, values: bool = True, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """(key, value) pairs of `table` whose key starts with `prefix`, in key order (values b"" when
        `values` is False); at most `limit` pairs. One read transaction."""
        out: list[tuple[bytes, bytes]] = []
        if limit is not None and limit <= 0:
            return out
        with self._read() as txn:
            cur = txn.cursor(db=self._dbs[table])
            if not cur.set_range(prefix):
                return out
            pairs = (cur.iternext(keys=True, values=True) if values
                     else ((k, b"") for k in cur.iternext(keys=True, values=False)))
            for key, value in pairs:
                if not key.startswith(prefix):
                    break
                out.append((key, value))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def stats(self) -> dict[str, int]:
        """Entry counts per table and the map size; for health endpoints and benchmarks."""
        with self._read() as txn:
            out = {name: txn.stat(db)["entries"] for name, db in self._dbs.items()}
        info = self.env.info()
        out["map_size"] = info["map_size"]
        out["last_pgno"] = info["last_pgno"]
        return out

    def dump(self) -> Iterator[tuple[str, bytes, bytes]]:
        """Every (table, key, stored value) — blobs decompressed. For audits (e.g. secrets checks)."""
        with self._read() as txn:
            for name, db in self._dbs.items():
                for key, value in txn.cursor(db=db):
                    yield name, key, decompress_blob(value) if name == "blobs" else value

    def close(self) -> None:
        self.env.close()


def _apply_run_event(run: RunRecord, ev: RunEvent) -> None:
    if ev.trace_id and not run.trace_id:
        run.trace_id = ev.trace_id
    if ev.started_ns and (not run.started_ns or ev.started_ns < run.started_ns):
        run.started_ns = ev.started_ns
    for name in ("service_name", "agent_name", "canon_profile", "replay_of", "replay_mode"):
        value = getattr(ev, name)
        if value:
            setattr(run, name, value)
    if ev.command:
        run.command = ev.command
    if ev.replay_forced:
        run.replay_forced = True
    if ev.lineage_depth:
        run.lineage_depth = ev.lineage_depth
    if ev.recording_error:  # counted once: a span already stored is a duplicate and never applied again
        run.recording_errors += 1
    if ev.kind == "end":
        run.status = records.outcome_to_status(ev.outcome)
        run.exit_code = ev.exit_code
        run.ended_ns = ev.ended_ns


def _cursor(txn: lmdb.Transaction, meta: Any, route: str) -> int:
    """A forwarding route's outbox cursor (0 when it has none)."""
    raw = txn.get(FORWARD_CURSOR + route.encode(), db=meta)
    return 0 if raw is None else keys.outbox_seq(raw)


def _last_outbox_seq(txn: lmdb.Transaction, db: Any) -> int:
    """The sequence number of the newest outbox entry (0 when there is none)."""
    cur = txn.cursor(db=db)
    return keys.outbox_seq(cur.key()) if cur.last() else 0
