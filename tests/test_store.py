"""The store and the ingest path: key layout, step merging, dedupe, content addressing, map growth, verdicts.

Spans are made by the real OTel SDK and encoded by the real OTLP encoder, as an agent would send them.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tracetape.collector import ingest, keys, records
from tracetape.collector.store import Store, StoreError, StoreFull
from tracetape.collector.writer import Overloaded, StoreWriter
from tracetape.instrumentation import contract as c

RUN = "run-1"


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    yield s
    s.close()


class Agent:
    """Makes spans the way the instrumentation does, through the real SDK."""

    def __init__(self, run_id: str = RUN, tenant: str = "acme", scope: str = "prod") -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")
        self.base = {c.RUN_ID: run_id, c.TENANT: tenant, c.SCOPE: scope}

    def step(self, step_id: str, started_ns: int, body: bytes, response: bytes, attempt: int = 0,
             status: int = 200, envelope: str | None = None) -> None:
        attrs = {
            **self.base, c.SPAN_KIND: c.SPAN_KIND_STEP, c.STEP_ID: step_id, c.STEP_STARTED_NS: started_ns,
            c.STEP_KIND: c.STEP_KIND_MODEL, c.STEP_ATTEMPT: attempt,
            c.ENVELOPE_HASH: envelope or c.envelope_hash(c.http_envelope("POST", "/v1/chat/completions", "", [], body)),
            c.REQUEST_METHOD: "POST", c.REQUEST_URL: "http://x/v1/chat/completions", c.REQUEST_BODY: body,
            c.REQUEST_HEADERS: c.encode_headers([("content-type", "application/json")]),
            c.RESPONSE_STATUS: status, c.RESPONSE_BODY: response, c.GEN_AI_PROVIDER_NAME: "openai",
            c.GEN_AI_REQUEST_MODEL: "gpt-test",
        }
        self.tracer.start_span("chat gpt-test", attributes=attrs, start_time=started_ns + attempt).end()

    def run_span(self, outcome: str = c.OUTCOME_COMPLETED, exit_code: int = 0) -> None:
        attrs = {**self.base, c.SPAN_KIND: c.SPAN_KIND_RUN, c.RUN_OUTCOME: outcome, c.RUN_EXIT_CODE: exit_code,
                 c.RUN_COMMAND: ["python", "agent.py"]}
        self.tracer.start_span("invoke_agent agent", attributes=attrs, start_time=1).end()

    def request(self) -> ExportTraceServiceRequest:
        req = encode_spans(self.exporter.get_finished_spans())
        self.exporter.clear()
        return req


def _write(store: Store, req: ExportTraceServiceRequest) -> None:
    batch = ingest.prepare(req, store)
    assert batch.rejected == 0, batch.errors
    store.apply([batch])


RESPONSE = json.dumps({"id": "cc-1", "model": "gpt-test-0613", "choices": [{"finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()


def test_steps_are_ordered_by_start_and_attempts_merge(store: Store) -> None:
    agent = Agent()
    agent.step("00000000000000b2", 2_000, b'{"q":2}', RESPONSE)
    agent.step("00000000000000a1", 1_000, b'{"q":1}', b'{"error":"rate"}', attempt=0, status=429)
    _write(store, agent.request())
    agent.step("00000000000000a1", 1_000, b'{"q":1}', RESPONSE, attempt=1)  # the retry, in a later batch
    agent.run_span()
    _write(store, agent.request())

    steps = store.steps("acme", "prod", RUN)
    assert [s.step_id for s in steps] == ["00000000000000a1", "00000000000000b2"]
    assert [(a.attempt, a.status) for a in steps[0].attempts] == [(0, 429), (1, 200)]
    last = steps[0].attempts[1]
    assert (last.response_model, last.input_tokens, last.output_tokens, last.finish_reasons) == (
        "gpt-test-0613", 7, 3, ["stop"])
    assert store.blob("acme", "prod", last.response_body.digest) == RESPONSE
    run = store.run("acme", "prod", RUN)
    assert run is not None and (run.status, run.replayable, run.reason) == ("completed", True, "ok")
    assert (run.step_count, run.command) == (2, ["python", "agent.py"])


def test_two_spans_claiming_one_attempt_are_both_kept_and_count_as_a_recording_error(store: Store) -> None:
    agent = Agent()
    agent.step("00000000000000a1", 1_000, b'{"q":1}', b'{"error":"rate"}', attempt=0, status=429)
    agent.step("00000000000000a1", 1_000, b'{"q":1}', RESPONSE, attempt=1)
    agent.run_span()
    _write(store, agent.request())
    agent.step("00000000000000a1", 1_000, b'{"q":1}', RESPONSE, attempt=1)  # another span, same attempt number
    data = agent.request().SerializeToString()
    _write(store, ExportTraceServiceRequest.FromString(data))
    again = store.apply([ingest.prepare(ExportTraceServiceRequest.FromString(data), store)])[0]
    assert (again.accepted, again.duplicates) == (0, 1)  # the exporter resending it changes nothing

    (step,) = store.steps("acme", "prod", RUN)
    assert [(a.attempt, a.status) for a in step.attempts] == [(0, 429), (1, 200), (1, 200)]
    assert len({a.span_id for a in step.attempts}) == 3
    run = store.run("acme", "prod", RUN)
    assert run is not None and run.recording_errors == 1
    assert (run.replayable, run.reason) == (False, records.REASON_RECORDING_FAILURE)


def test_a_step_keeps_a_bounded_number_of_attempts(store: Store) -> None:
    """Spans claiming one step far past any SDK's retries (a client that lost track, or a hostile one): the step
    record stops growing at `MAX_ATTEMPTS_PER_STEP` (every attempt rewrites it) and the run says so."""
    from tracetape.collector.store import MAX_ATTEMPTS_PER_STEP

    agent = Agent()
    for _ in range(MAX_ATTEMPTS_PER_STEP + 6):
        agent.step("00000000000000a2", 1_000, b'{"q":2}', RESPONSE, attempt=0)
        _write(store, agent.request())  # one request (one merge) per span
    (step,) = store.steps("acme", "prod", RUN)
    assert len(step.attempts) == MAX_ATTEMPTS_PER_STEP
    run = store.run("acme", "prod", RUN)
    assert run is not None and run.recording_errors == MAX_ATTEMPTS_PER_STEP + 5 and not run.replayable


def test_envelope_occurrences_follow_issue_order(store: Store) -> None:
    agent = Agent()
    env = c.envelope_hash(c.tool_envelope("t", {}))
    for i, started in enumerate([3_000, 1_000, 2_000]):
        agent.step(f"{i + 1:016x}", started, b"{}", RESPONSE, envelope=env)
    _write(store, agent.request())
    order = [store.envelope_occurrence("acme", "prod", env, RUN, k) for k in range(3)]
    assert [o[0] for o in order] == [1_000, 2_000, 3_000]
    assert store.envelope_occurrence("acme", "prod", env, RUN, 3) is None
    assert store.envelope_count("acme", "prod", env, RUN) == 3
    assert store.envelope_occurrence("other", "prod", env, RUN, 0) is None  # tenant is part of the key


def test_resend_is_stored_once_and_payloads_are_deduplicated(store: Store) -> None:
    agent = Agent()
    for i in range(3):
        agent.step(f"{i + 1:016x}", 1_000 * (i + 1), b'{"same":true}', RESPONSE)
    req = agent.request()
    data = req.SerializeToString()
    _write(store, ExportTraceServiceRequest.FromString(data))
    again = ingest.prepare(ExportTraceServiceRequest.FromString(data), store)
    result = store.apply([again])[0]
    assert (result.accepted, result.duplicates) == (0, 3)
    stats = store.stats()
    assert (stats["steps"], stats["spans"], stats["blobs"]) == (3, 3, 2)  # request + response bodies, once each
    assert store.run("acme", "prod", RUN).step_count == 3


def test_stored_spans_carry_refs_not_payloads(store: Store) -> None:
    agent = Agent()
    agent.step("00000000000000a1", 1_000, b'{"prompt":"' + b"x" * 5000 + b'"}', RESPONSE)
    _write(store, agent.request())
    (stored,) = store.spans("acme", "prod", RUN)
    assert b"x" * 100 not in stored
    span = ingest.ResourceSpans.FromString(stored).scope_spans[0].spans[0]
    attrs = {kv.key: ingest.value_of(kv.value) for kv in span.attributes}
    assert c.REQUEST_BODY not in attrs and len(attrs[c.REQUEST_BODY + c.PAYLOAD_REF_SUFFIX]) == 64
    assert attrs[c.GEN_AI_RESPONSE_MODEL] == "gpt-test-0613" and attrs[c.GEN_AI_USAGE_INPUT_TOKENS] == 7


def test_invalid_spans_are_rejected_individually(store: Store) -> None:
    agent = Agent()
    agent.step("00000000000000a1", 1_000, b"{}", RESPONSE)
    agent.step("not-hex", 2_000, b"{}", RESPONSE)
    bad_tenant = Agent(tenant="a\x00b")
    bad_tenant.step("00000000000000a2", 3_000, b"{}", RESPONSE)
    req = agent.request()
    req.resource_spans.extend(bad_tenant.request().resource_spans)
    batch = ingest.prepare(req, store)
    assert batch.rejected == 2 and "tracetape.step.id" in batch.errors[0] and "tenant" in batch.errors[1]
    store.apply([batch])
    assert len(store.steps("acme", "prod", RUN)) == 1


@pytest.mark.parametrize(
    ("outcome", "exit_code", "status", "replayable", "reason"),
    [
        (c.OUTCOME_COMPLETED, 0, "completed", True, "ok"),
        (c.OUTCOME_FAILED, 1, "failed", True, "ok"),  # a failing run is what incident replay reproduces
        (c.OUTCOME_FAILED, -9, "failed", False, "execution_incomplete"),  # killed
        (c.OUTCOME_CANCELLED, -15, "cancelled", False, "execution_incomplete"),
    ],
)
def test_run_verdicts(store: Store, outcome: str, exit_code: int, status: str, replayable: bool, reason: str) -> None:
    agent = Agent()
    agent.step("00000000000000a1", 1_000, b"{}", RESPONSE)
    _write(store, agent.request())
    run = store.run("acme", "prod", RUN)
    assert (run.status, run.replayable, run.reason) == ("running", False, "execution_incomplete")
    agent.run_span(outcome, exit_code)
    _write(store, agent.request())
    run = store.run("acme", "prod", RUN)
    assert (run.status, run.replayable, run.reason) == (status, replayable, reason)
    assert store.invalidate("acme", "prod", RUN, "bad data").reason == records.REASON_MANUALLY_INVALIDATED


def test_map_grows_instead_of_failing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", map_size=1 << 20, max_map_size=64 << 20)
    agent = Agent()
    for i in range(40):
        agent.step(f"{i + 1:016x}", 1_000 + i, os.urandom(64 << 10), os.urandom(16 << 10))
    _write(store, agent.request())
    assert store.env.info()["map_size"] > 1 << 20 and len(store.steps("acme", "prod", RUN)) == 40
    capped = Store(tmp_path / "small", map_size=1 << 20, max_map_size=1 << 20)
    for i in range(40):
        agent.step(f"{i + 1:016x}", 1_000 + i, os.urandom(64 << 10), b"{}")
    with pytest.raises(StoreFull):
        capped.apply([ingest.prepare(agent.request(), capped)])
    assert capped.stats()["steps"] == 0  # nothing half-written
    store.close()
    capped.close()


def _read_steps(path: str, out: "multiprocessing.Queue[int]") -> None:
    reader = Store(path, readonly=True)
    out.put(len(reader.steps("acme", "prod", RUN)))


def test_reader_process_sees_writes_after_growth(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", map_size=1 << 20)
    agent = Agent()
    for i in range(30):
        agent.step(f"{i + 1:016x}", 1_000 + i, os.urandom(64 << 10), b"{}")
    _write(store, agent.request())
    q: multiprocessing.Queue[int] = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=_read_steps, args=(str(tmp_path / "db"), q))
    proc.start()
    assert q.get(timeout=20) == 30
    proc.join(30)
    store.close()


def test_writer_acknowledges_after_commit_and_pushes_back(store: Store) -> None:
    async def scenario() -> None:
        writer = StoreWriter(store, max_pending_bytes=1 << 20)
        await writer.start()
        agents = [Agent(run_id=f"run-{i}") for i in range(20)]
        for i, agent in enumerate(agents):
            agent.step(f"{i + 1:016x}", 1_000, b'{"i":%d}' % i, RESPONSE)
        results = await asyncio.gather(*(writer.submit(a.request()) for a in agents))
        assert all(r.accepted == 1 and r.rejected == 0 for r in results)
        assert len(store.runs("acme")) == 20  # visible to readers as soon as submit returned
        assert writer.stats["commits"] < 20  # grouped into fewer transactions
        big = Agent()
        big.step("00000000000000ff", 1_000, os.urandom(600 << 10), b"{}")
        big2 = Agent()
        big2.step("00000000000000fe", 1_000, os.urandom(600 << 10), b"{}")
        outcomes = await asyncio.gather(writer.submit(big.request()), writer.submit(big2.request()),
                                        return_exceptions=True)
        assert sum(isinstance(o, Overloaded) for o in outcomes) == 1
        await writer.close()

    asyncio.run(scenario())


def test_a_cancelled_submit_keeps_its_bytes_held_until_its_batch_is_committed(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that goes away while its batch waits for a slow commit (a gRPC deadline cancels the handler):
    the batch is still queued and committed, so its bytes stay in the budget until then, and only then."""
    gate, committing = threading.Event(), threading.Event()
    apply = store.apply

    def slow_apply(*args: object, **kwargs: object) -> object:
        committing.set()
        gate.wait(30)  # the disk is slow
        return apply(*args, **kwargs)

    monkeypatch.setattr(store, "apply", slow_apply)

    async def scenario() -> None:
        writer = StoreWriter(store, max_pending_bytes=1 << 20)
        await writer.start()
        agent = Agent(run_id="run-cancelled")
        agent.step("00000000000000c1", 1_000, b'{"q": 1}', RESPONSE)
        request = agent.request()
        size = request.ByteSize()  # before `submit`: preparing moves the payloads out of the message
        reservation = writer.reserve(size)
        with reservation:
            task = asyncio.create_task(writer.submit(request, reservation=reservation))
            for _ in range(3000):  # until the writer is committing it
                if committing.is_set():
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert writer.pending_bytes == size  # queued, not committed: still held
        gate.set()
        for _ in range(500):
            if writer.pending_bytes == 0:
                break
            await asyncio.sleep(0.01)
        assert writer.pending_bytes == 0 and store.run("acme", "prod", "run-cancelled") is not None
        await writer.close()

    asyncio.run(scenario())


