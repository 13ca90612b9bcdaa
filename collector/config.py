"""The collector's configuration: `otel-config.yaml`, in the OpenTelemetry Collector's own shape.

Contract
--------
`load(path)` / `parse(mapping)` return a frozen `CollectorConfig` or raise `ConfigError` whose message
names the offending place, e.g. `exporters.otlphttp/jaeger: unknown key 'endpointt' (did you mean
'endpoint'?)`. Nothing is started from a config that has not parsed completely.

Shape (every section optional; `default_config()` is what an absent file means)::

    receivers:
      otlp:                              # component ids are `type` or `type/name`, as in the collector
        protocols:
          grpc: {endpoint: 127.0.0.1:4317, max_recv_msg_size_mib: 64}
          http: {endpoint: 127.0.0.1:4318, max_request_body_size: 67108864}
    processors:
      tracetape_slim: {max_attribute_bytes: 16384}    # preview cap per attribute in forwarded copies
    exporters:
      tracetape: {path: .tracetape/data, map_size: 8GiB, max_pending_bytes: 256MiB,   # the LMDB store
                  ingest_processes: 0}   # > 0: worker processes prepare spans (default 0: threads)
      otlphttp/jaeger: {endpoint: "http://127.0.0.1:14318", timeout: 10s, headers: {}, compression: gzip}
      otlp/jaeger: {endpoint: "127.0.0.1:14317", tls: {insecure: true}}               # gRPC
    extensions:                          # optional: API keys (see collector/auth.py); off unless listed below
      tracetape_auth: {keys: [{sha256: <hex>, tenant: acme, scopes: [prod]}], keys_file: keys.yaml}
                                         # (keys_file relative to the working directory, read at load)
    service:
      extensions: [tracetape_auth]       # turns it on; every storing receiver's protocols must then say
                                         # auth: {authenticator: tracetape_auth}
      pipelines:
        traces:        {receivers: [otlp], exporters: [tracetape]}
        traces/jaeger: {receivers: [otlp], processors: [tracetape_slim], exporters: [otlphttp/jaeger]}

Semantics that differ from the OpenTelemetry Collector, on purpose:
- A *storing* pipeline (exporter `tracetape`) has no processors: the store records spans as received.
  A receiver acknowledges a request only after the store's write transaction has committed.
- A *forwarding* pipeline (`otlp`/`otlphttp` exporters) is not fed by its receivers directly: it is fed
  from the store's outbox after commit, so what is forwarded has been stored first, a slow or absent
  backend never delays recording, and nothing acknowledged is lost if the collector stops before
  forwarding. Its receivers must be receivers of a storing pipeline; its only processor is
  `tracetape_slim` (the default cap applies when none is listed).
- A protocol present under `protocols:` (even empty) is enabled; an absent one is not. An `otlp`
  receiver without `protocols:` enables both.
- API keys (`tracetape_auth`) are all or nothing: once the extension is listed in `service.extensions`,
  every protocol of every storing receiver must name it (`auth: {authenticator: tracetape_auth}`), so no
  port accepts unauthenticated spans; defining it without listing it, or naming it from a receiver
  without listing it, is an error too (never a silently open collector). At most one is enabled.

Values: sizes are integers (bytes) or strings such as `64MiB`, `1GiB`, `500MB`; durations are numbers
(seconds) or Go-style strings (`500ms`, `10s`, `1m30s`). Scalars may use `${env:VAR}`, `${env:VAR:-default}`
or `${VAR}`; `$$` is a literal `$`. CLI overrides (`--data`, `--host`, `--http-port`, `--grpc-port`) are
applied afterwards by `with_overrides`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tracetape.collector import auth as auth_ext
from tracetape.errors import CliError

DEFAULT_GRPC_ENDPOINT = "127.0.0.1:4317"
DEFAULT_HTTP_ENDPOINT = "127.0.0.1:4318"
DEFAULT_MAX_RECV_MSG_SIZE_MIB = 64
MAX_RECV_MSG_SIZE_MIB = (2**31 - 1) // 2**20
"""2047: gRPC takes the limit in bytes as a C int (signed 32-bit)."""
DEFAULT_MAX_REQUEST_BODY_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_ATTRIBUTE_BYTES = 16 * 1024
DEFAULT_STORE_PATH = ".tracetape/data"
DATA_ENV = "TRACETAPE_DATA"
"""The store directory when the config names none (`${TRACETAPE_DATA}`, else `DEFAULT_STORE_PATH`)."""
DEFAULT_MAP_SIZE = 8 * 1024**3
DEFAULT_MAX_PENDING_BYTES = 256 * 1024**2
DEFAULT_INGEST_PROCESSES = 0
"""Threads by default: on the 2-core machine measured (docs/benchmarks.md) worker processes were faster
only for repeated payloads, and they cost ~60 MiB of memory each."""
DEFAULT_EXPORT_TIMEOUT = 10.0
DEFAULT_BATCH_SPANS = 512
DEFAULT_BATCH_BYTES = 3 * 1024 * 1024  # under the 4 MiB gRPC message cap most backends keep

STORE_TYPE = "tracetape"
SLIM_TYPE = "tracetape_slim"
OTLP_RECEIVER_TYPE = "otlp"
OTLP_GRPC_EXPORTER_TYPES = ("otlp",)
OTLP_HTTP_EXPORTER_TYPES = ("otlphttp", "otlp_http")
RECEIVER_TYPES = (OTLP_RECEIVER_TYPE,)
PROCESSOR_TYPES = (SLIM_TYPE,)
EXPORTER_TYPES = (STORE_TYPE, *OTLP_GRPC_EXPORTER_TYPES, *OTLP_HTTP_EXPORTER_TYPES)
EXTENSION_TYPES: tuple[str, ...] = (auth_ext.EXTENSION_TYPE,)
SIGNALS = ("traces",)
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")


class ConfigError(CliError):
    """An invalid configuration; the message starts with the dotted path of the bad key or component."""


# --- config objects -------------------------------------------------------------------------------------


class _Listener:
    """A server protocol's `endpoint` (`host:port`) split into its parts."""

    endpoint: str

    @property
    def host(self) -> str:
        return split_endpoint(self.endpoint, "endpoint")[0]

    @property
    def port(self) -> int:
        return split_endpoint(self.endpoint, "endpoint")[1]


