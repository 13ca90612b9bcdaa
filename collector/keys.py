"""The LMDB key layout. Every key of tenant data begins with `tenant \\0 scope \\0`.

| database    | key                                                            | value                       |
|-------------|----------------------------------------------------------------|-----------------------------|
| `runs`      | T S run                                                        | RunRecord (msgpack)         |
| `steps`     | T S run \\0 started_ns(8, BE) step_id(8)                        | StepRecord (msgpack)        |
| `envelopes` | T S hash(32) run \\0 started_ns(8) step_id(8) attempt(2)        | empty                       |
| `blobs`     | T S digest(32)                                                 | codec(1) + compressed bytes |
| `spans`     | T S run \\0 trace_id(16) span_id(8)                             | ResourceSpans protobuf      |
| `outbox`    | seq(8, BE)                                                     | a `spans` key               |
| `meta`      | name                                                           | value                       |

(`T S` = `tenant \\0 scope \\0`.) Steps sort by the start of their first attempt, so a prefix scan of
`T S run \\0` yields a run's steps in the order they were issued, and a step's index is its position in
that scan. The envelope index sorts a run's identical envelopes the same way, so "the k-th occurrence of
this envelope in this run" is one cursor seek plus k steps, whatever the store holds. The outbox is the
collector's own forwarding queue; its values are tenant-scoped `spans` keys.
"""

from __future__ import annotations

import re
import struct

SEP = b"\x00"
_ID = re.compile(r"[A-Za-z0-9._:@+\-]{1,128}")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")

DEFAULT_TENANT = "default"
DEFAULT_SCOPE = "default"
NO_RUN = "_"
"""The run id of spans that carry none (foreign spans): stored for forwarding only."""


class InvalidId(ValueError):
    """A tenant, scope or run id that cannot be part of a key."""


def check_id(value: str, what: str) -> str:
    """`value` if it is a valid id (1-128 of `A-Z a-z 0-9 . _ : @ + -`), else `InvalidId`."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise InvalidId(f"invalid {what} {value!r}: use 1-128 of A-Z a-z 0-9 . _ : @ + -")
    return value


def tenant_prefix(tenant: str, scope: str) -> bytes:
    return tenant.encode() + SEP + scope.encode() + SEP


def run_key(tenant: str, scope: str, run_id: str) -> bytes:
    return tenant_prefix(tenant, scope) + run_id.encode()


def run_from_key(key: bytes) -> tuple[str, str, str]:
    tenant, scope, run = key.split(SEP, 2)
    return tenant.decode(), scope.decode(), run.decode()


def step_prefix(tenant: str, scope: str, run_id: str) -> bytes:
    return tenant_prefix(tenant, scope) + run_id.encode() + SEP


def step_key(tenant: str, scope: str, run_id: str, started_ns: int, step_id: str) -> bytes:
    return step_prefix(tenant, scope, run_id) + _U64.pack(started_ns) + bytes.fromhex(step_id)


def envelope_prefix(tenant: str, scope: str, envelope_hash: str, run_id: str) -> bytes:
    return tenant_prefix(tenant, scope) + bytes.fromhex(envelope_hash) + run_id.encode() + SEP


def envelope_key(
    tenant: str, scope: str, envelope_hash: str, run_id: str, started_ns: int, step_id: str, attempt: int
) -> bytes:
    return (
        envelope_prefix(tenant, scope, envelope_hash, run_id)
        + _U64.pack(started_ns)
        + bytes.fromhex(step_id)
        + _U16.pack(attempt)
    )


def split_envelope_suffix(suffix: bytes) -> tuple[int, str, int]:
    """(started_ns, step_id, attempt) from the 18 bytes after an envelope prefix."""
    return _U64.unpack(suffix[:8])[0], suffix[8:16].hex(), _U16.unpack(suffix[16:18])[0]


def blob_key(tenant: str, scope: str, digest: bytes) -> bytes:
    return tenant_prefix(tenant, scope) + digest


def span_key(tenant: str, scope: str, run_id: str, trace_id: bytes, span_id: bytes) -> bytes:
    return tenant_prefix(tenant, scope) + run_id.encode() + SEP + trace_id + span_id


def span_prefix(tenant: str, scope: str, run_id: str) -> bytes:
    return tenant_prefix(tenant, scope) + run_id.encode() + SEP


def outbox_key(seq: int) -> bytes:
    return _U64.pack(seq)


def outbox_seq(key: bytes) -> int:
    return _U64.unpack(key)[0]
