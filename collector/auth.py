"""API keys → tenant: who may ingest into, read and replay which tenant's data.

Contract
--------
- Keys are never configured or stored in plaintext. A key is configured by the sha256 hex digest of its
  UTF-8 bytes (`printf %s KEY | sha256sum`), with the tenant it belongs to and, optionally, the scopes
  (the store's second key component, `tenant \\0 scope \\0`) it is limited to; no `scopes` = every scope
  of its tenant.
- `Authenticator.authenticate(key)` hashes the presented key and compares the digest with EVERY
  configured digest using `hmac.compare_digest` (no early exit), returning the `Principal` of the match
  or None. The key itself is never logged, stored, echoed in an error, nor kept after the call.
- Clients send the key as `x-api-key: KEY` or `Authorization: Bearer KEY` (HTTP headers or gRPC
  metadata); `presented_key` reads it (x-api-key first).
- `parse_keys` / `load_keys_file` validate a `keys:` list (the `tracetape_auth` extension of
  otel-config.yaml, its `keys_file`, or `tracetape replayer --api-keys FILE`), raising `KeysError` naming
  the offending place and never quoting a value given as a digest (it may be a pasted key).

Without an `Authenticator` (no keys configured) nothing is checked: the services bind to 127.0.0.1 by
default and that is the protection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tracetape.collector import keys as store_keys
from tracetape.errors import CliError

EXTENSION_TYPE = "tracetape_auth"
HEADER = "x-api-key"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_KEY_FIELDS = ("sha256", "tenant", "scopes")
_PLAINTEXT_FIELDS = ("key", "api_key", "value", "secret", "token")


class KeysError(CliError):
    """An invalid key list; the message starts with the dotted place of the bad entry."""


@dataclass(frozen=True)
class Principal:
    """Who a valid key authenticates: a tenant, and the scopes it is limited to (None = all)."""

    tenant: str
    scopes: frozenset[str] | None = None

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its sha256 digest (32 bytes), never the key."""

    digest: bytes
    principal: Principal

    def __repr__(self) -> str:  # the digest is not secret, but it has no business in logs either
        return f"ApiKey(tenant={self.principal.tenant!r}, scopes={self.principal.scopes!r})"