@dataclass(frozen=True)
class GrpcProtocol(_Listener):
    """OTLP/gRPC server settings."""

    endpoint: str = DEFAULT_GRPC_ENDPOINT
    max_recv_msg_size_mib: int = DEFAULT_MAX_RECV_MSG_SIZE_MIB
    authenticator: str | None = None
    """`auth.authenticator`: the id of the `tracetape_auth` extension checking API keys, if any."""

    @property
    def max_recv_msg_size(self) -> int:
        """The message limit in bytes (checked on the decompressed message)."""
        return self.max_recv_msg_size_mib * 1024 * 1024


@dataclass(frozen=True)
class HttpProtocol(_Listener):
    """OTLP/HTTP server settings; `max_request_body_size` caps the body both as sent and decompressed."""

    endpoint: str = DEFAULT_HTTP_ENDPOINT
    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE
    authenticator: str | None = None
    """`auth.authenticator`: the id of the `tracetape_auth` extension checking API keys, if any."""


@dataclass(frozen=True)
class OtlpReceiver:
    """An `otlp` receiver; a protocol left out is disabled."""

    id: str
    grpc: GrpcProtocol | None = field(default_factory=GrpcProtocol)
    http: HttpProtocol | None = field(default_factory=HttpProtocol)


@dataclass(frozen=True)
class SlimProcessor:
    """`tracetape_slim`: the forwarded copy's per-attribute cap (payload previews and long strings)."""

    id: str = SLIM_TYPE
    max_attribute_bytes: int = DEFAULT_MAX_ATTRIBUTE_BYTES


@dataclass(frozen=True)
class StoreExporter:
    """`tracetape`: the LMDB store every acknowledged span is written to.

    `map_size` is the most the store may grow to (the map starts smaller and doubles up to it; past it
    writes fail with 503 + Retry-After and the store stays intact). `max_pending_bytes` bounds what has
    been received but not yet committed; over it, receivers answer 503 / RESOURCE_EXHAUSTED.
    `ingest_processes` > 0: that many worker processes prepare received spans for the writer (0, the default:
    threads of the collector process, which share one core's worth of Python).
    """

    id: str = STORE_TYPE
    path: str = DEFAULT_STORE_PATH
    map_size: int = DEFAULT_MAP_SIZE
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    ingest_processes: int = DEFAULT_INGEST_PROCESSES


@dataclass(frozen=True)
class RetryPolicy:
    """`retry_on_failure`: exponential backoff between attempts; `max_elapsed_time` 0 = retry forever.

    The outbox is durable, so retrying forever only delays forwarding; it never holds up recording.
    """

    enabled: bool = True
    initial_interval: float = 1.0
    max_interval: float = 30.0
    max_elapsed_time: float = 0.0
    multiplier: float = 1.5


