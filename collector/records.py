"""The records tracetape stores, as msgspec Structs encoded with MessagePack.

A run has steps; a step (one model call, raw HTTP call or tool call) has attempts; an attempt refers to
its payloads by content digest (`PayloadRef`), never inline, so a payload is stored once however many
attempts, steps or runs carry it. Fields only grow, with defaults, so old records keep decoding.
"""

from __future__ import annotations

import msgspec

from tracetape.instrumentation import contract

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_CANCELLED = "cancelled"
STATUSES = (STATUS_RUNNING, STATUS_COMPLETED, STATUS_FAILED, STATUS_CANCELLED)

REASON_OK = "ok"
REASON_EXECUTION_INCOMPLETE = "execution_incomplete"  # still running, killed, or cancelled
REASON_RECORDING_FAILURE = "recording_failure"  # the recorder failed on at least one attempt
REASON_PAYLOAD_MISSING = "payload_missing"  # a referenced payload blob is not in the store
REASON_MANUALLY_INVALIDATED = "manually_invalidated"
REASON_NO_STEPS = "no_steps"
REASONS = (
    REASON_OK,
    REASON_EXECUTION_INCOMPLETE,
    REASON_RECORDING_FAILURE,
    REASON_PAYLOAD_MISSING,
    REASON_MANUALLY_INVALIDATED,
    REASON_NO_STEPS,
)


class PayloadRef(msgspec.Struct, array_like=True, frozen=True):
    """A content-addressed payload: sha256 of the (redacted) bytes, and their length."""

    digest: bytes
    size: int


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    """One HTTP attempt or one tool execution, as recorded."""

    attempt: int
    trace_id: bytes
    span_id: bytes
    started_ns: int
    ended_ns: int
    envelope_hash: str
    # HTTP (model and raw) attempts
    method: str = ""
    url: str = ""
    request_headers: list[tuple[str, str]] = []
    request_body: PayloadRef | None = None
    status: int | None = None
    response_headers: list[tuple[str, str]] = []
    response_body: PayloadRef | None = None
    content_encoding: str = ""
    streamed: bool = False
    chunk_ends: list[int] = []
    chunk_times_us: list[int] = []
    bytes_read: int = 0
    end_reason: str = ""
    # tool attempts
    tool_arguments: PayloadRef | None = None
    tool_result: PayloadRef | None = None
    # failure of the call itself, or of the recorder
    error_type: str = ""
    error_message: str = ""
    recording_error: str = ""
    # read from the response at ingest (GenAI conventions)
    response_model: str = ""
    response_id: str = ""
    finish_reasons: list[str] = []
    input_tokens: int | None = None
    output_tokens: int | None = None

    @property
    def duration_ms(self) -> float:
        return max(0, self.ended_ns - self.started_ns) / 1e6

    def payload_refs(self) -> list[PayloadRef]:
        return [
            r
            for r in (self.request_body, self.response_body, self.tool_arguments, self.tool_result)
            if r is not None
        ]


class StepRecord(msgspec.Struct, omit_defaults=True):
    """One step of a run: a model call, raw HTTP call or tool call, with its attempts in order."""

    step_id: str
    started_ns: int
    kind: str
    name: str
    envelope_hash: str
    process_index: int = 0
    provider: str = ""
    request_model: str = ""
    tool_name: str = ""
    tool_call_id: str = ""
    mutating: bool = False
    attempts: list[AttemptRecord] = []

    @property
    def last(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts else None


class RunRecord(msgspec.Struct, omit_defaults=True):
    """A run: one execution of an agent, recorded or replayed."""

    run_id: str
    tenant: str
    scope: str
    status: str = STATUS_RUNNING
    replayable: bool = False
    reason: str = REASON_EXECUTION_INCOMPLETE
    started_ns: int = 0
    ended_ns: int = 0
    trace_id: bytes = b""
    service_name: str = ""
    agent_name: str = ""
    command: list[str] = []
    exit_code: int | None = None
    canon_profile: str = contract.CANON_PROFILE
    replay_of: str = ""
    replay_mode: str = ""
    replay_forced: bool = False
    lineage_depth: int = 0
    step_count: int = 0
    span_count: int = 0
    recording_errors: int = 0
    invalidated: bool = False
    invalidated_reason: str = ""


def outcome_to_status(outcome: str) -> str:
    """The run status a run span's outcome gives."""
    return {
        contract.OUTCOME_COMPLETED: STATUS_COMPLETED,
        contract.OUTCOME_FAILED: STATUS_FAILED,
        contract.OUTCOME_CANCELLED: STATUS_CANCELLED,
    }.get(outcome, STATUS_FAILED)


def verdict(run: RunRecord) -> tuple[bool, str]:
    """Whether a run can be replayed, and why (one of `REASONS`).

    A run is replayable when its execution finished on its own (exit status, even non-zero: a failing run
    is exactly what incident replay reproduces), every attempt was recorded, and nobody invalidated it.
    Killed by a signal, cancelled, or never ended: `execution_incomplete`.
    """
    if run.invalidated:
        return False, REASON_MANUALLY_INVALIDATED
    if run.status == STATUS_RUNNING or run.status == STATUS_CANCELLED:
        return False, REASON_EXECUTION_INCOMPLETE
    if run.exit_code is not None and run.exit_code < 0:
        return False, REASON_EXECUTION_INCOMPLETE
    if run.recording_errors:
        return False, REASON_RECORDING_FAILURE
    return True, REASON_OK


_encoder = msgspec.msgpack.Encoder()
_run_decoder = msgspec.msgpack.Decoder(RunRecord)
_step_decoder = msgspec.msgpack.Decoder(StepRecord)


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


def decode_run(data: bytes) -> RunRecord:
    return _run_decoder.decode(data)


def decode_step(data: bytes) -> StepRecord:
    return _step_decoder.decode(data)
