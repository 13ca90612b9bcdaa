"""The span contract: the one place that says what a tracetape span carries and how a request is hashed.

Everything that writes or reads tracetape spans (instrumentation, collector, replayer) imports the names
and functions below; `docs/span-contract.md` is the prose version of this module. Change one, change both,
and bump `CANON_PROFILE` whenever the envelope hash of any request would change.

Spans
-----
- The run span (`invoke_agent {agent}`), one per run, ends when the run ends: `RUN_*` attributes,
  `SPAN_KIND` = `run`. A zero-length `tracetape.run.start` span (`SPAN_KIND` = `run_start`) is exported as
  soon as the run starts so that a run killed before its end is still known (as `running`, then incomplete).
- A step is one model call, raw HTTP call or tool call. A model/HTTP step is made of attempts (the SDK's
  retries); every attempt is one span with `SPAN_KIND` = `step`, the same `STEP_ID` and `STEP_STARTED_NS`
  for every attempt of the step, and its own `STEP_ATTEMPT` (0, 1, ...). A tool step has one attempt.
- Every span the recording process starts carries `RUN_ID`, `TENANT` and `SCOPE`.

Payload encoding
----------------
Bodies are `bytes` attributes holding the exact bytes (after redaction): the request body as sent, the
response body as read from the wire (still compressed if `RESPONSE_CONTENT_ENCODING` says so). Headers are
a JSON string: a list of `[name, value]` pairs, names lower-case, credentials removed. A streamed response
also carries `RESPONSE_CHUNK_ENDS` (cumulative byte offset at the end of each chunk as read) and
`RESPONSE_CHUNK_TIMES_US` (microseconds from the attempt's start to each chunk), so a replay can reproduce
the chunk boundaries and the pacing.

Envelope hash
-------------
`sha256` (hex) of the canonical JSON of the request's envelope (profile `CANON_PROFILE`):
`{"v":1,"kind":"http","method":M,"path":P,"query":[[k,v],...],"headers":[[k,v],...],"body":B}` with keys
sorted, no insignificant whitespace, arrays in order; `P` the URL path (secrets masked) with repeated `/`
collapsed and no trailing `/`; `query` sorted pairs (a credential parameter's value `***`); `headers` only the `SEMANTIC_HEADERS`, lower-case, sorted; `B` the
parsed JSON body (object keys sorted, numbers as parsed), `null` when empty, or `{"$sha256": hex}` of the
raw bytes when the body is not JSON. A tool's envelope is `{"v":1,"kind":"tool","name":N,"arguments":A}`.
Redaction is applied to the body before hashing, so a replayer hashing a live request redacts it first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from tracetape.instrumentation import redaction

CANON_PROFILE = "tracetape.envelope/3"
"""Version of the canonicalisation below; recorded on every run and every step."""

# --- attribute names: every span -------------------------------------------------------------------
RUN_ID = "tracetape.run.id"
TENANT = "tracetape.tenant"
SCOPE = "tracetape.scope"
SPAN_KIND = "tracetape.span.kind"  # "run" | "run_start" | "step"

# --- the run span ------------------------------------------------------------------------------------
RUN_COMMAND = "tracetape.run.command"  # string array (argv)
RUN_OUTCOME = "tracetape.run.outcome"  # OUTCOME_*
RUN_EXIT_CODE = "tracetape.run.exit_code"  # int; negative = killed by that signal
RUN_CANON_PROFILE = "tracetape.run.canon_profile"
RUN_REPLAY_OF = "tracetape.run.replay_of"  # run id this run replays, when it is a replay
RUN_REPLAY_MODE = "tracetape.run.replay_mode"
RUN_REPLAY_FORCED = "tracetape.run.replay_forced"  # bool
RUN_LINEAGE_DEPTH = "tracetape.run.lineage_depth"  # int, 0 for an original recording

OUTCOME_COMPLETED = "completed"  # exit status 0
OUTCOME_FAILED = "failed"  # non-zero exit status or uncaught exception
OUTCOME_CANCELLED = "cancelled"  # SIGINT / SIGTERM / KeyboardInterrupt
OUTCOMES = (OUTCOME_COMPLETED, OUTCOME_FAILED, OUTCOME_CANCELLED)

SPAN_KIND_RUN = "run"
SPAN_KIND_RUN_START = "run_start"
SPAN_KIND_STEP = "step"

# --- every step attempt ---------------------------------------------------------------------------------
STEP_ID = "tracetape.step.id"  # 16 hex chars, shared by the attempts of one step
STEP_STARTED_NS = "tracetape.step.started_ns"  # int, start of attempt 0 (orders the run's steps)
STEP_INDEX = "tracetape.step.index"  # int, the recording process's own call counter (informative)
STEP_KIND = "tracetape.step.kind"  # STEP_KIND_*
STEP_ATTEMPT = "tracetape.step.attempt"  # int, 0 for the first attempt
ENVELOPE_HASH = "tracetape.envelope.hash"  # sha256 hex of the canonical envelope
ENVELOPE_PROFILE = "tracetape.envelope.profile"  # CANON_PROFILE
RECORDING_ERROR = "tracetape.recording.error"  # the recorder failed for this attempt (or, on a run span, the run)

STEP_KIND_MODEL = "model"
STEP_KIND_HTTP = "http"
STEP_KIND_TOOL = "tool"
STEP_KINDS = (STEP_KIND_MODEL, STEP_KIND_HTTP, STEP_KIND_TOOL)

# --- model / HTTP attempts --------------------------------------------------------------------------------
REQUEST_METHOD = "tracetape.request.method"
REQUEST_URL = "tracetape.request.url"  # full URL, redacted
REQUEST_HEADERS = "tracetape.request.headers"  # JSON [[name, value], ...]
REQUEST_BODY = "tracetape.request.body"  # bytes
RESPONSE_STATUS = "tracetape.response.status"  # int
RESPONSE_HEADERS = "tracetape.response.headers"  # JSON [[name, value], ...]
RESPONSE_BODY = "tracetape.response.body"  # bytes, as on the wire
RESPONSE_CONTENT_ENCODING = "tracetape.response.content_encoding"  # "" for identity
RESPONSE_STREAMED = "tracetape.response.streamed"  # bool: text/event-stream
RESPONSE_CHUNK_ENDS = "tracetape.response.chunk_ends"  # int array
RESPONSE_CHUNK_TIMES_US = "tracetape.response.chunk_times_us"  # int array
RESPONSE_BYTES_READ = "tracetape.response.bytes_read"  # int
STREAM_END_REASON = "tracetape.stream.end_reason"  # END_*
ERROR_TYPE = "error.type"  # exception class for a failed attempt or tool
ERROR_MESSAGE = "tracetape.error.message"  # redacted str(exception)

END_EXHAUSTED = "exhausted"  # read to the end
END_CLOSED = "closed"  # closed by the application before the end (break + close, `with` exit)
END_ERROR = "error"  # an exception while reading
END_DROPPED = "dropped"  # garbage-collected without being closed or read to the end
END_REASONS = (END_EXHAUSTED, END_CLOSED, END_ERROR, END_DROPPED)

# --- tool attempts ----------------------------------------------------------------------------------------
TOOL_ARGUMENTS = "tracetape.tool.arguments"  # bytes: canonical JSON of the arguments
TOOL_RESULT = "tracetape.tool.result"  # bytes: JSON of the result
TOOL_MUTATING = "tracetape.tool.mutating"  # bool
TOOL_SOURCE = "tracetape.tool.source"  # "decorator" | "context" | "mcp"
TOOL_REPLAYED = "tracetape.tool.replayed"  # bool: answered from the tape, the body did not run
TOOL_MUTATION_SUPPRESSED = "tracetape.tool.mutation_suppressed"  # bool: a mutating tool the replay did not run
EVENT_MUTATION_SUPPRESSED = "tracetape.mutation_suppressed"

PAYLOAD_ATTRIBUTES: tuple[str, ...] = (REQUEST_BODY, RESPONSE_BODY, TOOL_ARGUMENTS, TOOL_RESULT)
"""The attributes whose values are payloads: stored as content-addressed blobs, previewed when forwarded."""

PAYLOAD_REF_SUFFIX = ".ref"
"""A forwarded or stored span replaces payload attribute `X` by `X.ref` (blob digest hex) and a preview."""

PAYLOAD_PREVIEW_SUFFIX = ".preview"
PAYLOAD_SIZE_SUFFIX = ".size"

# --- replay lineage -----------------------------------------------------------------------------------------
REPLAYED_FROM_HEADER = "x-tracetape-replayed-from"
"""Response header the replayer adds to an answer served from the tape: `{trace_id hex}-{span_id hex}` of the
recorded attempt. A recorder turns it into a span link (`LINK_KIND` = `replay_of`) and does not record it."""
LINK_KIND = "tracetape.link"
LINK_REPLAY_OF = "replay_of"


def parse_replayed_from(value: str) -> tuple[int, int] | None:
    """(trace id, span id) from a `REPLAYED_FROM_HEADER` value, or None when malformed."""
    trace_hex, _, span_hex = value.strip().partition("-")
    if len(trace_hex) != 32 or len(span_hex) != 16:
        return None
    try:
        return int(trace_hex, 16), int(span_hex, 16)
    except ValueError:
        return None


# --- GenAI semantic conventions (the subset we set) ---------------------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # "chat" | "execute_tool" | "invoke_agent" | ...
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"  # "openai" | "anthropic"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"

SEMANTIC_HEADERS: frozenset[str] = frozenset({"anthropic-version", "anthropic-beta", "openai-beta"})
"""Request headers that change what a provider answers, and so belong in the envelope."""

# Paths (as sent, after normalisation) that are model calls rather than plain HTTP.
MODEL_PATH_SUFFIXES: tuple[str, ...] = (
    "/chat/completions",
    "/completions",
    "/responses",
    "/embeddings",
    "/messages",
    "/messages/count_tokens",
)

_SLASHES = re.compile(r"/{2,}")
_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_decode_json = msgspec.json.Decoder().decode


def normalize_path(path: str) -> str:
    """URL path with repeated slashes collapsed and no trailing slash (`/` stays `/`)."""
    if not path:
        return "/"
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return path


SECRET_PARAM_VALUE = "***"
"""A credential parameter's value in the envelope (`redaction.is_secret_param`), whatever it was."""