@dataclass(frozen=True)
class OtlpExporter:
    """An `otlp` (gRPC) or `otlphttp` (HTTP, protobuf) exporter, used by the forwarder.

    `url` is where requests go: for HTTP the full traces URL (`endpoint` + `/v1/traces` unless
    `traces_endpoint` is given); for gRPC `host:port`.
    """

    id: str
    protocol: Literal["grpc", "http"]
    endpoint: str
    url: str
    timeout: float = DEFAULT_EXPORT_TIMEOUT
    headers: tuple[tuple[str, str], ...] = ()
    compression: Literal["gzip", "none"] = "gzip"
    insecure: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_batch_spans: int = DEFAULT_BATCH_SPANS
    max_batch_bytes: int = DEFAULT_BATCH_BYTES


@dataclass(frozen=True)
class Pipeline:
    """One `service.pipelines` entry; names are component ids."""

    id: str
    receivers: tuple[str, ...]
    processors: tuple[str, ...]
    exporters: tuple[str, ...]


@dataclass(frozen=True)
class ForwardRoute:
    """One forwarding destination: the exporter and the slimming applied to what it is sent."""

    exporter: OtlpExporter
    slim: SlimProcessor


@dataclass(frozen=True)
class CollectorConfig:
    """A complete, validated configuration. Build with `parse`, `load` or `default_config`."""

    receivers: Mapping[str, OtlpReceiver]
    processors: Mapping[str, SlimProcessor]
    exporters: Mapping[str, StoreExporter | OtlpExporter]
    pipelines: tuple[Pipeline, ...]
    log_level: str = "info"
    source: str | None = None
    """The file this came from (None for the built-in defaults)."""
    auth: auth_ext.AuthExtension | None = None
    """The enabled `tracetape_auth` extension (API keys), or None: no keys, loopback is the protection."""

    @property
    def authenticator(self) -> auth_ext.Authenticator | None:
        return self.auth.authenticator if self.auth is not None else None

    @property
    def store(self) -> StoreExporter:
        """The one `tracetape` exporter the storing pipelines use."""
        for p in self.pipelines:
            for e in p.exporters:
                exp = self.exporters[e]
                if isinstance(exp, StoreExporter):
                    return exp
        raise AssertionError("validated config without a storing pipeline")

    @property
    def storing_receivers(self) -> tuple[OtlpReceiver, ...]:
        """Receivers that feed the store, in the order the pipelines name them: the ones to start."""
        seen: dict[str, OtlpReceiver] = {}
        for p in self.pipelines:
            if _is_storing(p, self.exporters):
                for r in p.receivers:
                    seen.setdefault(r, self.receivers[r])
        return tuple(seen.values())

    @property
    def forward_routes(self) -> tuple[ForwardRoute, ...]:
        """Where the outbox is forwarded to, one route per forwarding exporter."""
        routes: list[ForwardRoute] = []
        for p in self.pipelines:
            if _is_storing(p, self.exporters):
                continue
            slim = self.processors[p.processors[0]] if p.processors else SlimProcessor()
            for e in p.exporters:
                exp = self.exporters[e]
                assert isinstance(exp, OtlpExporter)
                routes.append(ForwardRoute(exp, slim))
        return tuple(routes)

    def with_overrides(
        self,
        *,
        data: str | None = None,
        host: str | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
    ) -> CollectorConfig:
        """A copy with the CLI's overrides applied.

        `data` replaces the store's path. `host` replaces the host of every storing receiver's endpoints;
        `http_port` / `grpc_port` the port of the first storing receiver (enabling that protocol, with
        default limits, when the file left it out). Port 0 asks the OS for a free port.
        """
        exporters = dict(self.exporters)
        if data is not None:
            store = self.store
            exporters[store.id] = dataclasses.replace(store, path=data)
        receivers = dict(self.receivers)
        for index, rec in enumerate(self.storing_receivers):
            grpc, http = rec.grpc, rec.http
            guard = self.auth.id if self.auth is not None else None  # a protocol the CLI adds is keyed too
            if index == 0 and grpc_port is not None:
                grpc = grpc or GrpcProtocol(authenticator=guard)
                grpc = dataclasses.replace(grpc, endpoint=join_endpoint(grpc.host, grpc_port))
            if index == 0 and http_port is not None:
                http = http or HttpProtocol(authenticator=guard)
                http = dataclasses.replace(http, endpoint=join_endpoint(http.host, http_port))
            if host is not None:
                if grpc is not None:
                    grpc = dataclasses.replace(grpc, endpoint=join_endpoint(host, grpc.port))
                if http is not None:
                    http = dataclasses.replace(http, endpoint=join_endpoint(host, http.port))
            receivers[rec.id] = dataclasses.replace(rec, grpc=grpc, http=http)
        return dataclasses.replace(self, receivers=receivers, exporters=exporters)


