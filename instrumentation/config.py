"""The recorder's configuration, read from the environment of the recording process.

| variable                     | meaning                                                                  | default                          |
|------------------------------|--------------------------------------------------------------------------|----------------------------------|
| `TRACETAPE_RUN_ID`           | the run this process records into                                        | `run-YYYYmmdd-HHMMSS-<6 hex>` (UTC) |
| `TRACETAPE_TENANT`           | tenant of the run                                                        | `default`                        |
| `TRACETAPE_SCOPE`            | scope of the run within the tenant                                       | `default`                        |
| `TRACETAPE_ENDPOINT`         | OTLP/HTTP base URL of the collector; spans go to `{endpoint}/v1/traces`  | `http://127.0.0.1:4318`          |
| `TRACETAPE_API_KEY`          | API key sent to the collector as `x-api-key` (when it requires keys);    | unset                            |
|                              | never logged nor recorded; the collector stores under the key's tenant   |                                  |
| `TRACETAPE_HTTP_HOSTS`       | comma list of `host` or `host:port` whose plain HTTP calls are recorded  | empty                            |
| `TRACETAPE_MODE`             | `record` or `replay`                                                     | `record`                         |
| `TRACETAPE_REPLAY_URL`       | replay mode: the replay session's base URL                               | empty                            |
| `TRACETAPE_REPLAY_PATHS`     | replay mode: JSON {proxy path prefix: upstream base path}; envelopes hash the upstream path | empty |
| `TRACETAPE_ALLOW_MUTATIONS`  | comma list of tool names allowed to run live in replay (`*` = all)       | empty                            |
| `TRACETAPE_RUN_SPAN`         | `external`: the `tracetape run` wrapper owns the run span, and this      | empty (this process owns the run)|
|                              | process parents its spans under `TRACEPARENT` (and `TRACESTATE`)         |                                  |
| `TRACETAPE_MAX_EXPORT_BYTES` | upper bound (estimated) of one OTLP export request                       | 8 MiB                            |
| `TRACETAPE_AGENT_NAME`       | the agent's name (`gen_ai.agent.name`, run span `invoke_agent {name}`)   | derived from the command         |
| `TRACETAPE_DISABLED`         | `1`/`true`/`yes`/`on`: tracetape does nothing in this process            | off                              |
| `TRACETAPE_COLLECTOR_WARNED` | internal: set by `tracetape run` for its child once it has already       | unset                            |
|                              | warned that the collector is unreachable, so the warning is printed once |                                  |

Tenant, scope and run id are ids: 1-128 of `A-Z a-z 0-9 . _ : @ + -` (the collector's key alphabet).
`RecorderConfig.from_env` raises `ConfigError` for an invalid id, mode or size.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tracetape.instrumentation import redaction, runtime

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
DEFAULT_TENANT = "default"
DEFAULT_SCOPE = "default"
DEFAULT_MAX_EXPORT_BYTES = 8 * 1024 * 1024
RUN_SPAN_EXTERNAL = "external"

ENV_RUN_ID = "TRACETAPE_RUN_ID"
ENV_TENANT = "TRACETAPE_TENANT"
ENV_SCOPE = "TRACETAPE_SCOPE"
ENV_ENDPOINT = "TRACETAPE_ENDPOINT"
ENV_API_KEY = "TRACETAPE_API_KEY"
ENV_HTTP_HOSTS = "TRACETAPE_HTTP_HOSTS"
ENV_MODE = "TRACETAPE_MODE"
ENV_REPLAY_URL = "TRACETAPE_REPLAY_URL"
ENV_REPLAY_PATHS = "TRACETAPE_REPLAY_PATHS"
ENV_ALLOW_MUTATIONS = "TRACETAPE_ALLOW_MUTATIONS"
ENV_RUN_SPAN = "TRACETAPE_RUN_SPAN"
ENV_MAX_EXPORT_BYTES = "TRACETAPE_MAX_EXPORT_BYTES"
ENV_AGENT_NAME = "TRACETAPE_AGENT_NAME"
ENV_DISABLED = "TRACETAPE_DISABLED"
ENV_COLLECTOR_WARNED = "TRACETAPE_COLLECTOR_WARNED"

_ID = re.compile(r"[A-Za-z0-9._:@+\-]{1,128}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_MODES = (runtime.MODE_RECORD, runtime.MODE_REPLAY)


class ConfigError(ValueError):
    """An environment variable (or option) with a value tracetape cannot use."""


def check_id(value: str, what: str) -> str:
    """`value` when it is a valid tenant/scope/run id, else `ConfigError` naming `what`."""
    if _ID.fullmatch(value) is None:
        raise ConfigError(f"invalid {what} {value!r}: use 1-128 of A-Z a-z 0-9 . _ : @ + -")
    return value


def new_run_id(now: float | None = None) -> str:
    """A fresh run id: `run-YYYYmmdd-HHMMSS-<6 hex>` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"run-{stamp}-{os.urandom(3).hex()}"


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


def split_list(value: str | None) -> frozenset[str]:
    """A comma-separated list as a set, blanks and surrounding spaces dropped."""
    return frozenset(p.strip() for p in (value or "").split(",") if p.strip())


def parse_replay_paths(raw: str | None) -> tuple[tuple[str, str], ...]:
    """`TRACETAPE_REPLAY_PATHS` (a JSON object: proxy path prefix → upstream base path), longest prefix first."""
    if not raw or not raw.strip():
        return ()
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigError(f"invalid {ENV_REPLAY_PATHS}: not a JSON object") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"invalid {ENV_REPLAY_PATHS}: use {{\"/s/SID/openai\": \"/v1\", ...}}")
    return tuple(sorted(data.items(), key=lambda kv: -len(kv[0])))