def canonical_query(query: str | bytes) -> list[list[str]]:
    """Query string as sorted `[name, value]` pairs (blank values kept), values redacted; a credential
    parameter's value is `SECRET_PARAM_VALUE`."""
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    if not query:
        return []
    secret = redaction.is_secret_param
    return sorted([k, SECRET_PARAM_VALUE if secret(k) else redaction.redact_text(v)]
                  for k, v in parse_qsl(query, keep_blank_values=True))


def canonical_headers(headers: Iterable[tuple[str, str]]) -> list[list[str]]:
    """The semantic request headers as sorted `[name, value]` pairs, names lower-case; a value that is not
    valid UTF-8 (a server decodes it with surrogate escapes) has the invalid bytes replaced."""
    semantic = SEMANTIC_HEADERS
    return sorted([name, _valid_text(v)] for n, v in headers if (name := n.lower()) in semantic)


def _valid_text(value: str) -> str:
    try:
        value.encode()
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def canonical_body(body: bytes) -> Any:
    """Parsed JSON body, `None` when empty, `{"$sha256": hex}` when the bytes are not JSON."""
    if not body:
        return None
    try:
        return _decode_json(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # not JSON, or nested past the decoder
        return {"$sha256": hashlib.sha256(body).hexdigest()}


def model_of(parsed_body: Any) -> str | None:
    """The model a parsed request body names: its top-level `model` string, if any."""
    model = parsed_body.get("model") if isinstance(parsed_body, dict) else None
    return model if isinstance(model, str) else None


class _ModelField(msgspec.Struct):
    model: Any = None


_decode_model_field = msgspec.json.Decoder(_ModelField).decode


def request_model(body: bytes) -> str | None:
    """The top-level `model` string of a JSON object body, decoding only that member: the rest of the document
    is checked for syntax and skipped, not built (a 32 MiB chat body ≈10 ms instead of ≈32 ms parsed whole; a
    body that is not a JSON object stops at its first byte). Equal to `model_of(canonical_body(body))` except
    where the whole-document decoder rejects a skipped member's content (invalid UTF-8 in a string, a number
    out of float range): this still reads the model there."""
    if not body:
        return None
    try:
        model = _decode_model_field(body).model
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # not a JSON object (or not JSON at all)
        return None
    return model if isinstance(model, str) else None


def http_envelope(
    method: str,
    path: str,
    query: str | bytes,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    parsed_body: Any = msgspec.UNSET,
) -> dict[str, Any]:
    """The canonical envelope of an HTTP request. `body` must already be redacted.

    Pass `parsed_body` when the caller has already decoded the JSON body, so it is parsed once.
    """
    return {
        "v": 1,
        "kind": "http",
        "method": method.upper(),
        "path": normalize_path(redaction.redact_text(path)),
        "query": canonical_query(query),
        "headers": canonical_headers(headers),
        "body": canonical_body(body) if parsed_body is msgspec.UNSET else parsed_body,
    }


def tool_envelope(name: str, arguments: Any) -> dict[str, Any]:
    """The canonical envelope of a tool call; `arguments` must be JSON-serialisable (or `to_jsonable`'d)."""
    return {"v": 1, "kind": "tool", "name": name, "arguments": arguments}


def canonical_bytes(envelope: dict[str, Any]) -> bytes:
    """The canonical JSON encoding: sorted keys, compact, UTF-8."""
    return _encode_sorted(envelope)


def envelope_hash(envelope: dict[str, Any]) -> str:
    """sha256 hex of the canonical encoding."""
    return hashlib.sha256(_encode_sorted(envelope)).hexdigest()


def to_jsonable(value: Any) -> Any:
    """A JSON-compatible form of tool arguments/results: pydantic models, dataclasses, sets and the like."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=_enc_hook))


def _enc_hook(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, bytes):
        return {"$bytes": obj.hex()}
    return repr(obj)


def encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    """Header pairs as the JSON string stored in `*_HEADERS` attributes. A name or value that is not valid
    text (bytes a server decoded with surrogate escapes) has the invalid bytes replaced."""
    try:
        return msgspec.json.encode([[n, v] for n, v in headers]).decode()
    except UnicodeEncodeError:
        return msgspec.json.encode([[_valid_text(n), _valid_text(v)] for n, v in headers]).decode()


def decode_headers(value: str | bytes) -> list[tuple[str, str]]:
    """Inverse of `encode_headers`."""
    return [(str(n), str(v)) for n, v in _decode_json(value)]


def detect_provider(host: str, headers: Iterable[tuple[str, str]]) -> str | None:
    """`openai`, `anthropic`, or None for other HTTP, from the request's host and headers."""
    host = host.lower()
    anthropic_version = openai_beta = False
    ua = ""
    for n, v in headers:
        name = n.lower()
        if name == "user-agent":
            ua = v  # the last one, as a dict of the headers would keep
        elif name == "anthropic-version":
            anthropic_version = True
        elif name == "openai-beta":
            openai_beta = True
    if anthropic_version or host.endswith("anthropic.com"):
        return "anthropic"
    # the SDK's user agent is its client class: OpenAI/…, AsyncOpenAI/…, AzureOpenAI/…
    if host.endswith("openai.com") or "OpenAI/" in ua or openai_beta:
        return "openai"
    return None


def is_model_path(path: str) -> bool:
    """Whether a normalised path is one of the providers' model endpoints."""
    return path.endswith(MODEL_PATH_SUFFIXES)


def genai_request_attributes(kind: str, provider: str | None, model: str | None) -> dict[str, str]:
    """The GenAI attributes an HTTP attempt carries from its request alone."""
    attrs: dict[str, str] = {}
    if provider:
        attrs[GEN_AI_PROVIDER_NAME] = provider
    if kind == STEP_KIND_MODEL:
        attrs[GEN_AI_OPERATION_NAME] = "chat"
    if model:
        attrs[GEN_AI_REQUEST_MODEL] = model
    return attrs


def step_span_name(kind: str, *, model: str | None = None, tool: str | None = None,
                   method: str = "", path: str = "") -> str:
    """The span name the GenAI conventions give a step: `chat {model}`, `execute_tool {name}`, `{METHOD} {path}`."""
    if kind == STEP_KIND_MODEL:
        return f"chat {model}" if model else "chat"
    if kind == STEP_KIND_TOOL:
        return f"execute_tool {tool}" if tool else "execute_tool"
    return f"{method} {path}".strip()