def _is_storing(p: Pipeline, exporters: Mapping[str, StoreExporter | OtlpExporter]) -> bool:
    return any(isinstance(exporters[e], StoreExporter) for e in p.exporters)


# --- entry points ---------------------------------------------------------------------------------------


def default_config() -> CollectorConfig:
    """What an absent config file means: OTLP on 127.0.0.1:4317/4318 into the store, no forwarding."""
    return parse({}, source=None)


def load(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> CollectorConfig:
    """Read and validate a YAML config file; `ConfigError` for a missing file, bad YAML or bad content."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} not found") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {os.fspath(path)!r} is not UTF-8 text "
                          f"(invalid byte at offset {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{os.fspath(path)}: {problem}{where}") from None
    return parse(data, source=os.fspath(path), environ=environ)


def parse(
    data: Any, *, source: str | None = None, environ: Mapping[str, str] | None = None
) -> CollectorConfig:
    """Validate a parsed YAML document (None/empty = defaults) into a `CollectorConfig`."""
    env = os.environ if environ is None else environ
    root = _mapping(_substitute(data, env, ""), "config")
    if not root:
        root = {
            "receivers": {"otlp": None},
            "exporters": {STORE_TYPE: None},
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": [STORE_TYPE]}}},
        }
    _check_keys(root, ("receivers", "processors", "exporters", "extensions", "connectors", "service"), "")

    receivers = {
        cid: _parse_receiver(cid, body) for cid, body in _components(root, "receivers", RECEIVER_TYPES)
    }
    processors = {
        cid: _parse_slim(cid, body) for cid, body in _components(root, "processors", PROCESSOR_TYPES)
    }
    exporters = {
        cid: _parse_exporter(cid, body, env.get(DATA_ENV) or DEFAULT_STORE_PATH)
        for cid, body in _components(root, "exporters", EXPORTER_TYPES)
    }
    extensions = dict(_components(root, "extensions", EXTENSION_TYPES))  # only tracetape_auth exists
    for _cid, _body in _components(root, "connectors", ()):
        pass

    service = _mapping(root.get("service"), "service")
    _check_keys(service, ("extensions", "pipelines", "telemetry"), "service")
    enabled = _string_list(service.get("extensions"), "service.extensions")
    for i, ext in enumerate(enabled):
        if ext not in extensions:
            hint = _did_you_mean(ext, extensions)
            raise ConfigError(f"service.extensions[{i}]: extension {ext!r} is not defined under extensions:{hint}")
    log_level = _parse_telemetry(service.get("telemetry"))
    pipelines = _parse_pipelines(service.get("pipelines"), receivers, processors, exporters)
    config = CollectorConfig(
        receivers=receivers,
        processors=processors,
        exporters=exporters,
        pipelines=pipelines,
        log_level=log_level,
        source=source,
    )
    return dataclasses.replace(config, auth=_parse_auth(extensions, enabled, config))


def _parse_auth(
    extensions: Mapping[str, Any], enabled: Sequence[str], config: CollectorConfig
) -> auth_ext.AuthExtension | None:
    """The enabled `tracetape_auth` extension, after checking every storing protocol uses it (module doc)."""
    for cid in extensions:
        if cid not in enabled:
            raise ConfigError(f"extensions.{cid}: defined but not enabled; list it in service.extensions "
                              f"(API keys are then required on every receiver) or remove it")
    if len(set(enabled)) != len(enabled):
        raise ConfigError("service.extensions: listed more than once")
    if len(enabled) > 1:
        raise ConfigError(f"service.extensions: at most one {auth_ext.EXTENSION_TYPE} extension, got {list(enabled)}")
    ext_id = enabled[0] if enabled else None
    for receiver in config.storing_receivers:
        for name, proto in (("grpc", receiver.grpc), ("http", receiver.http)):
            if proto is None:
                continue
            where = f"receivers.{receiver.id}.protocols.{name}"
            if proto.authenticator is not None and proto.authenticator != ext_id:
                hint = "; list it in service.extensions" if proto.authenticator in extensions else ""
                raise ConfigError(f"{where}.auth.authenticator: {proto.authenticator!r} is not an enabled "
                                  f"{auth_ext.EXTENSION_TYPE} extension{hint}")
            if ext_id is not None and proto.authenticator is None:
                raise ConfigError(f"{where}: {ext_id} is enabled, so this protocol needs auth: {{authenticator: "
                                  f"{ext_id}}} (without it, it would accept spans without an API key)")
    if ext_id is None:
        return None
    try:
        return auth_ext.parse_extension(ext_id, extensions[ext_id])
    except auth_ext.KeysError as err:
        raise ConfigError(str(err)) from None


# --- components -----------------------------------------------------------------------------------------

_COMPONENT_ID = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:/([^/\s]+))?")


def component_type(cid: str) -> str:
    """`otlphttp` for `otlphttp/jaeger`."""
    return cid.split("/", 1)[0]


def _components(root: Mapping[str, Any], kind: str, types: Sequence[str]) -> list[tuple[str, Any]]:
    section = _mapping(root.get(kind), kind)
    out = []
    for cid, body in section.items():
        path = f"{kind}.{cid}"
        if not isinstance(cid, str) or _COMPONENT_ID.fullmatch(cid) is None:
            raise ConfigError(f"{kind}: invalid component id {cid!r} (use type or type/name)")
        ctype = component_type(cid)
        if ctype not in types:
            known = ", ".join(types) if types else "none are supported"
            raise ConfigError(f"{path}: unknown {kind[:-1]} type {ctype!r} (known: {known})")
        out.append((cid, body))
    return out


def _parse_receiver(cid: str, body: Any) -> OtlpReceiver:
    path = f"receivers.{cid}"
    body = _mapping(body, path)
    _check_keys(body, ("protocols",), path)
    if "protocols" not in body:
        return OtlpReceiver(cid)
    protocols = _mapping(body["protocols"], f"{path}.protocols")
    _check_keys(protocols, ("grpc", "http"), f"{path}.protocols")
    if not protocols:
        raise ConfigError(f"{path}.protocols: enable at least one of grpc, http")
    grpc = http = None
    if "grpc" in protocols:
        p = f"{path}.protocols.grpc"
        g = _mapping(protocols["grpc"], p)
        _check_keys(g, ("endpoint", "max_recv_msg_size_mib", "auth"), p)
        endpoint = _endpoint(g.get("endpoint", DEFAULT_GRPC_ENDPOINT), f"{p}.endpoint")
        mib = _int(g.get("max_recv_msg_size_mib", DEFAULT_MAX_RECV_MSG_SIZE_MIB), f"{p}.max_recv_msg_size_mib", 1,
                   MAX_RECV_MSG_SIZE_MIB)
        grpc = GrpcProtocol(endpoint, mib, _parse_protocol_auth(g.get("auth"), f"{p}.auth"))
    if "http" in protocols:
        p = f"{path}.protocols.http"
        h = _mapping(protocols["http"], p)
        _check_keys(h, ("endpoint", "max_request_body_size", "auth"), p)
        endpoint = _endpoint(h.get("endpoint", DEFAULT_HTTP_ENDPOINT), f"{p}.endpoint")
        size = _size(h.get("max_request_body_size", DEFAULT_MAX_REQUEST_BODY_SIZE), f"{p}.max_request_body_size", 1)
        http = HttpProtocol(endpoint, size, _parse_protocol_auth(h.get("auth"), f"{p}.auth"))
    return OtlpReceiver(cid, grpc, http)


def _parse_protocol_auth(value: Any, path: str) -> str | None:
    """`auth: {authenticator: ID}` (the collector's `configauth` shape) → the extension id, or None."""
    if value is None:
        return None
    body = _mapping(value, path)
    _check_keys(body, ("authenticator",), path)
    ext = body.get("authenticator")
    if not isinstance(ext, str) or _COMPONENT_ID.fullmatch(ext) is None:
        raise ConfigError(f"{path}.authenticator: expected an extension id such as {auth_ext.EXTENSION_TYPE}")
    return ext


def _parse_slim(cid: str, body: Any) -> SlimProcessor:
    path = f"processors.{cid}"
    body = _mapping(body, path)
    _check_keys(body, ("max_attribute_bytes",), path)
    cap = _size(body.get("max_attribute_bytes", DEFAULT_MAX_ATTRIBUTE_BYTES), f"{path}.max_attribute_bytes", 64)
    return SlimProcessor(cid, cap)


def _parse_exporter(cid: str, body: Any, default_store: str) -> StoreExporter | OtlpExporter:
    ctype = component_type(cid)
    path = f"exporters.{cid}"
    body = _mapping(body, path)
    if ctype == STORE_TYPE:
        _check_keys(body, ("path", "map_size", "max_pending_bytes", "ingest_processes"), path)
        store_path = body.get("path", default_store)
        if not isinstance(store_path, str) or not store_path.strip():
            raise ConfigError(f"{path}.path: expected a directory path")
        if "\0" in store_path:
            raise ConfigError(f"{path}.path: must not contain a NUL byte")
        return StoreExporter(
            cid,
            os.path.expanduser(store_path),
            _size(body.get("map_size", DEFAULT_MAP_SIZE), f"{path}.map_size", 1024 * 1024),
            _size(body.get("max_pending_bytes", DEFAULT_MAX_PENDING_BYTES), f"{path}.max_pending_bytes", 1024),
            _int(body.get("ingest_processes", DEFAULT_INGEST_PROCESSES), f"{path}.ingest_processes"),
        )
    keys = ("endpoint", "timeout", "headers", "compression", "tls", "retry_on_failure", "sending_queue")
    if ctype in OTLP_HTTP_EXPORTER_TYPES:
        keys += ("traces_endpoint",)
    _check_keys(body, keys, path)
    if ctype in OTLP_HTTP_EXPORTER_TYPES:
        protocol: Literal["grpc", "http"] = "http"
        endpoint, url, insecure = _http_exporter_endpoint(body, path)
    else:
        protocol = "grpc"
        endpoint, url, insecure = _grpc_exporter_endpoint(body, path)
    tls = _mapping(body.get("tls"), f"{path}.tls")
    _check_keys(tls, ("insecure",), f"{path}.tls")
    if "insecure" in tls:
        insecure = _bool(tls["insecure"], f"{path}.tls.insecure")
    compression = body.get("compression", "gzip")
    if compression in (None, "", "none"):
        compression = "none"
    if compression not in ("gzip", "none"):
        raise ConfigError(f"{path}.compression: unsupported {compression!r} (use gzip or none)")
    max_spans, max_bytes = _parse_sending_queue(body.get("sending_queue"), f"{path}.sending_queue")
    return OtlpExporter(
        id=cid,
        protocol=protocol,
        endpoint=endpoint,
        url=url,
        timeout=_duration(body.get("timeout", DEFAULT_EXPORT_TIMEOUT), f"{path}.timeout", positive=True),
        headers=_headers(body.get("headers"), f"{path}.headers"),
        compression=compression,
        insecure=insecure,
        retry=_parse_retry(body.get("retry_on_failure"), f"{path}.retry_on_failure"),
        max_batch_spans=max_spans,
        max_batch_bytes=max_bytes,
    )


def _http_exporter_endpoint(body: Mapping[str, Any], path: str) -> tuple[str, str, bool]:
    endpoint = body.get("endpoint")
    traces = body.get("traces_endpoint")
    if endpoint is None and traces is None:
        raise ConfigError(f"{path}: 'endpoint' is required (e.g. http://127.0.0.1:4318)")
    for key, value in (("endpoint", endpoint), ("traces_endpoint", traces)):
        if value is not None and (not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value)):
            raise ConfigError(f"{path}.{key}: expected an http:// or https:// URL, got {value!r}")
    url = traces if traces is not None else endpoint.rstrip("/") + "/v1/traces"
    return (endpoint or traces), url, url.startswith("http://")


def _grpc_exporter_endpoint(body: Mapping[str, Any], path: str) -> tuple[str, str, bool]:
    endpoint = body.get("endpoint")
    if endpoint is None:
        raise ConfigError(f"{path}: 'endpoint' is required (e.g. 127.0.0.1:4317)")
    if not isinstance(endpoint, str):
        raise ConfigError(f"{path}.endpoint: expected host:port, got {endpoint!r}")
    insecure = False
    target = endpoint
    m = re.match(r"(https?)://(.*)$", endpoint)
    if m:
        insecure = m.group(1) == "http"
        target = m.group(2).rstrip("/")
    host, port = split_endpoint(target, f"{path}.endpoint")
    if port == 0 or not host:
        raise ConfigError(f"{path}.endpoint: expected host:port, got {endpoint!r}")
    return endpoint, join_endpoint(host, port), insecure


def _parse_retry(value: Any, path: str) -> RetryPolicy:
    body = _mapping(value, path)
    _check_keys(body, ("enabled", "initial_interval", "max_interval", "max_elapsed_time", "multiplier"), path)
    d = RetryPolicy()
    policy = RetryPolicy(
        enabled=_bool(body.get("enabled", d.enabled), f"{path}.enabled"),
        initial_interval=_duration(body.get("initial_interval", d.initial_interval), f"{path}.initial_interval", positive=True),
        max_interval=_duration(body.get("max_interval", d.max_interval), f"{path}.max_interval", positive=True),
        max_elapsed_time=_duration(body.get("max_elapsed_time", d.max_elapsed_time), f"{path}.max_elapsed_time"),
        multiplier=_float(body.get("multiplier", d.multiplier), f"{path}.multiplier", 1.0),
    )
    if policy.max_interval < policy.initial_interval:
        raise ConfigError(f"{path}.max_interval: must not be less than initial_interval")
    return policy


def _parse_sending_queue(value: Any, path: str) -> tuple[int, int]:
    body = _mapping(value, path)
    _check_keys(body, ("batch",), path)
    batch = _mapping(body.get("batch"), f"{path}.batch")
    _check_keys(batch, ("max_size", "max_bytes"), f"{path}.batch")
    return (
        _int(batch.get("max_size", DEFAULT_BATCH_SPANS), f"{path}.batch.max_size", 1),
        _size(batch.get("max_bytes", DEFAULT_BATCH_BYTES), f"{path}.batch.max_bytes", 1024),
    )


def _parse_telemetry(value: Any) -> str:
    body = _mapping(value, "service.telemetry")
    _check_keys(body, ("logs",), "service.telemetry")
    logs = _mapping(body.get("logs"), "service.telemetry.logs")
    _check_keys(logs, ("level",), "service.telemetry.logs")
    level = str(logs.get("level", "info")).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"service.telemetry.logs.level: unknown level {level!r} (use {', '.join(LOG_LEVELS)})")
    return "warning" if level == "warn" else level