class Authenticator:
    """The configured keys; `authenticate` maps a presented key to its `Principal` (see module doc)."""

    def __init__(self, api_keys: Sequence[ApiKey]) -> None:
        if not api_keys:
            raise KeysError("no API keys configured")
        self._keys = tuple(api_keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(k.principal.tenant for k in self._keys)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal of `presented`, or None when it is missing or matches no configured key."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for key in self._keys:  # every digest is compared, so the time does not say which one matched
            if hmac.compare_digest(digest, key.digest):
                found = key.principal
        return found


def hash_key(key: str) -> str:
    """The sha256 hex digest to configure for `key` (same as `printf %s KEY | sha256sum`)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `x-api-key`, else in `Authorization: Bearer KEY`; None when neither is there.

    `headers` must look names up case-insensitively (aiohttp's headers) or hold lower-case names.
    """
    value = (headers.get(HEADER) or "").strip()
    if value:
        return value
    scheme, _, token = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def metadata_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """`presented_key` for gRPC invocation metadata (binary `-bin` entries are ignored)."""
    headers = {name.lower(): value for name, value in (metadata or ()) if isinstance(value, str)}
    return presented_key(headers)


# --- configuration --------------------------------------------------------------------------------------


def parse_keys(value: Any, path: str) -> list[ApiKey]:
    """A `keys:` list → `ApiKey`s; `KeysError` naming `path[i].field` for anything invalid."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise KeysError(f"{path}: expected a list of {{sha256, tenant, scopes}} entries")
    out: list[ApiKey] = []
    seen: dict[bytes, int] = {}
    for i, entry in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(entry, dict):
            raise KeysError(f"{where}: expected a mapping with sha256 and tenant")
        plaintext = [f for f in _PLAINTEXT_FIELDS if f in entry]
        if plaintext:
            raise KeysError(f"{where}.{plaintext[0]}: keys are never configured in plaintext; give "
                            f"sha256: <hex digest> (printf %s KEY | sha256sum)")
        for field_name in entry:
            if field_name not in _KEY_FIELDS:
                raise KeysError(f"{where}: unknown key {field_name!r} (known: {', '.join(_KEY_FIELDS)})")
        digest = _digest(entry.get("sha256"), f"{where}.sha256")
        if digest in seen:
            raise KeysError(f"{where}.sha256: the same key is already configured at {path}[{seen[digest]}]")
        seen[digest] = i
        tenant = _id(entry.get("tenant"), f"{where}.tenant", required=True)
        scopes = entry.get("scopes")
        if scopes is not None:
            if not isinstance(scopes, list) or not scopes:
                raise KeysError(f"{where}.scopes: expected a non-empty list of scopes (leave it out for all)")
            scopes = frozenset(_id(s, f"{where}.scopes[{j}]", required=True) for j, s in enumerate(scopes))
        out.append(ApiKey(digest, Principal(tenant, scopes)))
    return out


def load_keys_file(path: str | os.PathLike[str], where: str = "keys_file") -> list[ApiKey]:
    """The keys of a YAML or JSON file holding `{keys: [...]}`; `KeysError` naming the file."""
    import yaml

    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise KeysError(f"{where}: cannot read {name!r}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise KeysError(f"{where}: {name} is not UTF-8 text (invalid byte at offset {err.start})") from None
    except ValueError:  # a NUL in the path (`open` checks it before any system call)
        raise KeysError(f"{where}: cannot read {name!r}: the path contains a NUL byte") from None
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        raise KeysError(f"{where}: {name} is not valid {'JSON' if name.endswith('.json') else 'YAML'}") from None
    if not isinstance(data, dict) or set(data) != {"keys"}:
        raise KeysError(f"{where}: {name} must hold exactly one mapping key, keys: [{{sha256, tenant, scopes}}, ...]")
    return parse_keys(data["keys"], f"{name}: keys")


def authenticator_from_file(path: str | os.PathLike[str]) -> Authenticator:
    """`tracetape replayer --api-keys FILE`: an `Authenticator` over the file's keys."""
    found = load_keys_file(path, "--api-keys")
    if not found:
        raise KeysError(f"--api-keys: {os.fspath(path)} configures no keys")
    return Authenticator(found)


@dataclass(frozen=True)
class AuthExtension:
    """The `tracetape_auth` extension: inline `keys` plus those of `keys_file`."""

    id: str
    authenticator: Authenticator
    keys_file: str | None = None


def parse_extension(cid: str, body: Any) -> AuthExtension:
    """`extensions.tracetape_auth: {keys: [...], keys_file: PATH}` (at least one key in all)."""
    path = f"extensions.{cid}"
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise KeysError(f"{path}: expected a mapping with keys and/or keys_file")
    for name in body:
        if name not in ("keys", "keys_file"):
            raise KeysError(f"{path}: unknown key {name!r} (known: keys, keys_file)")
    found = parse_keys(body.get("keys"), f"{path}.keys")
    keys_file = body.get("keys_file")
    if keys_file is not None:
        if not isinstance(keys_file, str) or not keys_file.strip():
            raise KeysError(f"{path}.keys_file: expected a file path")
        keys_file = os.path.expanduser(keys_file)
        found += load_keys_file(keys_file, f"{path}.keys_file")
    digests = [k.digest for k in found]
    if len(set(digests)) != len(digests):
        raise KeysError(f"{path}: the same key is configured twice (in keys and keys_file)")
    if not found:
        raise KeysError(f"{path}: no keys configured; add keys: [{{sha256: ..., tenant: ...}}] or keys_file")
    return AuthExtension(cid, Authenticator(found), keys_file)


def _digest(value: Any, where: str) -> bytes:
    hint = "the sha256 hex digest of the key: printf %s KEY | sha256sum"
    if not isinstance(value, str):
        raise KeysError(f"{where}: required: {hint}")
    text = re.sub(r"\s+-\s*$", "", value.strip()).lower()  # sha256sum's trailing "  -" is tolerated
    if _HEX64.fullmatch(text) is None:  # never quote the value: it may be a pasted key
        raise KeysError(f"{where}: expected 64 hex digits ({hint}), got {len(value)} characters")
    if text == _EMPTY_SHA256:
        raise KeysError(f"{where}: this is the sha256 of an empty key")
    return bytes.fromhex(text)


def _id(value: Any, where: str, *, required: bool) -> str:
    if value is None and required:
        raise KeysError(f"{where}: required")
    try:
        return store_keys.check_id(value, where.rsplit(".", 1)[-1])
    except store_keys.InvalidId as err:
        raise KeysError(f"{where}: {err}") from None