def test_key_layout_puts_tenant_and_scope_first() -> None:
    assert keys.run_key("t", "s", "r") == b"t\x00s\x00r"
    k = keys.envelope_key("t", "s", "ab" * 32, "r", 5, "00" * 8, 1)
    assert k.startswith(b"t\x00s\x00") and keys.split_envelope_suffix(k[len(keys.envelope_prefix("t", "s", "ab" * 32, "r")):]) == (5, "00" * 8, 1)
    with pytest.raises(keys.InvalidId):
        keys.check_id("bad\x00id", "run id")


def test_runs_and_show_read_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tracetape.cli import main

    store = Store(tmp_path / "db")
    agent = Agent()
    agent.step("00000000000000a1", 1_000, b'{"q":1}', RESPONSE)
    agent.run_span(c.OUTCOME_FAILED, -9)
    _write(store, agent.request())
    store.close()
    assert main(["runs", "--data", str(tmp_path / "db"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["run_id"], r["status"], r["replayable"]) for r in listed] == [(RUN, "failed", False)]
    assert main(["show", RUN, "--data", str(tmp_path / "db")]) == 0
    text = capsys.readouterr().out
    assert "killed by signal 9" in text and "execution_incomplete" in text and "gpt-test-0613" in text
    assert main(["show", RUN, "--data", str(tmp_path / "db"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["steps"][0]["input_tokens"] == 7 and shown["steps"][0]["attempts"] == 1
    assert main(["show", "nope", "--data", str(tmp_path / "db")]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert main(["runs", "--data", str(tmp_path / "missing")]) == 2


def test_an_overridden_tenant_is_what_the_stored_span_says(store: Store) -> None:
    agent = Agent(tenant="claimed")
    agent.step("00000000000000a1", 1_000, b"{}", RESPONSE)
    store.apply([ingest.prepare(agent.request(), store, tenant="authenticated")])
    assert store.steps("claimed", "prod", RUN) == []
    (stored,) = store.spans("authenticated", "prod", RUN)
    span = ingest.ResourceSpans.FromString(stored).scope_spans[0].spans[0]
    attrs = {kv.key: ingest.value_of(kv.value) for kv in span.attributes}
    assert (attrs[c.TENANT], attrs[c.SCOPE]) == ("authenticated", "prod")


def test_stored_span_encoding_equals_protobufs_own(store: Store) -> None:
    """The hand-built ResourceSpans wrapper around each stored span is byte-identical to protobuf's."""
    agent = Agent()
    agent.step("00000000000000a1", 1_000, b'{"q":1}', RESPONSE)
    req = agent.request()
    req.resource_spans[0].schema_url = "https://opentelemetry.io/schemas/1.30.0"
    req.resource_spans[0].scope_spans[0].schema_url = "https://example.com/scope"
    batch = ingest.prepare(req, store)  # mutates req's span in place (payloads -> refs)
    rs, ss = req.resource_spans[0], req.resource_spans[0].scope_spans[0]
    expected = ingest.ResourceSpans(
        resource=rs.resource, schema_url=rs.schema_url,
        scope_spans=[ingest.ScopeSpans(scope=ss.scope, schema_url=ss.schema_url, spans=[ss.spans[0]])],
    ).SerializeToString()
    assert batch.spans[0].stored_span == expected


def test_a_request_that_breaks_the_write_fails_alone(store: Store) -> None:
    """A batch the store cannot write (here: a step id no key can hold) must not fail its commit group."""
    from tracetape.collector.store import Batch, SpanWrite, StepWrite
    from tracetape.collector.writer import IngestFailed

    good = Agent()
    good.step("00000000000000a1", 1_000, b'{"ok":1}', RESPONSE)
    good_batch = ingest.prepare(good.request(), store)
    bad_batch = ingest.prepare(Agent(run_id="run-bad").request(), store)
    header = records.StepRecord(step_id="zz", started_ns=1, kind="model", name="x", envelope_hash="00" * 32)
    attempt = records.AttemptRecord(attempt=0, trace_id=b"\x01" * 16, span_id=b"\x01" * 8, started_ns=1,
                                    ended_ns=2, envelope_hash="00" * 32)
    bad_batch = Batch(spans=[SpanWrite("acme", "prod", "run-bad", b"acme\x00prod\x00run-bad\x00" + b"\x01" * 24,
                                       b"", step=StepWrite("acme", "prod", "run-bad", header, attempt))])

    async def scenario() -> list[object]:
        writer = StoreWriter(store)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future(), loop.create_future()]
        writer._commit([(bad_batch, loop, futures[0]), (good_batch, loop, futures[1])])
        return list(await asyncio.gather(*futures, return_exceptions=True))

    bad, ok = asyncio.run(scenario())
    assert isinstance(bad, IngestFailed) and ok.accepted == 1
    assert len(store.steps("acme", "prod", RUN)) == 1 and store.run("acme", "prod", "run-bad") is None


def test_a_request_that_fits_a_nearly_full_store_is_written_when_its_group_does_not_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full store fails a commit group; each request is then tried alone, and the one that fits is written.
    The full store is logged once, not once per request."""
    from tracetape.collector.writer import StoreUnavailable

    capped = Store(tmp_path / "small", map_size=1 << 20, max_map_size=1 << 20)
    small = Agent(run_id="run-small")
    small.step("00000000000000a1", 1_000, b'{"ok":1}', RESPONSE)
    batches = []
    for n in range(2):
        big = Agent(run_id=f"run-big-{n}")
        big.step(f"00000000000000b{n}", 1_000, os.urandom(2 << 20), b"{}")
        batches.append(ingest.prepare(big.request(), capped))
    batches.append(ingest.prepare(small.request(), capped))

    async def scenario() -> list[object]:
        writer = StoreWriter(capped)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in batches]
        writer._commit([(batch, loop, fut) for batch, fut in zip(batches, futures)])
        return list(await asyncio.gather(*futures, return_exceptions=True))

    try:
        with caplog.at_level("ERROR", logger="tracetape.collector"):
            *too_big, ok = asyncio.run(scenario())
        for refused in too_big:
            assert isinstance(refused, StoreUnavailable) and refused.retry_after >= 1 and "full" in refused.message
        assert ok.accepted == 1 and len(capped.steps("acme", "prod", "run-small")) == 1
        assert capped.run("acme", "prod", "run-big-0") is None and capped.run("acme", "prod", "run-big-1") is None
        assert sum("store full" in r.getMessage() for r in caplog.records) == 1
    finally:
        capped.close()


def test_reservations_bound_the_pending_bytes(store: Store) -> None:
    writer = StoreWriter(store, max_pending_bytes=1000)
    first = writer.reserve(5000)  # alone: admitted even over the budget
    with pytest.raises(Overloaded):
        writer.reserve(1)
    first.release()
    with writer.reserve(600) as second:
        third = writer.reserve(300)
        with pytest.raises(Overloaded):
            second.grow(1100)  # 300 held by another request + 1100 > 1000
        assert writer.pending_bytes == 900  # the refused growth took nothing
        third.release()
    assert writer.pending_bytes == 0


def test_find_run_seeks_each_tenant_and_scope(store: Store) -> None:
    """find_run jumps from one tenant/scope to the next: scopes that prefix each other must not hide runs."""
    places = [("a", "s"), ("a", "sb"), ("a", "s-b"), ("ab", "s"), ("b", "s")]
    for tenant, scope in places:
        for run in ("run-x", "run-y", "run-z"):
            agent = Agent(run_id=run, tenant=tenant, scope=scope)
            agent.step("00000000000000a1", 1_000, b"{}", RESPONSE)
            _write(store, agent.request())
    assert sorted((r.tenant, r.scope) for r in store.find_run("run-y")) == sorted(places)
    assert sorted((r.tenant, r.scope) for r in store.find_run("run-y", "a")) == [("a", "s"), ("a", "s-b"), ("a", "sb")]
    assert store.find_run("run-q") == [] and len(store.find_run("run-x", "ab", "s")) == 1


_ids = st.text(alphabet="ABYZabyz0189._:@+-", min_size=1, max_size=6)  # the id alphabet's extremes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_ids, _ids, _ids), min_size=1, max_size=10))
def test_the_key_layout_lets_find_run_seek_from_one_tenant_and_scope_to_the_next(keys_in: list[tuple[str, str, str]]) -> None:
    """What `Store.find_run`'s seek relies on: the run keys of one (tenant, scope) are exactly those in
    [`T \\0 S \\0`, `T \\0 S \\x01`), whatever other tenants, scopes and run ids (prefixes of each other
    included) the store holds, so jumping to `T \\0 S \\x01` skips that pair's runs and nothing else."""
    places = {(t, s) for t, s, _ in keys_in}
    for tenant, scope in places:
        low = keys.tenant_prefix(tenant, scope)
        high = tenant.encode() + keys.SEP + scope.encode() + b"\x01"
        for t, s, run in keys_in:
            key = keys.run_key(t, s, run)
            assert (low <= key < high) == ((t, s) == (tenant, scope)), (tenant, scope, key)


def _queue_spans(path: str, run_id: str, out: "multiprocessing.Queue[int]") -> None:
    other = Store(path)
    agent = Agent(run_id=run_id)
    agent.step("00000000000000aa", 5_000, b'{"q": "other"}', b"{}")
    agent.run_span()
    _write(other, agent.request())
    other.close()
    out.put(1)


def test_two_processes_writing_one_store_never_overwrite_each_others_outbox_entries(tmp_path: Path) -> None:
    """Each write transaction numbers its outbox entries after the newest one in the store, not after the last
    one this process wrote: a `tracetape import` into a running collector's store loses no span to forward."""
    store = Store(tmp_path / "db")
    try:
        for run_id in ("run-1", "other", "run-2"):
            if run_id == "other":  # another process writes between this one's transactions
                q: multiprocessing.Queue[int] = multiprocessing.get_context("spawn").Queue()
                proc = multiprocessing.get_context("spawn").Process(
                    target=_queue_spans, args=(str(tmp_path / "db"), run_id, q))
                proc.start()
                assert q.get(timeout=30) == 1
                proc.join(30)
                continue
            agent = Agent(run_id=run_id)
            agent.step("00000000000000bb", 6_000, f'{{"q": "{run_id}"}}'.encode(), b"{}")
            agent.run_span()
            _write(store, agent.request())
        queued = [ResourceSpans.FromString(raw).scope_spans[0].spans[0] for _, raw in store.outbox_read(100)]
        runs = sorted({next(kv.value.string_value for kv in s.attributes if kv.key == c.RUN_ID) for s in queued})
        assert len(queued) == 6 and runs == ["other", "run-1", "run-2"]
    finally:
        store.close()


def _grow_run(path: str, steps: int, started: "multiprocessing.Event") -> None:
    writer = Store(path)
    agent = Agent()
    for i in range(steps):  # one commit per step
        agent.step(f"{i + 1:016x}", 10_000 + i, f'{{"q": {i}}}'.encode(), b"{}")
        _write(writer, agent.request())
        started.set()
    writer.close()


def test_show_and_export_read_a_growing_run_as_of_one_moment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While another process commits a run one step at a time, `show --json` and `export` never mix two
    commits: the run record's step count always equals the steps (or spans) listed with it."""
    from tracetape.cli import main

    path = tmp_path / "db"
    Store(path).close()
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_grow_run, args=(str(path), 1500, started))
    proc.start()
    try:
        assert started.wait(30)
        checked = 0
        while proc.is_alive() or checked < 5:
            assert main(["show", RUN, "--data", str(path), "--json", "--tenant", "acme", "--scope", "prod"]) == 0
            shown = json.loads(capsys.readouterr().out)
            assert shown["run"]["step_count"] == len(shown["steps"])
            assert main(["export", RUN, "--data", str(path), "--tenant", "acme", "--scope", "prod"]) == 0
            lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert lines[0]["run"]["span_count"] == sum(1 for line in lines if line["type"] == "span")
            checked += 1
    finally:
        proc.join(60)
    assert checked >= 5


def test_another_programs_lmdb_is_not_a_store(tmp_path: Path) -> None:
    """An LMDB environment whose main database has a plain key named like one of the store's tables."""
    import lmdb

    env = lmdb.open(str(tmp_path / "foreign"))
    with env.begin(write=True) as txn:
        txn.put(b"runs", b"some value")
    env.close()
    for readonly in (True, False):
        with pytest.raises(StoreError, match="is not a tracetape store"):
            Store(tmp_path / "foreign", readonly=readonly)