# --- pipelines ------------------------------------------------------------------------------------------


def _parse_pipelines(
    value: Any,
    receivers: Mapping[str, OtlpReceiver],
    processors: Mapping[str, SlimProcessor],
    exporters: Mapping[str, StoreExporter | OtlpExporter],
) -> tuple[Pipeline, ...]:
    section = _mapping(value, "service.pipelines")
    if not section:
        raise ConfigError("service.pipelines: define at least one pipeline (traces: receivers [otlp], exporters [tracetape])")
    pipelines = []
    for pid, body in section.items():
        path = f"service.pipelines.{pid}"
        if not isinstance(pid, str) or _COMPONENT_ID.fullmatch(pid) is None:
            raise ConfigError(f"service.pipelines: invalid pipeline id {pid!r} (use traces or traces/name)")
        signal = component_type(pid)
        if signal not in SIGNALS:
            raise ConfigError(f"{path}: unsupported signal {signal!r} (tracetape collects traces only)")
        body = _mapping(body, path)
        _check_keys(body, ("receivers", "processors", "exporters"), path)
        p = Pipeline(
            pid,
            _refs(body, "receivers", receivers, path, required=True),
            _refs(body, "processors", processors, path, required=False),
            _refs(body, "exporters", exporters, path, required=True),
        )
        pipelines.append(p)
    _check_topology(pipelines, exporters)
    return tuple(pipelines)