@dataclass(frozen=True)
class RecorderConfig:
    """Everything the recording process needs to know; see the module docstring for the variables."""

    run_id: str
    tenant: str = DEFAULT_TENANT
    scope: str = DEFAULT_SCOPE
    endpoint: str = DEFAULT_ENDPOINT
    http_hosts: frozenset[str] = field(default_factory=frozenset)
    mode: str = runtime.MODE_RECORD
    replay_url: str = ""
    replay_paths: tuple[tuple[str, str], ...] = ()
    allow_mutations: frozenset[str] = field(default_factory=frozenset)
    run_span_external: bool = False
    max_export_bytes: int = DEFAULT_MAX_EXPORT_BYTES
    agent_name: str = ""
    disabled: bool = False
    collector_warned: bool = False
    api_key: str = field(default="", repr=False)
    """`TRACETAPE_API_KEY`: sent to the collector only (never in a repr, a log or a span)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RecorderConfig:
        """The configuration the environment gives (`os.environ` by default); `ConfigError` when invalid."""
        env = os.environ if environ is None else environ
        mode = (env.get(ENV_MODE) or runtime.MODE_RECORD).strip().lower()
        if mode not in _MODES:
            raise ConfigError(f"invalid {ENV_MODE} {mode!r}: use record or replay")
        raw_max = (env.get(ENV_MAX_EXPORT_BYTES) or "").strip()
        try:
            max_bytes = int(raw_max) if raw_max else DEFAULT_MAX_EXPORT_BYTES
        except ValueError:
            raise ConfigError(f"invalid {ENV_MAX_EXPORT_BYTES} {raw_max!r}: use a number of bytes") from None
        if max_bytes <= 0:
            raise ConfigError(f"invalid {ENV_MAX_EXPORT_BYTES} {raw_max!r}: must be positive")
        return cls(
            run_id=check_id((env.get(ENV_RUN_ID) or "").strip() or new_run_id(), "run id"),
            tenant=check_id((env.get(ENV_TENANT) or "").strip() or DEFAULT_TENANT, "tenant"),
            scope=check_id((env.get(ENV_SCOPE) or "").strip() or DEFAULT_SCOPE, "scope"),
            endpoint=normalize_endpoint(env.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT),
            http_hosts=frozenset(h.lower() for h in split_list(env.get(ENV_HTTP_HOSTS))),
            mode=mode,
            replay_url=(env.get(ENV_REPLAY_URL) or "").strip(),
            replay_paths=parse_replay_paths(env.get(ENV_REPLAY_PATHS)),
            allow_mutations=split_list(env.get(ENV_ALLOW_MUTATIONS)),
            run_span_external=(env.get(ENV_RUN_SPAN) or "").strip().lower() == RUN_SPAN_EXTERNAL,
            max_export_bytes=max_bytes,
            agent_name=(env.get(ENV_AGENT_NAME) or "").strip(),
            disabled=is_true(env.get(ENV_DISABLED)),
            collector_warned=is_true(env.get(ENV_COLLECTOR_WARNED)),
            api_key=(env.get(ENV_API_KEY) or "").strip(),
        )

    @property
    def traces_url(self) -> str:
        """Where spans are exported: `{endpoint}/v1/traces`."""
        return f"{self.endpoint}/v1/traces"

    def run_context(self) -> runtime.RunContext:
        """The `RunContext` hooks record under."""
        return runtime.RunContext(
            run_id=self.run_id,
            tenant=self.tenant,
            scope=self.scope,
            mode=self.mode,
            http_hosts=self.http_hosts,
            replay_url=self.replay_url,
            allow_mutations=self.allow_mutations,
            upstream_paths=self.replay_paths,
        )

    def to_env(self) -> dict[str, str]:
        """The variables that make a child process record into the same run (`from_env` reads them back)."""
        env = {
            ENV_RUN_ID: self.run_id,
            ENV_TENANT: self.tenant,
            ENV_SCOPE: self.scope,
            ENV_ENDPOINT: self.endpoint,
            ENV_MODE: self.mode,
            ENV_MAX_EXPORT_BYTES: str(self.max_export_bytes),
        }
        if self.http_hosts:
            env[ENV_HTTP_HOSTS] = ",".join(sorted(self.http_hosts))
        if self.replay_url:
            env[ENV_REPLAY_URL] = self.replay_url
        if self.replay_paths:
            env[ENV_REPLAY_PATHS] = json.dumps(dict(self.replay_paths))
        if self.allow_mutations:
            env[ENV_ALLOW_MUTATIONS] = ",".join(sorted(self.allow_mutations))
        if self.run_span_external:
            env[ENV_RUN_SPAN] = RUN_SPAN_EXTERNAL
        if self.agent_name:
            env[ENV_AGENT_NAME] = self.agent_name
        if self.collector_warned:
            env[ENV_COLLECTOR_WARNED] = "1"
        if self.api_key:
            env[ENV_API_KEY] = self.api_key
        return env


def normalize_endpoint(value: str) -> str:
    """The OTLP/HTTP base URL without a trailing slash (nor a trailing `/v1/traces`); `ConfigError` if not http(s)."""
    url = value.strip().rstrip("/")
    if url.endswith("/v1/traces"):
        url = url[: -len("/v1/traces")]
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. `http://[::1`: an unbalanced or invalid IPv6 literal
        valid = False
    if not valid:
        raise ConfigError(f"invalid {ENV_ENDPOINT} {redaction.without_userinfo(value)!r}: use an http(s) URL such as "
                          f"{DEFAULT_ENDPOINT}")
    return url