def _refs(body: Mapping[str, Any], kind: str, defined: Mapping[str, Any], path: str, *, required: bool) -> tuple[str, ...]:
    names = _string_list(body.get(kind), f"{path}.{kind}")
    if required and not names:
        raise ConfigError(f"{path}.{kind}: at least one is required")
    for name in names:
        if name not in defined:
            hint = _did_you_mean(name, defined)
            raise ConfigError(f"{path}.{kind}: {name!r} is not defined under {kind}:{hint}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}.{kind}: listed more than once")
    return tuple(names)


def _check_topology(pipelines: list[Pipeline], exporters: Mapping[str, StoreExporter | OtlpExporter]) -> None:
    storing = [p for p in pipelines if _is_storing(p, exporters)]
    if not storing:
        raise ConfigError("service.pipelines: no pipeline exports to 'tracetape' (the store); add one, "
                          "e.g. traces: {receivers: [otlp], exporters: [tracetape]}")
    stores = {e for p in storing for e in p.exporters if isinstance(exporters[e], StoreExporter)}
    if len(stores) > 1:
        raise ConfigError(f"service.pipelines: one tracetape store per collector, got {sorted(stores)}")
    stored_receivers = {r for p in storing for r in p.receivers}
    forwarding_exporters: dict[str, str] = {}
    for p in pipelines:
        path = f"service.pipelines.{p.id}"
        if p in storing:
            others = [e for e in p.exporters if not isinstance(exporters[e], StoreExporter)]
            if others:
                raise ConfigError(
                    f"{path}.exporters: {others[0]!r} cannot share a pipeline with the store; forward from "
                    f"a separate pipeline (e.g. traces/jaeger), which is fed from the store's outbox"
                )
            if p.processors:
                raise ConfigError(
                    f"{path}.processors: a pipeline exporting to the store takes no processors "
                    f"(the store records spans as received); slimming belongs to the forwarding pipeline"
                )
            continue
        for r in p.receivers:
            if r not in stored_receivers:
                raise ConfigError(
                    f"{path}.receivers: {r!r} does not feed the store; forwarding pipelines are fed from the "
                    f"store's outbox, so their receivers must be those of the storing pipeline"
                )
        if len(p.processors) > 1:
            raise ConfigError(f"{path}.processors: at most one {SLIM_TYPE} processor")
        for e in p.exporters:
            if e in forwarding_exporters:
                raise ConfigError(f"{path}.exporters: {e!r} is already used by {forwarding_exporters[e]}")
            forwarding_exporters[e] = f"service.pipelines.{p.id}"


# --- values ---------------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _substitute(value: Any, env: Mapping[str, str], path: str) -> Any:
    """Expand `${env:VAR}`, `${env:VAR:-default}`, `${VAR}` and `$$` in every string scalar."""
    if isinstance(value, dict):
        return {k: _substitute(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def expand(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        ref = m.group(1)
        default: str | None = None
        if ":-" in ref:
            ref, default = ref.split(":-", 1)
        if ":" in ref:
            provider, ref = ref.split(":", 1)
            if provider != "env":
                raise ConfigError(f"{path or 'config'}: unsupported config provider {provider!r} in {m.group(0)!r} (use env)")
        if _ENV_NAME.fullmatch(ref) is None:
            raise ConfigError(f"{path or 'config'}: invalid environment variable name {ref!r}")
        if ref in env:
            return env[ref]
        if default is not None:
            return default
        raise ConfigError(f"{path or 'config'}: environment variable {ref} is not set (write ${{env:{ref}:-default}} for a default)")

    return _ENV_REF.sub(expand, value)


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_kind(value)}")
    return value


def _check_keys(body: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in body:
        if key not in allowed:
            hint = _did_you_mean(str(key), allowed)
            where = f"{path}: " if path else ""
            raise ConfigError(f"{where}unknown key {key!r}{hint}")


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _string_list(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: expected a list of component ids, got {value!r}")
    return list(value)


def _int(value: Any, path: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(f"{path}: must be between {minimum} and {maximum}, got {value}")
    if value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum}, got {value}")
    return value


def _float(value: Any, path: str, minimum: float = 0.0) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if result < minimum:
        raise ConfigError(f"{path}: must be at least {minimum}, got {value!r}")
    return result


def _bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{path}: expected true or false, got {value!r}")


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: Any, path: str = "size", minimum: int = 0) -> int:
    """Bytes from an int or a string like `64MiB`, `1GiB`, `500MB`, `4096`."""
    return _size(value, path, minimum)


def _size(value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ConfigError(f"{path}: expected a size such as 64MiB, 1GiB or 1048576, got {value!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()])
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected a size such as 64MiB, 1GiB or 1048576, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}: must be at least {minimum} bytes, got {value}")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, path: str = "duration") -> float:
    """Seconds from a number (seconds) or a Go-style duration string (`500ms`, `10s`, `1m30s`)."""
    return _duration(value, path)


def _duration(value: Any, path: str, *, positive: bool = False) -> float:
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+", text):
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    if seconds is None or seconds < 0:
        raise ConfigError(f"{path}: expected a duration such as 500ms, 10s or 1m, got {value!r}")
    if positive and seconds <= 0:
        raise ConfigError(f"{path}: must be greater than zero")
    return seconds


def _headers(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    body = _mapping(value, path)
    out = []
    for name, v in body.items():
        if not isinstance(name, str) or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            raise ConfigError(f"{path}: invalid header name {name!r}")
        if isinstance(v, (dict, list)) or v is None:
            raise ConfigError(f"{path}.{name}: expected a string value")
        out.append((name, str(v)))
    return tuple(out)


def _endpoint(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected host:port, got {value!r}")
    host, port = split_endpoint(value, path)
    return join_endpoint(host, port)


def split_endpoint(endpoint: str, path: str = "endpoint") -> tuple[str, int]:
    """(host, port) of `host:port`, `[v6]:port` or `:port` (an empty host means every interface)."""
    m = re.fullmatch(r"\s*(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]\s]*)):(\d{1,5})\s*", endpoint)
    if m is None:
        raise ConfigError(f"{path}: expected host:port, got {endpoint!r}")
    port = int(m.group(3))
    if port > 65535:
        raise ConfigError(f"{path}: port {port} is out of range")
    return (m.group(1) if m.group(1) is not None else m.group(2)), port


def join_endpoint(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
